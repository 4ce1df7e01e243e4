"""Implicit UNMAP events (kernel-semantics.md A.13 events table, B.66): every do_vmi_munmap
path with a uffd list sends UNMAP {start, end} to an EVENT_UNMAP uffd and waits for it to be
read: mmap MAP_FIXED over a registered range, mremap shrinking, mremap's MREMAP_FIXED target
and the moved-from range."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.gup.guphelp import mm_of
from tests.unit.mm.mmhelp import ANON, RW, P, errname, mmap_anon
from tests.unit.uffd.uffdhelp import priv, ready, settle
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mmap import sys_mmap, sys_mremap
from vkernel.kernel.uaccess import read_user_bytes
from vkernel.kernel.uapi import MAP_FIXED, MREMAP_FIXED, MREMAP_MAYMOVE

MISSING = uf.UFFDIO_REGISTER_MODE_MISSING


async def test_map_fixed_over_registered_range_sends_unmap(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_UNMAP)
    await uf.uffdio_register(ctx, t, a, 4 * P, MISSING)
    m = asyncio.ensure_future(sys_mmap(t, a + P, 2 * P, RW, ANON | MAP_FIXED))
    await settle()
    assert not m.done()  # waits for the monitor
    with pytest.raises(KernelError) as e:
        await uf.uffdio_zeropage(ctx, t, a, P)
    assert errname(e.value) == "EAGAIN"
    (msg,) = await ctx.read(64)
    assert (msg.event, msg.start, msg.end) == (uf.UFFD_EVENT_UNMAP, a + P, a + 3 * P)
    assert await m == a + P
    assert not ctx.mmap_changing
    with pytest.raises(KernelError) as e:
        await uf.uffdio_copy(ctx, t, a + P, b"\1" * P)
    assert errname(e.value) == "ENOENT"  # the new mapping is not registered
    assert await read_user_bytes(t, a + P, 1) == b"\0"  # an ordinary fault, no message
    assert not ctx.fault_pending
    assert mm_of(t).vma_lookup(a + 3 * P).uffd_ctx is ctx  # type: ignore[union-attr]
    # MAP_FIXED over an unregistered range sends nothing and does not wait
    b = await mmap_anon(t, 2 * P)
    assert await sys_mmap(t, b, P, RW, ANON | MAP_FIXED) == b
    assert not ctx.events
    await ctx.put()


async def test_mremap_shrink_sends_unmap(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await ready(t, features=uf.UFFD_FEATURE_EVENT_UNMAP)
    await uf.uffdio_register(ctx, t, a, 4 * P, MISSING)
    r = asyncio.ensure_future(sys_mremap(t, a, 4 * P, P, 0))
    await settle()
    assert not r.done()
    (msg,) = await ctx.read(64)
    assert (msg.event, msg.start, msg.end) == (uf.UFFD_EVENT_UNMAP, a + P, a + 4 * P)
    assert await r == a
    with pytest.raises(KernelError) as e:
        await uf.uffdio_zeropage(ctx, t, a + P, P)
    assert errname(e.value) == "ENOENT"
    assert await uf.uffdio_zeropage(ctx, t, a, P) == P  # the kept page is still registered
    await ctx.put()


async def test_mremap_move_sends_remap_then_unmap_of_the_old_range(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 2 * P)
    feats = uf.UFFD_FEATURE_EVENT_UNMAP | uf.UFFD_FEATURE_EVENT_REMAP
    ctx = await ready(t, features=feats)
    await uf.uffdio_register(ctx, t, a, 2 * P, MISSING)
    target = await mmap_anon(t, 8 * P)
    await uf.uffdio_register(ctx, t, target, 2 * P, MISSING)  # the MREMAP_FIXED target
    fl = MREMAP_MAYMOVE | MREMAP_FIXED
    r = asyncio.ensure_future(sys_mremap(t, a, 2 * P, 2 * P, fl, target))
    await settle()
    got: list[uf.UffdMsg] = []
    while len(got) < 3:
        (msg,) = await ctx.read(32)
        got.append(msg)
        await settle()
    new = await r
    assert new == target
    # Linux's order: UNMAP of the target, REMAP, UNMAP of the moved-from range
    assert (got[0].event, got[0].start, got[0].end) == (uf.UFFD_EVENT_UNMAP, target, target + 2 * P)
    assert (got[1].event, got[1].start, got[1].to, got[1].length) == (
        uf.UFFD_EVENT_REMAP,
        a,
        target,
        2 * P,
    )
    assert (got[2].event, got[2].start, got[2].end) == (uf.UFFD_EVENT_UNMAP, a, a + 2 * P)
    assert not ctx.mmap_changing
    assert mm_of(t).vma_lookup(new).uffd_ctx is ctx  # type: ignore[union-attr]
    await ctx.put()


async def test_mremap_without_event_unmap_does_not_wait(kernel: Kernel) -> None:
    t = priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await ready(t)
    await uf.uffdio_register(ctx, t, a, 4 * P, MISSING)
    assert await sys_mremap(t, a, 4 * P, 2 * P, 0) == a
    assert await sys_mmap(t, a, P, RW, ANON | MAP_FIXED) == a
    assert not ctx.events
    assert not ctx.mmap_changing
    await ctx.put()
