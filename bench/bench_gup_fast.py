"""GUP-fast figures against floors measured in the same run (perf-floor.md §4, seed 000).

Why: GUP-fast exists to be cheap per page and to keep DIO off ``mmap_lock``. Its cost can only
be judged next to what numpy itself needs for the same work on the same arrays, right now.

Figures (every in-kernel step is followed by a clean audit, else the benchmark raises):

- ``pin_fast_64`` / ``pin_fast_512``: ``pin_user_pages_fast(FOLL_WRITE)`` of 64 / 512 pages at
  random, unaligned page offsets of a prefaulted 64 MiB anonymous region (so some calls cross a
  leaf table), in pages/s; each pin is dropped (untimed) before the next call. Floor:
  perf-floor §4's "vectorised gup-fast on a flat per-VMA table" on the *same* data -- the region's PTEs as one
  flat int64 array and a copy of the kernel's int32 refcount array: copy the slice, check
  P|RW with one ``bitwise_and.reduce``, shift out the pfns, ``np.add.at(rc, pfns, 1024)``,
  re-check the slice -- at the same offsets, back to back with the kernel in each round. Goal
  at 512 pages: ratio >= 0.5. ``mirror_ns_per_page`` is what the call spends keeping
  ``kernel.extra_refs`` (an int32 array, the audit's ledger of GUP references) exact, timed
  alone.
- ``seed000_fast_vs_slow``: seed 000's effect in miniature. Four asyncio tasks each loop
  pin + unpin of their own prefaulted 64-page buffer while a fifth task loops
  mmap(MAP_POPULATE)/munmap on the same mm (mmap_lock for write, page tables freed).
  Value: pinned pages/s with ``pin_user_pages_fast``; floor: the same with
  ``pin_user_pages_unlocked`` (the slow path: mmap_lock read per call). No goal (the ratio is
  the effect). ``seed000_fast_mmap_lock_reads`` and ``seed000_fast_gup_slow`` count the
  mmap_lock read acquisitions and ``fast_gup_slow`` events during the fast runs: the goal is 0
  for both (ratio 1 when 0).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from bench._harness import BenchContext, Record, make_record
from vkernel.kernel import gup_fast as _gf
from vkernel.kernel.audit import audit
from vkernel.kernel.gup import pin_user_pages_unlocked, unpin_user_pages
from vkernel.kernel.gup_fast import pin_user_pages_fast
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mm_api import sys_mmap, sys_munmap, write_user
from vkernel.kernel.pgtable import U64_PFN_MASK, U64_SHIFT, iter_tables
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    FOLL_WRITE,
    MAP_ANONYMOUS,
    MAP_POPULATE,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

REGION = 64 << 20
KERNEL_MEMORY = 256 << 20
CALLS = 400
CALLS_QUICK = 60
PINNERS = 4
BUF_PAGES = 64
PHASE_S = 0.25
PHASE_S_QUICK = 0.08
GOAL_512 = 0.5
_NEED = np.int64(0x3)  # P|RW
_BIAS = np.int32(1024)

PageArray = npt.NDArray[np.int64]


def _check_audit(kernel: Kernel, when: str) -> None:
    """A fast wrong kernel is not a result."""
    problems = audit(kernel)
    if problems:
        raise RuntimeError(f"audit after {when}: {problems[:5]}")


async def _boot() -> tuple[Kernel, Task, int]:
    """A kernel with one process holding REGION written (4 KiB pages)."""
    kernel = Kernel(KernelConfig(memory_bytes=KERNEL_MEMORY, thp="never"))
    task = kernel.spawn("bench", "bench")
    a = await sys_mmap(task, 0, REGION, 3, MAP_PRIVATE | MAP_ANONYMOUS)
    await write_user(task, a, b"\x5a" * REGION)
    return kernel, task, a


def _flat_ptes(kernel: Kernel, task: Task, a: int) -> npt.NDArray[np.int64]:
    """The region's leaf PTEs as one flat int64 array (the floor's per-VMA table)."""
    mm = task.mm
    u = kernel.mem.u64
    flat = np.zeros(REGION >> PAGE_SHIFT, dtype=np.int64)
    for level, t, base in iter_tables(mm):
        if level != 1:
            continue
        lo = max(base, a)
        hi = min(base + (512 << PAGE_SHIFT), a + REGION)
        if lo >= hi:
            continue
        i0 = (lo - base) >> PAGE_SHIFT
        n = (hi - lo) >> PAGE_SHIFT
        flat[(lo - a) >> PAGE_SHIFT : ((lo - a) >> PAGE_SHIFT) + n] = u[
            t * 512 + i0 : t * 512 + i0 + n
        ].view(np.int64)
    pfns = (flat.view(np.uint64) & U64_PFN_MASK) >> U64_SHIFT
    assert (pfns > 0).all()
    return flat


def _floor(
    flat: npt.NDArray[np.int64], rc: npt.NDArray[np.int32], offs: list[int], n: int
) -> float:
    """perf-floor §4's flat vectorised gup at ``offs``: seconds for all calls."""
    t = 0.0
    for i in offs:
        t0 = time.perf_counter()
        seg = flat[i : i + n].copy()
        if np.bitwise_and.reduce(seg) & _NEED != _NEED:
            raise RuntimeError("floor: PTE not present+writable")
        pfns = (seg >> 12) & 0xFFFFFFFFFF
        np.add.at(rc, pfns, _BIAS)
        if not (flat[i : i + n] == seg).all():
            raise RuntimeError("floor: PTE changed")
        t += time.perf_counter() - t0
        np.subtract.at(rc, pfns, _BIAS)
    return t


