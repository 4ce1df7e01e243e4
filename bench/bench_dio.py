"""O_DIRECT and AIO through pinned user pages (issue 7): the seed 004 job and seed 000's switch.

In-process (no gRPC), on a RAM device with no latency, so the figures are the kernel's path:
an AIO ring of depth 64 doing 4 KiB O_DIRECT reads over the file (the seed 004 job, 1 GiB,
16 MiB under --quick), every I/O pinning and unpinning its buffer page.

- ``dio.seed004_iops`` against a floor measured in the same run: one Python thread doing
  4 KiB ``os.preadv`` into a shared memfd mapping from a page-cached host file (goal ≥ 0.5);
  clat percentiles (issue → completion, ns) ride along;
- ``dio.pin_vs_get_iops``: FOLL_PIN IOPS against FOLL_GET IOPS (goal: within 2%, ≥ 0.98);
- ``dio.seed000_fast_vs_slow_iops``: the same job while another task of the same process
  loops mmap/munmap: GUP-fast IOPS against slow GUP under mmap_lock (goal ≥ 1.1), with
  ``fast_gup_slow`` and the mmap_lock read acquisitions counted over the GUP-fast run.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._harness import BenchContext, make_record
from vkernel.kernel import aio
from vkernel.kernel.audit import audit
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.fs import O_CREAT, O_DIRECT, O_RDWR
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mmap import sys_mmap, sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import write_user
from vkernel.kernel.uapi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE

P = 4096
MiB = 1 << 20
DEPTH = 64
FULL = 1 << 30
QUICK = 16 * MiB


async def _setup(region: int) -> tuple[Kernel, Task, int, int]:
    """A kernel with a RAM disk, a laid-out file of ``region`` bytes and a touched buffer."""
    k = Kernel(KernelConfig(memory_bytes=256 * MiB))
    k.vfs.add_device(DeviceSpec.parse(f"bench0=ram:{region // MiB + 64}M"))
    t = k.spawn("vkfio", "bench")
    fd, _ = k.vfs.do_sys_open(t, "reader.0.0", O_CREAT | O_RDWR | O_DIRECT, "disk", "bench0")
    buf = await sys_mmap(t, 0, DEPTH * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    await write_user(t, buf, b"\xa5" * (DEPTH * P))
    ctx = aio.KioCtx(t, DEPTH)
    for off in range(0, region, DEPTH * P):  # layout: direct writes of the buffer
        ctx.submit([aio.Iocb(aio.IOCB_CMD_PWRITE, fd, [(buf, DEPTH * P)], off)])
        await ctx.getevents(1, 1)
    await ctx.destroy()
    return k, t, fd, buf


async def _job(t: Task, fd: int, buf: int, region: int, gup: str, foll: str) -> dict[str, Any]:
    """The seed job: rw=read, bs=4k, iodepth=64 over ``region``; IOPS and clat samples."""
    ctx = aio.KioCtx(t, DEPTH, gup=gup, foll=foll)
    n = region // P
    nxt = 0
    free = list(range(DEPTH))
    clat: list[int] = []
    t0 = time.perf_counter()
    while nxt < n or len(free) < DEPTH:
        cbs = []
        while free and nxt < n:
            s = free.pop()
            cbs.append(aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(buf + s * P, P)], nxt * P, s))
            nxt += 1
        if cbs:
            ctx.submit(cbs)
        for e in await ctx.getevents(1, DEPTH):
            if e.res != P:
                raise RuntimeError(f"I/O failed: {e.res}")
            free.append(e.user_data)
            clat.append(e.complete_ns - e.issue_ns)
    dt = time.perf_counter() - t0
    await ctx.destroy()
    return {"iops": n / dt, "clat": clat}


async def _mmap_loop(t: Task, stop: asyncio.Event) -> int:
    """Seed 000's contender: another task of the process looping mmap/munmap."""
    loops = 0
    while not stop.is_set():
        a = await sys_mmap(t, 0, 16 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        await sys_munmap(t, a, 16 * P)
        loops += 1
        await asyncio.sleep(0)
    return loops


def _floor(path: str, region: int) -> float:
    """One thread: 4 KiB os.preadv into a shared memfd mapping from a page-cached file."""
    mfd = os.memfd_create("dio-floor")
    os.ftruncate(mfd, DEPTH * P)
    m = mmap.mmap(mfd, DEPTH * P, mmap.MAP_SHARED)
    mv = memoryview(m)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = region // P
        t0 = time.perf_counter()
        for i in range(n):
            s = (i % DEPTH) * P
            os.preadv(fd, [mv[s : s + P]], i * P)
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        mv.release()
        m.close()
        os.close(mfd)


def _write_host(path: Path, region: int) -> None:
    """The floor's host file, ``region`` bytes (left in the host page cache)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(region // MiB))


def _pcts(clat: list[int]) -> dict[str, int]:
    a = np.asarray(clat, dtype=np.float64)
    return {f"clat_p{p}_ns": int(np.percentile(a, p)) for p in (50, 90, 99, 99.9)}


async def run(ctx: BenchContext) -> list[dict[str, Any]]:
    """The four figures, interleaved per round."""
    region = QUICK if ctx.quick else FULL
    rounds = min(ctx.rounds, 3 if ctx.quick else 5)
    host = ctx.scratch / "floor.dat"
    _write_host(host, region)
    _floor(str(host), min(region, 64 * MiB))  # warm the host page cache
    k, t, fd, buf = await _setup(region)
    pin: list[float] = []
    get: list[float] = []
    floor: list[float] = []
    fast: list[float] = []
    slow: list[float] = []
    clat: list[int] = []
    fast_slow_calls = 0
    lock_reads = 0
    for r in range(rounds):
        res = await _job(t, fd, buf, region, "fast", "pin")
        pin.append(res["iops"])
        clat = res["clat"]
        floor.append(_floor(str(host), region))
        get.append((await _job(t, fd, buf, region, "fast", "get"))["iops"])
        order = ("fast", "slow") if r % 2 == 0 else ("slow", "fast")
        for mode in order:
            stop = asyncio.Event()
            loop = asyncio.ensure_future(_mmap_loop(t, stop))
            vs0 = k.vmstat["fast_gup_slow"]
            lk = t.mm.mmap_lock
            l0 = lk._read_acquired
            iops = (await _job(t, fd, buf, region, mode, "pin"))["iops"]
            l1 = lk._read_acquired
            stop.set()
            await loop
            if mode == "fast":
                fast.append(iops)
                fast_slow_calls += k.vmstat["fast_gup_slow"] - vs0
                lock_reads += l1 - l0
            else:
                slow.append(iops)
        problems = audit(k)
        if problems:
            raise RuntimeError(f"audit after round {r}: {problems[:5]}")
    k.do_exit(t)
    await k.vfs.shutdown()
    host.unlink()
    extra = {"region_mib": region // MiB, "iodepth": DEPTH, "bs": P, "device": "ram, latency 0"}
    return [
        make_record(
            "dio.seed004_iops",
            pin,
            "IOPS",
            floor=floor,
            goal=0.5,
            better="higher",
            **extra,
            **_pcts(clat),
        ),
        make_record(
            "dio.pin_vs_get_iops", pin, "IOPS", floor=get, goal=0.98, better="higher", **extra
        ),
        make_record(
            "dio.seed000_fast_vs_slow_iops",
            fast,
            "IOPS",
            floor=slow,
            goal=1.1,
            better="higher",
            fast_gup_slow=fast_slow_calls,
            mmap_lock_read_acquisitions_fast=lock_reads,
            **extra,
        ),
    ]
