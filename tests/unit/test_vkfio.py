"""vkfio's job-file parser and its fio 3.x JSON report structure (no daemon)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vkclient import vkfio, vkfio_stats

DATA = Path(__file__).resolve().parent.parent / "data"


def test_seed_004_job_parses_unchanged() -> None:
    """The job from seed 004's mail."""
    g, [job] = vkfio.parse_jobfile((DATA / "seed004.fio").read_text())
    assert g == {}
    assert (job.name, job.direct, job.engine, job.bs, job.size) == (
        "reader",
        True,
        "libaio",
        4096,
        1 << 30,
    )
    assert (job.numjobs, job.rw, job.iodepth, job.depth) == (1, "read", 64, 64)


def test_global_comments_sizes_and_overrides() -> None:
    """[global] applies to every job, a job overrides it; ';' and '#' comments; suffixes."""
    text = """
; a comment
[global]
ioengine=psync
bs=8k
size=1MiB
# another
direct

[a]
rw=randrw
rwmixread=70
runtime=2m
time_based

[b]
bs=4KiB
rw=write
verify=crc32c
group_reporting
numjobs=3
offset=1m
randseed=7
"""
    g, (a, b) = vkfio.parse_jobfile(text)
    assert g == {"ioengine": "psync", "bs": "8k", "size": "1MiB", "direct": "1"}
    assert (a.engine, a.bs, a.size, a.direct, a.rw, a.rwmixread) == (
        "psync",
        8192,
        1 << 20,
        True,
        "randrw",
        70,
    )
    assert (a.runtime, a.time_based, a.depth) == (120.0, True, 1)
    assert (b.bs, b.rw, b.verify, b.group_reporting, b.numjobs, b.offset, b.randseed) == (
        4096, "write", "crc32c", True, 3, 1 << 20, 7,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("[j]\nsize=1m\nbogus_opt=1\n", "unknown option 'bogus_opt'"),
        ("[j]\nsize=1m\nioengine=mmap\n", "unknown ioengine 'mmap'"),
        ("[j]\nsize=1m\nrw=trim\n", "unsupported rw"),
        ("[j]\nsize=1m\nverify=sha512\n", "unsupported verify"),
        ("[j]\nrw=read\n", "need a size"),
        ("size=1m\n", "outside a section"),
        ("[global]\nsize=1m\n", "no jobs"),
        ("[j]\nsize=1x\n", "bad size"),
    ],
)
def test_errors_name_the_option(text: str, msg: str) -> None:
    """An unknown option or value is a clear error naming it."""
    with pytest.raises(vkfio.JobError, match=msg):
        vkfio.parse_jobfile(text)


def test_sizes_and_times() -> None:
    """fio's suffixes (kb_base=1024) and time units."""
    assert [vkfio.parse_size(s) for s in ("512", "4k", "4K", "4KiB", "1m", "1g", "2T")] == [
        512, 4096, 4096, 4096, 1 << 20, 1 << 30, 2 << 40,
    ]  # fmt: skip
    assert [vkfio.parse_time(s) for s in ("10", "10s", "500ms", "2m", "1h")] == [
        10.0, 10.0, 0.5, 120.0, 3600.0,
    ]  # fmt: skip


def test_crc32c_known_value() -> None:
    """CRC-32C check value of '123456789'."""
    assert vkfio.crc32c(b"123456789") == 0xE3069283


def test_verify_block_roundtrip() -> None:
    """A verify block checks; a flipped byte, a wrong offset, a bad magic are reported."""
    for kind in ("crc32c", "md5"):
        blk = vkfio.verify_block(kind, 8192, 4096, 1)
        assert vkfio.check_block(kind, blk, 8192) is None
        bad = bytearray(blk)
        bad[100] ^= 1
        assert "verify failed" in (vkfio.check_block(kind, bytes(bad), 8192) or "")
        assert "bad header offset" in (vkfio.check_block(kind, blk, 0) or "")
        assert "bad magic" in (vkfio.check_block(kind, bytes(4096), 8192) or "")


