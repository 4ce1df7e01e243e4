"""File devices keep data and namespace across a restart; the metadata slots survive tearing."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from tests.unit.fs.conftest import MakeFsKernel
from tests.unit.fs.fshelp import P, make_file, pattern, sync_raises
from vkernel.config import build_parser, config_from_args
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.errors import KernelError
from vkernel.kernel.fs import O_RDONLY


async def test_fsynced_file_survives_a_remount(
    make_fs_kernel: MakeFsKernel, tmp_path: Path
) -> None:
    spec = f"disk0=file:{tmp_path}/d.img:4M"
    k1 = make_fs_kernel(spec)
    t = k1.spawn("t", "s")
    data = pattern(5 * P + 7)
    fd = await make_file(k1, t, "kept", data)
    await make_file(k1, t, "other", b"ordered")  # made durable by the same commit
    await k1.vfs.fsync(t, fd)
    await make_file(k1, t, "late", b"never synced")
    # No orderly shutdown: the process dies here (the fixture syncs k1 only at teardown).
    k1.vfs.devices["disk0"].close()
    k2 = make_fs_kernel(spec)
    t2 = k2.spawn("t", "s")
    fd2, _ = k2.vfs.do_sys_open(t2, "kept", O_RDONLY)
    assert await k2.vfs.read(t2, fd2, 10 * P, 0) == data
    fd3, _ = k2.vfs.do_sys_open(t2, "other", O_RDONLY)
    assert await k2.vfs.read(t2, fd3, 100, 0) == b"ordered"
    sync_raises(errno.ENOENT, k2.vfs.stat, "late")
    k1.vfs.devices.clear()  # already closed


async def test_a_torn_newest_slot_falls_back_to_the_previous_commit(
    make_fs_kernel: MakeFsKernel, tmp_path: Path
) -> None:
    spec = f"disk0=file:{tmp_path}/d.img:4M"
    k1 = make_fs_kernel(spec)
    t = k1.spawn("t", "s")
    fd = await make_file(k1, t, "a", b"first")
    await k1.vfs.fsync(t, fd)
    await make_file(k1, t, "b", b"second")
    await k1.vfs.fsync(t, fd)
    sb = k1.vfs.supers["disk0"]
    newest = ((sb.generation + 1) % 2) * sb.slot_blocks
    garbage = np.full((1, 4096), 0xAB, dtype=np.uint8)
    garbage[0, :8] = np.frombuffer(b"VKFS\x00\x01\x00\x00", dtype=np.uint8)
    sb.bdev.write_raw(newest, garbage)  # a crash in the middle of the metadata write
    k1.vfs.devices["disk0"].close()
    k1.vfs.devices.clear()
    k2 = make_fs_kernel(spec)
    assert sorted(k2.vfs.names) == ["a"]


def test_device_spec_syntax() -> None:
    s = DeviceSpec.parse("ram1=ram:64M,latency=2ms+10us/KiB,jitter=0.5ms,qd=8,dax=1,eio=16+8/100")
    assert (s.name, s.kind, s.size, s.qd, s.dax) == ("ram1", "ram", 64 << 20, 8, True)
    lat = s.latency
    assert (lat.fixed, lat.per_kib, lat.jitter) == pytest.approx((2e-3, 10e-6, 0.5e-3))
    assert str(lat) == "2ms+10us/KiB jitter 500us"
    assert s.bad_sectors == ((16, 8), (100, 1))
    f = DeviceSpec.parse("d=file:/var/tmp/x.img:1G,latency=100us")
    assert (f.kind, f.path, f.size, f.latency.fixed) == ("file", "/var/tmp/x.img", 1 << 30, 1e-4)
    for bad in (
        "ram:64M",
        "x=tape:1M",
        "x=ram:1000",
        "x=file:rel.img:1M",
        "x=ram:1M,bogus=1",
        "x=file:/a:1M,dax=1",
        "x=ram:1M,qd=0",
        "x=ram:1M,latency=fast",
    ):
        try:
            DeviceSpec.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


async def test_a_device_reopened_with_another_size_is_refused(
    make_fs_kernel: MakeFsKernel, tmp_path: Path
) -> None:
    k1 = make_fs_kernel(f"disk0=file:{tmp_path}/d.img:4M")
    t = k1.spawn("t", "s")
    fd = await make_file(k1, t, "a", b"keep me")
    await k1.vfs.fsync(t, fd)
    k2 = make_fs_kernel()
    with pytest.raises(KernelError) as ei:
        k2.vfs.add_device(DeviceSpec.parse(f"disk0=file:{tmp_path}/d.img:8M"))
    assert ei.value.errno == errno.EINVAL
    assert not k2.vfs.devices


def test_vkernel_device_env_and_options() -> None:
    args = build_parser().parse_args(["serve"])
    env = {"VKERNEL_DEVICE": "a=ram:1M,qd=4,b=file:/tmp/b.img:1M;c=ram:2M,dax=1"}
    cfg = config_from_args(args, env, stdout_isatty=False)
    assert [(d.name, d.kind, d.qd) for d in cfg.devices] == [
        ("a", "ram", 4),
        ("b", "file", 32),
        ("c", "ram", 32),
    ]
    assert cfg.readahead
    args = build_parser().parse_args(["serve", "--device", "x=ram:1M", "--no-readahead"])
    cfg = config_from_args(args, env, stdout_isatty=False)
    assert [d.name for d in cfg.devices] == ["x"]
    assert not cfg.readahead
    cfg = config_from_args(build_parser().parse_args(["serve"]), {}, stdout_isatty=False)
    assert [(d.name, d.size) for d in cfg.devices] == [("ram0", 256 << 20)]
    with pytest.raises(ValueError, match="duplicate"):
        config_from_args(
            build_parser().parse_args(["serve", "--device", "x=ram:1M", "--device", "x=ram:2M"]),
            {},
            stdout_isatty=False,
        )
