"""I/O into userfaultfd-registered memory (issue 6 "every fault path", issue 7 seed 001): O_DIRECT
pread/preadv/pwrite (``iomap_dio_rw``) and AIO (``KioCtx.submit`` → ``dio_batch``) whose buffer
is MISSING-registered, every GUP switch, ``--no-fault-retry``, buffered read(2)/write(2) of disk
and shmem files, seed 001's postcopy-plus-O_DIRECT scenario with several uffds, and the faulting
process or the monitor going away mid-I/O (kernel-semantics.md A.13, A.14, B.51, B.53, B.68).

Linux: the device writes memory on a read, so the read's GUP has FOLL_WRITE and its fault message
carries UFFD_PAGEFAULT_FLAG_WRITE; a write's GUP reads memory (flags 0). Every DIO extraction
goes through ``pin_user_pages_fast`` (or the seed-000/004 switches: ``*_user_pages_unlocked``,
``get_user_pages_fast``), all FOLL_UNLOCKABLE, so the fault has ALLOW_RETRY, queues its message,
drops mmap_lock and sleeps until the monitor resolves it. Every test ends audited (the fs
kernel fixture's teardown), with FOLL_PIN pins balanced.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from tests.unit.fs.conftest import MakeFsKernel, make_fs_kernel
from tests.unit.fs.fshelp import P, make_file, pattern, raises
from vkernel.kernel import aio, dio, gup, pagecache
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.audit import audit
from vkernel.kernel.cred import Capability, Cred
from vkernel.kernel.errors import KernelError, UserFault
from vkernel.kernel.fs import O_DIRECT, O_RDWR
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import lookup_pte, sys_mmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import FOLL_WRITE, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE

__all__ = ["make_fs_kernel"]  # the fixture, re-exported for pytest

W = uf.UFFD_PAGEFAULT_FLAG_WRITE
ZERO = b""
"""A fill that answers with UFFDIO_ZEROPAGE."""
T = TypeVar("T")


@pytest.fixture
def fk(make_fs_kernel: MakeFsKernel) -> Kernel:
    """A 64 MiB kernel with a 16 MiB RAM disk (no latency)."""
    return make_fs_kernel("ram0=ram:16M")


def ptask(k: Kernel, name: str = "qemu") -> Task:
    """A process with CAP_SYS_PTRACE: its uffds need not be UFFD_USER_MODE_ONLY (GUP faults)."""
    return k.spawn(name, "s", cred=Cred(caps=frozenset({Capability.CAP_SYS_PTRACE})))


async def anon(t: Task, npages: int) -> int:
    """An anonymous private mapping."""
    return await sys_mmap(t, 0, npages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)


async def registered(t: Task, npages: int, flags: int = 0) -> tuple[uf.UserfaultfdCtx, int]:
    """userfaultfd(flags) (a blocking fd unless O_NONBLOCK), API, and an anonymous area of
    ``npages`` registered MISSING on it."""
    ctx = uf.sys_userfaultfd(t, flags)
    ctx.api(t, uf.UFFD_API, 0)
    a = await anon(t, npages)
    await uf.uffdio_register(ctx, t, a, npages * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    return ctx, a


async def dfile(k: Kernel, t: Task, data: bytes, name: str = "f") -> int:
    """A disk file holding ``data`` (written back: a direct read has nothing to flush); an
    O_DIRECT|O_RDWR fd to it."""
    fd0 = await make_file(k, t, name, data)
    await k.vfs.fsync(t, fd0)
    k.vfs.close(t, fd0)
    fd, _ = k.vfs.do_sys_open(t, name, O_RDWR | O_DIRECT, "disk")
    return fd


def pins(k: Kernel) -> tuple[int, int]:
    """(nr_foll_pin_acquired, nr_foll_pin_released)."""
    return k.vmstat["nr_foll_pin_acquired"], k.vmstat["nr_foll_pin_released"]


async def next_msgs(ctx: uf.UserfaultfdCtx) -> list[uf.UffdMsg]:
    """A blocking read(2) of the uffd: returns once a message is there (bounded, not a sleep)."""
    return await asyncio.wait_for(ctx.read(64 * uf.UFFD_MSG_SIZE, nonblock=False), 5)


async def resolve(ctx: uf.UserfaultfdCtx, t: Task, page: int, data: bytes | None) -> None:
    """COPY ``data`` (ZEROPAGE for ZERO) at ``page``; EEXIST (someone filled it) → WAKE."""
    if data is None:
        return
    try:
        if data == ZERO:
            await uf.uffdio_zeropage(ctx, t, page, P)
        else:
            await uf.uffdio_copy(ctx, t, page, data)
    except KernelError as e:
        if e.errno != errno.EEXIST:
            raise
        uf.uffdio_wake(ctx, page, P)


async def serve(
    ctx: uf.UserfaultfdCtx,
    t: Task,
    fill: Callable[[int], bytes | None],
    log: list[uf.UffdMsg],
) -> None:
    """A monitor thread: blocking reads, every message logged, each fault's page filled with
    ``fill(page)`` (bytes: COPY, ZERO: ZEROPAGE, None: left blocked). Ends on release."""
    while msgs := await ctx.read(64 * uf.UFFD_MSG_SIZE, nonblock=False):
        for m in msgs:
            log.append(m)
            if m.event == uf.UFFD_EVENT_PAGEFAULT:
                await resolve(ctx, t, m.address & ~(P - 1), fill(m.address & ~(P - 1)))


def spawn(aw: Awaitable[T]) -> asyncio.Future[T]:
    """Start ``aw`` as a task of its own (another thread of the process, or the monitor)."""
    return asyncio.ensure_future(aw)


async def stop(*tasks: asyncio.Future[Any]) -> None:
    """Cancel monitor tasks and wait for them."""
    for x in tasks:
        x.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until(cond: Callable[[], object]) -> None:
    """Wait (bounded) for a condition of the kernel's state, one loop turn at a time."""
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0)


