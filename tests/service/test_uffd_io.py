"""I/O into userfaultfd-registered memory over gRPC (issue 6 "every fault path", issue 7 seed
001): a process's O_DIRECT ``Rw`` call, an ``AioService.Ring`` submission and a buffered read(2)
block on a uffd served by a monitor in another session, and complete once it resolves; the
faulting session or the monitor's session dying mid-I/O. Every test ends with the audit clean
(the ``daemon`` fixture's teardown).

GUP faults are not FAULT_FLAG_USER, so these uffds are created without UFFD_USER_MODE_ONLY: the
faulting process has CAP_SYS_PTRACE (A.13 creation rule).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import anyio
import pytest
import structlog

import vkclient
from tests.service.conftest import Daemon
from vkclient import O_CREAT, O_DIRECT, O_RDWR, PAGE_SIZE
from vkclient._aio import AioRing, preadv, pwritev
from vkclient.uffd import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UffdMessage,
    Userfaultfd,
    copy,
)
from vkernel.v1 import userfaultfd_service_pb2 as upb

P = PAGE_SIZE
W = UFFD_PAGEFAULT_FLAG_WRITE


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed + (i >> 12)) & 0xFF for i in range(n))


async def _until(cond: Callable[[], object]) -> None:
    with anyio.fail_after(10):
        while not cond():
            await anyio.sleep(0.005)


async def _pins(k: vkclient.Kernel) -> tuple[int, int]:
    vm = await k.vmstat()
    return vm["nr_foll_pin_acquired"], vm["nr_foll_pin_released"]


async def _guest(
    k: vkclient.Kernel, npages: int, data: bytes, *, direct: bool = True
) -> tuple[vkclient.Process, int, int, Userfaultfd]:
    """A privileged process, a file holding ``data`` (an O_DIRECT fd unless not ``direct``)
    and an anonymous area of ``npages`` registered MISSING on a uffd it owns."""
    p = await k.spawn("qemu", capabilities=[vkclient.CAP_SYS_PTRACE])
    fd = await p.open("disk.img", O_CREAT | O_RDWR | (O_DIRECT if direct else 0))
    if data:
        src = await p.mmap(len(data))
        await p.write(src, data)
        assert await pwritev(p, fd, [(src, len(data))], 0) == len(data)
    addr = await p.mmap(npages * P)
    u = await k.userfaultfd(p)
    await u.register(addr, npages * P)
    return p, fd, addr, u


class _Gate:
    """An ``on_fault`` planner that logs every message and holds its answer (a COPY of
    ``fill(page)`` per fault) until the gate opens."""

    def __init__(self, fill: Callable[[int], bytes]) -> None:
        self.fill = fill
        self.log: list[UffdMessage] = []
        self.open = anyio.Event()

    async def __call__(self, msgs: list[UffdMessage]) -> list[upb.UffdResolveOp]:
        self.log.extend(msgs)
        await self.open.wait()
        return [copy(m.address & ~(P - 1), self.fill(m.address & ~(P - 1))) for m in msgs]


async def _reap(p: vkclient.Process) -> None:
    await p.kill()
    await p.wait()


@pytest.mark.parametrize(("gup", "foll"), [("", ""), ("slow", "pin"), ("fast", "get")])
async def test_dio_read_blocks_until_the_monitor_copies(
    daemon: Daemon, k: vkclient.Kernel, gup: str, foll: str
) -> None:
    """Rw(preadv, O_DIRECT) into a MISSING buffer: the monitor session gets a PAGEFAULT with
    the WRITE flag (FOLL_WRITE: the device writes memory) and the read waits for its COPY; it
    then returns the file's data (the COPY'd page overwritten), pins balanced."""
    data = _pattern(4 * P, seed=3)
    p, fd, addr, u = await _guest(k, 4, data)
    vma = daemon.kernel.find_task(p.pid).mm.vma_lookup(addr)
    assert vma is not None
    ctx = vma.uffd_ctx
    assert ctx is not None
    acq, rel = await _pins(k)
    async with vkclient.connect(daemon.addr, client_name="monitor") as mk:
        await u.grant(mk.session_id)
        gate = _Gate(lambda page: b"M" * P)
        mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
        result: list[int] = []

        async def read() -> None:
            result.append(await preadv(p, fd, [(addr, 4 * P)], 0, gup=gup, foll=foll))

        async with anyio.create_task_group() as tg:
            tg.start_soon(mon.run)
            tg.start_soon(read)
            await _until(lambda: gate.log)
            assert [(m.event, m.flags, m.address) for m in gate.log] == [
                (UFFD_EVENT_PAGEFAULT, W, addr)
            ]
            assert not result
            assert [w.address for w in ctx.fault_read] == [addr]  # the GUP sleeps on it
            gate.open.set()
            await _until(lambda: result)
            tg.cancel_scope.cancel()
    assert result == [4 * P]
    assert [(m.flags, m.address) for m in gate.log] == [(W, addr + i * P) for i in range(4)]
    assert await p.read(addr, 4 * P) == data
    a1, r1 = await _pins(k)
    assert (a1 - acq, r1 - rel) == ((4, 4) if foll != "get" else (0, 0))
    await u.close()
    await _reap(p)


async def test_dio_write_from_a_missing_buffer(daemon: Daemon, k: vkclient.Kernel) -> None:
    """Rw(pwritev, O_DIRECT) from a MISSING buffer: read faults (flags 0); the monitor's bytes
    reach the device."""
    p, fd, addr, u = await _guest(k, 2, b"")
    async with vkclient.connect(daemon.addr, client_name="monitor") as mk:
        await u.grant(mk.session_id)
        gate = _Gate(lambda page: bytes([0x41 + (page - addr) // P]) * P)
        gate.open.set()
        mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mon.run)
            with anyio.fail_after(10):
                assert await pwritev(p, fd, [(addr, 2 * P)], 0) == 2 * P
            tg.cancel_scope.cancel()
    assert [(m.flags, m.address) for m in gate.log] == [(0, addr), (0, addr + P)]
    assert await p.pread(fd, 2 * P, 0) == b"A" * P + b"B" * P
    acq, rel = await _pins(k)
    assert acq == rel
    await u.close()
    await _reap(p)


async def test_buffered_read_into_a_registered_buffer(daemon: Daemon, k: vkclient.Kernel) -> None:
    """Rw(preadv) on a buffered fd: copy_to_user faults (WRITE), sleeps on the uffd, and
    completes after the monitor's COPY with the file's data."""
    data = _pattern(2 * P, seed=5)
    p, fd, addr, u = await _guest(k, 2, data, direct=False)
    async with vkclient.connect(daemon.addr, client_name="monitor") as mk:
        await u.grant(mk.session_id)
        gate = _Gate(lambda page: b"M" * P)
        mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
        result: list[int] = []

        async def read() -> None:
            result.append(await preadv(p, fd, [(addr, 2 * P)], 0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(mon.run)
            tg.start_soon(read)
            await _until(lambda: gate.log)
            assert not result
            gate.open.set()
            await _until(lambda: result)
            tg.cancel_scope.cancel()
    assert result == [2 * P]
    assert [(m.flags, m.address) for m in gate.log] == [(W, addr), (W, addr + P)]
    assert await p.read(addr, 2 * P) == data
    await u.close()
    await _reap(p)


async def test_ring_iocb_waits_for_the_monitor(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A Ring message of three reads, the middle one into a MISSING buffer: the message returns
    at once (vkernel's io_submit does not wait for the pins); the read before the blocked one
    completes (io_submit_one in order: it is submitted before the GUP sleeps), the one after
    it waits; a later message's read into a resident buffer completes meanwhile; once the
    monitor resolves, the other two complete with the file's data."""
    data = _pattern(8 * P, seed=7)
    p, fd, u_addr, u = await _guest(k, 2, data)
    bufs = [await p.mmap(2 * P) for _ in range(3)]
    for b in bufs:
        await p.write(b, b"\xff" * (2 * P))  # resident
    async with vkclient.connect(daemon.addr, client_name="monitor") as mk:
        await u.grant(mk.session_id)
        gate = _Gate(lambda page: b"M" * P)
        mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
        async with anyio.create_task_group() as tg, AioRing(p, 8) as ring:
            tg.start_soon(mon.run)
            with anyio.fail_after(10):
                ring.prep_read(fd, bufs[0], 2 * P, 0, user_data=10)
                ring.prep_read(fd, u_addr, 2 * P, 2 * P, user_data=11)
                ring.prep_read(fd, bufs[1], 2 * P, 4 * P, user_data=12)
                assert await ring.submit_and_wait(0) == []
                assert ring.inflight == 3
                await _until(lambda: gate.log)
                ring.prep_read(fd, bufs[2], 2 * P, 6 * P, user_data=13)
                early: dict[int, int] = {}
                while len(early) < 2:
                    for c in await ring.submit_and_wait(1, timeout=5.0):
                        early[c.user_data] = c.res
                assert early == {10: 2 * P, 13: 2 * P}
                assert ring.inflight == 2
                gate.open.set()
                got: dict[int, int] = {}
                while len(got) < 2:
                    for c in await ring.submit_and_wait(1, timeout=5.0):
                        got[c.user_data] = c.res
            tg.cancel_scope.cancel()
    assert got == {11: 2 * P, 12: 2 * P}
    assert [(m.flags, m.address) for m in gate.log] == [(W, u_addr), (W, u_addr + P)]
    for b, off in ((bufs[0], 0), (u_addr, 2 * P), (bufs[1], 4 * P), (bufs[2], 6 * P)):
        assert await p.read(b, 2 * P) == data[off : off + 2 * P]
    acq, rel = await _pins(k)
    assert acq == rel
    await u.close()
    await _reap(p)


