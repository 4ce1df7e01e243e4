"""Page-cache file reads against the device's own throughput floor (issue 5, part 1).

Why: a page-cache read of a cold file can be no faster than the device under it, and should
not be much slower: the cache's job on a miss is to turn a sequential read into large bios
(readahead) and get out of the way. So the floor is the device itself, measured in the same
run with the same latency model: a loop of 1 MiB bios (``submit_bio`` into one buffer) over
the same number of bytes, back to back with the kernel's read.

In-process (no gRPC: the API's streaming cost is bench_mm's ``read_api``), on a fresh kernel
with one RAM device ``latency=200us+0.5us/KiB,qd=32`` (about 1.4 GB/s for 1 MiB requests):

- ``files.pread_cold``: ``pread`` of a ``region`` file (256 MiB, 32 MiB under ``--quick``)
  in 1 MiB calls right after ``drop_caches``: every page is a miss, readahead builds the
  bios. MB/s; floor: the raw 1 MiB bio loop; goal ratio ≥ 0.7.
- ``files.pread_warm``: the same reads with every page cached: no device I/O at all. MB/s;
  floor: the same raw loop (so the ratio says how much the cache saves); goal ratio ≥ 1.
- ``files.pread_warm_copy``: the warm figure against a plain ``bytes`` copy of the same
  amount out of a numpy buffer in 1 MiB slices (what a cached read cannot avoid). No goal.

The mapping variants (issue 5, part 2), on the same kernel and file:

- ``files.mmap_read_cold`` / ``files.mmap_read_warm``: the file mapped MAP_SHARED|PROT_READ
  and read by the CPU (``read_user`` in 1 MiB loads) after ``drop_caches`` and again with the
  cache warm (a fresh mapping each time): read faults (filemap_fault, mmap readahead) that map
  16 pages each (fault-around).
  MB/s; floor: the raw 1 MiB bio loop; goal ratio ≥ 0.7 cold, none warm (the fault cost is
  the figure to watch).

Seed 001's experiment (``files.retry_*``), on its own kernel with a RAM device
``latency=10ms,qd=64`` and readahead off: 32 coroutines of one process (threads sharing one
mm) fault distinct pages of a cold ``disk`` file through a shared mapping while another
loops ``mmap``/``munmap`` of one anonymous page (1 ms apart) on the same mm. Each writer
acquisition's mmap_lock wait is sampled from the lock's ``write_wait_ns_total`` before and
after the call (one write acquisition per call; 0 when uncontended). Run with ALLOW_RETRY on
and with ``fault_retry=False`` (``--no-fault-retry``), interleaved per round:

- ``files.retry_writer_wait_p99``: the writer's p99 wait with retry (ms, lower is better);
  floor: the same p99 without retry; goal ratio ≥ 10 (p99 with retry ≤ 0.1 × without).
  Waits below 1 µs count as 1 µs (the ratio stays finite).
- ``files.retry_writer_wait_p50``: the same at p50, no goal.
- ``files.retry_fault_rate``: faults per second of the 32 readers with retry; floor: the
  same without retry; no goal (reported: what retry costs or saves in throughput).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from bench._harness import BenchContext, make_record
from vkernel.kernel.audit import audit
from vkernel.kernel.blockdev import BLOCK_SIZE, REQ_OP_READ, DeviceSpec
from vkernel.kernel.fs import O_CREAT, O_RDWR
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mmap import sys_mmap, sys_munmap
from vkernel.kernel.uaccess import read_user, read_user_bytes
from vkernel.kernel.uapi import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)

MiB = 1 << 20
REGION = 256 * MiB
REGION_QUICK = 32 * MiB
CHUNK = MiB
LATENCY = "latency=200us+0.5us/KiB,qd=32"


def _mbps(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10^6 bytes)."""
    return nbytes / seconds / 1e6


async def _setup(region: int) -> tuple[Kernel, Any, int]:
    """A kernel with a RAM device holding one ``region``-byte file, written and fsynced."""
    memory = max(256 * MiB, 2 * region + 64 * MiB)
    k = Kernel(KernelConfig(memory_bytes=memory))
    k.vfs.add_device(DeviceSpec.parse(f"bench0=ram:{region // MiB + 32}M,{LATENCY}"))
    t = k.spawn("bench", "bench")
    fd, _ = k.vfs.do_sys_open(t, "data", O_CREAT | O_RDWR)
    chunk = np.random.default_rng(5).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    for off in range(0, region, CHUNK):
        await k.vfs.write(t, fd, chunk, off)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    return k, t, fd