# ---- 1. synchronous O_DIRECT (vfs_preadv / vfs_pwritev → iomap_dio_rw) -------------------------


@pytest.mark.parametrize("how", ["copy", "zeropage"])
async def test_dio_pread_blocks_until_resolved(fk: Kernel, how: str) -> None:
    """pread(O_DIRECT) of 4 pages into a MISSING buffer: the pin faults on page 0 with a WRITE
    message and sleeps with mmap_lock dropped; once the monitor fills the page the read goes
    on (one fault per page, in order) and the device overwrites whatever was filled."""
    t = ptask(fk)
    data = pattern(4 * P, seed=3)
    fd = await dfile(fk, t, data)
    ctx, a = await registered(t, 4)
    acq, rel = pins(fk)
    io = spawn(dio.vfs_preadv(t, fd, [(a, 4 * P)], 0))
    (m,) = await next_msgs(ctx)
    assert (m.event, m.flags, m.address) == (uf.UFFD_EVENT_PAGEFAULT, W, a)
    assert not io.done()
    assert t.mm is not None
    assert t.mm.mmap_lock.readers == 0  # handle_userfault dropped mmap_lock before sleeping
    assert pins(fk) == (acq, rel)  # nothing pinned yet: page 0 is the first
    await resolve(ctx, t, a, b"\xee" * P if how == "copy" else ZERO)
    log = [m]
    mon = spawn(serve(ctx, t, lambda _: ZERO, log))
    assert await asyncio.wait_for(io, 5) == 4 * P
    await stop(mon)
    assert [(x.flags, x.address) for x in log] == [(W, a + i * P) for i in range(4)]
    assert await read_user_bytes(t, a, 4 * P) == data  # the COPY'd page was overwritten
    assert pins(fk) == (acq + 4, rel + 4)
    await ctx.put()
    assert audit(fk) == []


async def test_dio_preadv_faults_only_the_pages_it_uses(fk: Kernel) -> None:
    """preadv with two segments skipping page 1: pages 0, 2, 3 fault (WRITE), page 1 stays
    missing; the data lands in both segments."""
    t = ptask(fk)
    data = pattern(3 * P, seed=5)
    fd = await dfile(fk, t, data)
    ctx, a = await registered(t, 4)
    log: list[uf.UffdMsg] = []
    mon = spawn(serve(ctx, t, lambda page: bytes([page >> 12 & 0xFF]) * P, log))
    assert await dio.vfs_preadv(t, fd, [(a, P), (a + 2 * P, 2 * P)], 0) == 3 * P
    await stop(mon)
    assert [(x.flags, x.address) for x in log] == [(W, a), (W, a + 2 * P), (W, a + 3 * P)]
    assert await read_user_bytes(t, a, P) == data[:P]
    assert await read_user_bytes(t, a + 2 * P, 2 * P) == data[P:]
    assert lookup_pte(t, a + P) == 0
    assert pins(fk)[0] == pins(fk)[1]
    await ctx.put()


