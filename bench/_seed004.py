"""The seed 004 job's pieces that bench_dio and bench_vkfio share: the os.preadv floor, its
host file, and the job's two in-process loops (per-iocb objects, struct-of-arrays).

The job is fio's ``rw=read, bs=4k, iodepth=64, ioengine=libaio, direct=1`` over a file on a
RAM disk, through a 64-page buffer: each I/O reads one page into its slot of the buffer.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np

from vkernel.kernel import aio
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.fs import O_CREAT, O_DIRECT, O_RDWR
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mmap import sys_mmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import write_user
from vkernel.kernel.uapi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE

P = 4096
MiB = 1 << 20
DEPTH = 64


def write_host(path: Path, region: int) -> None:
    """The floor's host file, ``region`` bytes (left in the host page cache)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(region // MiB))


async def setup_kernel(region: int, *devices: str) -> tuple[Kernel, Task, int, int]:
    """An in-process kernel with a RAM disk ``bench0`` (plus ``devices``), the job's file laid
    out over ``region`` bytes by direct writes, and a touched 64-page buffer:
    (kernel, task, fd, buffer address)."""
    k = Kernel(KernelConfig(memory_bytes=256 * MiB))
    k.vfs.add_device(DeviceSpec.parse(f"bench0=ram:{region // MiB + 64}M"))
    for spec in devices:
        k.vfs.add_device(DeviceSpec.parse(spec))
    t = k.spawn("vkfio", "bench")
    fd, _ = k.vfs.do_sys_open(t, "reader.0.0", O_CREAT | O_RDWR | O_DIRECT, "disk", "bench0")
    buf = await sys_mmap(t, 0, DEPTH * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    await write_user(t, buf, b"\xa5" * (DEPTH * P))
    ctx = aio.KioCtx(t, DEPTH)
    for off in range(0, region, DEPTH * P):
        ctx.submit([aio.Iocb(aio.IOCB_CMD_PWRITE, fd, [(buf, DEPTH * P)], off)])
        await ctx.getevents(1, 1)
    await ctx.destroy()
    return k, t, fd, buf


class PreadvFloor:
    """The issue's floor: one Python thread doing 4 KiB ``os.preadv`` into a shared memfd
    mapping (a 64-page buffer, as the job's) from a page-cached host file."""

    def __init__(self, path: str) -> None:
        self._mfd = os.memfd_create("dio-floor")
        os.ftruncate(self._mfd, DEPTH * P)
        self._map = mmap.mmap(self._mfd, DEPTH * P, mmap.MAP_SHARED)
        self._mv = memoryview(self._map)
        self._fd = os.open(path, os.O_RDONLY)

    def run(self, first: int, n: int) -> float:
        """Pages [first, first+n) of the file, in order: seconds taken."""
        mv, fd = self._mv, self._fd
        t0 = time.perf_counter()
        for i in range(first, first + n):
            s = (i % DEPTH) * P
            os.preadv(fd, [mv[s : s + P]], i * P)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Unmap and close everything."""
        os.close(self._fd)
        self._mv.release()
        self._map.close()
        os.close(self._mfd)


async def job_sqes(
    t: Task, fd: int, buf: int, first: int, n: int, gup: str, foll: str, clat: list[int] | None
) -> tuple[float, float]:
    """The seed job (rw=read, bs=4k, iodepth=64) over pages [first, first+n) through the
    struct-of-arrays path, as fio's libaio engine runs it: reap what completed
    (``getevents_array``), refill the free slots with the next offsets as arrays
    (``io_submit_sqes``). (wall, CPU) seconds taken."""
    ctx = aio.KioCtx(t, DEPTH, gup=gup, foll=foll)
    nxt = first
    end = first + n
    free = np.arange(DEPTH, dtype=np.int64)  # buffer slots not in flight
    ops = np.full(DEPTH, aio.IOCB_CMD_PREAD, dtype=np.int64)
    fds = np.full(DEPTH, fd, dtype=np.int64)
    lens = np.full(DEPTH, P, dtype=np.int64)
    steps = np.arange(DEPTH, dtype=np.int64) * P
    inflight = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while nxt < end or inflight:
        k = min(len(free), end - nxt)
        if k:
            s, free = free[:k], free[k:]
            ctx.io_submit_sqes(ops[:k], fds[:k], buf + s * P, lens[:k], nxt * P + steps[:k], s)
            nxt += k
            inflight += k
        ev = await ctx.getevents_array(1, DEPTH)
        if (ev.res != P).any():
            raise RuntimeError(f"I/O failed: {ev.res[ev.res != P][:4].tolist()}")
        free = np.concatenate((free, ev.user_data.astype(np.int64)))
        inflight -= len(ev.res)
        if clat is not None:
            clat.extend((ev.complete_ns - ev.issue_ns).tolist())
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await ctx.destroy()
    return dt, cpu


async def job_iocbs(
    t: Task, fd: int, buf: int, first: int, n: int, gup: str, foll: str, clat: list[int] | None
) -> tuple[float, float]:
    """The seed job (rw=read, bs=4k, iodepth=64) over pages [first, first+n) through the
    per-iocb path (an ``Iocb`` and an ``IoEvent`` per I/O): (wall, CPU) seconds taken."""
    ctx = aio.KioCtx(t, DEPTH, gup=gup, foll=foll)
    nxt = first
    end = first + n
    free = list(range(DEPTH))
    c0 = time.process_time()
    t0 = time.perf_counter()
    while nxt < end or len(free) < DEPTH:
        cbs = []
        while free and nxt < end:
            s = free.pop()
            cbs.append(aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(buf + s * P, P)], nxt * P, s))
            nxt += 1
        if cbs:
            ctx.submit(cbs)
        for e in await ctx.getevents(1, DEPTH):
            if e.res != P:
                raise RuntimeError(f"I/O failed: {e.res}")
            free.append(e.user_data)
            if clat is not None:
                clat.append(e.complete_ns - e.issue_ns)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await ctx.destroy()
    return dt, cpu
