"""O_DIRECT and AIO through pinned user pages (issue 7): the seed 004 job and seed 000's switch.

In-process (no gRPC), on a RAM device with no latency, so the figures are the kernel's path:
an AIO ring of depth 64 doing 4 KiB O_DIRECT reads over the file (the seed 004 job, 1 GiB,
16 MiB under --quick), every I/O pinning and unpinning its buffer page (``nr_foll_pin_*``
count them). The seed 004 and FOLL_PIN/FOLL_GET jobs use the struct-of-arrays path
(``KioCtx.io_submit_sqes`` → ``dio_batch.iomap_dio_submit_array``, reaped with
``getevents_array``) the way fio's libaio engine drives a ring; the same job through the
per-iocb path (``KioCtx.submit`` with ``Iocb`` objects → ``dio_batch.iomap_dio_submit``) takes
its turn too (``iocb_path_*``: the figure before the array path). Seed 000 stays on the
per-iocb path (both GUP modes run in a task of their own there, so only the GUP differs).

Each round reads the file once per configuration, in ``CHUNKS`` pieces (8 under --quick), and
the configurations take turns piece by piece (the order rotates and every pair swaps, see
:func:`_order`), so a slow phase of the machine or a warm cache hits them all alike; the
records' ratios are medians of the per-round paired ratios, with the per-round range. FOLL_PIN
vs FOLL_GET also reports the ratio of the CPU time per I/O, FOLL_GET's over FOLL_PIN's
(``time.process_time``: other processes on the machine do not count) -- per round, and as the
median (and quartiles) over all pieces of the piece-by-piece ratio, the estimate least moved by
a noisy neighbour -- and the ratio of the IOPS pooled over all rounds.

- ``dio.seed004_iops``: FOLL_PIN IOPS against a floor measured in the same pieces: one
  Python thread doing 4 KiB ``os.preadv`` into a shared memfd mapping from a page-cached host
  file (goal ≥ 0.5); clat percentiles (issue → completion, ns) ride along;
- ``dio.pin_vs_get_iops``: FOLL_PIN IOPS against FOLL_GET IOPS (goal: within 2%, ≥ 0.98);
- ``dio.seed000_fast_vs_slow_iops``: the same job while a contender task of the same process
  holds mmap_lock for write across device waits (see :func:`_contender`): GUP-fast IOPS
  against slow GUP (goal ≥ 1.1), with ``fast_gup_slow`` and the mmap_lock read acquisitions
  over the GUP-fast pieces (both must be 0: the contender only takes the lock for write, so
  any read acquisition would be the I/O path's), and the share of the slow-GUP pieces' time
  the I/O task spent queued on mmap_lock (the seed's ``__down_read`` share).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench._harness import BenchContext, make_record
from bench._seed004 import (
    DEPTH,
    MiB,
    P,
    PreadvFloor,
    job_iocbs,
    job_sqes,
    setup_kernel,
    write_host,
)
from vkernel.kernel import aio, pagecache
from vkernel.kernel.audit import audit
from vkernel.kernel.fs import O_CREAT, O_DIRECT, O_RDONLY, O_RDWR
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mmap import sys_mmap, sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    MAP_POPULATE,
    MAP_PRIVATE,
    PROT_READ,
)

FULL = 1 << 30
QUICK = 16 * MiB
CHUNKS = 32
"""Pieces per round and configuration (interleaved); 8 under --quick."""
CONTENDER_DEVICE = "cold0=ram:32M,latency=1ms,qd=4"
"""Where the contender's file lives: a slow disk (1 ms a request)."""
CONTENDER_WINDOW = 32 * P
"""Bytes the contender maps (and populates) per iteration."""
CONTENDER_THINK = 0.002
"""Seconds the contender works between two mappings (outside mmap_lock)."""


async def _setup(region: int) -> tuple[Kernel, Task, int, int, int]:
    """The seed job's kernel (see :func:`bench._seed004.setup_kernel`) plus the contender's
    file on a slow disk."""
    k, t, fd, buf = await setup_kernel(region, CONTENDER_DEVICE)
    ctx = aio.KioCtx(t, DEPTH)
    cfd, _ = k.vfs.do_sys_open(t, "cold.dat", O_CREAT | O_RDWR | O_DIRECT, "disk", "cold0")
    for off in range(0, 16 * MiB, DEPTH * P):
        ctx.submit([aio.Iocb(aio.IOCB_CMD_PWRITE, cfd, [(buf, DEPTH * P)], off)])
        await ctx.getevents(1, 1)
    await ctx.destroy()
    k.vfs.close(t, cfd)
    cold, _ = k.vfs.do_sys_open(t, "cold.dat", O_RDONLY, "disk", "cold0")
    return k, t, fd, buf, cold


@dataclass
class _Contention:
    """What the contender did, and how long it held mmap_lock for write."""

    loops: int = 0
    write_hold_ns: list[int] = field(default_factory=list)


