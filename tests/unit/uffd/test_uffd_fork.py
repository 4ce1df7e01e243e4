"""userfaultfd and fork: UFFD_EVENT_FORK (a new uffd for the child), fork without it, uffd-wp
bits and PTE markers across fork, wp-fork-pin (kernel-semantics.md A.11, A.13, B.52, B.58,
B.59, B.66)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import P, errname, mmap_anon, pfn_at
from tests.unit.uffd.uffdhelp import pm57, priv, ready, settle
from vkernel.kernel import gup
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError, UserFault
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import fork
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import FOLL_LONGTERM, VM_UFFD_MISSING, VM_UFFD_WP

MISSING = uf.UFFDIO_REGISTER_MODE_MISSING
WP = uf.UFFDIO_REGISTER_MODE_WP


def _reap(kernel: Kernel, child: Task) -> None:
    kernel.kill(child, signal.SIGKILL)
    kernel.reap(child)


async def _fork_read(t: Task, ctx: uf.UserfaultfdCtx) -> tuple[Task, uf.UserfaultfdCtx]:
    """fork() with EVENT_FORK: it blocks until the FORK message is read; returns the child
    and its new uffd (whose reference the reader now owns)."""
    f = asyncio.ensure_future(fork(t))
    await settle()
    assert not f.done()
    (m,) = await ctx.read(64)
    assert m.event == uf.UFFD_EVENT_FORK
    child = await f
    assert m.fork_task is child
    assert m.fork_ctx is not None
    return child, m.fork_ctx


async def test_event_fork_new_ctx_for_the_child(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK | uf.UFFD_FEATURE_THREAD_ID)
    await uf.uffdio_register(ctx, t, a, 4 * P, MISSING)
    await uf.uffdio_copy(ctx, t, a, b"\5" * P)
    f = asyncio.ensure_future(fork(t))
    await settle()
    assert not f.done()  # the fork waits for the monitor
    assert ctx.mmap_changing == 1
    with pytest.raises(KernelError) as e:
        await uf.uffdio_zeropage(ctx, t, a + P, P)
    assert errname(e.value) == "EAGAIN"  # mmap_changing on the parent's uffd
    (m,) = await ctx.read(64)
    assert m.event == uf.UFFD_EVENT_FORK
    child = await f
    nctx = m.fork_ctx
    assert m.fork_task is child
    assert nctx is not None
    assert nctx is not ctx
    assert nctx.mm is mm_of(child)
    assert (nctx.flags, nctx.features, nctx.holders) == (ctx.flags, ctx.features, 1)
    assert nctx.initialized
    assert not ctx.mmap_changing
    v = mm_of(child).vma_lookup(a)
    assert v is not None
    assert v.uffd_ctx is nctx
    assert v.vm_flags & VM_UFFD_MISSING
    # the copied page is shared COW; a missing page of the child faults to the new uffd
    assert await read_user_bytes(child, a, 1) == b"\5"
    r = asyncio.ensure_future(read_user_bytes(child, a + P, 2))
    await settle()
    assert not ctx.fault_pending
    (m,) = await nctx.read(64)
    assert (m.event, m.address, m.ptid) == (uf.UFFD_EVENT_PAGEFAULT, a + P, child.pid)
    assert await uf.uffdio_copy(nctx, None, a + P, b"\6" * P) == P
    assert await r == b"\6\6"
    # the parent's range is untouched by the child's COPY and still faults to the old uffd
    r = asyncio.ensure_future(read_user_bytes(t, a + P, 1))
    await settle()
    (m,) = await ctx.read(64)
    assert m.address == a + P
    assert m.ptid == t.pid
    await uf.uffdio_zeropage(ctx, t, a + P, P)
    assert await r == b"\0"
    _reap(kernel, child)
    await nctx.put()
    await ctx.put()


async def test_fork_without_event_fork_unregisters_the_child(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await ready(t)
    await uf.uffdio_register(ctx, t, a, 2 * P, MISSING)
    child = await fork(t)  # no event: fork does not wait
    v = mm_of(child).vma_lookup(a)
    assert v is not None
    assert v.uffd_ctx is None
    assert not v.vm_flags & VM_UFFD_MISSING
    assert await read_user_bytes(child, a, 1) == b"\0"
    assert not ctx.fault_pending
    assert not ctx.events
    _reap(kernel, child)
    await ctx.put()


async def test_sigbus_feature_child_gets_sigbus_and_no_messages(kernel: Kernel) -> None:
    """B.52: with SIGBUS|EVENT_FORK the child's uffd has SIGBUS too: every touch of a missing
    page is SIGBUS, the monitor sees only the FORK event."""
    t = priv(kernel)
    a = await mmap_anon(t, 3 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_SIGBUS | uf.UFFD_FEATURE_EVENT_FORK)
    await uf.uffdio_register(ctx, t, a, 3 * P, MISSING)
    child, nctx = await _fork_read(t, ctx)
    for i in range(3):
        with pytest.raises(UserFault) as e:
            await read_user_bytes(child, a + i * P, 1)
        assert e.value.signo == signal.SIGBUS
    assert not nctx.fault_pending
    assert not ctx.fault_pending
    assert not ctx.events
    _reap(kernel, child)
    await nctx.put()
    await ctx.put()


async def test_unread_fork_event_and_close_releases_the_new_ctx(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK)
    await uf.uffdio_register(ctx, t, a, 2 * P, MISSING)
    f = asyncio.ensure_future(fork(t))
    await settle()
    assert not f.done()
    nctx = ctx.events[0].msg.fork_ctx
    assert nctx is not None
    await ctx.put()  # the monitor closes without reading
    child = await f
    assert nctx.released
    assert nctx.holders == 0
    v = mm_of(child).vma_lookup(a)
    assert v is not None
    assert v.uffd_ctx is None
    assert not v.vm_flags & VM_UFFD_MISSING
    assert await read_user_bytes(child, a, 1) == b"\0"  # an ordinary fault
    _reap(kernel, child)


async def test_killed_forker_abandons_the_event_and_the_child(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK)
    await uf.uffdio_register(ctx, t, a, 2 * P, MISSING)
    npids = len(kernel.tasks)
    f = asyncio.ensure_future(fork(t))
    await settle()
    nctx = ctx.events[0].msg.fork_ctx
    child = ctx.events[0].msg.fork_task
    assert nctx is not None
    assert child is not None
    kernel.kill(t, signal.SIGKILL)
    with pytest.raises(KernelError) as e:
        await f
    assert errname(e.value) == "EINTR"
    assert nctx.released
    assert not ctx.events
    assert not ctx.mmap_changing
    assert child.mm is None
    assert len(kernel.tasks) == npids
    kernel.reap(t)
    await ctx.put()


async def test_wp_fork_with_event_keeps_the_bits(kernel: Kernel) -> None:
    """B.58 wp-fork-with-event: the child's pagemap bit 57 stays set, its uffd gets the WP
    fault, unprotecting through it clears the bit."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\1" * (2 * P))
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    child, nctx = await _fork_read(t, ctx)
    v = mm_of(child).vma_lookup(a)
    assert v is not None
    assert v.vm_flags & VM_UFFD_WP
    assert pm57(child, a)
    assert pm57(child, a + P)
    assert pm57(t, a)
    w = asyncio.ensure_future(write_user(child, a, b"c"))
    await settle()
    (m,) = await nctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WP | uf.UFFD_PAGEFAULT_FLAG_WRITE
    assert not ctx.fault_pending
    await uf.uffdio_writeprotect(nctx, None, a, P, 0)
    await w
    assert not pm57(child, a)
    assert await read_user_bytes(child, a, 2) == b"c\1"
    assert await read_user_bytes(t, a, 1) == b"\1"  # COW: the parent's page is its own
    assert pm57(t, a)
    _reap(kernel, child)
    await nctx.put()
    await ctx.put()