@pytest.mark.parametrize("how", ["copy", "zeropage"])
async def test_dio_pwrite_from_missing_buffer(fk: Kernel, how: str) -> None:
    """pwrite(O_DIRECT) from a MISSING buffer: read faults (flags 0), the monitor's bytes go to
    the device (a ZEROPAGE'd buffer writes zeroes; the zero page's pin is not counted)."""
    t = ptask(fk)
    fd = await dfile(fk, t, pattern(4 * P, seed=1))
    ctx, a = await registered(t, 2)
    log: list[uf.UffdMsg] = []

    def fill(page: int) -> bytes:
        return bytes([0x41 + ((page - a) >> 12)]) * P if how == "copy" else ZERO

    io = spawn(dio.vfs_pwritev(t, fd, [(a, 2 * P)], P))
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (0, a)
    assert not io.done()
    await resolve(ctx, t, a, fill(a))
    mon = spawn(serve(ctx, t, fill, log))
    assert await asyncio.wait_for(io, 5) == 2 * P
    await stop(mon)
    assert [(x.flags, x.address) for x in log] == [(0, a + P)]
    want = b"A" * P + b"B" * P if how == "copy" else bytes(2 * P)
    assert await fk.vfs.read(t, fd, 2 * P, P) == want
    assert pins(fk)[0] == pins(fk)[1]
    await ctx.put()


# ---- 3. the GUP switches, --no-fault-retry, USER_MODE_ONLY --------------------------------------


@pytest.mark.parametrize("gmode", ["fast", "slow"])
@pytest.mark.parametrize("fmode", ["pin", "get"])
async def test_dio_switches_block_and_complete(fk: Kernel, gmode: str, fmode: str) -> None:
    """Seed 000's slow GUP and seed 004's FOLL_GET block on the uffd and complete as
    pin_user_pages_fast does; the counters show which path ran."""
    t = ptask(fk)
    data = pattern(2 * P, seed=9)
    fd = await dfile(fk, t, data)
    ctx, a = await registered(t, 2)
    acq, rel = pins(fk)
    fast, slow = fk.vmstat["fast_gup"], fk.vmstat["fast_gup_slow"]
    io = spawn(dio.vfs_preadv(t, fd, [(a, 2 * P)], 0, gup=gmode, foll=fmode))
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (W, a)
    assert not io.done()
    log = [m]
    await resolve(ctx, t, a, b"\1" * P)
    mon = spawn(serve(ctx, t, lambda _: ZERO, log))
    assert await asyncio.wait_for(io, 5) == 2 * P
    await stop(mon)
    assert [x.address for x in log] == [a, a + P]
    assert await read_user_bytes(t, a, 2 * P) == data
    assert pins(fk) == ((acq + 2, rel + 2) if fmode == "pin" else (acq, rel))
    if gmode == "fast":
        assert fk.vmstat["fast_gup_slow"] > slow  # the lockless walk found nothing: fallback
    else:
        assert fk.vmstat["fast_gup"] == fast
    await ctx.put()


