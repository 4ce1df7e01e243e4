"""vkfio's statistics and reports: what fio 3.x's stat.c computes and prints.

Kept apart from :mod:`vkclient.vkfio` (job files, running) because it is pure computation on
counters and samples, testable without a daemon.  The algorithms follow fio so the figures
mean what fio users expect:

- latency percentiles come from fio's log-linear histogram (``FIO_IO_U_PLAT_BITS`` = 6, 29
  groups): a percentile is the midpoint of the first bucket whose cumulative count reaches
  it, so values are fio's bucket values (e.g. 321536 ns), not raw samples;
- bandwidth / IOPS samples are taken every ``bwavgtime`` / ``iopsavgtime`` ms of the job
  (an interval with no I/O adds no sample), kept as fio's running min/max/mean/S
  (:class:`IoStat`), and summed (not averaged) across the clones of a reporting group;
- IO depth / submit / complete distributions are counted per submit and per reap, with
  fio's bucket edges; latency buckets (``latency_ns/us/ms``) use clat, as fio does;
- numbers in the text report go through :func:`num2str` (fio's 4-significant-figure
  rendering: ``190k``, ``741MiB/s``, ``48.6MiB``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FIO_VERSION = "fio-3.42"
"""The fio release whose output structure vkfio reproduces (keys, nesting, text lines)."""
PERCENTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.5, 99.9, 99.95, 99.99)
"""fio's default percentile_list (options.c)."""
PLAT_BITS = 6
PLAT_VAL = 1 << PLAT_BITS
PLAT_NR = 29 * PLAT_VAL
"""fio's histogram: 29 groups of 64 buckets (relative error ≤ 1/128, up to ~17 s)."""
_LAT_EDGES = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)
_LAT_M_EDGES = (*_LAT_EDGES, 2000)


# ---- fio's number rendering -------------------------------------------------------------------


def num2str(num: int, maxlen: int = 4, base: int = 1, pow2: bool = False, unit: str = "") -> str:
    """fio's num2str(): at most ``maxlen`` digits, SI (k, M…) or IEC (Ki, Mi…) prefixes.

    ``base`` is the multiplier ``num`` is already in (1024 when num counts KiB)."""
    prefixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi") if pow2 else ("", "k", "M", "G", "T", "P")
    thousand = 1024 if pow2 else 1000
    num = int(num)
    post = 0
    while base > 1:
        base //= thousand
        post += 1
    modulo = -1
    carry = False
    while post < len(prefixes) and len(str(num)) > maxlen:
        modulo = num % thousand
        num //= thousand
        carry = modulo >= thousand // 2
        post += 1
    if post >= len(prefixes):
        post = 0
    if modulo == -1:
        return f"{num}{prefixes[post]}{unit}"
    decimals = maxlen - len(str(num)) - 1
    if decimals <= 0:
        return f"{num + carry}{prefixes[post]}{unit}"
    # fio prints the fraction with %.Nf and keeps what follows "0." (or "1." when it rounds
    # up, which fio does not carry into the integer part: kept, so the text matches fio's).
    frac = f"{modulo / thousand:.{decimals}f}"
    return f"{num}.{frac[2:]}{prefixes[post]}{unit}"


# ---- the latency histogram --------------------------------------------------------------------


def plat_idx(ns: np.ndarray) -> np.ndarray:
    """fio's plat_val_to_idx() for an array of latencies (ns)."""
    v = np.asarray(ns, dtype=np.int64)
    _, exp = np.frexp(np.maximum(v, 1).astype(np.float64))
    msb = exp.astype(np.int64) - 1
    err = np.maximum(msb - PLAT_BITS, 0)
    grouped = ((err + 1) << PLAT_BITS) + ((PLAT_VAL - 1) & (v >> err))
    return np.where(msb <= PLAT_BITS, v, np.minimum(grouped, PLAT_NR - 1))


def plat_val(idx: int) -> int:
    """fio's plat_idx_to_val(): the midpoint of bucket ``idx`` (ns)."""
    if idx < (PLAT_VAL << 1):
        return idx
    err = (idx >> PLAT_BITS) - 1
    return (1 << (err + PLAT_BITS)) + int((idx % PLAT_VAL + 0.5) * (1 << err))


