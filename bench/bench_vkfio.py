"""vkfio: the seed 004 job (rw=read, bs=4k, iodepth=64, libaio, O_DIRECT) through the daemon.

What a fio user of vkernel sees: vkfio in this process, the daemon (``python -m vkernel
serve``) in its own, every I/O crossing the gRPC Ring stream and pinning its page. 64 MiB
per run (16 MiB under --quick) on the daemon's default RAM device, rounds interleaved with
the floors:

- ``vkfio.seed004_iops``: vkfio's read IOPS against bench_dio's floor, one Python thread doing
  4 KiB ``os.preadv`` into a shared memfd mapping from a page-cached host file;
- ``vkfio.daemon_vs_inprocess_iops``: the same IOPS against the same job run on an
  in-process kernel's AIO context through the struct-of-arrays path (``io_submit_sqes``, what
  the daemon runs for vkfio's IocbBatch; no gRPC): the share of the kernel's speed that
  survives the transport and the client. The in-process per-iocb path's IOPS ride along
  (``inprocess_iocb_path_iops``).

clat percentiles, the Ring batch sizes (fio's ``iodepth_submit`` / ``iodepth_complete``) and
vkfio's own CPU ride along, from vkfio's fio JSON of the last round.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._harness import BenchContext, make_record
from bench._vkernel import vkernel_daemon
from vkclient import vkfio
from vkernel.kernel import aio
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.fs import O_CREAT, O_DIRECT, O_RDWR
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mmap import sys_mmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import write_user
from vkernel.kernel.uapi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE

P = 4096
DEPTH = 64
MiB = 1 << 20
FULL = 64 * MiB
QUICK = 16 * MiB
SEED_JOB = """
[reader]
direct=1
ioengine=libaio
blocksize=4096
size={size}
numjobs=1
rw=read
iodepth=64
"""


def _floor(path: str, region: int) -> float:
    """The issue's floor: one thread, 4 KiB os.preadv into a shared memfd mapping from a
    page-cached host file (bench_dio measures the same; kept here so neither module leans on
    the other's internals)."""
    mfd = os.memfd_create("vkfio-floor")
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
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(region // MiB))


async def _inprocess_setup(region: int) -> tuple[Kernel, Task, int, int]:
    """An in-process kernel with a RAM disk, a laid-out file and a touched 64-page buffer."""
    k = Kernel(KernelConfig(memory_bytes=256 * MiB))
    k.vfs.add_device(DeviceSpec.parse(f"bench0=ram:{region // MiB + 64}M"))
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


async def _inprocess_sqes(t: Task, fd: int, buf: int, region: int) -> float:
    """The seed job on the kernel's AIO context directly (no gRPC, no client), through the
    struct-of-arrays path the daemon's Ring uses for an IocbBatch (reap with
    ``getevents_array``, refill the free slots as arrays with ``io_submit_sqes``): IOPS."""
    ctx = aio.KioCtx(t, DEPTH)
    n = region // P
    nxt = 0
    free = np.arange(DEPTH, dtype=np.int64)
    ops = np.full(DEPTH, aio.IOCB_CMD_PREAD, dtype=np.int64)
    fds = np.full(DEPTH, fd, dtype=np.int64)
    lens = np.full(DEPTH, P, dtype=np.int64)
    steps = np.arange(DEPTH, dtype=np.int64) * P
    inflight = 0
    t0 = time.perf_counter()
    while nxt < n or inflight:
        k = min(len(free), n - nxt)
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
    dt = time.perf_counter() - t0
    await ctx.destroy()
    return n / dt


async def _inprocess_job(t: Task, fd: int, buf: int, region: int) -> float:
    """The seed job on the kernel's AIO context directly through the per-iocb path (an
    ``Iocb`` and an ``IoEvent`` per I/O; the path before the arrays): IOPS."""
    ctx = aio.KioCtx(t, DEPTH)
    n = region // P
    nxt = 0
    free = list(range(DEPTH))
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
    dt = time.perf_counter() - t0
    await ctx.destroy()
    return n / dt


async def _vkfio_round(addr: str, region: int) -> dict[str, Any]:
    """One run of the seed job through the daemon; its fio JSON job object."""
    _, jobs = vkfio.parse_jobfile(SEED_JOB.format(size=region))
    results, disks = await vkfio.run_jobs(jobs, addr)
    [r] = results
    if r.error or r.read.ios != region // 4096:
        raise RuntimeError(f"vkfio run failed: error {r.error} {r.errmsg!r}, {r.read.ios} I/Os")
    job: dict[str, Any] = vkfio.report_json({}, results, disks)["jobs"][0]
    return job


async def run(ctx: BenchContext) -> list[dict[str, Any]]:
    """vkfio IOPS against the os.preadv floor and against the in-process kernel."""
    region = QUICK if ctx.quick else FULL
    rounds = min(ctx.rounds, 3 if ctx.quick else 5)
    host = ctx.scratch / "floor.dat"
    _write_host(host, region)
    _floor(str(host), region)  # warm the host page cache
    k, t, fd, buf = await _inprocess_setup(region)
    ours: list[float] = []
    floor: list[float] = []
    inproc: list[float] = []
    inproc_iocb: list[float] = []
    job: dict[str, Any] = {}
    async with vkernel_daemon(ctx.scratch, client_name="bench-vkfio") as vk:
        addr = f"unix://{ctx.scratch / 'vk.sock'}"
        await _vkfio_round(addr, min(region, 4 * MiB))  # lay the file out, warm both sides
        for _ in range(rounds):
            t0 = time.perf_counter()
            job = await _vkfio_round(addr, region)
            ours.append(job["read"]["iops"])
            floor.append(_floor(str(host), region))
            inproc.append(await _inprocess_sqes(t, fd, buf, region))
            inproc_iocb.append(await _inprocess_job(t, fd, buf, region))
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("a round took over 10 minutes")
        vk.server.check_alive()
    k.do_exit(t)
    await k.vfs.shutdown()
    host.unlink()
    pct = job["read"]["clat_ns"]["percentile"]
    extra = {
        "region_mib": region // MiB,
        "iodepth": 64,
        "bs": 4096,
        "device": "daemon's default ram0, latency 0",
        "clat_p50_ns": pct["50.000000"],
        "clat_p99_ns": pct["99.000000"],
        "clat_p99_9_ns": pct["99.900000"],
        "iodepth_submit_pct": job["iodepth_submit"],
        "iodepth_complete_pct": job["iodepth_complete"],
        "vkfio_usr_cpu_pct": round(job["usr_cpu"], 1),
        "vkfio_sys_cpu_pct": round(job["sys_cpu"], 1),
        "inprocess_iocb_path_iops": round(float(np.median(inproc_iocb))),
    }
    return [
        make_record(
            "vkfio.seed004_iops", ours, "IOPS", floor=floor, goal=None, better="higher", **extra
        ),
        make_record(
            "vkfio.daemon_vs_inprocess_iops",
            ours,
            "IOPS",
            floor=inproc,
            goal=0.5,
            better="higher",
            **extra,
        ),
    ]
