"""vkfio: run fio job files on vkernel (``vkfio job.fio [--output-format=json] [--output F]``).

Each job (``numjobs`` clones) is a vkernel process: its I/O buffers are an anonymous mapping
in that process (``iodepth * bs`` bytes, touched before the run as fio touches its buffers),
so every I/O pins and unpins real pages in the daemon. ``ioengine=libaio`` / ``io_uring``
use an AIO ring of depth ``iodepth`` (:class:`vkclient._aio.AioRing`, its iocbs and
completions as packed arrays: ``prep_batch`` / ``submit_and_wait_arrays``): every Ring message
submits all the I/Os queued in free slots and reaps every completion ready, so the gRPC cost
is shared by a batch (``iodepth_batch_*`` tune the batch sizes). ``psync``, ``sync`` and
``pvsync`` do one synchronous preadv/pwritev per I/O. Without ``filename`` the file is
``<directory>/<job>.<n>.0`` on the daemon's default block device, laid out (written) first
when the job reads.

Output: fio's normal text report, or fio 3.x's JSON / JSON+ (see :mod:`vkclient.vkfio_stats`
and docs/vkfio.md). slat is the daemon's submit→issue time, clat issue→completion (daemon
clock); CPU figures are the vkfio process's own rusage over the job.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

import vkclient
from vkclient._aio import OP_READ, OP_WRITE, AioRing, preadv, pwritev, set_dio_defaults
from vkclient.constants import O_CREAT, O_DIRECT, O_RDWR
from vkclient.vkfio_stats import (
    FIO_VERSION,
    PERCENTILES,
    DirStats,
    JobResult,
    Rusage,
    Sampler,
    header_text,
    num2str,
    report_json,
    report_text,
)

__all__ = [
    "FIO_VERSION",
    "PERCENTILES",
    "DirStats",
    "Job",
    "JobError",
    "JobResult",
    "Progress",
    "Rusage",
    "check_block",
    "crc32c",
    "main",
    "parse_jobfile",
    "parse_size",
    "parse_time",
    "report_json",
    "report_text",
    "run_jobs",
    "verify_block",
]

ENGINES = {"libaio": "aio", "io_uring": "aio", "psync": "sync", "sync": "sync", "pvsync": "sync"}
RW_MODES = {
    "read": (False, True, False),
    "write": (False, False, True),
    "randread": (True, True, False),
    "randwrite": (True, False, True),
    "rw": (False, True, True),
    "readwrite": (False, True, True),
    "randrw": (True, True, True),
}
"""rw → (random, reads, writes)."""
OPTIONS = {
    "direct", "buffered", "ioengine", "rw", "readwrite", "bs", "blocksize", "size",
    "filename", "directory", "numjobs", "iodepth", "runtime", "time_based", "offset",
    "verify", "group_reporting", "randseed", "rwmixread", "rwmixwrite", "name",
    "thread", "randrepeat", "norandommap", "description", "do_verify",
    "percentile_list", "clat_percentiles", "lat_percentiles", "slat_percentiles",
    "iodepth_batch", "iodepth_batch_submit", "iodepth_batch_complete",
    "iodepth_batch_complete_min", "iodepth_batch_complete_max",
    "ramp_time", "startdelay", "thinktime", "thinktime_blocks", "bwavgtime", "iopsavgtime",
}  # fmt: skip
VERIFY = ("crc32c", "md5", "0", "")
EILSEQ = 84
HDR = 32
"""Bytes of the verify header at the start of each block (magic, len, offset, checksum)."""
MAX_PERCENTILES = 20
"""FIO_IO_U_LIST_MAX_LEN."""


class JobError(ValueError):
    """A job file fio would refuse."""


def parse_size(text: str) -> int:
    """fio sizes: 4k, 1m, 1g, 4KiB, 512 (kb_base=1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m:
        raise JobError(f"bad size {text!r}")
    mult = 1024 ** " kmgtp".index(m.group(2).lower() or " ")
    return int(m.group(1)) * int(mult)


_TIME_UNITS = {
    "ns": 1e-9, "nsec": 1e-9, "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0,
}  # fmt: skip


def parse_time(text: str, default: str = "s") -> float:
    """fio times in seconds: ``default`` unit when none is given (s for runtime, ramp_time,
    startdelay; us for thinktime); ns, us, ms, s, m, h, d suffixes (and their long forms)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _TIME_UNITS):
        raise JobError(f"bad time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[unit or default]


def parse_percentile_list(text: str) -> tuple[float, ...]:
    """fio's percentile_list: colon-separated percentages in (0, 100], at most 20."""
    try:
        vals = tuple(float(x) for x in text.split(":") if x.strip())
    except ValueError:
        raise JobError(f"bad percentile_list {text!r}") from None
    if not vals or len(vals) > MAX_PERCENTILES or any(not 0 < v <= 100 for v in vals):
        raise JobError(f"bad percentile_list {text!r}: 1 to {MAX_PERCENTILES} values in (0, 100]")
    return vals


def _bool(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off")


def _int(key: str, text: str, minimum: int = 0) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise JobError(f"option '{key}': bad integer {text!r}") from None
    if v < minimum:
        raise JobError(f"option '{key}': must be at least {minimum}")
    return v


@dataclass
class Job:
    """One [section] of a job file with [global] applied."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    direct: bool = False
    engine: str = "psync"
    rw: str = "read"
    bs: int = 4096
    size: int = 0
    filename: str = ""
    directory: str = ""
    numjobs: int = 1
    iodepth: int = 1
    runtime: float = 0.0
    time_based: bool = False
    offset: int = 0
    verify: str = ""
    group_reporting: bool = False
    randseed: int = 0x89
    rwmixread: int = 50
    percentile_list: tuple[float, ...] = PERCENTILES
    clat_percentiles: bool = True
    lat_percentiles: bool = False
    slat_percentiles: bool = False
    iodepth_batch_submit: int = 1
    iodepth_batch_complete_min: int = 1
    iodepth_batch_complete_max: int = 0
    """0: reap every completion that is ready (up to the ring's depth)."""
    ramp_time: float = 0.0
    startdelay: float = 0.0
    thinktime: float = 0.0
    thinktime_blocks: int = 1
    bwavgtime: int = 500
    iopsavgtime: int = 500
    description: str = ""

    def apply(self, key: str, value: str | None) -> None:
        """Set one option (fio's name, fio's syntax)."""
        if key not in OPTIONS:
            raise JobError(f"unknown option '{key}' in job '{self.name}'")
        v = "1" if value is None else value.strip()
        self.options[key] = v
        if key == "direct":
            self.direct = _bool(v)
        elif key == "buffered":
            self.direct = not _bool(v)
        elif key == "ioengine":
            if v not in ENGINES:
                raise JobError(f"unknown ioengine '{v}' (vkfio has {', '.join(ENGINES)})")
            self.engine = v
        elif key in ("rw", "readwrite"):
            mode = v.split(":")[0]
            if mode not in RW_MODES:
                raise JobError(f"unsupported rw '{v}'")
            self.rw = mode
        elif key in ("bs", "blocksize"):
            self.bs = parse_size(v)
        elif key == "size":
            self.size = parse_size(v)
        elif key == "filename":
            self.filename = v
        elif key == "directory":
            self.directory = v
        elif key == "numjobs":
            self.numjobs = _int(key, v, 1)
        elif key == "iodepth":
            self.iodepth = _int(key, v, 1)
        elif key == "runtime":
            self.runtime = parse_time(v)
        elif key == "time_based":
            self.time_based = _bool(v)
        elif key == "offset":
            self.offset = parse_size(v)
        elif key in ("verify", "do_verify"):
            if key == "verify":
                if v not in VERIFY:
                    raise JobError(f"unsupported verify '{v}' (crc32c, md5)")
                self.verify = "" if v == "0" else v
        elif key == "group_reporting":
            self.group_reporting = _bool(v)
        elif key == "randseed":
            self.randseed = _int(key, v)
        elif key == "rwmixread":
            self.rwmixread = _int(key, v)
        elif key == "rwmixwrite":
            self.rwmixread = 100 - _int(key, v)
        elif key == "name":
            self.name = v
        elif key == "description":
            self.description = v
        else:
            self._apply_stats_and_batching(key, v)
        if self.bs <= 0:
            raise JobError(f"option '{key}': value must be positive")

    def _apply_stats_and_batching(self, key: str, v: str) -> None:
        """The reporting, batching and timing options."""
        if key == "percentile_list":
            self.percentile_list = parse_percentile_list(v)
        elif key in ("clat_percentiles", "lat_percentiles", "slat_percentiles"):
            setattr(self, key, _bool(v))
        elif key in ("iodepth_batch", "iodepth_batch_submit"):
            self.iodepth_batch_submit = _int(key, v)
        elif key in ("iodepth_batch_complete", "iodepth_batch_complete_min"):
            self.iodepth_batch_complete_min = _int(key, v)
        elif key == "iodepth_batch_complete_max":
            self.iodepth_batch_complete_max = _int(key, v)
        elif key in ("ramp_time", "startdelay"):
            setattr(self, key, parse_time(v))
        elif key == "thinktime":
            self.thinktime = parse_time(v, "us")
        elif key == "thinktime_blocks":
            self.thinktime_blocks = _int(key, v, 1)
        elif key in ("bwavgtime", "iopsavgtime"):
            setattr(self, key, _int(key, v, 1))

    def check(self) -> None:
        """fio's fixup_options checks that involve more than one option."""
        if not self.size:
            raise JobError(f"job '{self.name}': need a size")
        if self.bs > self.size:
            raise JobError(f"job '{self.name}': bs larger than size")
        cmax = self.iodepth_batch_complete_max
        if cmax and cmax < self.iodepth_batch_complete_min:
            raise JobError(
                f"job '{self.name}': iodepth_batch_complete_max ({cmax}) < "
                f"iodepth_batch_complete_min ({self.iodepth_batch_complete_min})"
            )

    @property
    def depth(self) -> int:
        """Effective queue depth (synchronous engines: 1)."""
        return self.iodepth if ENGINES[self.engine] == "aio" else 1


def parse_jobfile(text: str) -> tuple[dict[str, str], list[Job]]:
    """The [global] options and the jobs of a job file (comments: ';' and '#')."""
    glob: list[tuple[str, str | None]] = []
    jobs: list[tuple[str, list[tuple[str, str | None]]]] = []
    cur: list[tuple[str, str | None]] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        m = re.fullmatch(r"\[([^\]]+)\]", line)
        if m:
            sec = m.group(1).strip()
            if sec == "global":
                cur = glob
            else:
                cur = []
                jobs.append((sec, cur))
            continue
        if cur is None:
            raise JobError(f"line {lineno}: option outside a section: {line!r}")
        key, eq, val = line.partition("=")
        cur.append((key.strip(), val.strip() if eq else None))
    if not jobs:
        raise JobError("no jobs defined")
    out = []
    probe = Job("global")
    for k, v in glob:
        probe.apply(k, v)
    gopts = dict(probe.options)
    for name, opts in jobs:
        job = Job(name)
        for k, v in [*glob, *opts]:
            job.apply(k, v)
        job.check()
        out.append(job)
    return gopts, out


# ---- checksums -------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    tab = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        tab.append(c)
    return tab


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as fio's verify=crc32c."""
    c = 0xFFFFFFFF
    tab = _CRC32C
    for b in data:
        c = tab[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _digest(kind: str, data: bytes) -> bytes:
    if kind == "md5":
        return hashlib.md5(data, usedforsecurity=False).digest()
    return crc32c(data).to_bytes(4, "little") + bytes(12)


def verify_block(kind: str, offset: int, bs: int, seed: int) -> bytes:
    """A block's contents: header (magic 0xacca, len, offset, checksum) + a seeded pattern."""
    rng = np.random.default_rng([seed, offset])
    body = rng.integers(0, 256, bs - HDR, dtype=np.uint8).tobytes()
    hdr = (0xACCA).to_bytes(4, "little") + bs.to_bytes(4, "little") + offset.to_bytes(8, "little")
    return hdr + _digest(kind, body) + body


def check_block(kind: str, data: bytes, offset: int) -> str | None:
    """None if the block verifies, else fio's complaint."""
    if int.from_bytes(data[:4], "little") != 0xACCA:
        return f"verify: bad magic header {int.from_bytes(data[:4], 'little'):x}, wanted acca"
    if int.from_bytes(data[8:16], "little") != offset:
        got = int.from_bytes(data[8:16], "little")
        return f"verify: bad header offset {got}, wanted {offset}"
    if _digest(kind, data[HDR:]) != data[16:32]:
        return f"{kind}: verify failed"
    return None


# ---- running a job ----------------------------------------------------------------------------


def _rusage_now() -> resource.struct_rusage:
    """The vkfio process's own usage (every thread: the event loop and gRPC's), as fio's
    getrusage(RUSAGE_SELF) for a job run as a process."""
    return resource.getrusage(resource.RUSAGE_SELF)


def rusage_delta(a: resource.struct_rusage, b: resource.struct_rusage) -> Rusage:
    """update_rusage_stat(): CPU ms, context switches and faults between two readings."""
    return Rusage(
        usr_ms=(b.ru_utime - a.ru_utime) * 1000.0,
        sys_ms=(b.ru_stime - a.ru_stime) * 1000.0,
        ctx=(b.ru_nvcsw + b.ru_nivcsw) - (a.ru_nvcsw + a.ru_nivcsw),
        majf=b.ru_majflt - a.ru_majflt,
        minf=b.ru_minflt - a.ru_minflt,
    )


class Runner:
    """Runs one job clone in its own vkernel process."""

    def __init__(self, k: vkclient.Kernel, job: Job, jobnum: int, progress: Progress) -> None:
        self.k = k
        self.job = job
        self.jobnum = jobnum
        self.res = JobResult(job, jobnum)
        self.progress = progress
        self.sampler = Sampler(job.bwavgtime, job.iopsavgtime)
        self.recording = False
        """False during ramp_time (and before/after the job): I/O then counts for nothing."""
        self._t0 = 0.0
        self._ru0 = _rusage_now()

    def _path(self) -> str:
        job = self.job
        name = job.filename or f"{job.name}.{self.jobnum}.0"
        return f"{job.directory.strip('/')}/{name}".lstrip("/") if job.directory else name

    def _offsets(self, rng: np.random.Generator) -> list[int]:
        """One pass over the file: every block once, shuffled for random rw. A list, because
        the I/O loop takes one offset per I/O and a numpy scalar per element costs more."""
        job = self.job
        n = job.size // job.bs
        random = RW_MODES[job.rw][0]
        base = job.offset + np.arange(n, dtype=np.int64) * job.bs
        offs: list[int] = (rng.permutation(base) if random else base).tolist()
        return offs

    def _begin(self) -> None:
        """Start of the measured part (after ramp_time): fresh counters, rusage, samples."""
        self.res.reset()
        self.res.start = time.time()
        self._t0 = time.perf_counter()
        self._ru0 = _rusage_now()
        self.sampler.start(self._t0)
        self.recording = True

    def _end(self) -> None:
        self.recording = False
        self.res.runtime_ms = max(1, round((time.perf_counter() - self._t0) * 1000))
        self.res.cpu = rusage_delta(self._ru0, _rusage_now())

    def snapshot(self) -> JobResult | None:
        """The cumulative figures so far (--status-interval), or None outside the run."""
        if not self.recording:
            return None
        r = self.res
        snap = JobResult(r.job, r.jobnum, r.pid, r.read, r.write, start=r.start)
        snap.runtime_ms = max(1, round((time.perf_counter() - self._t0) * 1000))
        snap.cpu = rusage_delta(self._ru0, _rusage_now())
        snap.io_u_map, snap.io_u_submit = r.io_u_map, r.io_u_submit
        snap.io_u_complete = r.io_u_complete
        snap.total_submit, snap.total_complete = r.total_submit, r.total_complete
        return snap

    async def _sample(self) -> None:
        """fio's helper thread: bw/iops samples every bwavgtime/iopsavgtime ms."""
        while True:
            wait = self.sampler.tick(time.perf_counter(), (self.res.read, self.res.write))
            await asyncio.sleep(wait)

    async def run(self) -> JobResult:
        job, res = self.job, self.res
        if job.startdelay:
            await asyncio.sleep(job.startdelay)
        p = await self.k.spawn(f"vkfio-{job.name}")
        res.pid = p.pid
        try:
            flags = O_CREAT | O_RDWR | (O_DIRECT if job.direct else 0)
            fd = await p.open(self._path(), flags, "disk")
            depth = job.depth
            buf = await p.mmap(depth * job.bs)
            await p.write(buf, b"\xa5" * (depth * job.bs))  # touched, as fio fills its buffers
            _, reads, writes = RW_MODES[job.rw]
            if reads and not job.verify:
                await self._layout(p, fd, buf)
            rng = np.random.default_rng(job.randseed + self.jobnum)
            if job.ramp_time:
                await self._loop(p, fd, buf, rng, ramp=job.ramp_time)
            self._begin()
            sampling = asyncio.ensure_future(self._sample())
            try:
                if job.verify and writes:
                    await self._loop(p, fd, buf, rng, verify_write=True)
                    await self._verify(p, fd, buf)
                else:
                    await self._loop(p, fd, buf, rng)
            finally:
                sampling.cancel()
                self._end()
        except OSError as e:
            res.error = e.errno or 5
            res.errmsg = str(e)
        finally:
            await p.kill()
            await p.wait()
        return res

    async def _layout(self, p: vkclient.Process, fd: int, buf: int) -> None:
        """fio's file layout: write the whole region before a read job."""
        job = self.job
        chunk = job.bs * job.depth
        off = job.offset
        end = job.offset + job.size
        st = await p.fstat(fd)
        if st.size >= end:
            return
        while off < end:
            n = min(chunk, end - off)
            await pwritev(p, fd, [(buf, n)], off)
            off += n

    def _is_read(self, rng: np.random.Generator) -> bool:
        _, reads, writes = RW_MODES[self.job.rw]
        if reads and writes:
            return bool(rng.integers(0, 100) < self.job.rwmixread)
        return reads

    def _offset_source(
        self, rng: np.random.Generator, verify_write: bool, ramp: float
    ) -> Callable[[], int | None]:
        """Next file offset, or None when the job (or the ramp) is over."""
        job = self.job
        limit = ramp or job.runtime
        deadline = time.perf_counter() + limit if limit else None
        cyclic = bool(ramp) or (job.time_based and not verify_write)
        offs = self._offsets(rng)
        it = 0

        def next_off() -> int | None:
            nonlocal offs, it
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            if it >= len(offs):
                if not cyclic:
                    return None
                offs = self._offsets(rng)
                it = 0
            it += 1
            return offs[it - 1]

        return next_off

    async def _loop(
        self,
        p: vkclient.Process,
        fd: int,
        buf: int,
        rng: np.random.Generator,
        verify_write: bool = False,
        ramp: float = 0.0,
    ) -> None:
        next_off = self._offset_source(rng, verify_write, ramp)
        if ENGINES[self.job.engine] == "sync":
            await self._sync_loop(p, fd, buf, rng, next_off, verify_write)
        else:
            await self._aio_loop(p, fd, buf, rng, next_off, verify_write)

    async def _sync_loop(
        self,
        p: vkclient.Process,
        fd: int,
        buf: int,
        rng: np.random.Generator,
        next_off: Callable[[], int | None],
        verify_write: bool,
    ) -> None:
        job = self.job
        issued = 0
        while (off := next_off()) is not None:
            is_read = not verify_write and self._is_read(rng)
            if verify_write:
                await p.write(buf, verify_block(job.verify, off, job.bs, job.randseed))
            await self._sync_io(p, fd, buf, off, is_read)
            issued += 1
            if job.thinktime and issued % job.thinktime_blocks == 0:
                await asyncio.sleep(job.thinktime)

    async def _sync_io(
        self, p: vkclient.Process, fd: int, buf: int, off: int, is_read: bool
    ) -> None:
        """One preadv/pwritev: a submit of 1 at depth 1 and a reap of 1, as fio's sync engines."""
        t = time.perf_counter_ns()
        if is_read:
            n = await preadv(p, fd, [(buf, self.job.bs)], off)
        else:
            n = await pwritev(p, fd, [(buf, self.job.bs)], off)
        if self.recording:
            self.res.mark_submit(1, 1)
            self.res.mark_complete(1)
        self._account(is_read, n, 0, time.perf_counter_ns() - t)

    async def _aio_loop(
        self,
        p: vkclient.Process,
        fd: int,
        buf: int,
        rng: np.random.Generator,
        next_off: Callable[[], int | None],
        verify_write: bool,
    ) -> None:
        """Keep the ring full; one Ring message per batch.

        Every message carries all the I/Os queued in free slots (fio commits what is queued)
        and waits for ``max(iodepth_batch_complete_min, iodepth_batch_submit)`` completions,
        so that the next message has that many slots to refill, then reaps every completion
        ready up to ``iodepth_batch_complete_max`` (default: the ring's depth): a round trip
        per message is what costs, so a message never leaves ready completions behind."""
        job, res = self.job, self.res
        depth = job.depth
        free = list(range(depth))
        kinds = np.zeros(depth, dtype=np.bool_)
        batch = min(max(1, job.iodepth_batch_submit), depth)
        cmin = min(job.iodepth_batch_complete_min, depth)
        cmax = min(job.iodepth_batch_complete_max or depth, depth)
        done = False
        issued = 0
        bs = job.bs
        async with AioRing(p, depth) as ring:
            while True:
                think = False
                offs: list[int] = []
                slots: list[int] = []
                while free and not done and not think:
                    off = next_off()
                    if off is None:
                        done = True
                        break
                    slot = free.pop()
                    is_read = not verify_write and self._is_read(rng)
                    if verify_write:
                        block = verify_block(job.verify, off, bs, job.randseed)
                        await p.write(buf + slot * bs, block)
                    kinds[slot] = is_read
                    offs.append(off)
                    slots.append(slot)
                    issued += 1
                    think = bool(job.thinktime) and issued % job.thinktime_blocks == 0
                if slots:  # the new iocbs as arrays: one packed IocbBatch
                    sl = np.asarray(slots, dtype=np.int64)
                    ops = np.where(kinds[sl], OP_READ, OP_WRITE)
                    ring.prep_batch(ops, fd, buf + sl * bs, bs, offs, sl)
                inflight = depth - len(free)
                if not inflight:
                    break
                queued = ring.queued
                want = min(inflight, cmax, max(1, cmin, 1 if done else batch))
                cq = await ring.submit_and_wait_arrays(want, cmax, timeout=30.0)
                if self.recording:
                    if queued - ring.queued:
                        res.mark_submit(inflight, queued - ring.queued)
                    res.mark_complete(len(cq.res))
                got = cq.user_data.astype(np.int64)
                free.extend(got.tolist())
                bad = cq.res < 0
                if bad.any():
                    err = -int(cq.res[bad][0])
                    raise OSError(err, os.strerror(err))
                self._account_arrays(kinds[got], cq.res, cq.submit_ns, cq.complete_ns)
                if think:
                    await asyncio.sleep(job.thinktime)

    def _account_arrays(
        self, is_read: np.ndarray, n: np.ndarray, slat: np.ndarray, clat: np.ndarray
    ) -> None:
        """_account() for completions reaped as arrays: per direction, one update."""
        for rd in (True, False):
            sel = is_read if rd else ~is_read
            k = int(np.count_nonzero(sel))
            if not k:
                continue
            nb = n[sel] if k < len(n) else n
            total = int(nb.sum())
            pr = self.progress
            pr.done += total
            if rd:
                pr.rbytes += total
                pr.rios += k
            else:
                pr.wbytes += total
                pr.wios += k
            if not self.recording:
                continue
            d = self.res.read if rd else self.res.write
            d.ios += k
            d.bytes += total
            d.short += int(np.count_nonzero(nb < self.job.bs))
            d.slat.extend((slat[sel] if k < len(n) else slat).tolist())
            d.clat.extend((clat[sel] if k < len(n) else clat).tolist())

    def _account(self, is_read: bool, n: int, slat: int, clat: int) -> None:
        self.progress.add(is_read, n)
        if not self.recording:
            return
        d = self.res.read if is_read else self.res.write
        d.ios += 1
        d.bytes += n
        if n < self.job.bs:
            d.short += 1
        d.slat.append(slat)
        d.clat.append(clat)

    async def _verify(self, p: vkclient.Process, fd: int, buf: int) -> None:
        """fio's verify phase: read every written block back and check its header."""
        job = self.job
        for off in range(job.offset, job.offset + job.size, job.bs):
            await self._sync_io(p, fd, buf, off, True)
            data = await p.read(buf, job.bs)
            bad = check_block(job.verify, data, off)
            if bad is not None:
                self.res.verify_errors.append(
                    f"{bad} at file {self._path()} offset {off}, length {job.bs} "
                    f"(requested block: offset={off}, length={job.bs})"
                )
                self.res.error = EILSEQ
        if self.res.verify_errors:
            self.res.errmsg = "Invalid or incomplete multibyte or wide character"


class Progress:
    """fio's status line: Jobs: N (f=N): [R(N)][x%][r=…,w=…][r=…,w=… IOPS][eta …]."""

    def __init__(
        self, total: int, stream: TextIO, enabled: bool, mode: str = "R", seconds: float = 0.0
    ) -> None:
        """``total``: bytes the jobs will move; ``seconds``: how long they run when every job
        is time_based (then the completion estimate is by time, as fio's ETA)."""
        self.total = max(1, total)
        self.seconds = seconds
        self.done = 0
        self.rbytes = 0
        self.wbytes = 0
        self.rios = 0
        self.wios = 0
        self.stream = stream
        self.enabled = enabled
        self.mode = mode
        self.t0 = time.perf_counter()
        self._last = (self.t0, 0, 0, 0, 0)

    def add(self, is_read: bool, n: int) -> None:
        self.done += n
        if is_read:
            self.rbytes += n
            self.rios += 1
        else:
            self.wbytes += n
            self.wios += 1

    def line(self, jobs: int) -> str:
        """The current rates (since the previous line) and the completion estimate."""
        now = time.perf_counter()
        t, rb, wb, ri, wi = self._last
        dt = max(1e-6, now - t)
        self._last = (now, self.rbytes, self.wbytes, self.rios, self.wios)
        el = max(1e-6, now - self.t0)
        frac = el / self.seconds if self.seconds else self.done / self.total
        pct = min(100.0, 100.0 * frac)
        eta = el * (100 - pct) / pct if pct > 0 else 0

        def bw(n: float) -> str:
            return num2str(int(n / dt), 4, 1, True, "B/s")

        def io(n: float) -> str:
            return num2str(int(n / dt))

        return (
            f"Jobs: {jobs} (f={jobs}): [{self.mode}({jobs})][{pct:.1f}%]"
            f"[r={bw(self.rbytes - rb)},w={bw(self.wbytes - wb)}]"
            f"[r={io(self.rios - ri)},w={io(self.wios - wi)} IOPS]"
            f"[eta {int(eta) // 60:02d}m:{int(eta) % 60:02d}s]"
        )

    async def ticker(self, jobs: int) -> None:
        while self.enabled:
            await asyncio.sleep(1.0)
            self.stream.write("\r" + self.line(jobs))
            self.stream.flush()


StatusHook = Callable[[list[JobResult]], None]


async def _status_loop(runners: list[Runner], interval: float, hook: StatusHook) -> None:
    """--status-interval: the cumulative report of the jobs running, every ``interval`` s."""
    while True:
        await asyncio.sleep(interval)
        snaps = [s for r in runners if (s := r.snapshot()) is not None]
        if snaps:
            hook(snaps)


async def run_jobs(
    jobs: list[Job],
    addr: str | None,
    gup: str = "",
    foll: str = "",
    progress: bool = False,
    status_interval: float = 0.0,
    on_status: StatusHook | None = None,
) -> tuple[list[JobResult], list[dict[str, Any]]]:
    """Run every job (clones concurrently); results and disk_util entries."""
    async with vkclient.connect(addr, client_name="vkfio") as k:
        if gup or foll:
            await set_dio_defaults(k, gup, foll)
        total = sum(j.size * j.numjobs for j in jobs)
        modes = {"".join(m[1] * "R" + m[2] * "W") for m in (RW_MODES[j.rw] for j in jobs)}
        mode = "M" if len(modes) > 1 else modes.pop()
        timed = all(j.time_based and j.runtime for j in jobs)
        seconds = max(j.startdelay + j.ramp_time + j.runtime for j in jobs) if timed else 0.0
        prog = Progress(total, sys.stderr, progress, "m" if mode == "RW" else mode, seconds)
        runners = [Runner(k, j, n, prog) for j in jobs for n in range(j.numjobs)]
        bg = [asyncio.ensure_future(prog.ticker(len(runners)))]
        if status_interval > 0 and on_status is not None:
            bg.append(asyncio.ensure_future(_status_loop(runners, status_interval, on_status)))
        try:
            before = {d.name: d for d in await k.devices()}
            results = list(await asyncio.gather(*(r.run() for r in runners)))
            after = await k.devices()
        finally:
            for t in bg:
                t.cancel()
            if progress:
                sys.stderr.write("\n")
        disks = []
        for d in after:
            b = before.get(d.name)
            if b is None or (d.reads == b.reads and d.writes == b.writes):
                continue
            disks.append(
                {
                    "name": d.name,
                    "read_ios": d.reads - b.reads,
                    "write_ios": d.writes - b.writes,
                    "read_sectors": (d.read_bytes - b.read_bytes) >> 9,
                    "write_sectors": (d.write_bytes - b.write_bytes) >> 9,
                    "read_merges": 0,
                    "write_merges": 0,
                    "read_ticks": 0,
                    "write_ticks": 0,
                    "in_queue": 0,
                    "util": 0.0,
                }
            )
        return results, disks


OUTPUT_FORMATS = ("normal", "json", "json+")


def render(
    formats: Sequence[str],
    gopts: dict[str, str],
    results: list[JobResult],
    disks: list[dict[str, Any]],
) -> str:
    """The report in each requested format; JSON first, as fio orders its output buffers."""
    out = []
    if "json" in formats or "json+" in formats:
        doc = report_json(gopts, results, disks, json_plus="json+" in formats)
        out.append(json.dumps(doc, indent=2) + "\n")
    if "normal" in formats:
        out.append(report_text(results, disks, header=False))
    return "".join(out)


def _formats(text: str) -> list[str]:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in OUTPUT_FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(
            f"unsupported output format {','.join(bad) or text!r} "
            f"(vkfio has {', '.join(OUTPUT_FORMATS)})"
        )
    return fmts


def main(argv: Sequence[str] | None = None) -> int:
    """The vkfio console script."""
    ap = argparse.ArgumentParser(prog="vkfio", description="Run fio job files on vkernel.")
    ap.add_argument("jobfiles", nargs="+")
    ap.add_argument(
        "--output-format", type=_formats, default=["normal"], help="normal, json, json+ (a,b)"
    )
    ap.add_argument("--output", default="")
    ap.add_argument(
        "--status-interval",
        default="0",
        help="print the cumulative report every so often (fio time: 10, 500ms, 1m)",
    )
    ap.add_argument("--addr", default=None, help="daemon address (env VKERNEL_ADDR)")
    ap.add_argument("--gup", default="", choices=("", "fast", "slow"))
    ap.add_argument("--foll", default="", choices=("", "pin", "get"))
    ap.add_argument("--eta", default="auto", choices=("auto", "always", "never"))
    a = ap.parse_args(argv)
    gopts: dict[str, str] = {}
    jobs: list[Job] = []
    try:
        interval = parse_time(a.status_interval)
        for path in a.jobfiles:
            with open(path) as f:
                g, js = parse_jobfile(f.read())
            gopts.update(g)
            jobs += js
    except (JobError, OSError) as e:
        print(f"fio: {e}", file=sys.stderr)
        return 1
    out: TextIO = open(a.output, "w") if a.output else sys.stdout  # noqa: SIM115
    try:
        if "normal" in a.output_format:
            out.write(header_text(jobs))

        def status(snaps: list[JobResult]) -> None:
            out.write(render(a.output_format, gopts, snaps, []))
            out.flush()

        show = a.eta == "always" or (a.eta == "auto" and sys.stderr.isatty())
        results, disks = asyncio.run(run_jobs(jobs, a.addr, a.gup, a.foll, show, interval, status))
        out.write(render(a.output_format, gopts, results, disks))
    finally:
        if out is not sys.stdout:
            out.close()
    for r in results:
        if r.errmsg:
            print(f"fio: pid={r.pid}, err={r.error}/: {r.errmsg}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
