"""ProcessService and SystemService through the real SDK: ownership, errno, wait status."""

from __future__ import annotations

import errno
import signal

import anyio
import pytest

import vkclient
from tests.service.conftest import Daemon


async def test_spawn_list_kill_wait(k: vkclient.Kernel) -> None:
    """spawn → ps shows it → kill(SIGTERM) → waitpid status is WTERMSIG=15, reaped after."""
    p = await k.spawn("worker", rlimit_as=1 << 30)
    ps = await k.ps()
    assert [x.pid for x in ps] == [p.pid]
    assert ps[0].name == "worker"
    assert ps[0].rlimits.as_bytes == 1 << 30
    assert ps[0].rlimits.memlock_bytes == 8 << 20  # Linux's default since 5.16
    await p.kill(signal.SIGTERM)
    result = await p.wait()
    assert (result.status, result.signal) == (signal.SIGTERM, signal.SIGTERM)
    assert await k.ps() == []


async def test_comm_is_truncated_like_task_comm_len(k: vkclient.Kernel) -> None:
    """TASK_COMM_LEN is 16: the name keeps 15 characters."""
    p = await k.spawn("a-very-long-process-name")
    assert p.info.name == "a-very-long-pro"


async def test_signal_zero_and_harmless_signals_keep_process(k: vkclient.Kernel) -> None:
    """kill(pid, 0) only checks existence; SIGCHLD's default action is to ignore."""
    p = await k.spawn("x")
    await p.kill(0)
    await p.kill(signal.SIGCHLD)
    assert [x.pid for x in await k.ps()] == [p.pid]


async def test_unknown_pid_is_esrch(k: vkclient.Kernel) -> None:
    """A pid nobody has → ESRCH → ProcessLookupError, as os.kill raises."""
    with pytest.raises(ProcessLookupError) as ei:
        await k.process(3_999_999).kill()
    assert ei.value.errno == errno.ESRCH


async def test_other_sessions_process_is_eperm(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A pid owned by another session → EPERM → PermissionError; the owner is undisturbed."""
    p = await k.spawn("mine")
    async with vkclient.connect(daemon.addr, client_name="other") as other:
        for call in (other.process(p.pid).kill, other.process(p.pid).wait):
            with pytest.raises(PermissionError) as ei:
                await call()
            assert ei.value.errno == errno.EPERM
        assert await other.ps() == []
        assert [x.pid for x in await other.ps(all_sessions=True)] == [p.pid]
    assert [x.pid for x in await k.ps()] == [p.pid]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x", "capabilities": [7]}, "credentials.capabilities"),
    ],
)
async def test_spawn_bad_fields_are_einval_naming_the_field(
    k: vkclient.Kernel, kwargs: dict[str, object], field: str
) -> None:
    """Missing or out-of-range fields → EINVAL with the field in ErrorInfo metadata."""
    name = kwargs.pop("name")
    with pytest.raises(OSError) as ei:
        await k.spawn(str(name), **kwargs)  # type: ignore[arg-type]
    assert ei.value.errno == errno.EINVAL
    assert ei.value.metadata["field"] == field  # type: ignore[attr-defined]


@pytest.mark.parametrize("sig", [-1, 65, 1 << 30])
async def test_bad_signal_is_einval(k: vkclient.Kernel, sig: int) -> None:
    """kill(2) with a signal outside 0..64 → EINVAL."""
    p = await k.spawn("x")
    with pytest.raises(OSError) as ei:
        await p.kill(sig)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("pid", [0, -5])
async def test_nonpositive_pid_is_einval(k: vkclient.Kernel, pid: int) -> None:
    """Out-of-range pids are refused as EINVAL naming the field."""
    with pytest.raises(OSError) as ei:
        await k.process(pid).kill()
    assert ei.value.errno == errno.EINVAL
    assert ei.value.metadata["field"] == "pid"  # type: ignore[attr-defined]


async def test_info_and_vmstat(daemon: Daemon, k: vkclient.Kernel) -> None:
    """GetInfo reports the configured memory and the boot prefault's progress; vmstat carries
    Linux's counter names."""
    info = await k.info()
    assert info.memory_bytes == 64 << 20
    assert info.arch == "x86_64"
    assert info.page_size == 4096
    # The fixture serves with prefault on: the background population reaches all of memory.
    with anyio.fail_after(30):
        while info.prefault_running:
            assert info.host_populated_bytes <= info.memory_bytes
            await anyio.sleep(0.02)
            info = await k.info()
    assert info.host_populated_bytes == info.memory_bytes == daemon.kernel.mem.populated_bytes
    counters = await k.vmstat()
    for name in ("pgfault", "pgmajfault", "nr_foll_pin_acquired", "fast_gup", "fast_gup_slow"):
        assert name in counters


async def test_sync_facade(daemon: Daemon) -> None:
    """vkclient.sync gives the same answers without async (run here from a worker thread)."""
    import anyio.to_thread

    import vkclient.sync

    def work() -> tuple[int, int]:
        with vkclient.sync.connect(daemon.addr) as sk:
            p = sk.spawn("sync")
            n = len(sk.ps())
            try:
                sk.process(3_999_999).kill()
            except ProcessLookupError as e:
                return n, e.errno or 0
            finally:
                p.kill()
                p.wait()
        return n, 0

    assert await anyio.to_thread.run_sync(work) == (1, errno.ESRCH)