async def _contender(t: Task, cold: int, stop: asyncio.Event, out: _Contention) -> None:
    """Seed 000's contender: another thread of the process mapping a file and unmapping it.

    Each iteration does ``mmap(MAP_PRIVATE|MAP_POPULATE)`` of a 128 KiB window of a file on a
    1 ms disk, ``munmap`` of it, ``posix_fadvise(DONTNEED)`` of the file (so the next populate
    reads the disk again) and a 2 ms sleep away from the lock. The populate is what makes the
    contention real: in the 2.6.2x kernels of the seed (2008), ``do_mmap_pgoff`` called
    ``make_pages_present`` for MAP_POPULATE inside ``down_write(&mm->mmap_sem)``, so the
    mapping thread sleeps on the disk with mmap_sem held for write (vkernel's ``sys_mmap``
    populates under the write lock the same way; Linux moved ``mm_populate`` out of the lock in
    3.9). Every slow GUP (``down_read``) queues behind it; GUP-fast never looks at the lock.
    """
    win = CONTENDER_WINDOW
    assert t.mm is not None
    ino = t.mm.kernel.vfs.fget(t, cold).inode
    nwin = (16 * MiB) // win
    lk = t.mm.mmap_lock
    i = 0
    while not stop.is_set():
        h0 = lk.stats()["write_hold_ns_total"]
        a = await sys_mmap(t, 0, win, PROT_READ, MAP_PRIVATE | MAP_POPULATE, cold, (i % nwin) * win)
        out.write_hold_ns.append(int(lk.stats()["write_hold_ns_total"] - h0))
        await sys_munmap(t, a, win)
        if ino.mapping is not None:
            pagecache.drop_clean_pages(ino.mapping)  # POSIX_FADV_DONTNEED: no mmap_lock
        i += 1
        out.loops += 1
        await asyncio.sleep(CONTENDER_THINK)


def _pcts(clat: list[int]) -> dict[str, int]:
    a = np.asarray(clat, dtype=np.float64)
    return {f"clat_p{p}_ns": int(np.percentile(a, p)) for p in (50, 90, 99, 99.9)}


def _pooled(rates: list[float]) -> float:
    """The rate over all rounds together (each round did the same number of I/Os)."""
    return len(rates) / sum(1 / x for x in rates)


def _rotate(names: list[str], i: int) -> list[str]:
    """The i-th rotation: every configuration goes first equally often."""
    k = i % len(names)
    return names[k:] + names[:k]