def _shape(x: Any) -> Any:
    """Key structure: dicts → {key: shape}, lists → shape of the first item, leaves → type."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return "num" if isinstance(x, int | float) and not isinstance(x, bool) else type(x).__name__


_PCT = ["1.000000", "5.000000", "10.000000", "20.000000", "30.000000", "40.000000", "50.000000",
        "60.000000", "70.000000", "80.000000", "90.000000", "95.000000", "99.000000",
        "99.500000", "99.900000", "99.950000", "99.990000"]  # fmt: skip
_LAT = ["min", "max", "mean", "stddev", "N"]
_DDIR = [
    "io_bytes", "io_kbytes", "bw_bytes", "bw", "iops", "runtime", "total_ios", "short_ios",
    "drop_ios", "slat_ns", "clat_ns", "lat_ns", "bw_min", "bw_max", "bw_agg", "bw_mean",
    "bw_dev", "bw_samples", "iops_min", "iops_max", "iops_mean", "iops_stddev", "iops_samples",
]  # fmt: skip
_JOB = [
    "jobname", "groupid", "job_start", "error", "eta", "elapsed", "job options", "read",
    "write", "trim", "sync", "job_runtime", "usr_cpu", "sys_cpu", "ctx", "majf", "minf",
    "iodepth_level", "iodepth_submit", "iodepth_complete", "latency_ns", "latency_us",
    "latency_ms", "latency_depth", "latency_target", "latency_target_ns",
    "latency_percentile", "latency_window", "latency_window_us",
]  # fmt: skip
_BUCKETS = {
    "iodepth_level": ["1", "2", "4", "8", "16", "32", ">=64"],
    "iodepth_submit": ["0", "4", "8", "16", "32", "64", ">=64"],
    "iodepth_complete": ["0", "4", "8", "16", "32", "64", ">=64"],
    "latency_ns": ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000"],
    "latency_us": ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000"],
    "latency_ms": ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000", "2000",
                   ">=2000"],
}  # fmt: skip
"""Key order of a job object as fio 3.42 prints it (show_thread_status_json in stat.c,
checked against a recorded fio-3.42 libaio run): the two keys after latency_target and
latency_window are the ones fio releases after the tests/data recording added."""
_NEW_IN_3_4X = {"latency_target_ns", "latency_window_us"}


def _seed_result() -> vkfio.JobResult:
    _, [job] = vkfio.parse_jobfile((DATA / "seed004.fio").read_text())
    r = vkfio.JobResult(job, 0, pid=100, runtime_ms=1381)
    r.read.ios, r.read.bytes = 3, 3 * 4096
    r.read.slat, r.read.clat = [10, 20, 30], [1000, 2000, 300_000]
    for v in (730152, 776512):
        r.read.bw.add(v)
    r.mark_submit(64, 3)
    r.mark_complete(3)
    return r


def test_json_keys_match_recorded_fio() -> None:
    """Keys and nesting equal the recorded fio 3.x JSON (tests/data) but for the keys newer
    fio releases added, percentile keys included."""
    real = json.loads((DATA / "fio-3.x-libaio-read.json").read_text())
    r = _seed_result()
    ours = vkfio.report_json({}, [r], [dict(real["disk_util"][0])])
    job = ours["jobs"][0]
    assert set(job) - set(real["jobs"][0]) == _NEW_IN_3_4X
    for key in _NEW_IN_3_4X:
        del job[key]
    assert _shape(ours) == _shape(real)
    assert list(job["read"]["clat_ns"]["percentile"]) == _PCT
    assert job["read"]["iops"] == pytest.approx(3 * 1000 / 1381)
    assert job["read"]["bw"] == (3 * 4096 * 1000 // 1381) >> 10


def test_json_key_order_matches_fio_3_42() -> None:
    """Every key in fio 3.42's order: job, direction, latency and bucket objects."""
    doc = vkfio.report_json({"bs": "4k"}, [_seed_result()], [])
    assert list(doc) == [
        "fio version", "timestamp", "timestamp_ms", "time", "global options", "jobs",
        "disk_util",
    ]  # fmt: skip
    assert doc["fio version"] == vkfio.FIO_VERSION == "fio-3.42"
    job = doc["jobs"][0]
    assert list(job) == _JOB
    for d in ("read", "write", "trim"):
        assert list(job[d]) == _DDIR
        for lat in ("slat_ns", "lat_ns"):
            assert list(job[d][lat]) == _LAT
    assert list(job["read"]["clat_ns"]) == [*_LAT, "percentile"]
    assert list(job["write"]["clat_ns"]) == _LAT  # no samples: no percentile object
    assert list(job["sync"]) == ["total_ios", "lat_ns"]
    for key, names in _BUCKETS.items():
        assert list(job[key]) == names


