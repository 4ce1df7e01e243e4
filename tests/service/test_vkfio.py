"""vkfio against an in-process daemon: the seed 004 job (scaled), verify round trips, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio.to_thread
import pytest

import vkclient
from tests.service.conftest import Daemon
from vkclient import vkfio

DATA = Path(__file__).resolve().parent.parent / "data"


async def test_seed_job_scaled_pins_every_io(daemon: Daemon, k: vkclient.Kernel) -> None:
    """The seed job at 2 MiB: 512 reads of 4 KiB at depth 64, each pinned and unpinned."""
    text = (DATA / "seed004.fio").read_text().replace("size=1g", "size=2m")
    _, jobs = vkfio.parse_jobfile(text)
    vm0 = await k.vmstat()
    results, disks = await vkfio.run_jobs(jobs, daemon.addr)
    [r] = results
    assert r.error == 0
    assert (r.read.ios, r.read.bytes, r.write.ios) == (512, 2 << 20, 0)
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] - vm0["nr_foll_pin_acquired"] >= 512
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]
    doc = vkfio.report_json({}, results, disks)
    assert doc["jobs"][0]["read"]["total_ios"] == 512
    assert doc["jobs"][0]["read"]["clat_ns"]["N"] == 512
    assert doc["disk_util"][0]["name"] == "ram0"
    assert await k.audit() == []


async def test_verify_crc32c_roundtrip(daemon: Daemon, k: vkclient.Kernel) -> None:
    """verify=crc32c (libaio) and verify=md5 (psync, buffered): write, read back, no error."""
    text = """
[global]
size=256k
bs=4k
[w1]
direct=1
ioengine=libaio
iodepth=8
rw=randwrite
verify=crc32c
[w2]
ioengine=psync
rw=write
verify=md5
numjobs=2
group_reporting
"""
    _, jobs = vkfio.parse_jobfile(text)
    results, _ = await vkfio.run_jobs(jobs, daemon.addr)
    assert len(results) == 3
    for r in results:
        assert (r.error, r.verify_errors) == (0, [])
        assert (r.write.ios, r.read.ios) == (64, 64)
    doc = vkfio.report_json({}, results, [])
    assert [j["jobname"] for j in doc["jobs"]] == ["w1", "w2"]
    assert doc["jobs"][1]["write"]["total_ios"] == 128


async def test_cli_json_output_file(daemon: Daemon, tmp_path: Path) -> None:
    """vkfio job --output-format=json --output F writes one valid fio JSON document."""
    job = tmp_path / "j.fio"
    job.write_text("[rw]\ndirect=1\nioengine=io_uring\niodepth=4\nrw=randrw\nsize=128k\n")
    out = tmp_path / "out.json"
    argv = [str(job), "--output-format=json", "--output", str(out), "--addr", daemon.addr]
    status = await anyio.to_thread.run_sync(vkfio.main, argv)
    assert status == 0
    doc = json.loads(out.read_text())
    j = doc["jobs"][0]
    assert j["read"]["total_ios"] + j["write"]["total_ios"] == 32
    assert j["error"] == 0
    bad = tmp_path / "bad.fio"
    bad.write_text("[x]\nsize=1m\nfrobnicate=2\n")
    assert await anyio.to_thread.run_sync(vkfio.main, [str(bad), "--addr", daemon.addr]) == 1


async def test_sampling_cpu_and_batches(daemon: Daemon) -> None:
    """A 1.2 s time_based run with 200 ms averaging: several bw/iops samples whose range
    holds the mean; the process's CPU figures; every Ring message carries a batch."""
    text = (
        "[s]\ndirect=1\nioengine=libaio\niodepth=16\nrw=randread\nsize=1m\n"
        "runtime=1200ms\ntime_based\nbwavgtime=200\niopsavgtime=200\n"
        "iodepth_batch_submit=8\niodepth_batch_complete_min=8\n"
    )
    _, jobs = vkfio.parse_jobfile(text)
    results, _ = await vkfio.run_jobs(jobs, daemon.addr)
    [r] = results
    assert r.error == 0
    job = vkfio.report_json({}, results, [])["jobs"][0]
    rd = job["read"]
    assert rd["bw_samples"] >= 3
    assert rd["iops_samples"] >= 3
    assert rd["bw_min"] <= rd["bw_mean"] <= rd["bw_max"]
    assert rd["iops_min"] <= rd["iops_mean"] <= rd["iops_max"]
    # One sample per 200 ms with I/O in it; bw and iops are sampled together, 4 KiB per I/O.
    assert rd["iops_samples"] <= job["job_runtime"] // 200 + 1
    assert rd["bw_mean"] == pytest.approx(4 * rd["iops_mean"], rel=0.01)
    assert 1100 <= job["job_runtime"] <= 3000
    assert job["usr_cpu"] + job["sys_cpu"] > 0.0
    assert job["usr_cpu"] <= 100.0 * (os.cpu_count() or 1)
    assert job["ctx"] >= 0
    assert job["minf"] >= 0
    assert job["majf"] >= 0
    # Submits of 8 or more (the first fills the ring: 16); no reap below 8 until the drain.
    assert job["iodepth_submit"]["4"] == 0.0
    assert job["iodepth_submit"]["8"] + job["iodepth_submit"]["16"] == pytest.approx(100.0)
    assert job["iodepth_level"]["16"] > 90.0
    assert r.total_submit < rd["total_ios"] / 4


