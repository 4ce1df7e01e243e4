"""vkfio: run fio job files on vkernel (``vkfio job.fio [--output-format=json] [--output F]``).

Each job (``numjobs`` clones) is a vkernel process: its I/O buffers are an anonymous mapping
in that process (``iodepth * bs`` bytes, touched before the run as fio touches its buffers),
so every I/O pins and unpins real pages in the daemon. ``ioengine=libaio`` / ``io_uring``
use an AIO ring of depth ``iodepth`` (:class:`vkclient._aio.AioRing`); ``psync``, ``sync``
and ``pvsync`` one synchronous preadv/pwritev per I/O. Without ``filename`` the file is
``<directory>/<job>.<n>.0`` on the daemon's default block device, laid out (written) first
when the job reads.

Output: fio's normal text report, or fio 3.x's JSON (``jobs[].read/write`` with
``io_bytes``, ``bw``, ``iops``, ``runtime``, ``slat_ns``/``clat_ns``/``lat_ns`` …).
slat is the daemon's submit→issue time, clat issue→completion (daemon clock).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import vkclient
from vkclient._aio import OP_READ, OP_WRITE, AioRing, preadv, pwritev, set_dio_defaults
from vkclient.constants import O_CREAT, O_DIRECT, O_RDWR

FIO_VERSION = "fio-3.36"
PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)
"""fio's default percentile_list (options.c)."""
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
}  # fmt: skip
VERIFY = ("crc32c", "md5", "0", "")
EILSEQ = 84
HDR = 32
"""Bytes of the verify header at the start of each block (magic, len, offset, checksum)."""


class JobError(ValueError):
    """A job file fio would refuse."""


