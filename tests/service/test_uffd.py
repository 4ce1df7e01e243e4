"""UserfaultfdService through the SDK: a process faulting in one session while a second
session's monitor serves its pages (kernel-semantics.md A.13, B.46, B.53); every test ends
with the audit clean (the ``daemon`` fixture's teardown)."""

from __future__ import annotations

import re

import anyio
import pytest

import vkclient
from tests.service.conftest import Daemon
from vkclient import PAGE_SIZE
from vkclient.uffd import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
    UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT_MODE_WP,
    Userfaultfd,
    continue_,
    copy,
    move,
    poison,
    wake,
    writeprotect,
    zeropage,
)

P = PAGE_SIZE


async def _setup(k: vkclient.Kernel, npages: int) -> tuple[vkclient.Process, Userfaultfd, int]:
    p = await k.spawn("faulter")
    addr = await p.mmap(npages * P)
    u = await Userfaultfd.create(k, p.pid, UFFD_USER_MODE_ONLY)
    features, ioctls = await u.api()
    assert features
    assert ioctls == 0b1 << 0x3F | 0b11
    await u.register(addr, npages * P)
    return p, u, addr


async def test_monitor_in_another_session_serves_faults(daemon: Daemon, k: vkclient.Kernel) -> None:
    p, u, addr = await _setup(k, 8)
    async with vkclient.connect(daemon.addr, client_name="monitor") as mk:
        await u.grant(mk.session_id)
        m = Userfaultfd.attach(mk, u.handle)
        served: list[int] = []

        async def monitor() -> None:
            async for msgs in m.messages():
                ops = []
                for msg in msgs:
                    assert msg.event == UFFD_EVENT_PAGEFAULT
                    served.append(msg.address)
                    page = (msg.address - addr) // P
                    ops.append(copy(msg.address, bytes([page + 1]) * P))
                res = await m.resolve(ops)
                assert all(r == (P, 0) for r in res)

        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor)
            with anyio.fail_after(10):
                data = await p.read(addr, 8 * P)
                await p.write(addr + 8 * P - 1, b"!")  # already present: no fault
            assert [data[i * P] for i in range(8)] == list(range(1, 9))
            tg.cancel_scope.cancel()
        assert sorted(served) == [addr + i * P for i in range(8)]
        # batch results: EEXIST on a present page, wake of nothing is fine
        res = await m.resolve(
            [copy(addr, b"\0" * P), wake(addr, P), zeropage(addr + P, P), poison(addr, P)]
        )
        assert res == [(-17, 17), (0, 0), (-17, 17), (-17, 17)]
    await u.close()
    await p.kill()
    await p.wait()


async def test_monitor_death_wakes_faults_as_ordinary(daemon: Daemon, k: vkclient.Kernel) -> None:
    p, u, addr = await _setup(k, 4)
    mk = await vkclient.connect(daemon.addr, client_name="monitor")
    await u.grant(mk.session_id)
    await u.close()  # the monitor is the only holder now
    m = Userfaultfd.attach(mk, u.handle)
    got: list[int] = []

    async def monitor() -> None:
        async for msgs in m.messages():
            got.extend(msg.flags for msg in msgs)

    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor)
        with anyio.fail_after(10):
            reader = anyio.Event()
            result: list[int] = []

            async def write() -> None:
                result.append(await p.write(addr + P, b"w"))
                reader.set()

            tg.start_soon(write)
            while not got:
                await anyio.sleep(0.01)
            assert got == [UFFD_PAGEFAULT_FLAG_WRITE]
            assert not reader.is_set()
            await mk.close()  # the monitor session dies: userfaultfd_release
            await reader.wait()
        tg.cancel_scope.cancel()
    assert result == [1]
    assert await p.read(addr, 2 * P) == b"\0" * P + b"w" + b"\0" * (P - 1)
    await p.kill()
    await p.wait()


async def test_only_holders_use_a_handle(daemon: Daemon, k: vkclient.Kernel) -> None:
    p, u, addr = await _setup(k, 1)
    async with vkclient.connect(daemon.addr, client_name="other") as ok:
        o = Userfaultfd.attach(ok, u.handle)
        with pytest.raises(OSError) as e:
            await o.resolve([zeropage(addr, P)])
        assert e.value.errno == 9
    await u.close()
    with pytest.raises(OSError) as e:
        await u.close()
    assert e.value.errno == 9
    await p.kill()
    await p.wait()