def _order(names: list[str], i: int) -> list[str]:
    """The i-th order of a piece's configurations: a rotation, with the first two swapped
    every other cycle. A rotation alone keeps the cyclic order, so the second would always
    run right after the first -- on the same piece of the file, with the device's pages warm
    in the CPU caches (that alone made FOLL_GET look ≈ 4% faster than FOLL_PIN)."""
    order = _rotate(names, i)
    if (i // len(names)) % 2:
        a, b = names[0], names[1]
        order = [b if m == a else a if m == b else m for m in order]
    return order


async def run(ctx: BenchContext) -> list[dict[str, Any]]:
    """The figures, interleaved piece by piece within each round."""
    region = QUICK if ctx.quick else FULL
    rounds = min(ctx.rounds, 3 if ctx.quick else 5)
    host = ctx.scratch / "floor.dat"
    write_host(host, region)
    k, t, fd, buf, cold = await _setup(region)
    fl = PreadvFloor(str(host))
    fl.run(0, region // P)  # warm the host page cache
    npages = region // P
    chunks = 8 if ctx.quick else CHUNKS
    piece = npages // chunks
    iops: dict[str, list[float]] = {m: [] for m in ("pin", "get", "iocb", "floor", "fast", "slow")}
    clat: list[int] = []
    fast_slow_calls = 0
    fast_lock_reads = 0
    slow_wait_share: list[float] = []
    hold_share: list[float] = []
    contention = _Contention()
    lk = t.mm.mmap_lock
    cpu_ratio: list[float] = []
    piece_cpu_ratio: list[float] = []  # the same piece, FOLL_GET's CPU over FOLL_PIN's
    cpu_us: dict[str, list[float]] = {"pin": [], "get": []}
    for r in range(rounds):
        secs = dict.fromkeys(iops, 0.0)
        cpu = {"pin": 0.0, "get": 0.0, "iocb": 0.0}
        clat = []
        for c in range(chunks):  # seed 004: FOLL_PIN, FOLL_GET, the per-iocb path, the floor
            first = c * piece
            here = {}
            for m in _order(["pin", "get", "iocb", "floor"], r * chunks + c):
                if m == "floor":
                    secs[m] += fl.run(first, piece)
                    continue
                if m == "iocb":  # the same job through Iocb objects (the path before arrays)
                    wall, used = await job_iocbs(t, fd, buf, first, piece, "fast", "pin", [])
                    secs[m] += wall
                    cpu[m] += used
                    continue
                # both collect clat (the same work per I/O); pin's are the ones reported
                wall, used = await job_sqes(
                    t, fd, buf, first, piece, "fast", m, clat if m == "pin" else []
                )
                secs[m] += wall
                cpu[m] += used
                here[m] = used
            piece_cpu_ratio.append(here["get"] / here["pin"])
        cpu_ratio.append(cpu["get"] / cpu["pin"])
        for m, used in cpu.items():
            cpu_us.setdefault(m, []).append(used / (piece * chunks) * 1e6)
        stop = asyncio.Event()
        loop = asyncio.ensure_future(_contender(t, cold, stop, contention))
        wait_ns = 0
        w0, t0 = lk.stats()["write_hold_ns_total"], time.perf_counter_ns()
        for c in range(chunks):  # seed 000: GUP-fast and slow GUP under the same contender
            first = c * piece
            for m in _order(["fast", "slow"], r * chunks + c):
                vs0 = k.vmstat["fast_gup_slow"]
                st0 = lk.stats()
                secs[m] += (await job_iocbs(t, fd, buf, first, piece, m, "pin", None))[0]
                st1 = lk.stats()
                if m == "fast":
                    fast_slow_calls += k.vmstat["fast_gup_slow"] - vs0
                    fast_lock_reads += int(st1["read_acquired"] - st0["read_acquired"])
                else:
                    wait_ns += int(st1["read_wait_ns_total"] - st0["read_wait_ns_total"])
        hold_share.append((lk.stats()["write_hold_ns_total"] - w0) / (time.perf_counter_ns() - t0))
        stop.set()
        await loop
        slow_wait_share.append(wait_ns / 1e9 / secs["slow"])
        for m, s in secs.items():
            iops[m].append(piece * chunks / s)
        problems = audit(k)
        if problems:
            raise RuntimeError(f"audit after round {r}: {problems[:5]}")
    acq, rel = k.vmstat["nr_foll_pin_acquired"], k.vmstat["nr_foll_pin_released"]
    if acq != rel:
        raise RuntimeError(f"pins not balanced: {acq} acquired, {rel} released")
    fl.close()
    k.do_exit(t)
    await k.vfs.shutdown()
    host.unlink()
    holds = np.asarray(contention.write_hold_ns or [0], dtype=np.float64)
    extra = {"region_mib": region // MiB, "iodepth": DEPTH, "bs": P, "device": "ram, latency 0"}
    return [
        make_record(
            "dio.seed004_iops",
            iops["pin"],
            "IOPS",
            floor=iops["floor"],
            goal=0.5,
            better="higher",
            engine="io_submit_sqes / getevents_array",
            cpu_us_per_io=round(float(np.median(cpu_us["pin"])), 2),
            iocb_path_iops=round(float(np.median(iops["iocb"]))),
            iocb_path_ratio=round(
                float(np.median(np.asarray(iops["iocb"]) / np.asarray(iops["floor"]))), 4
            ),
            iocb_path_cpu_us_per_io=round(float(np.median(cpu_us["iocb"])), 2),
            **extra,
            **_pcts(clat),
        ),
        make_record(
            "dio.pin_vs_get_iops",
            iops["pin"],
            "IOPS",
            floor=iops["get"],
            goal=0.98,
            better="higher",
            cpu_ratio=round(float(np.median(cpu_ratio)), 4),
            cpu_ratio_min=round(min(cpu_ratio), 4),
            cpu_ratio_max=round(max(cpu_ratio), 4),
            cpu_us_per_io_pin=round(float(np.median(cpu_us["pin"])), 2),
            cpu_us_per_io_get=round(float(np.median(cpu_us["get"])), 2),
            pooled_ratio=round(_pooled(iops["pin"]) / _pooled(iops["get"]), 4),
            piece_cpu_ratio_median=round(float(np.median(piece_cpu_ratio)), 4),
            piece_cpu_ratio_p25=round(float(np.percentile(piece_cpu_ratio, 25)), 4),
            piece_cpu_ratio_p75=round(float(np.percentile(piece_cpu_ratio, 75)), 4),
            pieces=len(piece_cpu_ratio),
            **extra,
        ),
        make_record(
            "dio.seed000_fast_vs_slow_iops",
            iops["fast"],
            "IOPS",
            floor=iops["slow"],
            goal=1.1,
            better="higher",
            fast_gup_slow=fast_slow_calls,
            mmap_lock_read_acquisitions_fast=fast_lock_reads,
            slow_gup_mmap_lock_wait_share=round(float(np.median(slow_wait_share)), 4),
            slow_gup_mmap_lock_wait_share_min=round(min(slow_wait_share), 4),
            slow_gup_mmap_lock_wait_share_max=round(max(slow_wait_share), 4),
            contender=f"mmap MAP_POPULATE {CONTENDER_WINDOW // 1024} KiB of a file on "
            f"{CONTENDER_DEVICE.split('=', 1)[1]}; munmap; fadvise DONTNEED; "
            f"{CONTENDER_THINK * 1e3:g} ms think",
            contender_write_hold_share=round(float(np.median(hold_share)), 4),
            contender_loops=contention.loops,
            contender_write_hold_ms_p50=round(float(np.percentile(holds, 50)) / 1e6, 3),
            **extra,
        ),
    ]
