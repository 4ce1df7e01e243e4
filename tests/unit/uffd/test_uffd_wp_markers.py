"""uffd-wp PTE markers: WP_UNPOPULATED on anon (B.57), WP_ASYNC with markers and
MADV_DONTNEED (A.13 WP specifics, B.60), WP on shmem (markers survive MADV_DONTNEED), fork of
protected shmem with and without EVENT_FORK (B.58), markers across fork."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import SHARED_ANON, P, mmap_anon
from tests.unit.uffd.uffdhelp import pm57, pm_swap, priv, ready, settle
from vkernel.kernel import gup
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import UserFault
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import fork
from vkernel.kernel.mmap import sys_madvise, sys_mremap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    _PAGE_UFFD_WP,
    FOLL_WRITE,
    MADV_DONTNEED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PTE_MARKER_UFFD_WP,
)

MISSING = uf.UFFDIO_REGISTER_MODE_MISSING
WP = uf.UFFDIO_REGISTER_MODE_WP
PROTECT = uf.UFFDIO_WRITEPROTECT_MODE_WP
WP_WRITE = uf.UFFD_PAGEFAULT_FLAG_WP | uf.UFFD_PAGEFAULT_FLAG_WRITE


def _reap(kernel: Kernel, child: Task) -> None:
    kernel.kill(child, signal.SIGKILL)
    kernel.reap(child)


async def test_wp_unpopulated_markers(kernel: Kernel) -> None:
    """B.57 wp-unpopulated: WP on none PTEs installs markers (bit 57); unprotect and
    MADV_DONTNEED drop them; a read of a marker reads zero and stays protected; a write to a
    marker is a WP fault."""
    t = priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_UNPOPULATED)
    await uf.uffdio_register(ctx, t, a, 4 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 4 * P, PROTECT)
    for i in range(4):
        assert pm57(t, a + i * P)
        assert pm_swap(t, a + i * P)  # a marker is a swap-type entry in pagemap
    await uf.uffdio_writeprotect(ctx, t, a, P, 0)
    assert not pm57(t, a)
    assert not pm_swap(t, a)
    await sys_madvise(t, a + P, P, MADV_DONTNEED)
    assert not pm57(t, a + P)  # the zap dropped the marker (anon)
    await write_user(t, a + P, b"w")  # no fault to the monitor: an ordinary page
    assert not pm57(t, a + P)
    assert not ctx.fault_pending
    # a read of a marker: the zero page, still write-protected, no message
    assert await read_user_bytes(t, a + 2 * P, 2) == b"\0\0"
    assert pm57(t, a + 2 * P)
    assert not pm_swap(t, a + 2 * P)
    assert not ctx.fault_pending
    # a write to a marker: WP|WRITE, resolved by unprotecting
    w = asyncio.ensure_future(write_user(t, a + 3 * P + 7, b"v"))
    await settle()
    assert not w.done()
    (m,) = await ctx.read(32)
    assert (m.flags, m.address) == (WP_WRITE, a + 3 * P)
    await uf.uffdio_writeprotect(ctx, t, a + 3 * P, P, 0)
    await w
    assert not pm57(t, a + 3 * P)
    assert await read_user_bytes(t, a + 3 * P + 6, 3) == b"\0v\0"
    # the zero-page PTE of the read keeps its protection until unprotected; a write then COWs
    w = asyncio.ensure_future(write_user(t, a + 2 * P, b"z"))
    await settle()
    (m,) = await ctx.read(32)
    assert m.flags == WP_WRITE
    await uf.uffdio_writeprotect(ctx, t, a + 2 * P, P, 0)
    await w
    assert await read_user_bytes(t, a + 2 * P, 1) == b"z"
    await ctx.put()


async def test_without_wp_unpopulated_none_ptes_stay_none(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\1")
    ctx = await ready(t)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, PROTECT)
    assert pm57(t, a)
    assert not pm57(t, a + P)  # a no-op on the none PTE
    await write_user(t, a + P, b"\2")  # so a write there does not fault to the monitor
    assert not ctx.fault_pending
    await ctx.put()


async def test_wp_async_markers_and_dontneed(kernel: Kernel) -> None:
    """WP_ASYNC (implies WP_UNPOPULATED): a write to a marker just drops the protection (bit
    57 clears: written); MADV_DONTNEED on anon drops markers and bits (reads as written)."""
    t = priv(kernel)
    a = await mmap_anon(t, 3 * P)
    await write_user(t, a, b"\1")
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_ASYNC)
    await uf.uffdio_register(ctx, t, a, 3 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 3 * P, PROTECT)
    assert all(pm57(t, a + i * P) for i in range(3))
    await write_user(t, a + P, b"x")  # a marker: no message, no block
    assert not pm57(t, a + P)
    assert pm57(t, a + 2 * P)
    assert not ctx.fault_pending
    assert await read_user_bytes(t, a + P, 2) == b"x\0"
    await sys_madvise(t, a, 3 * P, MADV_DONTNEED)
    assert not any(pm57(t, a + i * P) for i in range(3))
    await ctx.put()


async def test_missing_and_wp_marker_copy_overwrites(kernel: Kernel) -> None:
    """MISSING|WP: a marker is still a missing page (userfaultfd_must_wait: pte_none_mostly):
    a read sends a MISSING fault and COPY replaces the marker."""
    t = priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_UNPOPULATED)
    await uf.uffdio_register(ctx, t, a, P, MISSING | WP)
    await uf.uffdio_writeprotect(ctx, t, a, P, PROTECT)
    assert pm57(t, a)
    r = asyncio.ensure_future(read_user_bytes(t, a, 1))
    await settle()
    (m,) = await ctx.read(32)
    assert m.flags == 0
    assert await uf.uffdio_copy(ctx, t, a, b"\3" * P, uf.UFFDIO_COPY_MODE_WP) == P
    assert await r == b"\3"
    assert pm57(t, a)
    await ctx.put()


async def test_gup_write_on_a_marker_blocks_then_completes(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_UNPOPULATED)
    await uf.uffdio_register(ctx, t, a, P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, P, PROTECT)
    pages = page_array(1)
    mm = mm_of(t)
    g = asyncio.ensure_future(gup.get_user_pages_unlocked(mm, a, 1, pages, FOLL_WRITE, current=t))
    await settle()
    assert not g.done()
    (m,) = await ctx.read(32)
    assert m.flags == WP_WRITE
    await uf.uffdio_writeprotect(ctx, t, a, P, 0)
    assert await g == 1
    gup.put_pages(kernel, pages, 1)
    await ctx.put()


async def test_mremap_without_event_remap_clears_uffd_wp(kernel: Kernel) -> None:
    """mremap without EVENT_REMAP unregisters the moved VMA, and the moved PTEs lose uffd-wp:
    bits cleared (still read-only), markers gone."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\1")
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_UNPOPULATED)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, PROTECT)
    target = await mmap_anon(t, 2 * P)
    new = await sys_mremap(t, a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    v = mm_of(t).vma_lookup(new)
    assert v is not None
    assert v.uffd_ctx is None
    assert not pm57(t, new)
    assert not pm57(t, new + P)
    assert not pm_swap(t, new + P)  # the marker went with the protection
    await write_user(t, new, b"q")  # an ordinary write fault, no monitor
    assert await read_user_bytes(t, new, 1) == b"q"
    assert not ctx.fault_pending
    await ctx.put()


async def test_leftover_marker_of_an_unregistered_range_is_cleared(kernel: Kernel) -> None:
    """pte_marker_clear(): a uffd-wp marker in a VMA that is not uffd-wp registered (what
    kernels before the mremap fix could leave) is dropped by the fault, which then runs as an
    ordinary one."""
    from vkernel.kernel.pgtable import pmd_slot, pte_alloc

    t = priv(kernel)
    a = await mmap_anon(t, P)
    mm = mm_of(t)
    slot = pmd_slot(mm, a, alloc=True)
    table = pte_alloc(mm, slot)
    mm.mem.u64[table * 512 + ((a >> 12) & 511)] = PTE_MARKER_UFFD_WP
    assert pm57(t, a)
    await write_user(t, a, b"q")
    assert not pm57(t, a)
    assert await read_user_bytes(t, a, 1) == b"q"


async def test_shmem_wp(kernel: Kernel) -> None:
    """WP on shmem (shared anonymous): present pages and holes (markers, always) are
    protected; faults report WP|WRITE; MADV_DONTNEED keeps the protection as markers
    (zap_install_uffd_wp_if_needed); unregister drops it."""
    t = priv(kernel)
    a = await mmap_anon(t, 3 * P, flags=SHARED_ANON)
    await write_user(t, a, b"\1" * P + b"\2" * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)  # advertised: accepted
    ioctls = await uf.uffdio_register(ctx, t, a, 3 * P, WP)
    assert ioctls & (1 << uf._UFFDIO_WRITEPROTECT)
    await uf.uffdio_writeprotect(ctx, t, a, 3 * P, PROTECT)
    assert all(pm57(t, a + i * P) for i in range(3))
    assert pm_swap(t, a + 2 * P)  # the hole has a marker even without WP_UNPOPULATED
    assert await read_user_bytes(t, a, 1) == b"\1"
    w = asyncio.ensure_future(write_user(t, a, b"a"))
    await settle()
    (m,) = await ctx.read(32)
    assert (m.flags, m.address) == (WP_WRITE, a)
    await uf.uffdio_writeprotect(ctx, t, a, P, 0)
    await w
    assert not pm57(t, a)
    # MADV_DONTNEED: the page stays in the page cache, the protection stays as a marker
    await sys_madvise(t, a + P, P, MADV_DONTNEED)
    assert pm57(t, a + P)
    assert pm_swap(t, a + P)
    assert await read_user_bytes(t, a + P, 1) == b"\2"  # mapped again, still protected
    assert pm57(t, a + P)
    w = asyncio.ensure_future(write_user(t, a + P, b"b"))
    await settle()
    (m,) = await ctx.read(32)
    assert (m.flags, m.address) == (WP_WRITE, a + P)
    await uf.uffdio_writeprotect(ctx, t, a + P, P, 0)
    await w
    # the hole: a write maps the new page protected and faults
    w = asyncio.ensure_future(write_user(t, a + 2 * P, b"c"))
    await settle()
    (m,) = await ctx.read(32)
    assert (m.flags, m.address) == (WP_WRITE, a + 2 * P)
    await uf.uffdio_unregister(ctx, t, a, 3 * P)  # wakes it; the protection is gone
    await w
    assert not any(pm57(t, a + i * P) for i in range(3))
    assert await read_user_bytes(t, a, 3 * P) == b"a" + b"\1" * (P - 1) + b"b" + b"\2" * (
        P - 1
    ) + b"c" + b"\0" * (P - 1)
    await ctx.put()


@pytest.mark.parametrize("event_fork", [False, True])
async def test_shmem_wp_fork(kernel: Kernel, event_fork: bool) -> None:
    """B.58 on shmem: the child's bit 57 is set iff EVENT_FORK (vma_needs_copy copies the page
    tables of a uffd-wp child VMA, markers included); the parent keeps it after a zap."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P, flags=SHARED_ANON)
    await write_user(t, a, b"\4")
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_FORK if event_fork else 0)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, PROTECT)
    await sys_madvise(t, a, P, MADV_DONTNEED)
    assert pm57(t, a)
    nctx: uf.UserfaultfdCtx | None = None
    if event_fork:
        f = asyncio.ensure_future(fork(t))
        await settle()
        (m,) = await ctx.read(32)
        child = await f
        nctx = m.fork_ctx
        assert nctx is not None
    else:
        child = await fork(t)
    assert pm57(child, a) == event_fork
    assert pm57(child, a + P) == event_fork
    assert await read_user_bytes(child, a, 1) == b"\4"
    assert pm57(child, a) == event_fork
    if event_fork:
        assert nctx is not None
        w = asyncio.ensure_future(write_user(child, a, b"k"))
        await settle()
        (m,) = await nctx.read(32)
        assert m.flags == WP_WRITE
        await uf.uffdio_writeprotect(nctx, None, a, P, 0)
        await w
    else:
        await write_user(child, a, b"k")
    assert await read_user_bytes(t, a, 1) == b"k"  # shared memory
    assert pm57(t, a)
    _reap(kernel, child)
    if nctx is not None:
        await nctx.put()
    await ctx.put()


@pytest.mark.parametrize("event_fork", [False, True])
async def test_wp_marker_across_fork(kernel: Kernel, event_fork: bool) -> None:
    """copy_pte_marker(): an anon uffd-wp marker reaches the child only if its VMA stays
    uffd-wp registered (EVENT_FORK)."""
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\5")  # an anon_vma, so fork copies the page tables
    feats = uf.UFFD_FEATURE_WP_UNPOPULATED
    if event_fork:
        feats |= uf.UFFD_FEATURE_EVENT_FORK
    ctx = await ready(t, features=feats)
    await uf.uffdio_register(ctx, t, a, 2 * P, WP)
    await uf.uffdio_writeprotect(ctx, t, a + P, P, PROTECT)
    nctx: uf.UserfaultfdCtx | None = None
    if event_fork:
        f = asyncio.ensure_future(fork(t))
        await settle()
        (m,) = await ctx.read(32)
        child = await f
        nctx = m.fork_ctx
        assert nctx is not None
    else:
        child = await fork(t)
    assert pm57(child, a + P) == event_fork
    assert pm_swap(child, a + P) == event_fork
    assert pm57(t, a + P)
    _reap(kernel, child)
    if nctx is not None:
        await nctx.put()
    await ctx.put()


async def test_poison_and_markers_in_the_audit(kernel: Kernel) -> None:
    """The audit accepts markers and rejects any other non-present PTE."""
    from vkernel.kernel.audit import audit
    from vkernel.kernel.pgtable import pmd_slot, table_of

    t = priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_UNPOPULATED)
    await uf.uffdio_register(ctx, t, a, P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, P, PROTECT)
    assert audit(kernel) == []
    mm = mm_of(t)
    u = mm.mem.u64
    slot = table_of(u.item(pmd_slot(mm, a))) * 512 + ((a >> 12) & 511)
    assert u.item(slot) == PTE_MARKER_UFFD_WP == _PAGE_UFFD_WP
    u[slot] = 1 << 40  # garbage: not present, not a marker
    assert any("not a PTE marker" in p for p in audit(kernel))
    with pytest.raises(UserFault):  # handle_pte_marker(): an unknown marker is SIGBUS
        await read_user_bytes(t, a, 1)
    u[slot] = PTE_MARKER_UFFD_WP
    assert audit(kernel) == []
    assert await read_user_bytes(t, a, 1) == b"\0"  # a valid one is a protected zero page
    assert pm57(t, a)
    await ctx.put()


async def test_shmem_wp_survives_mprotect(kernel: Kernel) -> None:
    """userfaultfd_set_vm_flags(): a uffd-wp shared VMA wants write notification, so its
    vm_page_prot is read-only and mprotect(RW) does not make a protected PTE writable."""
    from vkernel.kernel.mmap import sys_mprotect
    from vkernel.kernel.uapi import PROT_READ, PROT_WRITE

    t = priv(kernel)
    a = await mmap_anon(t, P, flags=SHARED_ANON)
    await write_user(t, a, b"\6")
    ctx = await ready(t)
    await uf.uffdio_register(ctx, t, a, P, WP)
    await uf.uffdio_writeprotect(ctx, t, a, P, PROTECT)
    await sys_mprotect(t, a, P, PROT_READ)
    await sys_mprotect(t, a, P, PROT_READ | PROT_WRITE)
    assert pm57(t, a)
    w = asyncio.ensure_future(write_user(t, a, b"m"))
    await settle()
    (m,) = await ctx.read(32)
    assert m.flags == WP_WRITE
    await uf.uffdio_writeprotect(ctx, t, a, P, 0)
    await w
    assert await read_user_bytes(t, a, 1) == b"m"
    await ctx.put()


async def test_fills_over_markers(kernel: Kernel) -> None:
    """pte_none_mostly(): COPY and CONTINUE overwrite a uffd-wp marker
    (mfill_atomic_install_pte), anon ZEROPAGE and POISON want a none PTE (EEXIST)."""
    from tests.unit.mm.mmhelp import errname
    from vkernel.kernel.errors import KernelError

    t = priv(kernel)
    a = await mmap_anon(t, 3 * P)
    feats = uf.UFFD_FEATURE_WP_UNPOPULATED | uf.UFFD_FEATURE_POISON
    ctx = await ready(t, features=feats | uf.UFFD_FEATURE_MINOR_SHMEM)
    await uf.uffdio_register(ctx, t, a, 3 * P, MISSING | WP)
    await uf.uffdio_writeprotect(ctx, t, a, 3 * P, PROTECT)
    for call in (uf.uffdio_zeropage, uf.uffdio_poison):
        with pytest.raises(KernelError) as e:
            await call(ctx, t, a, P)
        assert errname(e.value) == "EEXIST"
    assert await uf.uffdio_copy(ctx, t, a, b"\7" * P) == P
    assert not pm57(t, a)  # replaced by a page without MODE_WP
    # shmem MINOR|WP: a read of a protected hole whose page is cached is a MINOR fault, and
    # CONTINUE maps the page over the marker
    s = await mmap_anon(t, P, flags=SHARED_ANON)
    await write_user(t, s, b"\x11")
    await sys_madvise(t, s, P, MADV_DONTNEED)
    await uf.uffdio_register(ctx, t, s, P, WP | uf.UFFDIO_REGISTER_MODE_MINOR)
    await uf.uffdio_writeprotect(ctx, t, s, P, PROTECT)
    assert pm_swap(t, s)
    r = asyncio.ensure_future(read_user_bytes(t, s, 1))
    await settle()
    (m,) = await ctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_MINOR
    assert await uf.uffdio_continue(ctx, t, s, P, uf.UFFDIO_CONTINUE_MODE_WP) == P
    assert await r == b"\x11"
    assert pm57(t, s)
    await ctx.put()