async def _kernel_pins(kernel: Kernel, task: Task, a: int, offs: list[int], n: int) -> float:
    """pin_user_pages_fast at ``offs``: seconds for all calls (each unpin, untimed, follows its
    pin: the DIO pattern pin → I/O → unpin)."""
    mm = task.mm
    pages = np.empty(n, dtype=np.int64)
    t = 0.0
    for i in offs:
        t0 = time.perf_counter()
        got = await pin_user_pages_fast(mm, a + (i << PAGE_SHIFT), n, FOLL_WRITE, pages)
        t += time.perf_counter() - t0
        if got != n:
            raise RuntimeError(f"pin_user_pages_fast returned {got}, wanted {n}")
        unpin_user_pages(kernel, pages, n)
    return t


def _mirror_cost(kernel: Kernel, task: Task, a: int, n: int, calls: int) -> float:
    """Seconds per call spent by gup_fast's extra_refs mirror alone (then undone, untimed)."""
    pages = np.empty(n, dtype=np.int64)
    from vkernel.kernel.gup import put_pages
    from vkernel.kernel.gup_fast import get_user_pages_fast_only

    if get_user_pages_fast_only(task.mm, a, n, 0, pages) != n:
        raise RuntimeError("fast_only failed")
    put_pages(kernel, pages, n)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        _gf._mirror(kernel, pages, 1024, None)
        dt = time.perf_counter() - t0
        _gf._unmirror(kernel, pages, 1024, None)
        best = min(best, dt)
    return best


async def _seed000(ctx: BenchContext, fast: bool) -> dict[str, float]:
    """Pinners (fast or slow GUP) against an mmap/munmap loop on one mm; pages/s and counts."""
    kernel = Kernel(KernelConfig(memory_bytes=KERNEL_MEMORY, thp="never"))
    task = kernel.spawn("seed000", "bench")
    mm = task.mm
    bufs = []
    for _ in range(PINNERS):
        b = await sys_mmap(task, 0, BUF_PAGES * PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS)
        await write_user(task, b, b"\x01" * (BUF_PAGES * PAGE_SIZE))
        bufs.append(b)
    stop = False
    pinned = [0]

    async def pinner(b: int) -> None:
        pages = np.empty(BUF_PAGES, dtype=np.int64)
        while not stop:
            if fast:
                got = await pin_user_pages_fast(mm, b, BUF_PAGES, FOLL_WRITE, pages)
            else:
                got = await pin_user_pages_unlocked(mm, b, BUF_PAGES, pages, FOLL_WRITE)
            if got != BUF_PAGES:
                raise RuntimeError(f"pin returned {got}")
            unpin_user_pages(kernel, pages, got)
            pinned[0] += got
            await asyncio.sleep(0)

    async def mapper() -> None:
        while not stop:
            m = await sys_mmap(
                task, 0, 16 * PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE
            )
            await sys_munmap(task, m, 16 * PAGE_SIZE)
            await asyncio.sleep(0)

    reads0 = mm.mmap_lock.stats()["read_acquired"]
    slow0 = kernel.vmstat["fast_gup_slow"]
    tasks = [asyncio.ensure_future(pinner(b)) for b in bufs]
    tasks.append(asyncio.ensure_future(mapper()))
    t0 = time.perf_counter()
    await asyncio.sleep(PHASE_S_QUICK if ctx.quick else PHASE_S)
    stop = True
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t0
    reads = mm.mmap_lock.stats()["read_acquired"] - reads0
    slow = kernel.vmstat["fast_gup_slow"] - slow0
    _check_audit(kernel, f"seed000 {'fast' if fast else 'slow'}")
    return {"pages_s": pinned[0] / dt, "reads": float(reads), "slow": float(slow)}