def histogram(ns: Sequence[int]) -> np.ndarray:
    """Bucket counts of fio's histogram for these latencies."""
    if not len(ns):
        return np.zeros(PLAT_NR, dtype=np.int64)
    return np.bincount(plat_idx(np.asarray(ns)), minlength=PLAT_NR)


def percentiles(ns: Sequence[int], plist: Sequence[float]) -> list[int]:
    """fio's calc_clat_percentiles(): for each p (sorted), the first bucket reaching p% of N."""
    hist = histogram(ns)
    cum = np.cumsum(hist)
    n = len(ns)
    idx = np.searchsorted(cum, [p / 100.0 * n for p in plist], side="left")
    return [plat_val(int(min(i, PLAT_NR - 1))) for i in idx]


# ---- running statistics ----------------------------------------------------------------------


@dataclass
class IoStat:
    """fio's struct io_stat: min, max, running mean and S (Welford), sample count."""

    min: float = math.inf
    max: float = 0.0
    mean: float = 0.0
    S: float = 0.0
    samples: int = 0

    def add(self, val: float) -> None:
        """add_stat_sample()."""
        self.max = max(self.max, val)
        self.min = min(self.min, val)
        delta = val - self.mean
        if delta:
            self.mean += delta / (self.samples + 1.0)
            self.S += delta * (val - self.mean)
        self.samples += 1

    def sum_pure(self, other: IoStat) -> None:
        """sum_stat(pure_sum=true): bw/iops of a reporting group add up across its jobs."""
        if not other.samples:
            return
        if not self.samples:
            self.min, self.max, self.mean, self.S = other.min, other.max, other.mean, other.S
        else:
            self.min += other.min
            self.max += other.max
            self.mean += other.mean
            self.S += other.S
        self.samples += other.samples

    def calc(self) -> tuple[int, int, float, float] | None:
        """calc_lat(): (min, max, mean, stddev) or None without samples."""
        if not self.samples:
            return None
        dev = math.sqrt(self.S / (self.samples - 1.0)) if self.samples > 1 else 0.0
        return int(self.min), int(self.max), self.mean, dev


def _depth_idx(depth: int) -> int:
    """io_u_mark_depth(): buckets 1, 2–3, 4–7, 8–15, 16–31, 32–63, ≥64."""
    return min(6, max(0, depth.bit_length() - 1))


def _batch_idx(nr: int) -> int:
    """io_u_mark_submit/complete(): buckets 0, 1–4, 5–8, 9–16, 17–32, 33–64, >64."""
    if nr <= 0:
        return 0
    return min(6, max(1, (nr - 1).bit_length() - 1))


@dataclass
class DirStats:
    """One direction's counters, latency samples (ns) and bw/iops samples."""

    ios: int = 0
    bytes: int = 0
    short: int = 0
    slat: list[int] = field(default_factory=list)
    clat: list[int] = field(default_factory=list)
    bw: IoStat = field(default_factory=IoStat)
    iops: IoStat = field(default_factory=IoStat)

    def merge(self, other: DirStats) -> None:
        self.ios += other.ios
        self.bytes += other.bytes
        self.short += other.short
        self.slat += other.slat
        self.clat += other.clat
        self.bw.sum_pure(other.bw)
        self.iops.sum_pure(other.iops)

    @property
    def lat(self) -> list[int]:
        """Total latency: submission + completion."""
        return [s + c for s, c in zip(self.slat, self.clat, strict=True)]


@dataclass
class Rusage:
    """The process's CPU time (ms), context switches and faults over a job."""

    usr_ms: float = 0.0
    sys_ms: float = 0.0
    ctx: int = 0
    majf: int = 0
    minf: int = 0

    def merge(self, other: Rusage) -> None:
        self.usr_ms += other.usr_ms
        self.sys_ms += other.sys_ms
        self.ctx += other.ctx
        self.majf += other.majf
        self.minf += other.minf