async def test_no_fault_retry_dio_is_efault(make_fs_kernel: MakeFsKernel) -> None:
    """``--no-fault-retry``: no fault has ALLOW_RETRY, so handle_userfault returns SIGBUS and
    GUP fails as Linux's plain get_user_pages does: EFAULT with no message; a buffer whose
    first page is resident transfers that prefix. A CPU access gets SIGBUS."""
    k = make_fs_kernel("ram0=ram:16M", fault_retry=False)
    t = ptask(k)
    data = pattern(3 * P, seed=2)
    fd = await dfile(k, t, data)
    ctx = uf.sys_userfaultfd(t, uf.O_NONBLOCK)
    ctx.api(t, uf.UFFD_API, 0)
    a = await anon(t, 3)
    await write_user(t, a, b"\xff" * P)  # page 0 resident
    await uf.uffdio_register(ctx, t, a + P, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    for gmode in ("fast", "slow"):
        for fmode in ("pin", "get"):
            await raises(errno.EFAULT, dio.vfs_preadv(t, fd, [(a + P, 2 * P)], 0, gup=gmode))
            await raises(errno.EFAULT, dio.vfs_pwritev(t, fd, [(a + 2 * P, P)], 0, foll=fmode))
            n = await dio.vfs_preadv(t, fd, [(a, 3 * P)], 0, gup=gmode, foll=fmode)
            assert n == P
    assert await read_user_bytes(t, a, P) == data[:P]
    assert not ctx.fault_pending
    assert not ctx.fault_read
    with pytest.raises(UserFault):
        await read_user_bytes(t, a + P, 1)
    assert not ctx.fault_pending
    assert pins(k)[0] == pins(k)[1]
    await ctx.put()


async def test_user_mode_only_uffd_refuses_dio(fk: Kernel) -> None:
    """B.51(d): a UFFD_USER_MODE_ONLY registration refuses GUP faults (no FAULT_FLAG_USER):
    O_DIRECT gets EFAULT and no message is queued, while a user access still gets one."""
    t = fk.spawn("p", "s")
    fd = await dfile(fk, t, pattern(P))
    ctx, a = await registered(t, 1, uf.UFFD_USER_MODE_ONLY | uf.O_NONBLOCK)
    await raises(errno.EFAULT, dio.vfs_preadv(t, fd, [(a, P)], 0))
    await raises(errno.EFAULT, dio.vfs_pwritev(t, fd, [(a, P)], 0, gup="slow"))
    assert not ctx.fault_pending
    r = spawn(read_user_bytes(t, a, 1))
    await until(lambda: ctx.fault_pending)
    await uf.uffdio_zeropage(ctx, t, a, P)
    assert await r == b"\0"
    assert pins(fk)[0] == pins(fk)[1]
    await ctx.put()


async def test_user_mode_only_uffd_refuses_buffered_read(fk: Kernel) -> None:
    """A.13 step 4: copy_to_user of read(2) into a USER_MODE_ONLY registration → EFAULT."""
    t = fk.spawn("p", "s")
    fd = await make_file(fk, t, "b", pattern(P))
    ctx, a = await registered(t, 1, uf.UFFD_USER_MODE_ONLY | uf.O_NONBLOCK)
    io = spawn(dio.vfs_preadv(t, fd, [(a, P)], 0))
    try:
        async with asyncio.timeout(1):
            await raises(errno.EFAULT, io)
    finally:
        await ctx.put()
        await asyncio.gather(io, return_exceptions=True)
    assert not ctx.fault_read


async def test_user_mode_only_uffd_refuses_buffered_write(fk: Kernel) -> None:
    """A.13 step 4 the other way: write(2)'s copy_from_user out of a USER_MODE_ONLY
    registration is a kernel-mode fault → EFAULT, no message, the file untouched."""
    t = fk.spawn("p", "s")
    fd = await make_file(fk, t, "b", pattern(P))
    ctx, a = await registered(t, 1, uf.UFFD_USER_MODE_ONLY | uf.O_NONBLOCK)
    io = spawn(dio.vfs_pwritev(t, fd, [(a, P)], 0))
    try:
        async with asyncio.timeout(1):
            await raises(errno.EFAULT, io)
    finally:
        await ctx.put()
        await asyncio.gather(io, return_exceptions=True)
    assert not ctx.fault_read
    b = await anon(t, 1)
    assert await dio.vfs_preadv(t, fd, [(b, P)], 0) == P
    got = await read_user_bytes(t, b, P)
    assert got == pattern(P)


async def test_remote_gup_with_locked_blocks(fk: Kernel) -> None:
    """pin_user_pages_remote with ``locked`` (KVM's path): the fault may drop mmap_lock, so it
    blocks on the uffd and returns once resolved, with the lock released (``*locked`` 0, as
    Linux's "the lock was temporarily dropped, so we must unlock later"); without ``locked``
    (the lock held throughout) it is EFAULT with no message."""
    t = ptask(fk)
    ctx, a = await registered(t, 2)
    mm = t.mm
    assert mm is not None
    pages = np.full(1, -1, dtype=np.int64)
    async with mm.mmap_lock.read(t):
        got = await gup.pin_user_pages_remote(mm, a, 1, FOLL_WRITE, pages, None, current=t)
        assert got == -errno.EFAULT
    assert not ctx.fault_pending
    await mm.mmap_lock.read_lock(t)
    locked = gup.Locked(1)
    g = spawn(gup.pin_user_pages_remote(mm, a, 1, FOLL_WRITE, pages, locked, current=t))
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (W, a)
    assert mm.mmap_lock.readers == 0
    await uf.uffdio_copy(ctx, t, a, b"\x42" * P)
    assert await asyncio.wait_for(g, 5) == 1
    assert locked.value == 0
    assert mm.mmap_lock.readers == 0
    gup.unpin_user_pages(fk, pages, 1)
    assert pins(fk)[0] == pins(fk)[1]
    await ctx.put()


# ---- 2. AIO: KioCtx.submit → dio_batch.iomap_dio_submit ----------------------------------------


@pytest.mark.parametrize(("gmode", "fmode"), [("fast", "pin"), ("slow", "pin"), ("fast", "get")])
async def test_aio_iocb_into_registered_buffer(fk: Kernel, gmode: str, fmode: str) -> None:
    """One io_submit of three reads, the middle one into a MISSING buffer: it completes only
    after the monitor resolved its pages, with the file's data. vkernel's io_submit returns at
    once (the batch runs in a task of its own), so a second io_submit into a resident buffer
    completes while the first is blocked. Under GUP-fast the iocb before the blocked one
    completes too (io_submit_one in order, the plug flushed when the submitter sleeps) and the
    one after it waits; with slow GUP (seed 000's switch) the whole submission waits."""
    t = ptask(fk)
    data = pattern(8 * P, seed=4)
    fd = await dfile(fk, t, data)
    r0 = await anon(t, 2)
    r2 = await anon(t, 2)
    r3 = await anon(t, 2)
    for r in (r0, r2, r3):
        await write_user(t, r, b"\xff" * (2 * P))  # resident: the lockless walk pins them
    ctx, u = await registered(t, 2)
    kio = aio.KioCtx(t, 16, gup=gmode, foll=fmode)
    acq, rel = pins(fk)
    cbs = [
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(r0, 2 * P)], 0, user_data=10),
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(u, 2 * P)], 2 * P, user_data=11),
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(r2, 2 * P)], 4 * P, user_data=12),
    ]
    assert kio.submit(cbs) == 3
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (W, u)
    assert kio.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(r3, 2 * P)], 6 * P, user_data=13)]) == 1
    ahead = {10, 13} if gmode == "fast" else {13}
    first = {e.user_data: e.res for e in await kio.getevents(len(ahead), 16, timeout=5)}
    assert first == dict.fromkeys(ahead, 2 * P)
    assert kio.nr_inflight == 4 - len(ahead)
    log = [m]
    await resolve(ctx, t, u, b"\x11" * P)
    mon = spawn(serve(ctx, t, lambda page: b"\x22" * P, log))
    got = {e.user_data: e.res for e in await kio.getevents(4 - len(ahead), 16, timeout=5)}
    await stop(mon)
    assert got == dict.fromkeys({10, 11, 12} - ahead, 2 * P)
    assert [(x.flags, x.address) for x in log] == [(W, u), (W, u + P)]
    for buf, off in ((r0, 0), (u, 2 * P), (r2, 4 * P), (r3, 6 * P)):
        assert await read_user_bytes(t, buf, 2 * P) == data[off : off + 2 * P]
    assert pins(fk) == ((acq + 8, rel + 8) if fmode == "pin" else (acq, rel))
    await kio.destroy()
    await ctx.put()