async def run(ctx: BenchContext) -> list[Record]:
    """Interleave kernel and floor per round; then seed 000's fast-vs-slow miniature."""
    calls = ctx.n(CALLS, CALLS_QUICK)
    kernel, task, a = await _boot()
    flat = _flat_ptes(kernel, task, a)
    rc = kernel.mem.refcount.copy()
    npages = REGION >> PAGE_SHIFT
    rnd = random.Random(4)
    samples: dict[str, list[float]] = {k: [] for k in ("k64", "f64", "k512", "f512")}
    for r in range(ctx.rounds):
        for n in (64, 512):
            offs = [rnd.randrange(0, npages - n) for _ in range(calls)]
            if r % 2:
                kt = await _kernel_pins(kernel, task, a, offs, n)
                ft = _floor(flat, rc, offs, n)
            else:
                ft = _floor(flat, rc, offs, n)
                kt = await _kernel_pins(kernel, task, a, offs, n)
            samples[f"k{n}"].append(calls * n / kt)
            samples[f"f{n}"].append(calls * n / ft)
        _check_audit(kernel, f"round {r}")
    mirror = {n: _mirror_cost(kernel, task, a, n, 50) for n in (64, 512)}
    _check_audit(kernel, "mirror timing")
    fast_s: list[float] = []
    slow_s: list[float] = []
    reads: list[float] = []
    slows: list[float] = []
    for r in range(ctx.rounds):
        order = (True, False) if r % 2 else (False, True)
        for fast in order:
            res = await _seed000(ctx, fast)
            if fast:
                fast_s.append(res["pages_s"])
                reads.append(res["reads"])
                slows.append(res["slow"])
            else:
                slow_s.append(res["pages_s"])
    common: dict[str, Any] = {
        "region_bytes": REGION,
        "calls_per_round": calls,
        "audit": "clean after every round",
        "floor_op": "perf-floor §4 flat vectorised gup (copy, and-reduce, add.at 1024, recheck)",
    }
    recs = [
        make_record(
            f"pin_fast_{n}",
            samples[f"k{n}"],
            "pages/s",
            floor=samples[f"f{n}"],
            goal=GOAL_512 if n == 512 else None,
            better="higher",
            pages_per_call=n,
            mirror_ns_per_page=round(mirror[n] * 1e9 / n, 1),
            **common,
        )
        for n in (64, 512)
    ]
    recs.append(
        make_record(
            "seed000_fast_vs_slow",
            fast_s,
            "pages/s",
            floor=slow_s,
            goal=None,
            better="higher",
            pinners=PINNERS,
            buffer_pages=BUF_PAGES,
            floor_op="pin_user_pages_unlocked (slow path, mmap_lock read per call)",
            competing="one task looping mmap(MAP_POPULATE) / munmap on the same mm",
        )
    )
    for name, vals in (("seed000_fast_mmap_lock_reads", reads), ("seed000_fast_gup_slow", slows)):
        rec = make_record(name, vals, "count", floor=None, goal=1.0, better="lower")
        rec["ratio"] = 1.0 if max(vals) == 0 else 0.0
        rec["ratio_basis"] = "1 when every fast round counted 0, else 0"
        recs.append(rec)
    return recs
