"""UserfaultfdService through the SDK: a process faulting in one session while a second
session's monitor serves its pages (kernel-semantics.md A.13, B.46, B.53); every test ends
with the audit clean (the ``daemon`` fixture's teardown)."""

from __future__ import annotations

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


async def test_uffd_unit_tests_subset(daemon: Daemon, k: vkclient.Kernel) -> None:
    from vkclient import uffd_unit_tests

    lines: list[str] = []
    assert await uffd_unit_tests.run(k, lines.append) == 0, lines
    assert lines[-1] == f"Userfaults unit tests: pass={len(uffd_unit_tests.TESTS)}, fail=0"
