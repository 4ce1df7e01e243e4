"""FileService through the SDK: errno round trips, many-MiB I/O, devices, vkctl devices/files."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import structlog

import vkclient
from tests.service.conftest import Daemon
from vkclient import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    O_CREAT,
    O_EXCL,
    O_RDONLY,
    O_RDWR,
    O_WRONLY,
    vkctl,
)
from vkernel.kernel.blockdev import DeviceSpec

P = 4096
MiB = 1 << 20


async def test_open_write_read_stat_close(k: vkclient.Kernel) -> None:
    """The basic file calls, and the default RAM device holding the data."""
    p = await k.spawn("files")
    fd = await p.open("f", O_CREAT | O_RDWR)
    assert fd == 0
    assert await p.write_fd(fd, b"hello ") == 6
    assert await p.write_fd(fd, b"world") == 5
    assert await p.pread(fd, 100, 0) == b"hello world"
    assert await p.read_fd(fd, 10) == b""  # at EOF
    assert await p.pwrite(fd, b"W", 6) == 1
    st = await p.fstat(fd)
    assert (st.name, st.kind, st.device, st.size, st.dirty_pages) == ("f", "disk", "ram0", 11, 1)
    await p.fsync(fd)
    assert (await p.stat("f")).dirty_pages == 0
    await p.close(fd)
    assert [f.name for f in await k.files()] == ["f"]


async def test_errno_round_trips(k: vkclient.Kernel) -> None:
    """Linux's errno comes back as the OSError Python's os module raises."""
    p = await k.spawn("errs")
    with pytest.raises(FileNotFoundError):
        await p.open("missing", O_RDONLY)
    fd = await p.open("f", O_CREAT | O_WRONLY)
    with pytest.raises(FileExistsError):
        await p.open("f", O_CREAT | O_EXCL | O_RDWR)
    with pytest.raises(OSError) as ei:
        await p.read_fd(fd, 1)
    assert ei.value.errno == errno.EBADF  # not open for reading
    with pytest.raises(OSError) as ei:
        await p.close(42)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        await p.ftruncate(fd, -1)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        await p.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, P)
    assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as ei:
        await p.pwrite(fd, b"x", 1 << 41)
    assert ei.value.errno == errno.EFBIG
    with pytest.raises(FileNotFoundError):
        await p.unlink("missing")
    with pytest.raises(OSError) as ei:
        await p.open("x", O_CREAT | O_RDWR, kind="disk", device="nodev")
    assert ei.value.errno == errno.ENODEV


async def test_another_sessions_process_is_eperm(daemon: Daemon, k: vkclient.Kernel) -> None:
    """File calls act only on the caller's own processes."""
    p = await k.spawn("mine")
    async with vkclient.connect(daemon.addr, client_name="other") as other:
        with pytest.raises(PermissionError):
            await other.process(p.pid).open("f", O_CREAT | O_RDWR)


async def test_many_mib_round_trip_with_punch_hole(k: vkclient.Kernel) -> None:
    """Reads and writes of many MiB stream in chunks; a punched hole reads back as zeros."""
    p = await k.spawn("big")
    data = os.urandom(6 * MiB + 123)
    fd = await p.open("big", O_CREAT | O_RDWR)
    assert await p.pwrite(fd, data, 0) == len(data)
    assert await p.pread(fd, 8 * MiB, 0) == data
    await p.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB)
    back = await p.pread(fd, 8 * MiB, 0)
    assert back == data[:MiB] + bytes(2 * MiB) + data[3 * MiB :]
    await p.ftruncate(fd, 5)
    assert await p.read_fd(fd, 100) == data[:5]
    await p.unlink("big")


async def test_shmem_and_fork_share_descriptions(k: vkclient.Kernel) -> None:
    """A shmem file; a forked child inherits the descriptor and the shared offset."""
    p = await k.spawn("parent")
    fd = await p.open("s", O_CREAT | O_RDWR, kind="shmem")
    await p.write_fd(fd, b"abcdef")
    child = await p.fork()
    assert await child.pread(fd, 10, 0) == b"abcdef"
    await child.write_fd(fd, b"gh")  # at the shared offset 6
    assert await p.read_fd(fd, 10) == b""
    assert await p.pread(fd, 10, 0) == b"abcdefgh"
    assert (await k.vmstat())["nr_shmem"] == 1
    await child.kill()
    await child.wait()


