"""The userfaultfd as a real fd on the daemon's side socket (vkernel.api.uffd_fd): a monitor
session on the same host reads struct uffd_msg records and calls the uffd ioctls with Linux's
struct layouts (A.13, B.43–B.55 through the fd). The fd is one more reference to the uffd:
closing it, or its session ending, is close(2), and the last close is userfaultfd_release
(B.53: blocked faults resolve as ordinary faults). Every test ends with the audit clean (the
``daemon`` fixture's teardown)."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import socket

import anyio
import anyio.lowlevel
import pytest

import vkclient
import vkclient.sync
from tests.service.conftest import Daemon
from vkclient import PAGE_SIZE
from vkclient.constants import UFFD_FEATURE_EVENT_REMOVE
from vkclient.uffd import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMOVE,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
    Userfaultfd,
    copy,
    copy_from,
    wake,
    zeropage,
)
from vkclient.uffd_fd import FdResolver, receive_uffd
from vkernel.api import uffd_wire as wire
from vkernel.api.uffd_fd import MAX_INFLIGHT
from vkernel.dma_socket import dma_socket_path
from vkernel.kernel import userfaultfd as kuf

P = PAGE_SIZE
MADV_DONTNEED = 4


async def _setup(
    k: vkclient.Kernel, monitor: vkclient.Kernel, npages: int, features: int = 0
) -> tuple[vkclient.Process, Userfaultfd, int]:
    p = await k.spawn("faulter")
    addr = await p.mmap(npages * P)
    u = await k.userfaultfd(p, UFFD_USER_MODE_ONLY, features=features)
    await u.register(addr, npages * P)
    await u.grant(monitor.session_id)
    return p, u, addr


async def _reap(p: vkclient.Process) -> None:
    await p.kill()
    await p.wait()


def test_the_sdk_speaks_the_daemons_wire() -> None:
    """The SDK and the daemon take the wire from one module (vkernel.api.uffd_wire); its
    ioctl numbers are Linux's."""
    import vkclient.uffd_fd as sdk

    for name in (
        "UFFDIO_API",
        "UFFDIO_REGISTER",
        "UFFDIO_UNREGISTER",
        "UFFDIO_WAKE",
        "UFFDIO_COPY",
        "UFFDIO_ZEROPAGE",
        "UFFDIO_MOVE",
        "UFFDIO_WRITEPROTECT",
        "UFFDIO_CONTINUE",
        "UFFDIO_POISON",
        "UFFD_FD_READ",
    ):
        assert getattr(sdk, name) == getattr(wire, name), name
    # Linux's numbers (include/uapi/linux/userfaultfd.h on x86-64).
    assert wire.UFFDIO_COPY == 0xC028AA03
    assert wire.UFFDIO_ZEROPAGE == 0xC020AA04
    assert wire.UFFDIO_WAKE == 0x8010AA02
    assert wire.UFFDIO_API == 0xC018AA3F
    assert wire.UFFDIO_REGISTER == 0xC020AA00
    assert wire.UFFD_MSG.size == kuf.UFFD_MSG_SIZE