async def test_aio_destroy_waits_for_the_blocked_iocb(fk: Kernel) -> None:
    """io_destroy with an iocb asleep on the uffd waits for it (Linux's kill_ioctx waits for
    every request); the monitor's COPY lets it complete, then destroy returns. Under
    ``--no-fault-retry`` semantics the same iocb would be EFAULT (see below)."""
    t = ptask(fk)
    data = pattern(P, seed=13)
    fd = await dfile(fk, t, data)
    ctx, u = await registered(t, 1)
    kio = aio.KioCtx(t, 4)
    assert kio.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(u, P)], 0, user_data=5)]) == 1
    await next_msgs(ctx)
    gone = spawn(kio.destroy())
    await until(lambda: kio.dead)
    assert not gone.done()
    assert kio.nr_inflight == 1
    await uf.uffdio_copy(ctx, t, u, b"\x01" * P)
    await asyncio.wait_for(gone, 5)
    assert kio.nr_inflight == 0
    assert await read_user_bytes(t, u, P) == data
    assert pins(fk)[0] == pins(fk)[1]
    await ctx.put()


async def test_no_fault_retry_aio_iocb_is_efault(make_fs_kernel: MakeFsKernel) -> None:
    """``--no-fault-retry``: the batched path's pin fails like plain GUP: the iocb into the
    registered buffer completes with -EFAULT and no message, its neighbours are unaffected."""
    k = make_fs_kernel("ram0=ram:16M", fault_retry=False)
    t = ptask(k)
    data = pattern(2 * P, seed=14)
    fd = await dfile(k, t, data)
    ctx, u = await registered(t, 1, uf.O_NONBLOCK)
    r = await anon(t, 1)
    await write_user(t, r, b"\xff" * P)
    kio = aio.KioCtx(t, 4)
    cbs = [
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(u, P)], 0, user_data=0),
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(r, P)], P, user_data=1),
    ]
    assert kio.submit(cbs) == 2
    got = {e.user_data: e.res for e in await kio.getevents(2, 4, timeout=5)}
    assert got == {0: -errno.EFAULT, 1: P}
    assert await read_user_bytes(t, r, P) == data[P:]
    assert not ctx.fault_pending
    assert pins(k)[0] == pins(k)[1]
    await kio.destroy()
    await ctx.put()