@pytest.mark.parametrize("event_fork", [False, True])
async def test_wp_fork_pin(kernel: Kernel, event_fork: bool) -> None:
    """B.59 wp-fork-pin: (1) a R/O longterm pin, then fork: the child's early-COW copy keeps
    uffd-wp iff EVENT_FORK; (2) fork, then the child pins R/O (unshare): its new page keeps
    uffd-wp iff EVENT_FORK."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\2" * (2 * P))
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK if event_fork else 0)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    pages = page_array(1)
    mm = mm_of(t)
    assert await gup.pin_user_pages_unlocked(mm, a, 1, pages, FOLL_LONGTERM, current=t) == 1
    if event_fork:
        child, nctx = await _fork_read(t, ctx)
    else:
        child = await fork(t)
    assert pfn_at(child, a) != pfn_at(t, a)  # copied early (maybe pinned, exclusive)
    assert pm57(child, a) == event_fork
    assert pm57(t, a)
    gup.unpin_user_pages(kernel, pages, 1)
    # (2) the second page is shared COW with the child: the child's R/O pin unshares it
    cpages = page_array(1)
    cmm = mm_of(child)
    assert await gup.pin_user_pages_unlocked(cmm, a + P, 1, cpages, FOLL_LONGTERM) == 1
    assert pfn_at(child, a + P) != pfn_at(t, a + P)
    assert pm57(child, a + P) == event_fork
    assert await read_user_bytes(child, a + P, 1) == b"\2"
    gup.unpin_user_pages(kernel, cpages, 1)
    _reap(kernel, child)
    if event_fork:
        await nctx.put()
    await ctx.put()


@pytest.mark.parametrize("event_fork", [False, True])
async def test_poison_marker_across_fork(kernel: Kernel, event_fork: bool) -> None:
    """copy_pte_marker(): a poison marker is always copied: the child SIGBUSes too."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    feats = uf.UFFD_FEATURE_POISON
    if event_fork:
        feats |= uf.UFFD_FEATURE_EVENT_FORK
    ctx = await ready(t, features=feats)
    await uf.uffdio_register(ctx, t, a, 2 * P, MISSING)
    assert await uf.uffdio_poison(ctx, t, a, P) == P
    if event_fork:
        child, nctx = await _fork_read(t, ctx)
    else:
        child = await fork(t)
    with pytest.raises(UserFault) as e:
        await read_user_bytes(child, a, 1)
    assert e.value.signo == signal.SIGBUS
    _reap(kernel, child)
    if event_fork:
        await nctx.put()
    await ctx.put()


