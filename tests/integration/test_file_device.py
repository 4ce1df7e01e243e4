"""A file-backed block device: fsynced data and names survive kill -9 of the daemon."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import vkclient
from tests.integration.conftest import start_daemon
from vkclient import O_CREAT, O_RDONLY, O_RDWR

pytestmark = pytest.mark.integration

MiB = 1 << 20


async def test_fsynced_data_survives_kill_9_and_restart(tmp_path: Path) -> None:
    """Write + fsync on a file: device, SIGKILL the daemon, restart, reopen by name, read."""
    img = tmp_path / "disk0.img"
    dev = f"disk0=file:{img}:64M,latency=100us+1us/KiB,qd=8"
    env = {"VKERNEL_DEVICE": dev}
    d1 = start_daemon(tmp_path, "--memory", "128M", "--no-prefault", env=env, name="a")
    data = os.urandom(3 * MiB + 1234)
    try:
        async with vkclient.connect(d1.addr) as k:
            devs = await k.devices()
            assert [(x.name, x.kind, x.path) for x in devs] == [("disk0", "file", str(img))]
            p = await k.spawn("writer")
            fd = await p.open("persist.bin", O_CREAT | O_RDWR)
            assert await p.pwrite(fd, data, 0) == len(data)
            await p.fsync(fd)
            fd2 = await p.open("unsynced.bin", O_CREAT | O_RDWR)
            await p.pwrite(fd2, b"x" * 4096, 0)  # dirty, never fsynced
            d1.proc.send_signal(signal.SIGKILL)
            assert d1.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if d1.proc.poll() is None:
            d1.proc.kill()
    d2 = start_daemon(tmp_path, "--memory", "128M", "--no-prefault", env=env, name="b")
    try:
        async with vkclient.connect(d2.addr) as k:
            p = await k.spawn("reader")
            fd = await p.open("persist.bin", O_RDONLY)
            assert (await p.fstat(fd)).size == len(data)
            assert await p.pread(fd, 4 * MiB, 0) == data
            (info,) = await k.devices()
            assert info.reads >= 1  # the data came from the device, not a cache
            assert await k.audit() == []
    finally:
        assert d2.stop() == 0, d2.log_path.read_text()[-3000:]


async def test_orderly_shutdown_writes_back_everything(tmp_path: Path) -> None:
    """SIGTERM unmounts: dirty pages and the namespace reach the host file without fsync."""
    img = tmp_path / "disk1.img"
    args = ("--memory", "128M", "--no-prefault", "--device", f"disk1=file:{img}:16M")
    d1 = start_daemon(tmp_path, *args, name="a")
    async with vkclient.connect(d1.addr) as k:
        p = await k.spawn("writer")
        fd = await p.open("dirty.txt", O_CREAT | O_RDWR)
        await p.write_fd(fd, b"written back at shutdown")
    assert d1.stop() == 0, d1.log_path.read_text()[-3000:]
    d2 = start_daemon(tmp_path, *args, name="b")
    try:
        async with vkclient.connect(d2.addr) as k:
            p = await k.spawn("reader")
            fd = await p.open("dirty.txt", O_RDONLY)
            assert await p.read_fd(fd, 100) == b"written back at shutdown"
            assert [f.name for f in await k.files()] == ["dirty.txt"]
    finally:
        assert d2.stop() == 0, d2.log_path.read_text()[-3000:]


async def test_mapped_writes_survive_kill_9_after_msync_and_fsync(tmp_path: Path) -> None:
    """Stores through a MAP_SHARED mapping, then msync(MS_SYNC) (one file) or fsync (another),
    SIGKILL, restart: both files read back what was stored through the mappings."""
    img = tmp_path / "disk2.img"
    env = {"VKERNEL_DEVICE": f"disk2=file:{img}:32M,latency=50us"}
    d1 = start_daemon(tmp_path, "--memory", "128M", "--no-prefault", env=env, name="a")
    page = vkclient.PAGE_SIZE
    blob = os.urandom(3 * page)
    try:
        async with vkclient.connect(d1.addr) as k:
            p = await k.spawn("mapper")
            fds = []
            for name in ("msynced.bin", "fsynced.bin"):
                fd = await p.open(name, O_CREAT | O_RDWR)
                await p.ftruncate(fd, 4 * page)
                addr = await p.mmap(4 * page, flags=vkclient.MAP_SHARED, fd=fd)
                await p.write(addr + page, blob)
                fds.append((fd, addr))
            await p.msync(fds[0][1], 4 * page, vkclient.MS_SYNC)
            await p.fsync(fds[1][0])
            d1.proc.send_signal(signal.SIGKILL)
            assert d1.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if d1.proc.poll() is None:
            d1.proc.kill()
    d2 = start_daemon(tmp_path, "--memory", "128M", "--no-prefault", env=env, name="b")
    try:
        async with vkclient.connect(d2.addr) as k:
            p = await k.spawn("reader")
            for name in ("msynced.bin", "fsynced.bin"):
                fd = await p.open(name, O_RDONLY)
                addr = await p.mmap(
                    4 * page, prot=vkclient.PROT_READ, flags=vkclient.MAP_SHARED, fd=fd
                )
                assert await p.read(addr + page, 3 * page) == blob
                assert await p.read(addr, page) == bytes(page)
            assert await k.audit() == []
    finally:
        assert d2.stop() == 0, d2.log_path.read_text()[-3000:]