async def test_device_fault_injection_and_listing(k: vkclient.Kernel) -> None:
    """SetDeviceFault makes reads fail with EIO; ListDevices shows counters and ranges."""
    p = await k.spawn("eio")
    fd = await p.open("f", O_CREAT | O_RDWR)
    await p.write_fd(fd, b"x" * 3 * P)
    await p.fsync(fd)
    (dev,) = await k.devices()
    assert (dev.name, dev.kind, dev.queue_depth) == ("ram0", "ram", 32)
    assert dev.write_bytes >= 3 * P
    info = await k.set_device_fault("ram0", [(0, dev.size // 512)])
    assert info.bad_ranges == ((0, dev.size // 512),)
    # The cached pages are still readable; a write back now fails.
    assert await p.pread(fd, 3 * P, 0) == b"x" * 3 * P
    await p.pwrite(fd, b"y", 0)
    with pytest.raises(OSError) as ei:
        await p.fsync(fd)
    assert ei.value.errno == errno.EIO
    await k.set_device_fault("ram0", [])
    with pytest.raises(OSError) as ei:
        await k.set_device_fault("ram0", [(dev.size, 1)])
    assert ei.value.errno == errno.EINVAL


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """The in-process daemon logs to stdout too: keep its lines out of vkctl's output."""
    with structlog.testing.capture_logs():
        yield


async def _vkctl(daemon: Daemon, *argv: str) -> int:
    """vkctl.main runs its own asyncio loop: call it from a worker thread."""
    return await anyio.to_thread.run_sync(lambda: vkctl.main(["--addr", daemon.addr, *argv]))


async def test_vkctl_devices_and_files(
    daemon: Daemon,
    k: vkclient.Kernel,
    capsys: pytest.CaptureFixture[str],
    quiet_logs: None,
) -> None:
    """vkctl devices and files: tables for people, --json for programs."""
    p = await k.spawn("shown")
    fd = await p.open("listed", O_CREAT | O_RDWR)
    await p.write_fd(fd, b"z" * 10)
    assert await _vkctl(daemon, "devices") == 0
    assert "ram0" in capsys.readouterr().out
    assert await _vkctl(daemon, "--json", "devices") == 0
    devs = json.loads(capsys.readouterr().out)
    assert devs[0]["name"] == "ram0"
    assert devs[0]["size"] == 256 * MiB
    assert await _vkctl(daemon, "files") == 0
    assert "listed" in capsys.readouterr().out
    assert await _vkctl(daemon, "--json", "files") == 0
    files = json.loads(capsys.readouterr().out)
    assert (files[0]["name"], files[0]["size"], files[0]["opens"]) == ("listed", 10, 1)
    await anyio.lowlevel.checkpoint()


async def test_kill_unwinds_a_read_waiting_on_a_slow_device(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """A pread waiting for a 500 ms device read ends with EINTR as soon as the process is
    killed; the I/O completes in the background and nothing leaks."""
    daemon.kernel.vfs.add_device(DeviceSpec.parse("slow=ram:4M,latency=500ms"))
    p = await k.spawn("victim")
    fd = await p.open("f", O_CREAT | O_RDWR, kind="disk", device="slow")
    await p.pwrite(fd, b"q" * 4 * P, 0)
    await p.fsync(fd)
    daemon.kernel.vfs.drop_caches()
    result: list[BaseException | bytes] = []

    async def reader() -> None:
        try:
            result.append(await p.pread(fd, 4 * P, 0))
        except OSError as e:
            result.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.1)
        start = anyio.current_time()
        await p.kill()
    assert anyio.current_time() - start < 0.35
    (err,) = result
    assert isinstance(err, OSError)
    assert err.errno == errno.EINTR
    await p.wait()
    await daemon.kernel.vfs.quiesce()
    assert await k.audit() == []