def test_bw_iops_cpu_depth_values() -> None:
    """bw_* from the samples (fio's per= against the group's aggregate), CPU from rusage,
    depth distributions with fio's 0.1% floor."""
    r = _seed_result()
    r.cpu = vkfio.Rusage(usr_ms=138.0, sys_ms=690.0, ctx=10, majf=0, minf=74)
    job = vkfio.report_json({}, [r], [])["jobs"][0]
    rd = job["read"]
    assert (rd["bw_min"], rd["bw_max"], rd["bw_samples"]) == (730152, 776512, 2)
    assert rd["bw_mean"] == pytest.approx(753332.0)
    assert rd["bw_dev"] == pytest.approx(32781.47, abs=0.01)  # the seed mail's figures
    assert rd["bw_agg"] == 100.0  # 3 I/Os: the group aggregate is below 1 KiB/s
    assert (rd["iops_samples"], rd["iops_min"], rd["iops_mean"]) == (0, 0, 0.0)
    assert job["usr_cpu"] == pytest.approx(10.0, abs=0.01)
    assert job["sys_cpu"] == pytest.approx(50.0, abs=0.04)
    assert (job["ctx"], job["majf"], job["minf"]) == (10, 0, 74)
    assert job["iodepth_level"][">=64"] == 100.0
    assert job["iodepth_submit"]["4"] == job["iodepth_complete"]["4"] == 100.0
    # clat 1000 ns and 2000 ns are in the µs "2" and "4" buckets, 300 µs in "500".
    assert job["latency_us"]["2"] == job["latency_us"]["4"] == job["latency_us"]["500"]
    assert job["latency_us"]["500"] == pytest.approx(100 / 3)


def test_percentile_list_option() -> None:
    """percentile_list: sorted, '%f' keys, fio's bucket values; bad lists are errors."""
    _, [job] = vkfio.parse_jobfile(
        "[j]\nsize=1m\npercentile_list=99.9:50:99\nlat_percentiles=1\nslat_percentiles=1\n"
    )
    assert job.percentile_list == (99.9, 50.0, 99.0)
    r = vkfio.JobResult(job, 0, runtime_ms=10)
    r.read.ios, r.read.bytes = 4, 4 * 4096
    r.read.slat, r.read.clat = [100, 100, 100, 100], [321_000, 322_000, 323_000, 10_000_000]
    rd = vkfio.report_json({}, [r], [])["jobs"][0]["read"]
    assert list(rd["clat_ns"]["percentile"]) == ["50.000000", "99.000000", "99.900000"]
    assert rd["clat_ns"]["percentile"]["50.000000"] == 321536  # fio's bucket, as in the seed
    assert rd["clat_ns"]["percentile"]["99.900000"] == 10027008  # 2^23 + 12.5 * 2^17
    assert "percentile" in rd["lat_ns"]
    assert "percentile" in rd["slat_ns"]
    for bad in ("0", "101", "a:b", ":".join(["1"] * 21)):
        with pytest.raises(vkfio.JobError, match="percentile_list"):
            vkfio.parse_jobfile(f"[j]\nsize=1m\npercentile_list={bad}\n")


def test_json_plus_bins() -> None:
    """json+: clat_ns.bins maps fio's bucket values to counts."""
    r = _seed_result()
    clat = vkfio.report_json({}, [r], [], json_plus=True)["jobs"][0]["read"]["clat_ns"]
    assert clat["bins"] == {"1004": 1, "2008": 1, "301056": 1}  # bucket midpoints
    assert sum(clat["bins"].values()) == clat["N"]


