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

The audit must be clean after every round, else the benchmark raises.

The mapping variant (mmap of the file, read faults through the page cache) comes with part 2.
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
    for r in range(rounds):
        if r % 2:
            raw.append(_mbps(region, await _raw_device(k, region)))
        k.vfs.drop_caches()
        cold.append(_mbps(region, await _pread_all(k, t, fd, region)))
        warm.append(_mbps(region, await _pread_all(k, t, fd, region)))
        copy.append(_mbps(region, _copy_floor(region)))
        if not r % 2:
            raw.append(_mbps(region, await _raw_device(k, region)))
        await k.vfs.quiesce()
        problems = audit(k)
        if problems:
            raise RuntimeError(f"audit after round {r}: {problems[:5]}")
        await asyncio.sleep(0)
    dev = k.vfs.devices["bench0"]
    await k.vfs.shutdown()
    extra = {"region_mib": region // MiB, "device": LATENCY, "bios": dev.stats.reads}
    return [
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