async def test_fault_served_through_the_fd(daemon: Daemon, k: vkclient.Kernel) -> None:
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 4)
        async with await mon.attach_userfaultfd(u.handle).open_fd() as fd:
            async with p.access_stream() as a:
                load = asyncio.ensure_future(a.load(addr + P + 5, 3))
                msgs = await fd.read()
                assert [(m.event, m.address, m.flags) for m in msgs] == [
                    (UFFD_EVENT_PAGEFAULT, addr + P, 0)
                ]
                assert not load.done()
                page = bytes(range(256)) * (P // 256)
                assert await fd.copy(addr + P, page) == (P, 0)
                assert await load == page[5:8]
                store = asyncio.ensure_future(a.store(addr + 2 * P, b"w"))
                (m,) = await fd.read()
                assert (m.address, m.flags) == (addr + 2 * P, UFFD_PAGEFAULT_FLAG_WRITE)
                assert await fd.zeropage(addr + 2 * P, P) == (P, 0)
                assert await store == 1
            assert await p.read(addr + 2 * P, 2) == b"w\0"
        await _reap(p)


async def test_ioctl_errors_are_linuxs(daemon: Daemon, k: vkclient.Kernel) -> None:
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 4)
        async with await mon.attach_userfaultfd(u.handle).open_fd() as fd:
            assert await fd.copy(addr, b"\1" * P) == (P, 0)
            # The page is there now: EEXIST, copy = -EEXIST (mfill_atomic's first page).
            assert await fd.copy(addr, b"\2" * P) == (-errno.EEXIST, errno.EEXIST)
            # Two pages of which the second exists: a partial result, EAGAIN.
            assert await fd.copy(addr + 3 * P, b"\3" * P) == (P, 0)
            assert await fd.copy(addr + 2 * P, b"\4" * 2 * P) == (P, errno.EAGAIN)
            assert await fd.copy(addr + 1, b"\5" * P) == (-errno.EINVAL, errno.EINVAL)
            assert await fd.zeropage(addr, P + 1) == (-errno.EINVAL, errno.EINVAL)
            assert await fd.wake(addr, P) == 0
            assert await fd.wake(addr + 1, P) == errno.EINVAL
            with pytest.raises(BlockingIOError):
                await fd.read(nonblock=True)
            with pytest.raises(OSError) as e:
                await fd.api()  # the creator already did the handshake
            assert e.value.errno == errno.EINVAL
            # A datagram the daemon cannot take: unknown ioctl, short struct, bytes ≠ len.
            assert await fd._call(0xC008AA7F, b"\0" * 8) == (errno.ENOTTY, b"")
            assert (await fd._call(wire.UFFDIO_COPY, b"\0" * 8))[0] == errno.EINVAL
            bad = wire.COPY.pack(addr + P, 0, 2 * P, 0, 0) + b"\0" * P
            assert (await fd._call(wire.UFFDIO_COPY, bad))[0] == errno.EINVAL
            err, _ = await fd._call(wire.UFFD_FD_READ, wire.READ_ARGS.pack(16, 0))
            assert err == errno.EINVAL  # a buffer smaller than struct uffd_msg
            # Through all that the fd still serves.
            assert await fd.copy(addr + P, b"\6" * P) == (P, 0)
        assert await p.read(addr + P, 1) == b"\6"
        await _reap(p)


async def test_only_a_holder_gets_the_fd(daemon: Daemon, k: vkclient.Kernel) -> None:
    path = dma_socket_path(str(daemon.socket_path))
    async with vkclient.connect(daemon.addr, client_name="stranger") as other:
        p = await k.spawn("faulter")
        addr = await p.mmap(P)
        u = await k.userfaultfd(p, UFFD_USER_MODE_ONLY)
        await u.register(addr, P)
        token = dict(other._metadata)["vkernel-session"]
        with pytest.raises(OSError) as e:
            await anyio.to_thread.run_sync(receive_uffd, path, token, u.handle)
        assert e.value.errno == errno.EBADF
        with pytest.raises(OSError) as e:
            await anyio.to_thread.run_sync(receive_uffd, path, "no-such-token", u.handle)
        with pytest.raises(OSError) as e:
            await anyio.to_thread.run_sync(receive_uffd, path, token, "1")  # type: ignore[arg-type]
        assert e.value.errno == errno.EINVAL
        # The holder still gets it, and the daemon is intact.
        fd = await u.open_fd()
        fd.close()
        await _reap(p)


