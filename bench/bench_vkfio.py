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

import time
from typing import Any

import numpy as np

from bench._harness import BenchContext, make_record
from bench._seed004 import MiB, P, PreadvFloor, job_iocbs, job_sqes, setup_kernel, write_host
from bench._vkernel import vkernel_daemon
from vkclient import vkfio

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
    write_host(host, region)
    fl = PreadvFloor(str(host))
    n = region // P
    fl.run(0, n)  # warm the host page cache
    k, t, fd, buf = await setup_kernel(region)
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
            floor.append(n / fl.run(0, n))
            inproc.append(n / (await job_sqes(t, fd, buf, 0, n, "fast", "pin", None))[0])
            inproc_iocb.append(n / (await job_iocbs(t, fd, buf, 0, n, "fast", "pin", None))[0])
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("a round took over 10 minutes")
        vk.server.check_alive()
    fl.close()
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