async def test_wp_served_by_monitor(daemon: Daemon, k: vkclient.Kernel) -> None:
    p = await k.spawn("faulter")
    addr = await p.mmap(2 * P)
    await p.write(addr, b"a" * (2 * P))
    u = await Userfaultfd.create(k, p.pid, UFFD_USER_MODE_ONLY)
    await u.api()
    ioctls = await u.register(addr, 2 * P, UFFDIO_REGISTER_MODE_WP)
    assert ioctls & (1 << 6)
    assert await u.resolve([writeprotect(addr, 2 * P, UFFDIO_WRITEPROTECT_MODE_WP)]) == [(0, 0)]
    flags: list[int] = []

    async def monitor() -> None:
        async for msgs in u.messages():
            flags.extend(m.flags for m in msgs)
            await u.resolve([writeprotect(m.address, P, 0) for m in msgs])

    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor)
        with anyio.fail_after(10):
            await p.write(addr + P + 1, b"b")
        tg.cancel_scope.cancel()
    assert flags == [UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE]
    assert await p.read(addr + P, 3) == b"aba"
    res = await u.resolve([writeprotect(addr + 4 * P, P, UFFDIO_WRITEPROTECT_MODE_WP)])
    assert res == [(-2, 2)]  # ENOENT: no VMA there
    await u.close()
    await p.kill()
    await p.wait()


async def test_move_over_grpc(daemon: Daemon, k: vkclient.Kernel) -> None:
    p = await k.spawn("mover")
    src = await p.mmap(2 * P)
    await p.write(src, b"s" * (2 * P))
    dst = await p.mmap(2 * P)
    u = await Userfaultfd.create(k, p.pid, UFFD_USER_MODE_ONLY)
    await u.api()
    await u.register(dst, 2 * P)
    assert await u.resolve([move(dst, src, 2 * P), move(dst, src, P)]) == [(2 * P, 0), (-17, 17)]
    assert await p.read(dst + P, 2) == b"ss"
    assert await p.read(src, 2) == b"\0\0"
    await u.close()
    await p.kill()
    await p.wait()


async def test_continue_over_grpc(daemon: Daemon, k: vkclient.Kernel) -> None:
    p = await k.spawn("minor")
    a = await p.mmap(2 * P, flags=vkclient.MAP_SHARED | vkclient.MAP_ANONYMOUS)
    await p.write(a, b"m" * P)
    await p.madvise(a, 2 * P, vkclient.MADV_DONTNEED)
    u = await Userfaultfd.create(k, p.pid, UFFD_USER_MODE_ONLY)
    await u.api()
    await u.register(a, 2 * P, 4)  # MINOR
    flags: list[int] = []

    async def monitor() -> None:
        async for msgs in u.messages():
            flags.extend(m.flags for m in msgs)
            assert await u.resolve([continue_(m.address, P) for m in msgs]) == [(P, 0)]

    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor)
        with anyio.fail_after(10):
            assert await p.read(a, 1) == b"m"
        tg.cancel_scope.cancel()
    assert flags == [4]  # UFFD_PAGEFAULT_FLAG_MINOR
    assert await u.resolve([continue_(a + P, P)]) == [(-14, 14)]  # not cached: EFAULT
    await u.close()
    await p.kill()
    await p.wait()


async def test_uffd_unit_tests(daemon: Daemon, k: vkclient.Kernel) -> None:
    """``vkctl uffd-unit-tests``: every case passes or is skipped for a missing feature (each
    one's audit is checked by the runner), with the selftest's lines and summary."""
    from vkclient import uffd_unit_tests

    lines: list[str] = []
    assert await uffd_unit_tests.run(k, lines.append) == 0, lines
    summary = re.fullmatch(
        r"Userfaults unit tests: pass=(\d+), skip=(\d+), fail=0 \(total=(\d+)\)", lines[-1]
    )
    assert summary, lines[-1]
    passed, skipped, total = map(int, summary.groups())
    assert passed + skipped == total == len(lines) - 1
    assert lines[0] == "Testing UFFDIO_API (with syscall)... done"
    for case in (
        "register-ioctls on anon",
        "zeropage on shmem",
        "move on anon",
        "wp-fork-with-event on anon",
        "wp-unpopulated on anon",
        "minor on shmem",
        "minor-wp on shmem",
        "sigbus on shmem-private",
        "sigbus-wp on anon",
        "events on shmem",
        "events-wp on anon",
        "poison on shmem",
    ):
        assert f"Testing {case}... done" in lines, (case, lines)
    for line in lines[1:-1]:
        assert line.endswith("... done") or "skipped [reason: " in line, line


# ---- B.51: GUP into a MISSING range ------------------------------------------------------------


async def _gup_setup(
    k: vkclient.Kernel, flags: int = 0
) -> tuple[vkclient.Process, Userfaultfd, int]:
    """Two registered pages; a uffd without UFFD_USER_MODE_ONLY needs CAP_SYS_PTRACE."""
    p = await k.spawn("gup-faulter", capabilities=[vkclient.CAP_SYS_PTRACE])
    addr = await p.mmap(2 * P)
    u = await Userfaultfd.create(k, p.pid, flags)
    await u.api()
    await u.register(addr, 2 * P)
    return p, u, addr