async def test_closing_the_last_reference_releases(daemon: Daemon, k: vkclient.Kernel) -> None:
    """The fd is a reference of its own (dup): with every handle closed it still serves; its
    close is then the last one, and the blocked fault resolves as an ordinary fault (B.53)."""
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 2)
        b = mon.attach_userfaultfd(u.handle)
        fd = await b.open_fd()
        await u.close()
        await b.close()
        async with p.access_stream() as a:
            first = asyncio.ensure_future(a.load(addr, 1))
            (m,) = await fd.read()
            assert m.address == addr
            assert await fd.copy(addr, b"\7" * P) == (P, 0)
            assert await first == b"\7"
            second = asyncio.ensure_future(a.load(addr + P, 1))
            (m,) = await fd.read()
            assert m.address == addr + P
            fd.close()
            with anyio.fail_after(5):
                assert await second == b"\0"  # an ordinary fault now: the zero page
        await _reap(p)


async def test_the_fd_closes_with_its_session(daemon: Daemon, k: vkclient.Kernel) -> None:
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 1)
        fd = await mon.attach_userfaultfd(u.handle).open_fd()
    # The monitor's session ended: its fd is closed by the daemon, a waiting read learns it.
    with anyio.fail_after(5), pytest.raises(OSError):
        await fd.read()
    fd.close()
    # The creator's handle still holds the uffd: faults still reach it.
    async with vkclient.connect(daemon.addr, client_name="monitor2") as mon2:
        await u.grant(mon2.session_id)
        fd2 = await mon2.attach_userfaultfd(u.handle).open_fd()
        async with fd2, p.access_stream() as a:
            load = asyncio.ensure_future(a.load(addr, 1))
            (m,) = await fd2.read()
            assert await fd2.copy(m.address, b"\x11" * P) == (P, 0)
            assert await load == b"\x11"
    await _reap(p)


async def test_events_and_raw_msg_layout(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A REMOVE event as struct uffd_msg: event 0x15 (UFFD_EVENT_REMOVE), {start, end}."""
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 4, features=UFFD_FEATURE_EVENT_REMOVE)
        fd = await mon.attach_userfaultfd(u.handle).open_fd()
        try:
            assert await fd.copy(addr, b"\1" * 4 * P) == (4 * P, 0)
            advise = asyncio.ensure_future(p.madvise(addr + P, 2 * P, MADV_DONTNEED))
            raw = await fd._call(wire.UFFD_FD_READ, wire.READ_ARGS.pack(64 * 32, 0))
            assert raw[0] == 0
            assert len(raw[1]) == 32
            event, _, _, _, arg = wire.UFFD_MSG.unpack(raw[1])
            assert event == UFFD_EVENT_REMOVE == 0x15
            assert wire.RANGE2.unpack_from(arg) == (addr + P, addr + 3 * P)
            with anyio.fail_after(5):
                await advise  # the event was read: MADV_DONTNEED goes on
        finally:
            fd.close()
        await _reap(p)


async def test_bad_first_lines_get_an_answer(daemon: Daemon) -> None:
    """The side socket's JSON request: garbage is a refused token, never a crash."""
    path = dma_socket_path(str(daemon.socket_path))

    def ask(line: bytes) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(line)
            reply = json.loads(s.recv(4096).split(b"\n")[0])
        assert isinstance(reply, dict)
        return reply

    for line in (b"{not json\n", b'{"uffd": 1}\n', b"[1, 2]\n"):
        # A blocking client in a thread: the daemon serves on this test's event loop.
        assert (await anyio.to_thread.run_sync(ask, line))["ok"] is False


async def test_sync_facade_fd(daemon: Daemon) -> None:
    """The sync façade's uffd fd: a thread serves a fault the way a C monitor thread does."""

    def body() -> list[object]:
        with (
            vkclient.sync.connect(daemon.addr, client_name="sync") as sk,
            vkclient.sync.connect(daemon.addr, client_name="sync-monitor") as sm,
        ):
            p = sk.spawn("faulter")
            addr = p.mmap(2 * P)
            u = sk.userfaultfd(p, UFFD_USER_MODE_ONLY)
            u.register(addr, 2 * P)
            u.grant(sm.session_id)
            fd = sm.attach_userfaultfd(u.handle).open_fd()
            out: list[object] = [fd.copy(addr, b"s" * P), fd.zeropage(addr + P, P)]
            with pytest.raises(BlockingIOError):
                fd.read(nonblock=True)
            out.append(p.read(addr + P - 1, 2))
            fd.close()
            u.close()
            p.kill()
            p.wait()
            return out

    assert await anyio.to_thread.run_sync(body) == [(P, 0), (P, 0), b"s\0"]


async def test_calls_that_sleep_finish_in_order_with_backpressure(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """COPYs that find mmap_lock taken sleep (the rest of each call goes on in a task); past
    MAX_INFLIGHT of them the daemon stops reading the fd, and takes the rest once they drain.
    Every call is answered, every page lands."""
    n = MAX_INFLIGHT + 36
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, n)
        mm = daemon.kernel.find_task(p.pid).mm
        async with await mon.attach_userfaultfd(u.handle).open_fd() as fd:
            await mm.mmap_lock.write_lock()
            try:
                answers = [fd.copy_nowait(addr + i * P, bytes([i]) * P) for i in range(n)]
                await anyio.sleep(0.2)
                assert not any(a.done() for a in answers)
            finally:
                mm.mmap_lock.write_unlock()
            with anyio.fail_after(10):
                assert await asyncio.gather(*answers) == [(P, 0)] * n
        assert [b[0] for b in [await p.read(addr + i * P, 1) for i in range(n)]] == list(range(n))
        await _reap(p)


async def test_oversized_and_empty_datagrams(daemon: Daemon, k: vkclient.Kernel) -> None:
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 1)
        async with await mon.attach_userfaultfd(u.handle).open_fd() as fd:
            big = wire.COPY.pack(addr, 0, P, 0, 0) + b"\0" * (wire.MAX_DATAGRAM + 8)
            assert (await fd._call(wire.UFFDIO_COPY, big))[0] == errno.E2BIG
            assert (await fd._call(wire.UFFDIO_COPY, b""))[0] == errno.EINVAL
            assert await fd.copy(addr, b"\x42" * P) == (P, 0)
        assert await p.read(addr, 1) == b"\x42"
        await _reap(p)