async def test_faulting_session_dies_while_its_dio_is_blocked(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """The client whose process is blocked in an O_DIRECT read (and an AIO read) on a uffd
    dies (its keepalive stream drops): the daemon ends the session, the process exits, the
    blocked GUPs end (the Rw call fails, the ring's context is destroyed), nothing stays
    pinned; the monitor's stream ends when the last holder goes."""
    client = await vkclient.connect(daemon.addr, client_name="qemu")
    data = _pattern(4 * P)
    p, fd, addr, u = await _guest(client, 4, data)
    vma = daemon.kernel.find_task(p.pid).mm.vma_lookup(addr)
    assert vma is not None
    ctx = vma.uffd_ctx
    assert ctx is not None
    mk = await vkclient.connect(daemon.addr, client_name="monitor")
    await u.grant(mk.session_id)
    gate = _Gate(lambda page: b"M" * P)  # never opened
    mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
    outcome: list[object] = []

    async def read() -> None:
        try:
            outcome.append(await preadv(p, fd, [(addr, 2 * P)], 0))
        except OSError as e:
            outcome.append(type(e).__name__)

    with structlog.testing.capture_logs():
        async with anyio.create_task_group() as tg, AioRing(p, 4) as ring:
            tg.start_soon(mon.run)
            tg.start_soon(read)
            ring.prep_read(fd, addr + 2 * P, 2 * P, 2 * P, user_data=1)
            assert await ring.submit_and_wait(0) == []
            # Both sleep on the uffd: one message read by the monitor, the other queued.
            await _until(lambda: gate.log and len(ctx.fault_pending) + len(ctx.fault_read) == 2)
            assert not outcome
            assert client._keepalive is not None
            client._keepalive.cancel()  # the client dies: its session ends, its process exits
            await _until(lambda: outcome)
            await _until(lambda: p.pid not in daemon.kernel.tasks)
            with anyio.fail_after(10):
                while True:
                    acq, rel = await _pins(k)
                    if acq == rel:
                        break
                    await anyio.sleep(0.01)
            assert not ctx.fault_pending
            assert not ctx.fault_read
            tg.cancel_scope.cancel()  # the monitor never answers (the process is gone)
    await mk.close()  # the last holder: the uffd is released
    await client.close()
    assert outcome
    assert outcome[0] != 2 * P
    assert await k.audit() == []


async def test_monitor_dies_while_a_dio_is_blocked(daemon: Daemon, k: vkclient.Kernel) -> None:
    """B.53: the monitor's session (the uffd's only holder) dies while an O_DIRECT read sleeps
    on it: the fault re-runs as an ordinary one and the read completes with the file's data."""
    data = _pattern(3 * P, seed=9)
    p, fd, addr, u = await _guest(k, 3, data)
    mk = await vkclient.connect(daemon.addr, client_name="monitor")
    await u.grant(mk.session_id)
    await u.close()  # the monitor is the only holder now
    gate = _Gate(lambda page: b"M" * P)  # reads the messages, never answers
    mon = mk.attach_userfaultfd(u.handle).monitor(on_fault=gate)
    result: list[int] = []

    async def read() -> None:
        result.append(await preadv(p, fd, [(addr, 3 * P)], 0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(mon.run)
        tg.start_soon(read)
        await _until(lambda: gate.log)
        assert [(m.flags, m.address) for m in gate.log] == [(W, addr)]
        assert not result
        await mk.close()  # userfaultfd_release: every blocked fault wakes as an ordinary one
        await _until(lambda: result)
        tg.cancel_scope.cancel()
    assert result == [3 * P]
    assert await p.read(addr, 3 * P) == data
    acq, rel = await _pins(k)
    assert acq == rel
    with pytest.raises(OSError) as e:
        await Userfaultfd.attach(k, u.handle).resolve([copy(addr, b"x" * P)])
    assert e.value.errno == errno.EBADF
    await _reap(p)