async def test_events_scenario_through_the_childs_uffd(kernel: Kernel) -> None:
    """B.65 events: FORK|REMAP|REMOVE; the monitor switches to the child's uffd on FORK; the
    child faults the first half, mremaps the area (REMAP), faults the second half at the new
    address, MADV_DONTNEEDs it all (REMOVE: the monitor unregisters) and reads zeros. Every
    page faults exactly once."""
    from vkernel.kernel.mmap import sys_madvise, sys_mremap
    from vkernel.kernel.uapi import MADV_DONTNEED, MREMAP_FIXED, MREMAP_MAYMOVE

    n = 8
    t = priv(kernel)
    a = await mmap_anon(t, n * P)
    other = await mmap_anon(t, n * P)
    feats = uf.UFFD_FEATURE_EVENT_FORK | uf.UFFD_FEATURE_EVENT_REMAP | uf.UFFD_FEATURE_EVENT_REMOVE
    ctx = await ready(t, features=feats)
    await uf.uffdio_register(ctx, t, a, n * P, MISSING)
    seen = {"faults": 0, "fork": 0, "remap": 0, "remove": 0}
    held: list[uf.UserfaultfdCtx] = []

    async def monitor() -> None:
        cur = ctx
        while True:
            for m in await cur.read(4 * uf.UFFD_MSG_SIZE, nonblock=False):
                if m.event == uf.UFFD_EVENT_FORK:
                    assert m.fork_ctx is not None
                    cur = m.fork_ctx
                    held.append(cur)
                    seen["fork"] += 1
                elif m.event == uf.UFFD_EVENT_PAGEFAULT:
                    assert not m.flags & uf.UFFD_PAGEFAULT_FLAG_WRITE  # reads come first
                    await uf.uffdio_zeropage(cur, None, m.address, P)
                    seen["faults"] += 1
                elif m.event == uf.UFFD_EVENT_REMAP:
                    assert (m.start, m.to, m.length) == (a, other, n * P)
                    seen["remap"] += 1
                elif m.event == uf.UFFD_EVENT_REMOVE:
                    await uf.uffdio_unregister(cur, None, m.start, m.end - m.start)
                    seen["remove"] += 1

    mon = asyncio.ensure_future(monitor())
    child = await fork(t)
    assert seen["fork"] == 1
    for i in range(n // 2):
        assert await read_user_bytes(child, a + i * P, 1) == b"\0"
        await write_user(child, a + i * P, b"\1")
    fl = MREMAP_MAYMOVE | MREMAP_FIXED
    assert await sys_mremap(child, a, n * P, n * P, fl, other) == other
    for i in range(n // 2, n):
        assert await read_user_bytes(child, other + i * P, 1) == b"\0"
        await write_user(child, other + i * P, b"\1")
    assert await read_user_bytes(child, other, 1) == b"\1"
    await sys_madvise(child, other, n * P, MADV_DONTNEED)
    assert await read_user_bytes(child, other, n * P) == b"\0" * (n * P)
    assert seen == {"faults": n, "fork": 1, "remap": 1, "remove": 1}
    mon.cancel()
    await asyncio.gather(mon, return_exceptions=True)
    _reap(kernel, child)
    for c in held:
        await c.put()
    await ctx.put()


async def test_cancelled_fork_unwinds(kernel: Kernel) -> None:
    """A fork whose wait for the FORK read is cancelled drops the event, the parent uffd's
    mmap_changing and the half-made child (its new uffd released)."""
    t = priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK)
    await uf.uffdio_register(ctx, t, a, P, MISSING)
    npids = len(kernel.tasks)
    f = asyncio.ensure_future(fork(t))
    await settle()
    nctx = ctx.events[0].msg.fork_ctx
    child = ctx.events[0].msg.fork_task
    assert nctx is not None
    assert child is not None
    f.cancel()
    with pytest.raises(asyncio.CancelledError):
        await f
    assert not ctx.events
    assert not ctx.mmap_changing
    assert nctx.released
    assert child.mm is None
    assert len(kernel.tasks) == npids
    assert await uf.uffdio_zeropage(ctx, t, a, P) == P  # the parent's uffd works on
    await ctx.put()