async def test_ramp_time_thinktime_startdelay(daemon: Daemon) -> None:
    """ramp_time runs I/O that counts for nothing; thinktime stalls every thinktime_blocks;
    startdelay holds a job back."""
    text = (
        "[ramp]\ndirect=1\nioengine=libaio\niodepth=4\nrw=randwrite\nsize=256k\n"
        "ramp_time=300ms\nruntime=400ms\ntime_based\n"
        "[think]\nioengine=psync\nrw=write\nsize=64k\nthinktime=25ms\nthinktime_blocks=4\n"
        "[late]\nioengine=psync\nrw=write\nsize=16k\nstartdelay=300ms\n"
    )
    _, jobs = vkfio.parse_jobfile(text)
    t0 = time.perf_counter()
    wall0 = time.time()
    ramp, think, late = (await vkfio.run_jobs(jobs, daemon.addr))[0]
    assert time.perf_counter() - t0 >= 0.7
    assert (ramp.error, think.error, late.error) == (0, 0, 0)
    assert late.start - wall0 >= 0.3  # startdelay: the job began 300 ms late
    assert late.write.ios == 4
    assert 400 <= ramp.runtime_ms < 700  # the ramp is not in the measured run
    assert ramp.write.ios == len(ramp.write.clat) > 0
    assert think.write.ios == 16
    assert think.runtime_ms >= 4 * 25


async def test_cli_status_interval_json(daemon: Daemon, tmp_path: Path) -> None:
    """--status-interval with json: a cumulative document per interval, then the final one
    (concatenated, as fio prints them)."""
    job = tmp_path / "j.fio"
    job.write_text(
        "[t]\ndirect=1\nioengine=libaio\niodepth=8\nrw=randread\nsize=256k\n"
        "runtime=1300ms\ntime_based\n"
    )
    out = tmp_path / "out.json"
    argv = [str(job), "--output-format=json", "--output", str(out), "--status-interval=400ms"]
    argv += ["--addr", daemon.addr]
    assert await anyio.to_thread.run_sync(vkfio.main, argv) == 0
    dec = json.JSONDecoder()
    text = out.read_text()
    docs = []
    pos = 0
    while pos < len(text):
        doc, end = dec.raw_decode(text, pos)
        docs.append(doc)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert len(docs) >= 3
    ios = [d["jobs"][0]["read"]["total_ios"] for d in docs]
    assert ios == sorted(ios)
    assert ios[0] > 0
    assert docs[-1]["disk_util"]


async def test_cli_normal_output(daemon: Daemon, tmp_path: Path) -> None:
    """The normal report has fio's lines, header first."""
    job = tmp_path / "j.fio"
    job.write_text("[n]\ndirect=1\nioengine=libaio\niodepth=4\nrw=read\nsize=128k\n")
    out = tmp_path / "out.txt"
    argv = [str(job), "--output", str(out), "--addr", daemon.addr]
    assert await anyio.to_thread.run_sync(vkfio.main, argv) == 0
    lines = out.read_text().splitlines()
    assert lines[1:3] == [vkfio.FIO_VERSION, "Starting 1 process"]
    for prefix in (
        "  read: IOPS=",
        "    clat percentiles (",
        "  cpu          : usr=",
        "  IO depths    : 1=",
        "     submit    : 0=",
        "     complete  : 0=",
        "     issued rwts: total=32,0,0,0",
        "     latency   : target=",
        "   READ: bw=",
        "  ram0: ios=",
    ):
        assert any(ln.startswith(prefix) for ln in lines), prefix