def test_batching_timing_options_parse() -> None:
    """iodepth_batch_*, ramp_time, startdelay, thinktime (µs by default), *avgtime."""
    _, [j] = vkfio.parse_jobfile(
        "[j]\nsize=1m\nioengine=libaio\niodepth=32\niodepth_batch=8\n"
        "iodepth_batch_complete_min=4\niodepth_batch_complete_max=16\nramp_time=2\n"
        "startdelay=500ms\nthinktime=250\nthinktime_blocks=4\nbwavgtime=200\niopsavgtime=100\n"
    )
    assert (j.iodepth_batch_submit, j.iodepth_batch_complete_min) == (8, 4)
    assert j.iodepth_batch_complete_max == 16
    assert (j.ramp_time, j.startdelay, j.thinktime, j.thinktime_blocks) == (2.0, 0.5, 250e-6, 4)
    assert (j.bwavgtime, j.iopsavgtime) == (200, 100)
    _, [j] = vkfio.parse_jobfile("[j]\nsize=1m\niodepth_batch_submit=2\nthinktime=3ms\n")
    assert (j.iodepth_batch_submit, j.thinktime) == (2, 0.003)
    with pytest.raises(vkfio.JobError, match=r"iodepth_batch_complete_max \(2\) < "):
        vkfio.parse_jobfile(
            "[j]\nsize=1m\niodepth_batch_complete_min=4\niodepth_batch_complete_max=2\n"
        )
    with pytest.raises(vkfio.JobError, match="option 'bwavgtime'"):
        vkfio.parse_jobfile("[j]\nsize=1m\nbwavgtime=0\n")
    with pytest.raises(vkfio.JobError, match="bad time"):
        vkfio.parse_jobfile("[j]\nsize=1m\nramp_time=5parsecs\n")
    with pytest.raises(vkfio.JobError, match="unknown option 'iodepth_low'"):
        vkfio.parse_jobfile("[j]\nsize=1m\niodepth_low=4\n")


def test_num2str_renders_like_fio() -> None:
    """The seed mail's and a fio 3.42 run's renderings."""
    n2s = vkfio_stats.num2str
    assert n2s(189821) == "190k"
    assert n2s(1244) == "1244"
    assert n2s(777502896, 4, 1, True, "B/s") == "741MiB/s"
    assert n2s(777502896, 4, 1, False, "B/s") == "778MB/s"
    assert n2s(1 << 30, 4, 1, True, "B") == "1024MiB"
    assert n2s(1 << 30, 4, 1, False, "B") == "1074MB"
    assert n2s(50966528, 4, 1, True, "B") == "48.6MiB"
    assert n2s(5096143, 4, 1, True, "B/s") == "4977KiB/s"  # JSON bw 4976: fio rounds here
    assert n2s(5096143, 4, 1, False, "B/s") == "5096kB/s"
    assert n2s(3319900, 6) == "3319.9k"


def test_histogram_buckets() -> None:
    """fio's plat index ↔ value mapping (exact below 128 ns, ≤ 1/128 error above)."""
    vals = np.array([0, 1, 127, 128, 322_000, 10**9, 10**12])
    idx = vkfio_stats.plat_idx(vals)
    assert list(idx[:3]) == [0, 1, 127]
    assert vkfio_stats.plat_val(int(idx[4])) == 321536
    for v, i in zip(vals[3:6], idx[3:6], strict=True):
        assert abs(vkfio_stats.plat_val(int(i)) - v) <= v / 128
    assert idx[6] == vkfio_stats.PLAT_NR - 1  # beyond ~17 s: the last bucket


def test_sampler_takes_one_sample_per_interval() -> None:
    """bw (KiB/s) and IOPS every avgtime ms; an interval without I/O adds no sample."""
    d = vkfio.DirStats()
    idle = vkfio.DirStats()
    s = vkfio_stats.Sampler(500, 250)
    s.start(100.0)
    assert s.tick(100.1, (d, idle)) == pytest.approx(0.15, abs=0.002)
    d.ios, d.bytes = 1000, 1000 * 4096
    assert s.tick(100.25, (d, idle)) == pytest.approx(0.25)  # iops due, bw not yet
    assert (d.iops.samples, d.iops.min) == (1, 4000)
    d.ios, d.bytes = 3000, 3000 * 4096
    s.tick(100.5, (d, idle))
    assert (d.bw.samples, d.bw.mean) == (1, 3000 * 4 * 2)
    assert (d.iops.samples, d.iops.max) == (2, 8000)
    s.tick(101.0, (d, idle))  # no I/O in (100.5, 101.0]
    assert (d.bw.samples, d.iops.samples) == (1, 2)
    assert (idle.bw.samples, idle.iops.samples) == (0, 0)