async def test_aio_iocbs_before_the_faulting_one_complete(fk: Kernel) -> None:
    """Linux: io_submit() runs io_submit_one per iocb in order; iocb 0's bio is in the plug
    when iocb 1's GUP sleeps on the uffd, schedule() flushes the plug, iocb 0 completes."""
    t = ptask(fk)
    fd = await dfile(fk, t, pattern(4 * P))
    ctx, u = await registered(t, 1)
    r0 = await anon(t, 1)
    await write_user(t, r0, b"\xff" * P)
    kio = aio.KioCtx(t, 4)
    cbs = [
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(r0, P)], 0, user_data=0),
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(u, P)], P, user_data=1),
    ]
    assert kio.submit(cbs) == 2
    await next_msgs(ctx)
    try:
        evs = await kio.getevents(1, 4, timeout=0.5)
        assert [e.user_data for e in evs] == [0]
    finally:
        await uf.uffdio_zeropage(ctx, t, u, P)
        await kio.getevents(1, 4, timeout=5)
        await kio.destroy()
        await ctx.put()


@pytest.mark.parametrize("tiled", [False, True])
async def test_aio_array_entries_before_the_faulting_one_complete(fk: Kernel, tiled: bool) -> None:
    """The struct-of-arrays path (io_submit_sqes) keeps io_submit's order too: entry 1's
    buffer is MISSING-registered, so its GUP leaves the lockless walk and sleeps; entry 0,
    pinned whole, completes meanwhile; entry 2 comes after the sleeper, so it waits, as in
    Linux. ``tiled``: the three buffers are adjacent pages of one range (one GUP run), else
    separate mappings (a run each)."""
    t = ptask(fk)
    data = pattern(4 * P)
    fd = await dfile(fk, t, data)
    mapping = fk.vfs.lookup("f").mapping
    assert mapping is not None
    pagecache.drop_clean_pages(mapping)  # an O_DIRECT-only file: the array path takes it
    if tiled:
        ctx, u = await registered(t, 3)
        await uf.uffdio_copy(ctx, t, u, b"\xff" * P, 0)  # page 0 resident, 1 missing
        await uf.uffdio_copy(ctx, t, u + 2 * P, b"\xff" * P, 0)  # and 2 resident
        bufs = [u, u + P, u + 2 * P]
    else:
        ctx, u1 = await registered(t, 1)
        r0, r2 = await anon(t, 1), await anon(t, 1)
        for r in (r0, r2):
            await write_user(t, r, b"\xff" * P)
        bufs = [r0, u1, r2]
    kio = aio.KioCtx(t, 4)
    n = kio.io_submit_sqes(
        np.full(3, aio.IOCB_CMD_PREAD),
        np.full(3, fd),
        np.array(bufs),
        np.full(3, P),
        np.arange(3) * P,
        np.arange(3),
    )
    assert n == 3
    (m,) = await next_msgs(ctx)
    assert m.address == bufs[1]
    try:
        evs = await kio.getevents(1, 4, timeout=0.5)
        assert [e.user_data for e in evs] == [0]
        assert [e.res for e in evs] == [P]
        assert await read_user_bytes(t, bufs[0], P) == data[:P]
    finally:
        await uf.uffdio_zeropage(ctx, t, bufs[1], P)
        rest = await kio.getevents(2, 4, timeout=5)
        await kio.destroy()
        await ctx.put()
    assert sorted((e.user_data, e.res) for e in rest) == [(1, P), (2, P)]
    assert await read_user_bytes(t, bufs[1], P) == data[P : 2 * P]
    assert await read_user_bytes(t, bufs[2], P) == data[2 * P : 3 * P]
    assert pins(fk)[0] == pins(fk)[1]


# ---- 4. buffered read(2) / write(2): copy_to_user / copy_from_user ------------------------------


@pytest.mark.parametrize("kind", ["disk", "shmem"])
async def test_buffered_read_into_registered_buffer(fk: Kernel, kind: str) -> None:
    """read(2) of a disk or shmem file into a MISSING buffer: copy_to_user faults (WRITE),
    handle_userfault sleeps, the copy resumes after the fill and overwrites it."""
    t = ptask(fk)
    data = pattern(3 * P, seed=6)
    fd = await make_file(fk, t, f"b.{kind}", data, kind)
    ctx, a = await registered(t, 3)
    io = spawn(dio.vfs_preadv(t, fd, [(a, 3 * P)], 0))
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (W, a)
    assert not io.done()
    log = [m]
    await resolve(ctx, t, a, b"\xee" * P)
    mon = spawn(serve(ctx, t, lambda _: ZERO, log))
    assert await asyncio.wait_for(io, 5) == 3 * P
    await stop(mon)
    assert [(x.flags, x.address) for x in log] == [(W, a + i * P) for i in range(3)]
    assert await read_user_bytes(t, a, 3 * P) == data
    await ctx.put()


