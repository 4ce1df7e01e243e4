"""vkfio's job-file parser and its fio 3.x JSON report structure (no daemon)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vkclient import vkfio

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


def test_json_keys_match_real_fio() -> None:
    """The report's keys and nesting equal fio 3.x's (tests/data), percentile keys included."""
    real = json.loads((DATA / "fio-3.x-libaio-read.json").read_text())
    _, [job] = vkfio.parse_jobfile((DATA / "seed004.fio").read_text())
    r = vkfio.JobResult(job, 0, pid=100, runtime_ms=1381)
    r.read.ios, r.read.bytes = 3, 3 * 4096
    r.read.slat, r.read.clat = [10, 20, 30], [1000, 2000, 300_000]
    ours = vkfio.report_json({}, [r], [dict(real["disk_util"][0])])
    assert _shape(ours) == _shape(real)
    assert list(ours["jobs"][0]["read"]["clat_ns"]["percentile"]) == [
        "1.000000", "5.000000", "10.000000", "20.000000", "30.000000", "40.000000", "50.000000",
        "60.000000", "70.000000", "80.000000", "90.000000", "95.000000", "99.000000",
        "99.500000", "99.900000", "99.950000", "99.990000",
    ]  # fmt: skip
    assert ours["jobs"][0]["read"]["iops"] == pytest.approx(3 * 1000 / 1381)
    assert ours["jobs"][0]["read"]["bw"] == (3 * 4096 * 1000 // 1381) >> 10
    text = vkfio.report_text([r])
    assert "read: IOPS=" in text
    assert "clat percentiles (usec)" in text
    assert "Run status group 0 (all jobs):" in text