def test_iostat_welford_and_group_sum() -> None:
    """IoStat matches numpy's mean/stddev; group_reporting sums clones (sum_stat pure_sum)."""
    vals = [3.0, 9.0, 4.0, 11.0, 7.0]
    a = vkfio_stats.IoStat()
    for v in vals:
        a.add(v)
    lo, hi, mean, dev = a.calc() or (0, 0, 0.0, 0.0)
    assert (lo, hi) == (3, 11)
    assert mean == pytest.approx(np.mean(vals))
    assert dev == pytest.approx(np.std(vals, ddof=1))
    b = vkfio_stats.IoStat()
    b.add(10.0)
    b.sum_pure(a)
    assert (b.min, b.max, b.samples) == (13.0, 21.0, 6)
    assert b.mean == pytest.approx(10.0 + np.mean(vals))


def test_depth_submit_complete_buckets() -> None:
    """io_u_mark_depth / _submit / _complete bucket edges."""
    r = vkfio.JobResult(None, 0)
    for depth in (1, 2, 3, 4, 7, 8, 16, 31, 32, 63, 64, 200):
        r.mark_submit(depth, 1)
    assert r.io_u_map == [1, 2, 2, 1, 2, 2, 2]
    r = vkfio.JobResult(None, 0)
    for nr in (0, 1, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65):
        r.mark_complete(nr)
    assert r.io_u_complete == [1, 2, 2, 2, 2, 2, 1]
    assert r.total_complete == 12


def test_latency_buckets_edges() -> None:
    """Bucket k holds [edge k-1, edge k): 999 ns → ns '1000', 1 µs → µs '2', 1.5 s → ms
    '2000', 2.5 s → '>=2000'; a non-empty bucket shows at least 0.01%."""
    ns, us, ms = vkfio_stats.lat_buckets([1, 999, 1000, 749_999, 1_500_000_000, 2_500_000_000])
    assert ns[0] == ns[9] == pytest.approx(100 / 6)
    assert us[0] == us[8] == pytest.approx(100 / 6)
    assert ms[10] == ms[11] == pytest.approx(100 / 6)
    assert sum(ns + us + ms) == pytest.approx(100.0)
    ns, _, _ = vkfio_stats.lat_buckets([5] + [5000] * 99_999)
    assert ns[2] == 0.01


def test_text_report_lines() -> None:
    """fio's text lines: bw / iops sample lines, cpu, IO depths, submit, complete, issued,
    latency, the run status group."""
    r = _seed_result()
    r.read.iops.add(182538)
    r.read.iops.add(194128)
    r.cpu = vkfio.Rusage(usr_ms=208.0, sys_ms=1161.7, ctx=10, majf=0, minf=74)
    text = vkfio.report_text([r])
    lines = text.splitlines()
    assert lines[0].startswith("reader: (g=0): rw=read, bs=(R) 4096B-4096B, (W) 4096B-4096B")
    assert lines[1:3] == ["fio-3.42", "Starting 1 process"]
    assert (
        "   bw (  KiB/s): min=730152, max=776512, per=100.00%, avg=753332.00, stdev=32781.47, "
        "samples=2"
    ) in lines
    assert "   iops        : min=182538, max=194128, avg=188333.00, stdev=8195.37, samples=2" in (
        lines
    )
    assert "  cpu          : usr=15.06%, sys=84.12%, ctx=10, majf=0, minf=74" in lines
    assert "  IO depths    : 1=0.0%, 2=0.0%, 4=0.0%, 8=0.0%, 16=0.0%, 32=0.0%, >=64=100.0%" in (
        lines
    )
    assert "     submit    : 0=0.0%, 4=100.0%, 8=0.0%, 16=0.0%, 32=0.0%, 64=0.0%, >=64=0.0%" in (
        lines
    )
    assert "     complete  : 0=0.0%, 4=100.0%, 8=0.0%, 16=0.0%, 32=0.0%, 64=0.0%, >=64=0.0%" in (
        lines
    )
    assert "     issued rwts: total=3,0,0,0 short=0,0,0,0 dropped=0,0,0,0" in lines
    assert "     latency   : target=0.00ns, window=0.00ns, percentile=100.00%, depth=64" in lines
    assert "  lat (usec)   : 2=33.33%, 4=33.33%, 500=33.33%" in lines
    assert "  read: IOPS=2, BW=8897B/s (8897B/s)(12.0KiB/1381msec)" in lines
    assert "    clat (nsec): min=1000, max=300000, avg=101000.00, stdev=172339.78" in lines
    assert "     lat (nsec): min=1010, max=300030, avg=101020.00, stdev=172348.46" in lines
    assert "    clat percentiles (nsec):" in lines
    assert "Run status group 0 (all jobs):" in lines
    assert any(ln.startswith("   READ: bw=8897B/s (8897B/s), 8897B/s-8897B/s") for ln in lines)