@pytest.mark.parametrize("kind", ["disk", "shmem"])
async def test_buffered_write_from_registered_buffer(fk: Kernel, kind: str) -> None:
    """write(2) from a MISSING buffer: copy_from_user read-faults (flags 0), the file gets the
    monitor's bytes."""
    t = ptask(fk)
    fd = await make_file(fk, t, f"w.{kind}", bytes(3 * P), kind)
    ctx, a = await registered(t, 2)
    io = spawn(dio.vfs_pwritev(t, fd, [(a + P // 2, P)], 100))
    (m,) = await next_msgs(ctx)
    assert (m.flags, m.address) == (0, a)
    assert not io.done()
    log = [m]
    await resolve(ctx, t, a, b"m" * P)
    mon = spawn(serve(ctx, t, lambda _: b"n" * P, log))
    assert await asyncio.wait_for(io, 5) == P
    await stop(mon)
    assert [(x.flags, x.address) for x in log] == [(0, a), (0, a + P)]
    assert await fk.vfs.read(t, fd, P, 100) == b"m" * (P // 2) + b"n" * (P // 2)
    await ctx.put()


# ---- 5. seed 001: KVM postcopy and O_DIRECT on the same guest memory, several uffds -------------


async def test_postcopy_with_odirect_and_several_uffds(fk: Kernel) -> None:
    """Guest memory registered MISSING on uffd A, served from a "source" image by monitor A,
    while at the same time vCPU loads and stores, KVM's unlocked GUP, an O_DIRECT read from a
    disk image into guest pages and an O_DIRECT write out of guest pages all fault on it.
    A second uffd B (a library's private area) has its own monitor and is partly unregistered
    while a fault is blocked there (B.54: the fault completes as an ordinary one); a third uffd C
    is created and registered while A's faults are in flight. Everything completes with the
    right bytes, pins balance, audit clean."""
    n = 32
    t = ptask(fk)
    source = pattern(n * P, seed=11)  # the migration source's guest memory
    disk = pattern(8 * P, seed=12)
    fd = await dfile(fk, t, disk, "disk.img")
    out_fd = await dfile(fk, t, bytes(4 * P), "dump.img")
    ga, g = await registered(t, n)
    gb, h = await registered(t, 8)
    acq, rel = pins(fk)
    log_a: list[uf.UffdMsg] = []
    log_b: list[uf.UffdMsg] = []
    late = g + 20 * P  # a page the source sends late: the DIO read waits for it

    def from_source(page: int) -> bytes | None:
        return None if page == late else source[page - g : page - g + P]

    mon_a = spawn(serve(ga, t, from_source, log_a))
    # Monitor B serves the lower half of its area only: the upper half is unregistered below.
    mon_b = spawn(serve(gb, t, lambda page: b"L" * P if page < h + 4 * P else None, log_b))

    async def vcpu() -> list[bytes]:
        seen = []
        for i in range(0, 16, 3):
            seen.append(await read_user_bytes(t, g + i * P + 8, 8))
        for i in range(1, 16, 3):
            await write_user(t, g + i * P, b"vcpu")
        return seen

    async def kvm_gup() -> int:
        mm = t.mm
        assert mm is not None
        pages = np.full(2, -1, dtype=np.int64)
        ret = await gup.get_user_pages_unlocked(mm, g + 14 * P, 2, pages, FOLL_WRITE, current=t)
        gup.put_pages(fk, pages, max(ret, 0))
        return ret

    cpu = spawn(vcpu())
    kvm = spawn(kvm_gup())
    rd = spawn(dio.vfs_preadv(t, fd, [(g + 16 * P, 8 * P)], 0))  # disk image → guest
    wr = spawn(dio.vfs_pwritev(t, out_fd, [(g + 24 * P, 4 * P)], 0))  # guest → dump
    lib = spawn(read_user_bytes(t, h + P, 4))  # library code, served by B
    upper = spawn(read_user_bytes(t, h + 6 * P, 4))  # B leaves it blocked …
    # The O_DIRECT read is held on page 20 (monitor A's source has not got it yet).
    await until(lambda: any(x.address == g + 20 * P for x in log_a))
    await until(lambda: any(x.address == h + 6 * P for x in log_b))
    assert not rd.done()
    assert not upper.done()
    # … until B unregisters the upper half: the fault wakes and maps the zero page.
    gc, j = await registered(t, 1)  # a third uffd, registered while A's faults are in flight
    await uf.uffdio_unregister(gb, t, h + 4 * P, 4 * P)
    assert await asyncio.wait_for(upper, 5) == b"\0\0\0\0"
    assert not rd.done()
    await resolve(ga, t, g + 20 * P, source[20 * P : 21 * P])  # the page arrives
    async with asyncio.timeout(10):
        seen = await cpu
        assert await kvm == 2
        assert (await rd, await wr) == (8 * P, 4 * P)
        assert await lib == b"LLLL"
    jc = spawn(read_user_bytes(t, j, 2))
    (mc,) = await next_msgs(gc)
    assert mc.address == j
    await uf.uffdio_copy(gc, t, j, b"C" * P)
    assert await jc == b"CC"
    assert seen == [source[i * P + 8 : i * P + 16] for i in range(0, 16, 3)]
    for i in range(1, 16, 3):
        assert await read_user_bytes(t, g + i * P, 4) == b"vcpu"
    assert await read_user_bytes(t, g + 16 * P, 8 * P) == disk
    assert await fk.vfs.read(t, out_fd, 4 * P, 0) == source[24 * P : 28 * P]
    dio_faults = {x.address: x.flags for x in log_a if x.address >= g + 16 * P}
    assert dio_faults == {g + i * P: (W if i < 24 else 0) for i in range(16, 28)}
    assert len({x.address for x in log_a}) == len(log_a)  # each page faulted once
    await stop(mon_a, mon_b)
    assert pins(fk) == (acq + 12, rel + 12)
    for c in (ga, gb, gc):
        await c.put()
    assert audit(fk) == []


# ---- 6. the process killed, or the monitor gone, while a DIO is blocked -------------------------


async def test_process_killed_while_dio_blocked(fk: Kernel) -> None:
    """SIGKILL while an O_DIRECT read and an AIO read sleep on the uffd: both fail (the killed
    fault ends the GUP), nothing stays pinned, the uffd's queues are empty, audit clean."""
    t = ptask(fk)
    fd = await dfile(fk, t, pattern(4 * P))
    ctx, a = await registered(t, 4)
    await uf.uffdio_copy(ctx, t, a + 3 * P, b"\3" * P)  # the AIO's second page: resident
    acq, rel = pins(fk)
    io = spawn(dio.vfs_preadv(t, fd, [(a, 2 * P)], 0))
    await next_msgs(ctx)
    kio = aio.KioCtx(t, 4)
    assert kio.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 2 * P, 2 * P)], 0, 7)]) == 1
    await next_msgs(ctx)
    assert pins(fk) == (acq, rel)  # its first page sleeps: nothing of the run is pinned yet
    fk.kill(t, 9)
    with pytest.raises(KernelError):
        await asyncio.wait_for(io, 5)
    [ev] = await kio.getevents(1, 4, timeout=5)
    assert ev.user_data == 7
    assert ev.res < 0
    await kio.destroy()
    assert not ctx.fault_pending
    assert not ctx.fault_read
    assert pins(fk)[0] - acq == pins(fk)[1] - rel
    await ctx.put()
    fk.reap(t)
    assert audit(fk) == []


@pytest.mark.parametrize("write", [False, True])
async def test_monitor_gone_while_dio_blocked(fk: Kernel, write: bool) -> None:
    """B.53: the last holder closes the uffd while an O_DIRECT transfer sleeps on it: the fault
    re-runs as an ordinary one (a new page for the read's FOLL_WRITE, the zero page for the
    write) and the transfer completes: the file's data in memory, zeroes on the device."""
    t = ptask(fk)
    data = pattern(2 * P, seed=8)
    fd = await dfile(fk, t, data)
    ctx, a = await registered(t, 2)
    op = dio.vfs_pwritev if write else dio.vfs_preadv
    io = spawn(op(t, fd, [(a, 2 * P)], 0))
    (m,) = await next_msgs(ctx)
    assert m.flags == (0 if write else W)
    await ctx.put()
    assert await asyncio.wait_for(io, 5) == 2 * P
    if write:
        assert await fk.vfs.read(t, fd, 2 * P, 0) == bytes(2 * P)
    else:
        assert await read_user_bytes(t, a, 2 * P) == data
    assert pins(fk)[0] == pins(fk)[1]
    assert audit(fk) == []