async def test_closing_with_calls_in_flight(daemon: Daemon, k: vkclient.Kernel) -> None:
    """Calls still waiting when the monitor closes its fd fail EBADF; one nobody awaits does
    not report "exception was never retrieved" when collected."""
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 2)
        mm = daemon.kernel.find_task(p.pid).mm
        fd = await mon.attach_userfaultfd(u.handle).open_fd()
        await mm.mmap_lock.write_lock()
        try:
            abandoned = fd.copy_nowait(addr, b"a" * P)
            awaited = fd.copy_nowait(addr + P, b"b" * P)
            fd.close()
            with pytest.raises(OSError) as e:
                await awaited
            assert e.value.errno == errno.EBADF
            del abandoned
            gc.collect()
        finally:
            mm.mmap_lock.write_unlock()
        # The calls were sent before the close: the daemon still runs them (as an ioctl in
        # progress holds its own reference to the file), then sees the EOF and drops the
        # fd's reference; the creator's handle keeps the uffd.
        assert await p.read(addr, 2 * P) == b"a" * P + b"b" * P
        await u.close()
        await _reap(p)


async def test_resolver_on_the_fd_gives_the_grpc_results(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """FdResolver (what UffdMonitor uses with fd=): a batch of ops as ioctls, one COPY longer
    than a datagram as several, each after the last succeeded; results as UffdResolve's."""
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        n = 100  # > MAX_COPY_BYTES / P: the COPY goes as two datagrams
        p, u, addr = await _setup(k, mon, n + 8)
        async with await mon.attach_userfaultfd(u.handle).open_fd() as fd:
            r = FdResolver(fd)
            page = bytes(range(256)) * (P // 256)
            assert await r.resolve([copy(addr, page * n)]) == [(n * P, 0)]
            base = addr + n * P
            assert await r.resolve([zeropage(base + P, P)]) == [(P, 0)]
            results = await r.resolve(
                [
                    copy(base, b"x" * 3 * P),  # the 2nd page exists: partial, EAGAIN
                    wake(base, P),
                    copy_from(base + 4 * P, 1, 0, P),  # no src on the fd
                    zeropage(base + 5 * P, P + 1),
                    copy(base + 6 * P, b"y" * (wire.MAX_COPY_BYTES + P)),  # past the end
                ]
            )
            assert results == [
                (P, errno.EAGAIN),
                (0, 0),
                (-errno.EINVAL, errno.EINVAL),
                (-errno.EINVAL, errno.EINVAL),
                (-errno.ENOENT, errno.ENOENT),
            ]
        got = await p.read(addr, n * P)
        assert got == page * n
        await _reap(p)


async def test_monitor_helper_on_the_fd(daemon: Daemon, k: vkclient.Kernel) -> None:
    """UffdMonitor(fd=...): the same loop through the uffd fd: faults served from a source,
    EEXIST answered with WAKE, REMOVE events called back; run() ends when the fd closes."""
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 4, features=UFFD_FEATURE_EVENT_REMOVE)
        fd = await mon.attach_userfaultfd(u.handle).open_fd()
        removed: list[tuple[int, int]] = []
        asked: list[int] = []

        async def source(start: int, length: int) -> bytes:
            asked.append(start)
            if start == addr + P:  # someone else fills it first: EEXIST, then the WAKE
                assert await fd.zeropage(start, P, 1) == (P, 0)  # DONTWAKE
            return b"s" * length

        m = mon.attach_userfaultfd(u.handle).monitor(
            source, fd=fd, on_remove=lambda s, e: removed.append((s, e))
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run)
            with anyio.fail_after(10):
                assert await p.read(addr, 1) == b"s"
                assert await p.read(addr + P, 1) == b"\0"
                await p.madvise(addr, P, MADV_DONTNEED)
                assert await p.read(addr, 1) == b"s"
                fd.close()
        assert asked == [addr, addr + P, addr]
        assert removed == [(addr, addr + P)]
        assert m.faults == 3
        assert m.events == 1
        await _reap(p)


async def test_a_monitor_that_does_not_read_its_answers_is_held_back(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """Answers the monitor does not read queue in the daemon only until the socket is full:
    then the daemon stops taking its requests (its sends block), and once it reads, every
    request it sent is answered, in any order, by tag."""
    path = dma_socket_path(str(daemon.socket_path))
    async with vkclient.connect(daemon.addr, client_name="monitor") as mon:
        p, u, addr = await _setup(k, mon, 1)
        token = dict(mon._metadata)["vkernel-session"]
        sock = await anyio.to_thread.run_sync(receive_uffd, path, token, u.handle)
        sock.setblocking(False)
        wake_req = wire.RANGE2.pack(addr, P)
        sent = 0
        with anyio.fail_after(20):
            while True:  # until the daemon stops reading: our sends would block
                try:
                    sock.send(wire.REQUEST.pack(wire.UFFDIO_WAKE, sent + 1) + wake_req)
                except BlockingIOError:
                    break
                sent += 1
                # One at a time, so the daemon (this loop, one datagram per callback) keeps
                # up: the unread answers pile up first (AF_UNIX queues ≤ max_dgram_qlen).
                await anyio.lowlevel.checkpoint()
            assert sent < 1_000_000
            tags: set[int] = set()
            while len(tags) < sent:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    await anyio.sleep(0.001)
                    continue
                cmd, tag, err, _ = wire.ANSWER.unpack_from(data)
                assert (cmd, err) == (wire.UFFDIO_WAKE, 0)
                tags.add(tag)
        assert tags == set(range(1, sent + 1))
        sock.close()
        await _reap(p)
