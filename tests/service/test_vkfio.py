"""vkfio against an in-process daemon: the seed 004 job (scaled), verify round trips, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anyio.to_thread

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