def parse_size(text: str) -> int:
    """fio sizes: 4k, 1m, 1g, 4KiB, 512 (kb_base=1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m:
        raise JobError(f"bad size {text!r}")
    mult = 1024 ** " kmgtp".index(m.group(2).lower() or " ")
    return int(m.group(1)) * int(mult)


def parse_time(text: str) -> float:
    """fio times: seconds by default; us, ms, s, m, h suffixes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*", text)
    if not m:
        raise JobError(f"bad time {text!r}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    return float(m.group(1)) * unit


def _bool(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off")


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
            self.numjobs = int(v)
        elif key == "iodepth":
            self.iodepth = int(v)
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
            self.randseed = int(v)
        elif key == "rwmixread":
            self.rwmixread = int(v)
        elif key == "rwmixwrite":
            self.rwmixread = 100 - int(v)
        if self.bs <= 0 or self.numjobs <= 0 or self.iodepth <= 0:
            raise JobError(f"option '{key}': value must be positive")

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
    gopts: dict[str, str] = {}
    probe = Job("global")
    for k, v in glob:
        probe.apply(k, v)
    gopts = dict(probe.options)
    for name, opts in jobs:
        job = Job(name)
        for k, v in [*glob, *opts]:
            job.apply(k, v)
        if not job.size:
            raise JobError(f"job '{name}': need a size")
        if job.bs > job.size:
            raise JobError(f"job '{name}': bs larger than size")
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


# ---- statistics ---------------------------------------------------------------------------


@dataclass
class DirStats:
    """One direction's counters and latency samples (ns)."""

    ios: int = 0
    bytes: int = 0
    short: int = 0
    slat: list[int] = field(default_factory=list)
    clat: list[int] = field(default_factory=list)

    def merge(self, other: DirStats) -> None:
        self.ios += other.ios
        self.bytes += other.bytes
        self.short += other.short
        self.slat += other.slat
        self.clat += other.clat


@dataclass
class JobResult:
    """One job clone's outcome."""

    job: Job
    jobnum: int
    pid: int = 0
    read: DirStats = field(default_factory=DirStats)
    write: DirStats = field(default_factory=DirStats)
    runtime_ms: int = 0
    error: int = 0
    errmsg: str = ""
    verify_errors: list[str] = field(default_factory=list)
    start: float = 0.0


def lat_json(samples: list[int], percentiles: bool) -> dict[str, Any]:
    """fio's add_ddir_lat_json: min/max/mean/stddev/N (+ percentile for clat)."""
    if not samples:
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    a = np.asarray(samples, dtype=np.float64)
    out: dict[str, Any] = {
        "min": int(a.min()),
        "max": int(a.max()),
        "mean": float(a.mean()),
        "stddev": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "N": len(a),
    }
    if percentiles:
        vals = np.percentile(a, PERCENTILES, method="higher")
        out["percentile"] = {f"{p:f}": int(v) for p, v in zip(PERCENTILES, vals, strict=True)}
    return out


def ddir_json(d: DirStats, runtime_ms: int) -> dict[str, Any]:
    """fio's add_ddir_status_json."""
    rt = runtime_ms if d.ios else 0
    bw_bytes = int(d.bytes * 1000 / rt) if rt else 0
    iops = d.ios * 1000.0 / rt if rt else 0.0
    lat = [s + c for s, c in zip(d.slat, d.clat, strict=True)]
    return {
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes >> 10,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes >> 10,
        "iops": iops,
        "runtime": rt,
        "total_ios": d.ios,
        "short_ios": d.short,
        "drop_ios": 0,
        "slat_ns": lat_json(d.slat, False),
        "clat_ns": lat_json(d.clat, True),
        "lat_ns": lat_json(lat, False),
        "bw_min": bw_bytes >> 10 if d.ios else 0,
        "bw_max": bw_bytes >> 10 if d.ios else 0,
        "bw_agg": 100.0 if d.ios else 0.0,
        "bw_mean": float(bw_bytes >> 10) if d.ios else 0.0,
        "bw_dev": 0.0,
        "bw_samples": 1 if d.ios else 0,
        "iops_min": int(iops),
        "iops_max": int(iops),
        "iops_mean": iops,
        "iops_stddev": 0.0,
        "iops_samples": 1 if d.ios else 0,
    }


def _bins(
    samples: list[int], edges: Sequence[int], scale: int, last: str | None
) -> dict[str, float]:
    """fio's latency_ns/us/ms buckets: % of I/Os with latency ≤ edge (in the unit)."""
    n = max(1, len(samples))
    a = np.asarray(samples, dtype=np.int64)
    out: dict[str, float] = {}
    lo = 0
    for e in edges:
        hi = e * scale
        out[str(e)] = float(np.count_nonzero((a > lo) & (a <= hi)) * 100.0 / n) if len(a) else 0.0
        lo = hi
    if last is not None:
        out[last] = float(np.count_nonzero(a > lo) * 100.0 / n) if len(a) else 0.0
    return out


_EDGES = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)


def job_json(r: JobResult, name: str, elapsed: int) -> dict[str, Any]:
    """fio's show_thread_status_json for one job (or a reporting group)."""
    lat = r.read.clat + r.write.clat
    depth = r.job.depth
    lvl = dict.fromkeys(("1", "2", "4", "8", "16", "32", ">=64"), 0.0)
    key = next(
        (
            k
            for k, v in (("1", 1), ("2", 2), ("4", 4), ("8", 8), ("16", 16), ("32", 32))
            if depth <= v
        ),
        ">=64",
    )
    lvl[key] = 100.0
    sub = dict.fromkeys(("0", "4", "8", "16", "32", "64", ">=64"), 0.0)
    sub[
        "4"
        if depth <= 4
        else "8"
        if depth <= 8
        else "16"
        if depth <= 16
        else "32"
        if depth <= 32
        else "64"
        if depth <= 64
        else ">=64"
    ] = 100.0
    return {
        "jobname": name,
        "groupid": 0,
        "job_start": int(r.start * 1000),
        "error": r.error,
        "eta": 0,
        "elapsed": elapsed,
        "job options": dict(r.job.options),
        "read": ddir_json(r.read, r.runtime_ms),
        "write": ddir_json(r.write, r.runtime_ms),
        "trim": ddir_json(DirStats(), 0),
        "sync": {"total_ios": 0, "lat_ns": lat_json([], False)},
        "job_runtime": r.runtime_ms,
        "usr_cpu": 0.0,
        "sys_cpu": 0.0,
        "ctx": 0,
        "majf": 0,
        "minf": 0,
        "iodepth_level": lvl,
        "iodepth_submit": sub,
        "iodepth_complete": dict(sub),
        "latency_ns": _bins(lat, _EDGES, 1, None),
        "latency_us": _bins([x for x in lat if x > 1000], _EDGES, 1000, None),
        "latency_ms": _bins(
            [x for x in lat if x > 1_000_000], (*_EDGES, 2000), 1_000_000, ">=2000"
        ),
        "latency_depth": depth,
        "latency_target": 0,
        "latency_percentile": 100.0,
        "latency_window": 0,
    }


def _merge(results: list[JobResult]) -> JobResult:
    """group_reporting: one result for the clones."""
    m = JobResult(results[0].job, 0, results[0].pid)
    m.start = min(r.start for r in results)
    for r in results:
        m.read.merge(r.read)
        m.write.merge(r.write)
        m.runtime_ms = max(m.runtime_ms, r.runtime_ms)
        m.error = m.error or r.error
        m.verify_errors += r.verify_errors
    return m


def report_json(
    gopts: dict[str, str], results: list[JobResult], disks: list[dict[str, Any]]
) -> dict[str, Any]:
    """The whole --output-format=json document."""
    now = time.time()
    jobs: list[dict[str, Any]] = []
    by_job: dict[int, list[JobResult]] = {}
    for r in results:
        by_job.setdefault(id(r.job), []).append(r)
    elapsed = max(1, round(max((r.runtime_ms for r in results), default=0) / 1000))
    for rs in by_job.values():
        if rs[0].job.group_reporting:
            jobs.append(job_json(_merge(rs), rs[0].job.name, elapsed))
        else:
            jobs += [job_json(r, r.job.name, elapsed) for r in rs]
    return {
        "fio version": FIO_VERSION,
        "timestamp": int(now),
        "timestamp_ms": int(now * 1000),
        "time": time.ctime(now),
        "global options": dict(gopts),
        "jobs": jobs,
        "disk_util": disks,
    }


def _h(n: float, unit: str = "B") -> str:
    """fio's IEC rendering: 741MiB, 4096B."""
    for suffix in ("", "Ki", "Mi", "Gi", "Ti"):
        if n < 1024 or suffix == "Ti":
            return (
                f"{n:.0f}{suffix}{unit}" if n >= 100 or suffix == "" else f"{n:.1f}{suffix}{unit}"
            )
        n /= 1024
    return f"{n}{unit}"


def _lat_line(label: str, ns: list[int]) -> str:
    if not ns:
        return ""
    a = np.asarray(ns, dtype=np.float64)
    unit, div = (
        ("nsec", 1.0)
        if a.mean() < 10_000
        else ("usec", 1e3)
        if a.mean() < 10_000_000
        else ("msec", 1e6)
    )
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return (
        f"    {label} ({unit}): min={a.min() / div:.0f}, max={a.max() / div:.0f}, "
        f"avg={a.mean() / div:.2f}, stdev={sd / div:.2f}\n"
    )


def report_text(results: list[JobResult]) -> str:
    """fio's normal output."""
    out = []
    by_job: dict[int, list[JobResult]] = {}
    for r in results:
        by_job.setdefault(id(r.job), []).append(r)
    for rs in by_job.values():
        job = rs[0].job
        out.append(
            f"{job.name}: (g=0): rw={job.rw}, bs=(R) {job.bs}B-{job.bs}B, (W) {job.bs}B-{job.bs}B, "
            f"(T) {job.bs}B-{job.bs}B, ioengine={job.engine}, iodepth={job.iodepth}\n"
        )
    out.append(
        f"{FIO_VERSION}\nStarting {len(results)} process{'es' if len(results) > 1 else ''}\n"
    )
    groups: list[JobResult] = []
    for rs in by_job.values():
        groups += [_merge(rs)] if rs[0].job.group_reporting else rs
    for r in groups:
        for msg in r.verify_errors[:10]:
            out.append(msg + "\n")
        out.append(
            f"{r.job.name}: (groupid=0, jobs={r.job.numjobs if r.job.group_reporting else 1}): "
            f"err={r.error:2d}: pid={r.pid}: {time.ctime()}\n"
        )
        for label, d in (("read", r.read), ("write", r.write)):
            if not d.ios:
                continue
            rt = max(1, r.runtime_ms)
            bw = d.bytes * 1000 / rt
            iops = d.ios * 1000 / rt
            iops_s = f"{iops / 1000:.1f}k" if iops >= 1000 else f"{iops:.0f}"
            out.append(
                f"  {label}: IOPS={iops_s}, BW={_h(bw)}/s ({bw / 1e6:.1f}MB/s)"
                f"({_h(d.bytes)}/{rt}msec)\n"
            )
            out.append(_lat_line("slat", d.slat))
            out.append(_lat_line("clat", d.clat))
            out.append(_lat_line("lat", [s + c for s, c in zip(d.slat, d.clat, strict=True)]))
            if d.clat:
                a = np.asarray(d.clat, dtype=np.float64)
                vals = np.percentile(a, PERCENTILES, method="higher") / 1000
                cells = [f"{p:5.2f}th=[{v:5.0f}]" for p, v in zip(PERCENTILES, vals, strict=True)]
                out.append("    clat percentiles (usec):\n")
                for i in range(0, len(cells), 4):
                    out.append("     | " + ", ".join(cells[i : i + 4]) + ",\n")
        out.append(f"  IO depths    : {r.job.depth}=100.0%\n")
        out.append(
            f"     issued rwts: total={r.read.ios},{r.write.ios},0,0 "
            f"short={r.read.short},{r.write.short},0,0 dropped=0,0,0,0\n"
        )
    out.append("\nRun status group 0 (all jobs):\n")
    for label, pick in (("READ", "read"), ("WRITE", "write")):
        ds = [getattr(r, pick) for r in results]
        tot = sum(d.bytes for d in ds)
        if not tot:
            continue
        rt = max(1, max(r.runtime_ms for r in results))
        bw = tot * 1000 / rt
        out.append(
            f"  {label}: bw={_h(bw)}/s ({bw / 1e6:.1f}MB/s), io={_h(tot)} ({tot / 1e6:.1f}MB), "
            f"run={rt}-{rt}msec\n"
        )
    return "".join(x for x in out if x)


# ---- running a job ----------------------------------------------------------------------------


class Runner:
    """Runs one job clone in its own vkernel process."""

    def __init__(self, k: vkclient.Kernel, job: Job, jobnum: int, progress: Progress) -> None:
        self.k = k
        self.job = job
        self.jobnum = jobnum
        self.res = JobResult(job, jobnum)
        self.progress = progress

    def _path(self) -> str:
        job = self.job
        name = job.filename or f"{job.name}.{self.jobnum}.0"
        return f"{job.directory.strip('/')}/{name}".lstrip("/") if job.directory else name

    def _offsets(self, rng: np.random.Generator) -> np.ndarray:
        job = self.job
        n = job.size // job.bs
        random = RW_MODES[job.rw][0]
        base = job.offset + np.arange(n, dtype=np.int64) * job.bs
        return rng.permutation(base) if random else base

    async def run(self) -> JobResult:
        job, res = self.job, self.res
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
            res.start = time.time()
            t0 = time.perf_counter()
            if job.verify and writes:
                await self._loop(p, fd, buf, rng, verify_write=True)
                await self._verify(p, fd, buf)
            else:
                await self._loop(p, fd, buf, rng)
            res.runtime_ms = max(1, round((time.perf_counter() - t0) * 1000))
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

    async def _loop(
        self,
        p: vkclient.Process,
        fd: int,
        buf: int,
        rng: np.random.Generator,
        verify_write: bool = False,
    ) -> None:
        job = self.job
        deadline = time.perf_counter() + job.runtime if job.runtime else None
        offs = self._offsets(rng)
        it = 0

        def next_off() -> int | None:
            nonlocal offs, it
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            if it >= len(offs):
                if not job.time_based or verify_write:
                    return None
                offs = self._offsets(rng)
                it = 0
            it += 1
            return int(offs[it - 1])

        if ENGINES[job.engine] == "sync":
            while (off := next_off()) is not None:
                is_read = not verify_write and self._is_read(rng)
                if verify_write:
                    await p.write(buf, verify_block(job.verify, off, job.bs, job.randseed))
                t = time.perf_counter_ns()
                if is_read:
                    n = await preadv(p, fd, [(buf, job.bs)], off)
                else:
                    n = await pwritev(p, fd, [(buf, job.bs)], off)
                self._account(is_read, n, 0, time.perf_counter_ns() - t)
            return
        slots = list(range(job.depth))
        kinds: dict[int, bool] = {}
        async with AioRing(p, job.depth) as ring:
            done = False
            while True:
                while slots and not done:
                    off = next_off()
                    if off is None:
                        done = True
                        break
                    slot = slots.pop()
                    addr = buf + slot * job.bs
                    is_read = not verify_write and self._is_read(rng)
                    if verify_write:
                        await p.write(addr, verify_block(job.verify, off, job.bs, job.randseed))
                    kinds[slot] = is_read
                    ring.prep(OP_READ if is_read else OP_WRITE, fd, [(addr, job.bs)], off, slot)
                if not ring.queued and len(slots) == job.depth:
                    break
                comps = await ring.submit_and_wait(1, timeout=30.0)
                for c in comps:
                    slot = int(c.user_data)
                    slots.append(slot)
                    if c.res < 0:
                        raise OSError(-c.res, os.strerror(-c.res))
                    self._account(kinds[slot], c.res, c.submit_ns, c.complete_ns)

    def _account(self, is_read: bool, n: int, slat: int, clat: int) -> None:
        d = self.res.read if is_read else self.res.write
        d.ios += 1
        d.bytes += n
        if n < self.job.bs:
            d.short += 1
        d.slat.append(slat)
        d.clat.append(clat)
        self.progress.add(is_read, n)

    async def _verify(self, p: vkclient.Process, fd: int, buf: int) -> None:
        """fio's verify phase: read every written block back and check its header."""
        job = self.job
        for off in range(job.offset, job.offset + job.size, job.bs):
            t = time.perf_counter_ns()
            n = await preadv(p, fd, [(buf, job.bs)], off)
            self._account(True, n, 0, time.perf_counter_ns() - t)
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
    """fio's status line: Jobs: N (f=N): [R(1)][x%][r=…][eta …]."""

    def __init__(self, total: int, stream: Any, enabled: bool) -> None:
        self.total = max(1, total)
        self.done = 0
        self.rbytes = 0
        self.wbytes = 0
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def add(self, is_read: bool, n: int) -> None:
        self.done += n
        if is_read:
            self.rbytes += n
        else:
            self.wbytes += n

    def line(self, jobs: int) -> str:
        el = max(1e-6, time.perf_counter() - self.t0)
        pct = min(100.0, 100.0 * self.done / self.total)
        eta = el * (100 - pct) / pct if pct > 0 else 0
        return (
            f"Jobs: {jobs} (f={jobs}): [{pct:.1f}% done] [r={_h(self.rbytes / el)}/s]"
            f"[w={_h(self.wbytes / el)}/s] [eta {int(eta) // 60:02d}m:{int(eta) % 60:02d}s]"
        )

    async def ticker(self, jobs: int) -> None:
        while self.enabled:
            await asyncio.sleep(1.0)
            self.stream.write("\r" + self.line(jobs))
            self.stream.flush()


async def run_jobs(
    jobs: list[Job], addr: str | None, gup: str = "", foll: str = "", progress: bool = False
) -> tuple[list[JobResult], list[dict[str, Any]]]:
    """Run every job (clones concurrently); results and disk_util entries."""
    async with vkclient.connect(addr, client_name="vkfio") as k:
        if gup or foll:
            await set_dio_defaults(k, gup, foll)
        total = sum(j.size * j.numjobs for j in jobs)
        prog = Progress(total, sys.stderr, progress)
        tick = asyncio.ensure_future(prog.ticker(sum(j.numjobs for j in jobs)))
        try:
            runners = [Runner(k, j, n, prog) for j in jobs for n in range(j.numjobs)]
            before = {d.name: d for d in await k.devices()}
            results = list(await asyncio.gather(*(r.run() for r in runners)))
            after = await k.devices()
        finally:
            tick.cancel()
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


def main(argv: Sequence[str] | None = None) -> int:
    """The vkfio console script."""
    ap = argparse.ArgumentParser(prog="vkfio", description="Run fio job files on vkernel.")
    ap.add_argument("jobfiles", nargs="+")
    ap.add_argument("--output-format", default="normal", choices=("normal", "json"))
    ap.add_argument("--output", default="")
    ap.add_argument("--addr", default=None, help="daemon address (env VKERNEL_ADDR)")
    ap.add_argument("--gup", default="", choices=("", "fast", "slow"))
    ap.add_argument("--foll", default="", choices=("", "pin", "get"))
    ap.add_argument("--eta", default="auto", choices=("auto", "always", "never"))
    a = ap.parse_args(argv)
    gopts: dict[str, str] = {}
    jobs: list[Job] = []
    try:
        for path in a.jobfiles:
            with open(path) as f:
                g, js = parse_jobfile(f.read())
            gopts.update(g)
            jobs += js
    except (JobError, OSError) as e:
        print(f"fio: {e}", file=sys.stderr)
        return 1
    show = a.eta == "always" or (a.eta == "auto" and sys.stderr.isatty())
    results, disks = asyncio.run(run_jobs(jobs, a.addr, a.gup, a.foll, show))
    if a.output_format == "json":
        text = json.dumps(report_json(gopts, results, disks), indent=2) + "\n"
    else:
        text = report_text(results)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    for r in results:
        if r.errmsg:
            print(f"fio: pid={r.pid}, err={r.error}/: {r.errmsg}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
