"""UFFDIO_MOVE of whole PMDs (B.64 move-pmd): a PMD-mapped THP moves as one entry when src
and dst are PMD aligned, the request covers it and dst has no page table; otherwise the PMD
is split first. The MISSING fault that asks for it leaves dst's PMD none
(do_huge_pmd_anonymous_page → handle_userfault)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import MakeKernel, MiB, P, errname, mmap_anon, pfn_at
from tests.unit.uffd.uffdhelp import priv, ready, settle
from vkernel.kernel import gup
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError
from vkernel.kernel.mm_api import fork
from vkernel.kernel.pgtable import pmd_slot, table_of
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import _PAGE_PFN_MASK, _PAGE_PSE, PAGE_SHIFT, PMD_SIZE

MISSING = uf.UFFDIO_REGISTER_MODE_MISSING
HOLES = uf.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES


def _pmd(t: Task, addr: int) -> int:
    mm = mm_of(t)
    slot = pmd_slot(mm, addr)
    return mm.mem.u64.item(slot) if slot >= 0 else 0


async def _areas(t: Task) -> tuple[int, int]:
    """A PMD-aligned 2 MiB source (its own VMA) and a 2 MiB destination after it."""
    raw = await mmap_anon(t, 6 * MiB)
    src = (raw + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    return src, src + 2 * MiB


async def test_move_whole_pmd_after_a_missing_fault(make_kernel: MakeKernel) -> None:
    kernel = make_kernel(thp="always")
    t = priv(kernel)
    src, dst = await _areas(t)
    await write_user(t, src, b"".join(i.to_bytes(4, "little") * (P // 4) for i in range(512)))
    e = _pmd(t, src)
    assert e & _PAGE_PSE  # a THP
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    ctx = await ready(t, features=uf.UFFD_FEATURE_MOVE)
    await uf.uffdio_register(ctx, t, dst, 2 * MiB, MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, dst + 7 * P, 4))
    await settle()
    (m,) = await ctx.read(32)
    assert (m.flags, m.address) == (0, dst + 7 * P)  # a MISSING read fault
    # The fault left dst's PMD without pages (Linux: none; vkernel's uaccess loop may have
    # allocated an empty PTE table, which MOVE treats as none).
    d = _pmd(t, dst)
    assert not d & _PAGE_PSE
    if d:
        tb = table_of(d) * 512
        assert not mm_of(t).mem.u64[tb : tb + 512].any()
    assert await uf.uffdio_move(ctx, t, dst, src, 2 * MiB, HOLES) == 2 * MiB
    assert await r == (7).to_bytes(4, "little")
    d = _pmd(t, dst)
    assert d & _PAGE_PSE
    assert (d & _PAGE_PFN_MASK) >> PAGE_SHIFT == head  # the same folio, not copied
    assert not _pmd(t, src)
    assert await read_user_bytes(t, dst + 511 * P, 4) == (511).to_bytes(4, "little")
    await write_user(t, dst, b"w")  # dirty and writable: no COW
    assert (_pmd(t, dst) & _PAGE_PFN_MASK) >> PAGE_SHIFT == head
    await ctx.put()
    assert await read_user_bytes(t, src, 4) == b"\0" * 4  # moved out


async def test_move_part_of_a_thp_splits_pmd_and_folio(make_kernel: MakeKernel) -> None:
    """move_splits_huge_pmd(): a request not covering the whole aligned PMD splits it, and
    move_pages_pte() splits the large folio (split_folio) before moving the small page; a
    pinned THP cannot be split: EBUSY."""
    kernel = make_kernel(thp="always")
    t = priv(kernel)
    src, dst = await _areas(t)
    await write_user(t, src, b"\1" * P + b"\2" * P)
    e = _pmd(t, src)
    assert e & _PAGE_PSE
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    ctx = await ready(t, features=uf.UFFD_FEATURE_MOVE)
    await uf.uffdio_register(ctx, t, dst, 2 * MiB, MISSING)
    assert await uf.uffdio_move(ctx, t, dst + P, src + P, P) == P
    assert not _pmd(t, src) & _PAGE_PSE  # the PMD was split
    mem = mm_of(t).mem
    assert mem.order[head] == 0  # and so was the folio
    assert pfn_at(t, dst + P) == head + 1  # the very page, not a copy
    assert await read_user_bytes(t, dst + P, 1) == b"\2"
    assert await read_user_bytes(t, src, 1) == b"\1"  # the rest stays in place
    # a pinned THP: no split, EBUSY
    other = (await mmap_anon(t, 4 * MiB) + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await write_user(t, other, b"\3")
    assert _pmd(t, other) & _PAGE_PSE
    pages = page_array(1)
    assert await gup.pin_user_pages_unlocked(mm_of(t), other, 1, pages, 0, current=t) == 1
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_move(ctx, t, dst + 2 * P, other + P, P)
    assert errname(e2.value) == "EBUSY"
    gup.unpin_user_pages(kernel, pages, 1)
    await ctx.put()


async def test_move_pmd_split_into_a_nohugepage_dst(make_kernel: MakeKernel) -> None:
    """B.64 move-pmd-split: dst is MADV_NOHUGEPAGE, so its MISSING fault really allocates a
    PTE table; a whole-PMD MOVE then splits the PMD and the folio and moves 512 pages."""
    from vkernel.kernel.mmap import sys_madvise
    from vkernel.kernel.uapi import MADV_NOHUGEPAGE

    kernel = make_kernel(thp="always")
    t = priv(kernel)
    src, dst = await _areas(t)
    await write_user(t, src, b"".join(i.to_bytes(4, "little") * (P // 4) for i in range(512)))
    head = (_pmd(t, src) & _PAGE_PFN_MASK) >> PAGE_SHIFT
    await sys_madvise(t, dst, 2 * MiB, MADV_NOHUGEPAGE)
    ctx = await ready(t, features=uf.UFFD_FEATURE_MOVE)
    await uf.uffdio_register(ctx, t, dst, 2 * MiB, MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, dst + 9 * P, 4))
    await settle()
    (m,) = await ctx.read(32)
    assert m.address == dst + 9 * P
    assert await uf.uffdio_move(ctx, t, dst, src, 2 * MiB, HOLES) == 2 * MiB
    assert await r == (9).to_bytes(4, "little")
    assert not _pmd(t, dst) & _PAGE_PSE  # moved by PTEs
    assert pfn_at(t, dst + 511 * P) == head + 511
    assert mm_of(t).mem.order[head] == 0
    assert await read_user_bytes(t, dst + 511 * P, 4) == (511).to_bytes(4, "little")
    await ctx.put()


async def test_move_pmd_refuses_shared_and_pinned_thps(make_kernel: MakeKernel) -> None:
    kernel = make_kernel(thp="always")
    t = priv(kernel)
    src, dst = await _areas(t)
    await write_user(t, src, b"\2")
    ctx = await ready(t, features=uf.UFFD_FEATURE_MOVE)
    await uf.uffdio_register(ctx, t, dst, 2 * MiB, MISSING)
    pages = page_array(1)
    assert await gup.pin_user_pages_unlocked(mm_of(t), src, 1, pages, 0, current=t) == 1
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst, src, 2 * MiB)
    assert errname(e.value) == "EBUSY"  # pinned
    gup.unpin_user_pages(kernel, pages, 1)
    child = await fork(t)  # now shared with the child: not AnonExclusive
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst, src, 2 * MiB)
    assert errname(e.value) == "EBUSY"
    assert _pmd(t, src) & _PAGE_PSE  # left whole
    kernel.kill(child, 9)
    kernel.reap(child)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst, src, 2 * MiB)
    assert errname(e.value) == "EBUSY"  # mapped once again, but not AnonExclusive yet
    await write_user(t, src, b"\3")  # the write fault reuses it: exclusive again
    assert await uf.uffdio_move(ctx, t, dst, src, 2 * MiB) == 2 * MiB
    assert _pmd(t, dst) & _PAGE_PSE
    assert await read_user_bytes(t, dst, 1) == b"\3"
    await ctx.put()