def test_text_percentile_table_like_the_seed() -> None:
    """The clat percentile table in µs, four per line, as in the seed 004 mail."""
    r = _seed_result()
    r.read.clat = [322_000] * 9990 + [12_255_000] * 10
    r.read.slat = [4000] * 10000
    r.read.ios = 10000
    text = vkfio.report_text([r])
    assert (
        "    clat percentiles (usec):\n"
        "     |  1.00th=[  322],  5.00th=[  322], 10.00th=[  322], 20.00th=[  322],\n"
    ) in text
    assert "     | 99.99th=[12256]\n" in text


def test_group_reporting_merges_clones() -> None:
    """group_reporting: one job entry, counts added, bw/iops samples summed, CPU averaged."""
    _, [job] = vkfio.parse_jobfile("[g]\nsize=1m\nnumjobs=2\ngroup_reporting\nrw=write\n")
    rs = []
    for n in range(2):
        r = vkfio.JobResult(job, n, runtime_ms=1000)
        r.write.ios, r.write.bytes = 100, 100 * 4096
        r.write.slat, r.write.clat = [0] * 100, [1000] * 100
        r.write.iops.add(100)
        r.cpu = vkfio.Rusage(usr_ms=100.0, sys_ms=50.0)
        rs.append(r)
    [j] = vkfio.report_json({}, rs, [])["jobs"]
    assert (j["write"]["total_ios"], j["write"]["iops_samples"]) == (200, 2)
    assert j["write"]["iops_mean"] == 200.0
    assert (j["usr_cpu"], j["sys_cpu"]) == (10.0, 5.0)
    assert "(groupid=0, jobs=2)" in vkfio.report_text(rs)


def test_name_and_description() -> None:
    """name= renames the job; description= shows as fio's "desc" key and Description line."""
    _, [job] = vkfio.parse_jobfile("[sec]\nname=renamed\ndescription=the seed\nsize=1m\n")
    r = vkfio.JobResult(job, 0, runtime_ms=10)
    r.read.ios, r.read.bytes, r.read.slat, r.read.clat = 1, 4096, [0], [1000]
    j = vkfio.report_json({}, [r], [])["jobs"][0]
    assert (j["jobname"], j["desc"]) == ("renamed", "the seed")
    assert list(j)[-1] == "desc"
    assert "  Description  : [the seed]\n" in vkfio.report_text([r])
    assert "desc" not in vkfio.report_json({}, [_seed_result()], [])["jobs"][0]


def test_progress_line() -> None:
    """fio's status line: rates since the last line, % done by bytes or (time_based) time."""
    p = vkfio.Progress(1 << 20, io.StringIO(), True, "R")
    for _ in range(64):
        p.add(True, 4096)
    line = p.line(2)
    assert line.startswith("Jobs: 2 (f=2): [R(2)][25.0%][r=")
    assert line.endswith(",w=0 IOPS][eta 00m:00s]")
    assert ",w=0B/s][r=" in line
    timed = vkfio.Progress(1, io.StringIO(), True, "W", seconds=3600.0)
    timed.add(False, 1 << 30)  # bytes do not matter for a time_based run
    assert "[W(1)][0.0%]" in timed.line(1)