async def _serve_recording(
    u: Userfaultfd, addr: int, seen: list[tuple[int, int]], before: anyio.Event | None = None
) -> None:
    """A monitor that records (address, flags) and COPYs page i as bytes i+1; with ``before``
    it waits for that event before serving its first batch."""
    async for msgs in u.messages():
        seen.extend((m.address, m.flags) for m in msgs)
        if before is not None:
            await before.wait()
        ops = [copy(m.address, bytes([(m.address - addr) // P + 1]) * P) for m in msgs]
        assert all(r == (P, 0) for r in await u.resolve(ops))


@pytest.mark.parametrize(
    ("kind", "api"),
    [("pin", "fast"), ("pin", "unlocked"), ("get", "fast"), ("get", "unlocked")],
)
async def test_gup_blocks_on_missing_until_copy(
    daemon: Daemon, k: vkclient.Kernel, kind: str, api: str
) -> None:
    """B.51 (a): GUP-fast (falling back to the slow path) and the *_unlocked entry points may
    drop mmap_lock, so the fault queues a message and GUP sleeps; after COPY it retries and
    returns the copied pages."""
    p, u, addr = await _gup_setup(k)
    seen: list[tuple[int, int]] = []
    go = anyio.Event()
    got: list[vkclient.Pages] = []

    async def take() -> None:
        ctx = p.pin(addr, 2, api=api) if kind == "pin" else p.get(addr, 2, api=api)
        got.append(await ctx)

    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_recording, u, addr, seen, go)
        tg.start_soon(take)
        with anyio.fail_after(10):
            while not seen:
                await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            assert not got, "GUP must wait for the monitor"
            go.set()
            while not got:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    pages = got[0]
    assert pages.count == 2
    assert await pages.dma_read(0, 2 * P) == b"\x01" * P + b"\x02" * P
    assert seen == [(addr, 0), (addr + P, 0)]  # read faults, one message per page
    await pages.release()
    await u.close()
    await p.kill()
    await p.wait()


@pytest.mark.parametrize(("kind", "name"), [("get", "get_user_pages"), ("pin", "pin_user_pages")])
async def test_locked_gup_into_missing_is_efault(
    daemon: Daemon, k: vkclient.Kernel, kind: str, name: str
) -> None:
    """B.51 (b): get/pin_user_pages with mmap_lock held by the caller cannot retry: -EFAULT
    and no message (the first message the monitor ever sees is a later CPU access's)."""
    p, u, addr = await _gup_setup(k)
    with pytest.raises(OSError) as e:
        await (p.get(addr, 1, api="locked") if kind == "get" else p.pin(addr, 1, api="locked"))
    assert e.value.errno == 14
    assert name in str(e.value)
    seen: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_recording, u, addr, seen)
        with anyio.fail_after(10):
            assert await p.read(addr + P, 1) == b"\x02"
        tg.cancel_scope.cancel()
    assert seen == [(addr + P, 0)]
    await u.close()
    await p.kill()
    await p.wait()


@pytest.mark.parametrize("api", ["remote", "unlocked"])
async def test_gup_nowait_into_missing_returns_zero(
    daemon: Daemon, k: vkclient.Kernel, api: str
) -> None:
    """B.51 (c): FOLL_NOWAIT never sleeps: 0 pages, no message."""
    p, u, addr = await _gup_setup(k)
    pages = await p.get(addr, 2, api=api, flags=vkclient.FOLL_NOWAIT)
    assert pages.count == 0
    seen: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_recording, u, addr, seen)
        with anyio.fail_after(10):
            assert await p.read(addr + P, 1) == b"\x02"
        tg.cancel_scope.cancel()
    assert seen == [(addr + P, 0)]
    await u.close()
    await p.kill()
    await p.wait()


async def test_gup_on_user_mode_only_uffd_is_efault(daemon: Daemon, k: vkclient.Kernel) -> None:
    """B.51 (d): with UFFD_USER_MODE_ONLY a GUP fault (not FAULT_FLAG_USER) is -EFAULT with no
    message, while a user access of the same page still delivers one."""
    p, u, addr = await _gup_setup(k, UFFD_USER_MODE_ONLY)
    for api in ("fast", "unlocked"):
        with pytest.raises(OSError) as e:
            await p.pin(addr, 1, api=api)
        assert e.value.errno == 14
    seen: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_recording, u, addr, seen)
        with anyio.fail_after(10):
            assert await p.read(addr, 1) == b"\x01"
        tg.cancel_scope.cancel()
    assert seen == [(addr, 0)]
    async with p.pin(addr, 1) as pages:  # present now: GUP-fast takes it without a fault
        assert await pages.dma_read(0, 1) == b"\x01"
    await u.close()
    await p.kill()
    await p.wait()