@dataclass
class Sampler:
    """fio's add_bw_samples()/add_iops_samples(): one rate per interval with I/O in it."""

    bw_msec: int = 500
    iops_msec: int = 500
    t_bw: float = 0.0
    t_iops: float = 0.0
    bytes_at: list[int] = field(default_factory=lambda: [0, 0])
    ios_at: list[int] = field(default_factory=lambda: [0, 0])

    def start(self, now: float) -> None:
        self.t_bw = self.t_iops = now
        self.bytes_at = [0, 0]
        self.ios_at = [0, 0]

    def tick(self, now: float, dirs: Sequence[DirStats]) -> float:
        """Take the samples that are due at ``now`` (s); returns seconds to the next one."""
        nxt = []
        for is_bw, msec in ((True, self.bw_msec), (False, self.iops_msec)):
            last = self.t_bw if is_bw else self.t_iops
            spent = int((now - last) * 1000)
            if spent < msec:
                nxt.append((msec - spent) / 1000)
                continue
            for i, d in enumerate(dirs):
                cur = d.bytes if is_bw else d.ios
                seen = self.bytes_at if is_bw else self.ios_at
                delta = cur - seen[i]
                if not delta:
                    continue  # no entries for the interval, as fio
                if is_bw:
                    d.bw.add(delta * 1000 // spent // 1024)  # KiB/s
                else:
                    d.iops.add(delta * 1000 // spent)
                seen[i] = cur
            if is_bw:
                self.t_bw = now
            else:
                self.t_iops = now
            nxt.append(msec / 1000)
        return min(nxt)


@dataclass
class JobResult:
    """One job clone's outcome (or a reporting group's, merged)."""

    job: Any
    """The vkfio.Job (Any: vkfio imports this module, not the other way round)."""
    jobnum: int
    pid: int = 0
    read: DirStats = field(default_factory=DirStats)
    write: DirStats = field(default_factory=DirStats)
    runtime_ms: int = 0
    error: int = 0
    errmsg: str = ""
    verify_errors: list[str] = field(default_factory=list)
    start: float = 0.0
    members: int = 1
    cpu: Rusage = field(default_factory=Rusage)
    io_u_map: list[int] = field(default_factory=lambda: [0] * 7)
    io_u_submit: list[int] = field(default_factory=lambda: [0] * 7)
    io_u_complete: list[int] = field(default_factory=lambda: [0] * 7)
    total_submit: int = 0
    total_complete: int = 0
    cpu_runtime_ms: int = 0
    """Run time the CPU percentages divide by (a group's: its clones' run times summed)."""

    def mark_submit(self, inflight: int, nr: int) -> None:
        """One submit of ``nr`` I/Os leaving ``inflight`` in flight (io_u_mark_depth/submit)."""
        self.io_u_map[_depth_idx(inflight)] += nr
        self.io_u_submit[_batch_idx(nr)] += 1
        self.total_submit += 1

    def mark_complete(self, nr: int) -> None:
        """One reap of ``nr`` completions (io_u_mark_complete)."""
        self.io_u_complete[_batch_idx(nr)] += 1
        self.total_complete += 1

    def reset(self) -> None:
        """reset_io_stats(), at the end of ramp_time."""
        self.read, self.write = DirStats(), DirStats()
        self.io_u_map, self.io_u_submit, self.io_u_complete = [0] * 7, [0] * 7, [0] * 7
        self.total_submit = self.total_complete = 0


def merge_results(results: list[JobResult]) -> JobResult:
    """group_reporting: one result for the clones (sum_thread_stats)."""
    m = JobResult(results[0].job, 0, results[0].pid, members=len(results))
    m.start = min(r.start for r in results)
    for r in results:
        m.read.merge(r.read)
        m.write.merge(r.write)
        m.runtime_ms = max(m.runtime_ms, r.runtime_ms)
        m.error = m.error or r.error
        m.verify_errors += r.verify_errors
        m.cpu.merge(r.cpu)
        for dst, src in (
            (m.io_u_map, r.io_u_map),
            (m.io_u_submit, r.io_u_submit),
            (m.io_u_complete, r.io_u_complete),
        ):
            for i, v in enumerate(src):
                dst[i] += v
        m.total_submit += r.total_submit
        m.total_complete += r.total_complete
    # CPU percentages are time over run time; clones' run times add up like their CPU times.
    m.cpu_runtime_ms = sum(_cpu_runtime(r) for r in results)
    return m


def _cpu_runtime(r: JobResult) -> int:
    return r.cpu_runtime_ms or r.runtime_ms


# ---- the run status group ---------------------------------------------------------------------


@dataclass
class GroupStats:
    """fio's struct group_run_stats for group 0 (every vkfio job is in it)."""

    # Indexed by direction: read, write, trim (vkfio never trims; kept for fio's layout).
    iobytes: list[int] = field(default_factory=lambda: [0, 0, 0])
    agg: list[int] = field(default_factory=lambda: [0, 0, 0])
    min_bw: list[int] = field(default_factory=lambda: [0, 0, 0])
    max_bw: list[int] = field(default_factory=lambda: [0, 0, 0])
    min_run: list[int] = field(default_factory=lambda: [0, 0, 0])
    max_run: list[int] = field(default_factory=lambda: [0, 0, 0])

    @classmethod
    def of(cls, reported: list[JobResult]) -> GroupStats:
        g = cls()
        for i, pick in enumerate(("read", "write")):
            runs = [(r.runtime_ms, getattr(r, pick).bytes) for r in reported]
            runs = [(rt, b) for rt, b in runs if b and rt]
            if not runs:
                continue
            bws = [b * 1000 // rt for rt, b in runs]
            g.iobytes[i] = sum(b for _, b in runs)
            g.min_bw[i], g.max_bw[i] = min(bws), max(bws)
            g.min_run[i] = min(rt for rt, _ in runs)
            g.max_run[i] = max(rt for rt, _ in runs)
            g.agg[i] = g.iobytes[i] * 1000 // g.max_run[i]
        return g

    def p_of_agg(self, ddir: int, mean: float) -> float:
        """convert_agg_kbytes_percent(): a job's mean bw as % of the group's (≤ 100)."""
        if self.agg[ddir] > 1024:
            return min(100.0, mean * 100.0 / (self.agg[ddir] / 1024.0))
        return 100.0


# ---- JSON -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOptions:
    """What the job asks of the report: percentile list and which latencies get them."""

    plist: tuple[float, ...] = PERCENTILES
    slat_percentiles: bool = False
    clat_percentiles: bool = True
    lat_percentiles: bool = False
    json_plus: bool = False


def lat_json(samples: Sequence[int], pct: bool, ro: ReportOptions) -> dict[str, Any]:
    """add_ddir_lat_json(): min/max/mean/stddev/N, with percentiles (and json+ bins)."""
    if not len(samples):
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    a = np.asarray(samples, dtype=np.float64)
    out: dict[str, Any] = {
        "min": int(a.min()),
        "max": int(a.max()),
        "mean": float(a.mean()),
        "stddev": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "N": len(a),
    }
    if pct:
        vals = percentiles(samples, ro.plist)
        out["percentile"] = {f"{p:f}": v for p, v in zip(ro.plist, vals, strict=True)}
        if ro.json_plus:
            hist = histogram(samples)
            out["bins"] = {str(plat_val(int(i))): int(hist[i]) for i in np.flatnonzero(hist)}
    return out


def ddir_json(
    d: DirStats, runtime_ms: int, g: GroupStats, ddir: int, ro: ReportOptions
) -> dict[str, Any]:
    """add_ddir_status_json()."""
    rt = runtime_ms if d.ios else 0
    bw_bytes = d.bytes * 1000 // rt if rt else 0
    iops = d.ios * 1000.0 / rt if rt else 0.0
    bw = d.bw.calc()
    io = d.iops.calc()
    return {
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes >> 10,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024,
        "iops": iops,
        "runtime": rt,
        "total_ios": d.ios,
        "short_ios": d.short,
        "drop_ios": 0,
        "slat_ns": lat_json(d.slat, ro.slat_percentiles, ro),
        "clat_ns": lat_json(d.clat, ro.clat_percentiles, ro),
        "lat_ns": lat_json(d.lat, ro.lat_percentiles, ro),
        "bw_min": bw[0] if bw else 0,
        "bw_max": bw[1] if bw else 0,
        "bw_agg": g.p_of_agg(ddir, bw[2]) if bw else 0.0,
        "bw_mean": bw[2] if bw else 0.0,
        "bw_dev": bw[3] if bw else 0.0,
        "bw_samples": d.bw.samples,
        "iops_min": io[0] if io else 0,
        "iops_max": io[1] if io else 0,
        "iops_mean": io[2] if io else 0.0,
        "iops_stddev": io[3] if io else 0.0,
        "iops_samples": d.iops.samples,
    }


def _dist(counts: Sequence[int], total: int) -> list[float]:
    """stat_calc_dist(): percentages, at least 0.1 for a non-empty bucket."""
    if not total:
        return [0.0] * len(counts)
    return [max(0.1, c * 100.0 / total) if c else 0.0 for c in counts]


def _bucket_pcts(v: np.ndarray, edges: Sequence[int], n: int) -> list[float]:
    """Bucket k holds edges[k-1] ≤ v < edges[k] (fio's switch ranges); % of n, ≥ 0.01."""
    idx = np.searchsorted(np.asarray(edges), v, side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1)
    return [max(0.01, int(c) * 100.0 / n) if c else 0.0 for c in counts]


def lat_buckets(clat: Sequence[int]) -> tuple[list[float], list[float], list[float]]:
    """io_u_mark_latency() + stat_calc_lat(): % of I/Os per ns / us / ms bucket.

    Below 1 µs the ns buckets, below 1 ms the µs buckets (in whole µs), else the ms ones,
    the last of which (">=2000") takes everything from 2 s."""
    n = max(1, len(clat))
    a = np.asarray(clat, dtype=np.int64)
    ns = _bucket_pcts(a[a < 1000], _LAT_EDGES, n)[:10]
    us = _bucket_pcts(a[(a >= 1000) & (a < 1_000_000)] // 1000, _LAT_EDGES, n)[:10]
    ms = _bucket_pcts(a[a >= 1_000_000] // 1_000_000, _LAT_M_EDGES, n)[:12]
    return ns, us, ms


def job_json(
    r: JobResult, name: str, elapsed: int, g: GroupStats, ro: ReportOptions
) -> dict[str, Any]:
    """show_thread_status_json() for one job (or a reporting group)."""
    clat = r.read.clat + r.write.clat
    total = r.read.ios + r.write.ios
    crt = _cpu_runtime(r)
    ln, lu, lm = lat_buckets(clat)
    depth = [_dist(r.io_u_map, total), _dist(r.io_u_submit, r.total_submit)]
    depth.append(_dist(r.io_u_complete, r.total_complete))
    return {
        "jobname": name,
        "groupid": 0,
        "job_start": int(r.start * 1000),
        "error": r.error,
        "eta": 0,
        "elapsed": elapsed,
        "job options": dict(r.job.options),
        "read": ddir_json(r.read, r.runtime_ms, g, 0, ro),
        "write": ddir_json(r.write, r.runtime_ms, g, 1, ro),
        "trim": ddir_json(DirStats(), 0, g, 2, ro),
        "sync": {"total_ios": 0, "lat_ns": lat_json([], False, ro)},
        "job_runtime": r.runtime_ms,
        "usr_cpu": r.cpu.usr_ms * 100.0 / crt if crt else 0.0,
        "sys_cpu": r.cpu.sys_ms * 100.0 / crt if crt else 0.0,
        "ctx": r.cpu.ctx,
        "majf": r.cpu.majf,
        "minf": r.cpu.minf,
        "iodepth_level": dict(zip(("1", "2", "4", "8", "16", "32", ">=64"), depth[0], strict=True)),
        "iodepth_submit": dict(zip(_BATCH_KEYS, depth[1], strict=True)),
        "iodepth_complete": dict(zip(_BATCH_KEYS, depth[2], strict=True)),
        "latency_ns": dict(zip(map(str, _LAT_EDGES), ln, strict=True)),
        "latency_us": dict(zip(map(str, _LAT_EDGES), lu, strict=True)),
        "latency_ms": dict(zip([*map(str, _LAT_M_EDGES), ">=2000"], lm, strict=True)),
        "latency_depth": r.job.depth,
        "latency_target": 0,
        "latency_target_ns": 0,
        "latency_percentile": 100.0,
        "latency_window": 0,
        "latency_window_us": 0,
        # fio adds "desc" only for a job with a description.
        **({"desc": r.job.description} if r.job.description else {}),
    }


_BATCH_KEYS = ("0", "4", "8", "16", "32", "64", ">=64")


def _grouped(results: list[JobResult]) -> list[JobResult]:
    """What fio reports: one entry per clone, or one per job with group_reporting."""
    by_job: dict[int, list[JobResult]] = {}
    for r in results:
        by_job.setdefault(id(r.job), []).append(r)
    out: list[JobResult] = []
    for rs in by_job.values():
        out += [merge_results(rs)] if rs[0].job.group_reporting else rs
    return out


def report_options(job: Any) -> ReportOptions:
    """The report settings of a job (its percentile_list and *_percentiles options)."""
    return ReportOptions(
        plist=tuple(sorted(job.percentile_list)),
        slat_percentiles=job.slat_percentiles,
        clat_percentiles=job.clat_percentiles,
        lat_percentiles=job.lat_percentiles,
    )


def report_json(
    gopts: dict[str, str],
    results: list[JobResult],
    disks: list[dict[str, Any]],
    json_plus: bool = False,
) -> dict[str, Any]:
    """The whole --output-format=json (or json+) document."""
    now = time.time()
    reported = _grouped(results)
    g = GroupStats.of(reported)
    elapsed = max(1, round(max((r.runtime_ms for r in results), default=0) / 1000))
    jobs = []
    for r in reported:
        ro = dataclasses.replace(report_options(r.job), json_plus=json_plus)
        jobs.append(job_json(r, r.job.name, elapsed, g, ro))
    return {
        "fio version": FIO_VERSION,
        "timestamp": int(now),
        "timestamp_ms": int(now * 1000),
        "time": time.ctime(now),
        "global options": dict(gopts),
        "jobs": jobs,
        "disk_util": disks,
    }


# ---- normal (text) output ---------------------------------------------------------------------


def _display_lat(name: str, ns: Sequence[int]) -> str:
    """display_lat(): one slat/clat/lat line, in nsec, usec or msec as fio picks."""
    if not len(ns):
        return ""
    a = np.asarray(ns, dtype=np.float64)
    lo, hi, mean = int(a.min()), int(a.max()), float(a.mean())
    dev = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    base = "(nsec)"
    if lo > 2_000_000 and hi > 99_999_999 and dev > 1_000_000.0:
        lo, hi, mean, dev, base = lo // 10**6, hi // 10**6, mean / 1e6, dev / 1e6, "(msec)"
    elif lo > 2000 and hi > 99_999 and dev > 1000.0:
        lo, hi, mean, dev, base = lo // 1000, hi // 1000, mean / 1e3, dev / 1e3, "(usec)"
    return (
        f"    {name} {base}: min={num2str(lo, 6)}, max={num2str(hi, 6)}, "
        f"avg={mean:5.02f}, stdev={dev:5.02f}\n"
    )


def _show_percentiles(label: str, ns: Sequence[int], plist: Sequence[float]) -> str:
    """show_clat_percentiles(): the bracketed table, 4 per line at precision 2."""
    vals = percentiles(ns, plist)
    lo, hi = min(vals), max(vals)
    if lo > 2_000_000 and hi > 99_999_999:
        scale, unit = 2, "msec"
    elif lo > 2000 and hi > 99_999:
        scale, unit = 1, "usec"
    else:
        scale, unit = 0, "nsec"
    for _ in range(scale):
        vals = [(v + 999) // 1000 for v in vals]
    width = max(5, int(math.log10(max(1, hi // 1000**scale)) + 1))
    per_line = (80 - 7) // (2 + 10 + width)
    out = [f"    {label} percentiles ({unit}):\n     |"]
    for j, (p, v) in enumerate(zip(plist, vals, strict=True)):
        if j and j % per_line == 0:
            out.append("     |")
        last = j == len(vals) - 1
        out.append(f" {p:5.2f}th=[{v:{width}d}]{chr(10) if last else ','}")
        if not last and j % per_line == per_line - 1:
            out.append("\n")
    return "".join(out)


def _ddir_text(label: str, d: DirStats, rt: int, g: GroupStats, ddir: int, job: Any) -> str:
    """show_ddir_status()."""
    bw = d.bytes * 1000 // rt
    iops = d.ios * 1000 // rt
    out = [
        (
            f"  {label}: IOPS={num2str(iops)}, BW={num2str(bw, 4, 1, True, 'B/s')} "
            f"({num2str(bw, 4, 1, False, 'B/s')})({num2str(d.bytes, 4, 1, True, 'B')}/{rt}msec)\n"
        ),
        _display_lat("slat", d.slat),
        _display_lat("clat", d.clat),
        _display_lat(" lat", d.lat),
    ]
    plist = sorted(job.percentile_list)
    for on, name, ns in (
        (job.slat_percentiles, "slat", d.slat),
        (job.clat_percentiles and not job.lat_percentiles, "clat", d.clat),
        (job.lat_percentiles, "lat", d.lat),
    ):
        if on and ns:
            out.append(_show_percentiles(name, ns, plist))
    s = d.bw.calc()
    if s:
        lo, hi, mean, dev = s
        unit = "KiB"
        if mean > 1024 * 1024:
            lo, hi, mean, dev, unit = lo // 1024, hi // 1024, mean / 1024, dev / 1024, "MiB"
        out.append(
            f"   bw ({unit:>5s}/s): min={lo:5d}, max={hi:5d}, per={g.p_of_agg(ddir, s[2]):3.2f}%, "
            f"avg={mean:5.02f}, stdev={dev:5.02f}, samples={d.bw.samples}\n"
        )
    s = d.iops.calc()
    if s:
        out.append(
            f"   iops        : min={s[0]:5d}, max={s[1]:5d}, avg={s[2]:5.02f}, "
            f"stdev={s[3]:5.02f}, samples={d.iops.samples}\n"
        )
    return "".join(out)


def _show_lat(pcts: Sequence[float], labels: Sequence[str], unit: str) -> str:
    """show_lat(): the non-zero latency buckets, five per line."""
    cells = [f"{lab}={p:3.2f}%" for lab, p in zip(labels, pcts, strict=True) if p > 0]
    lines = [cells[i : i + 5] for i in range(0, len(cells), 5)]
    return "".join(f"  lat ({unit})   : " + ", ".join(ln) + "\n" for ln in lines)


def _scale_down_ns(v: int) -> str:
    if v >= 2_000_000_000:
        return f"{v / 1e9:.2f}s"
    if v >= 2_000_000:
        return f"{v / 1e6:.2f}ms"
    if v >= 2000:
        return f"{v / 1e3:.2f}us"
    return f"{v:.2f}ns"


def thread_text(r: JobResult, g: GroupStats) -> str:
    """show_thread_status_normal() for one job (or a reporting group)."""
    out = [msg + "\n" for msg in r.verify_errors[:10]]
    err = f"err={r.error:2d}" + (f" ({r.errmsg})" if r.error and r.errmsg else "")
    out.append(f"{r.job.name}: (groupid=0, jobs={r.members}): {err}: pid={r.pid}: {time.ctime()}\n")
    if r.job.description:
        out.append(f"  Description  : [{r.job.description}]\n")
    for ddir, (label, d) in enumerate((("read", r.read), ("write", r.write))):
        if d.bytes:
            out.append(_ddir_text(label, d, max(1, r.runtime_ms), g, ddir, r.job))
    ln, lu, lm = lat_buckets(r.read.clat + r.write.clat)
    edges = [str(e) for e in _LAT_EDGES]
    out.append(_show_lat(ln, edges, "nsec"))
    out.append(_show_lat(lu, edges, "usec"))
    out.append(_show_lat(lm, [*edges, "2000", ">=2000"], "msec"))
    crt = _cpu_runtime(r)
    usr = r.cpu.usr_ms * 100.0 / crt if crt else 0.0
    sys_ = r.cpu.sys_ms * 100.0 / crt if crt else 0.0
    out.append(
        f"  cpu          : usr={usr:3.2f}%, sys={sys_:3.2f}%, ctx={r.cpu.ctx}, "
        f"majf={r.cpu.majf}, minf={r.cpu.minf}\n"
    )
    total = r.read.ios + r.write.ios
    lv = _dist(r.io_u_map, total)
    out.append(
        "  IO depths    : "
        + ", ".join(
            f"{k}={v:3.1f}%"
            for k, v in zip(("1", "2", "4", "8", "16", "32", ">=64"), lv, strict=True)
        )
        + "\n"
    )
    for name, counts, tot in (
        ("submit", r.io_u_submit, r.total_submit),
        ("complete", r.io_u_complete, r.total_complete),
    ):
        cells = ", ".join(
            f"{k}={v:3.1f}%" for k, v in zip(_BATCH_KEYS, _dist(counts, tot), strict=True)
        )
        out.append(f"     {name:<10s}: {cells}\n")
    out.append(
        f"     issued rwts: total={r.read.ios},{r.write.ios},0,0 "
        f"short={r.read.short},{r.write.short},0,0 dropped=0,0,0,0\n"
    )
    out.append(
        f"     latency   : target={_scale_down_ns(0)}, window={_scale_down_ns(0)}, "
        f"percentile=100.00%, depth={r.job.depth}\n"
    )
    return "".join(out)


def group_text(g: GroupStats) -> str:
    """show_group_stats() for group 0."""
    out = ["\nRun status group 0 (all jobs):\n"]
    for i, label in enumerate(("   READ", "  WRITE")):
        if not g.max_run[i]:
            continue

        def both(n: int, unit: str) -> tuple[str, str]:
            return num2str(n, 4, 1, True, unit), num2str(n, 4, 1, False, unit)

        agg, agg_alt = both(g.agg[i], "B/s")
        lo, lo_alt = both(g.min_bw[i], "B/s")
        hi, hi_alt = both(g.max_bw[i], "B/s")
        io, io_alt = both(g.iobytes[i], "B")
        out.append(
            f"{label}: bw={agg} ({agg_alt}), {lo}-{hi} ({lo_alt}-{hi_alt}), io={io} ({io_alt}), "
            f"run={g.min_run[i]}-{g.max_run[i]}msec\n"
        )
    return "".join(out)


def disk_text(disks: list[dict[str, Any]]) -> str:
    """show_disk_util() (normal output)."""
    if not disks:
        return ""
    out = ["\nDisk stats (read/write):\n"]
    for d in disks:
        out.append(
            f"  {d['name']}: ios={d['read_ios']}/{d['write_ios']}, "
            f"sectors={d['read_sectors']}/{d['write_sectors']}, "
            f"merge={d['read_merges']}/{d['write_merges']}, "
            f"ticks={d['read_ticks']}/{d['write_ticks']}, in_queue={d['in_queue']}, "
            f"util={d['util']:3.2f}%\n"
        )
    return "".join(out)


def header_text(jobs: list[Any]) -> str:
    """The lines fio prints before starting: one per job, version, process count."""
    out = []
    for job in jobs:
        b = f"{job.bs}B-{job.bs}B"
        out.append(
            f"{job.name}: (g=0): rw={job.rw}, bs=(R) {b}, (W) {b}, (T) {b}, "
            f"ioengine={job.engine}, iodepth={job.iodepth}\n"
        )
    n = sum(job.numjobs for job in jobs)
    out.append(f"{FIO_VERSION}\nStarting {n} process{'es' if n > 1 else ''}\n")
    return "".join(out)


def report_text(
    results: list[JobResult], disks: list[dict[str, Any]] | None = None, header: bool = True
) -> str:
    """fio's normal output (``header``: with the lines fio prints before the run)."""
    reported = _grouped(results)
    g = GroupStats.of(reported)
    seen: list[Any] = []
    for r in results:
        if all(r.job is not j for j in seen):
            seen.append(r.job)
    body = "".join(thread_text(r, g) for r in reported)
    return (header_text(seen) if header else "") + body + group_text(g) + disk_text(disks or [])