async def _pread_all(k: Kernel, t: Any, fd: int, region: int) -> float:
    """Seconds to pread the whole file in CHUNK calls."""
    t0 = time.perf_counter()
    for off in range(0, region, CHUNK):
        data = await k.vfs.read(t, fd, CHUNK, off)
        if len(data) != CHUNK:
            raise RuntimeError(f"short read at {off}: {len(data)}")
    return time.perf_counter() - t0


async def _raw_device(k: Kernel, region: int) -> float:
    """Seconds for the device's own loop: 1 MiB read bios into one buffer."""
    bdev = k.vfs.devices["bench0"]
    buf = np.empty((CHUNK // BLOCK_SIZE, BLOCK_SIZE), dtype=np.uint8)
    first = k.vfs.supers["bench0"].data_start
    t0 = time.perf_counter()
    for off in range(0, region, CHUNK):
        await bdev.submit_bio(REQ_OP_READ, first + off // BLOCK_SIZE, None, None, buf)
    return time.perf_counter() - t0


async def _mmap_read_all(t: Any, addr: int, region: int) -> float:
    """Seconds to read a mapping of the whole file with CPU loads, 1 MiB per call."""
    t0 = time.perf_counter()
    got = 0
    for off in range(0, region, CHUNK):
        async for chunk in read_user(t, addr + off, CHUNK):
            got += len(chunk)
    if got != region:
        raise RuntimeError(f"mapping read {got} of {region} bytes")
    return time.perf_counter() - t0


RETRY_READERS = 32
RETRY_LATENCY = "latency=10ms,qd=64"


async def _retry_experiment(fault_retry: bool, seconds: float, npages: int) -> dict[str, float]:
    """Seed 001: 32 faulting readers and one mmap/munmap writer on one mm (see the module
    docstring). Returns the writer's p50/p99 wait (ms) and the readers' faults per second."""
    k = Kernel(KernelConfig(memory_bytes=256 * MiB, readahead=False, fault_retry=fault_retry))
    k.vfs.add_device(
        DeviceSpec.parse(f"slow0=ram:{npages * PAGE_SIZE // MiB + 16}M,{RETRY_LATENCY}")
    )
    t = k.spawn("retry", "bench")
    fd, _ = k.vfs.do_sys_open(t, "cold", O_CREAT | O_RDWR)
    chunk = bytes(range(256)) * (CHUNK // 256)
    for off in range(0, npages * PAGE_SIZE, CHUNK):
        await k.vfs.write(t, fd, chunk, off)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    base = await sys_mmap(t, 0, npages * PAGE_SIZE, PROT_READ, MAP_SHARED, fd, 0)
    mm = t.mm
    assert mm is not None
    lock = mm.mmap_lock
    stop = False
    next_page = 0
    faults = 0
    waits: list[float] = []

    async def reader() -> None:
        nonlocal next_page, faults
        while not stop and next_page < npages:
            i = next_page
            next_page += 1
            await read_user_bytes(t, base + i * PAGE_SIZE, 1)
            faults += 1

    async def writer() -> None:
        while not stop:
            for op in ("mmap", "munmap"):
                w0 = lock.stats()["write_wait_ns_total"]
                if op == "mmap":
                    a = await sys_mmap(
                        t, 0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
                    )
                else:
                    await sys_munmap(t, a, PAGE_SIZE)
                waits.append(max(lock.stats()["write_wait_ns_total"] - w0, 1000) / 1e6)
            await asyncio.sleep(0.001)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(reader()) for _ in range(RETRY_READERS)]
    wtask = asyncio.ensure_future(writer())
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    await wtask
    await k.vfs.quiesce()
    problems = audit(k)
    if problems:
        raise RuntimeError(f"audit after the retry experiment: {problems[:5]}")
    k.do_exit(t)
    await k.vfs.shutdown()
    w = np.array(waits)
    return {
        "p50": float(np.percentile(w, 50)),
        "p99": float(np.percentile(w, 99)),
        "rate": faults / elapsed,
        "writer_ops": float(len(w)),
    }


def _copy_floor(region: int) -> float:
    """Seconds to copy ``region`` bytes out of a numpy buffer into bytes, 1 MiB at a time."""
    src = np.ones(region, dtype=np.uint8)
    t0 = time.perf_counter()
    for off in range(0, region, CHUNK):
        _ = src[off : off + CHUNK].tobytes()
    return time.perf_counter() - t0


async def run(ctx: BenchContext) -> list[dict[str, Any]]:
    """Cold and warm sequential pread against the raw device loop, interleaved per round."""
    region = REGION_QUICK if ctx.quick else REGION
    rounds = min(ctx.rounds, 3 if ctx.quick else 5)
    k, t, fd = await _setup(region)
    cold: list[float] = []
    warm: list[float] = []
    raw: list[float] = []
    copy: list[float] = []
    mcold: list[float] = []
    mwarm: list[float] = []
    for r in range(rounds):
        if r % 2:
            raw.append(_mbps(region, await _raw_device(k, region)))
        k.vfs.drop_caches()
        cold.append(_mbps(region, await _pread_all(k, t, fd, region)))
        warm.append(_mbps(region, await _pread_all(k, t, fd, region)))
        copy.append(_mbps(region, _copy_floor(region)))
        # The mapping lives only for its reads: mapped pages cannot be dropped from the cache.
        k.vfs.drop_caches()
        maddr = await sys_mmap(t, 0, region, PROT_READ, MAP_SHARED, fd, 0)
        mcold.append(_mbps(region, await _mmap_read_all(t, maddr, region)))
        await sys_munmap(t, maddr, region)  # a new mapping: every page faults again
        maddr = await sys_mmap(t, 0, region, PROT_READ, MAP_SHARED, fd, 0)
        mwarm.append(_mbps(region, await _mmap_read_all(t, maddr, region)))
        await sys_munmap(t, maddr, region)
        if not r % 2:
            raw.append(_mbps(region, await _raw_device(k, region)))
        await k.vfs.quiesce()
        problems = audit(k)
        if problems:
            raise RuntimeError(f"audit after round {r}: {problems[:5]}")
        await asyncio.sleep(0)
    dev = k.vfs.devices["bench0"]
    k.do_exit(t)
    await k.vfs.shutdown()
    extra = {"region_mib": region // MiB, "device": LATENCY, "bios": dev.stats.reads}
    seconds = 0.5 if ctx.quick else 1.5
    npages = 8192 if ctx.quick else 32768
    with_r: list[dict[str, float]] = []
    without: list[dict[str, float]] = []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for on in order:
            res = await _retry_experiment(on, seconds, npages)
            (with_r if on else without).append(res)
    rx = {
        "readers": RETRY_READERS,
        "device": RETRY_LATENCY,
        "seconds": seconds,
        "writer_ops_with_retry": [x["writer_ops"] for x in with_r],
        "writer_ops_without": [x["writer_ops"] for x in without],
    }
    return [
        make_record(
            "files.retry_writer_wait_p99",
            [x["p99"] for x in with_r],
            "ms",
            floor=[x["p99"] for x in without],
            goal=10.0,
            better="lower",
            **rx,
        ),
        make_record(
            "files.retry_writer_wait_p50",
            [x["p50"] for x in with_r],
            "ms",
            floor=[x["p50"] for x in without],
            goal=None,
            better="lower",
            **rx,
        ),
        make_record(
            "files.retry_fault_rate",
            [x["rate"] for x in with_r],
            "faults/s",
            floor=[x["rate"] for x in without],
            goal=None,
            better="higher",
            **rx,
        ),
        make_record(
            "files.mmap_read_cold", mcold, "MB/s", floor=raw, goal=0.7, better="higher", **extra
        ),
        make_record(
            "files.mmap_read_warm", mwarm, "MB/s", floor=raw, goal=None, better="higher", **extra
        ),
        make_record(
            "files.pread_cold", cold, "MB/s", floor=raw, goal=0.7, better="higher", **extra
        ),
        make_record(
            "files.pread_warm", warm, "MB/s", floor=raw, goal=1.0, better="higher", **extra
        ),
        make_record(
            "files.pread_warm_copy", warm, "MB/s", floor=copy, goal=None, better="higher", **extra
        ),
    ]


if __name__ == "__main__":
    for rec in asyncio.run(run(BenchContext(quick=True, rounds=3))):
        print(rec)
