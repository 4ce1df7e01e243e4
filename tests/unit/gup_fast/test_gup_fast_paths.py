"""GUP-fast: the lockless walk, its stop conditions and the slow-path fallback (A.7, B.15-B.21)."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest

from tests.unit.gup_fast.gfhelp import P, in_hook, page_array, read_locks
from tests.unit.mm.mmhelp import SHARED_ANON, MakeKernel, MiB, mmap_anon, pfn_at
from vkernel.kernel.gup import put_pages, unpin_user_page, unpin_user_pages
from vkernel.kernel.gup_fast import (
    __get_user_pages_fast,
    get_user_pages_fast,
    get_user_pages_fast_only,
    gup_fast,
    pin_user_pages_fast,
)
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.memory import zap_page_range_single
from vkernel.kernel.mm_api import (
    fork,
    lookup_pte,
    read_user_bytes,
    sys_madvise,
    sys_mprotect,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    FOLL_DUMP,
    FOLL_LONGTERM,
    FOLL_PIN,
    FOLL_TOUCH,
    FOLL_WRITE,
    MADV_HUGEPAGE,
    MMF_HAS_PINNED,
    PMD_SIZE,
    PROT_NONE,
    PROT_READ,
    TASK_SIZE,
    PG_anon_exclusive,
    PG_referenced,
)


async def _populated(task: Task, n: int, touched: int | None = None) -> int:
    """An anon RW mapping of ``n`` pages whose first ``touched`` (default all) are written."""
    a = await mmap_anon(task, n * P)
    k = n if touched is None else touched
    if k:
        await write_user(task, a, b"w" * (k * P))
    return a


def _events(kernel: Kernel) -> tuple[int, int]:
    return kernel.vmstat["fast_gup"], kernel.vmstat["fast_gup_slow"]


async def test_pin_fast_takes_every_page_without_mmap_lock(kernel: Kernel, task: Task) -> None:
    """B.15: 16 populated exclusive pages: pinned by the lockless walk, mmap_lock untouched,
    no FOLL_TOUCH (the PTE's accessed bit is not set by GUP, only folio_set_referenced)."""
    a = await _populated(task, 16)
    mem = kernel.mem
    pfns = [pfn_at(task, a + i * P) for i in range(16)]
    rc0 = mem.refcount[pfns].copy()
    ptes_before = [lookup_pte(task, a + i * P) for i in range(16)]
    for p in pfns:
        mem.flags[p] &= ~np.uint32(PG_referenced)
    locks = read_locks(task)
    pages = page_array(16)
    assert await pin_user_pages_fast(task.mm, a, 16, FOLL_WRITE, pages) == 16
    assert pages.tolist() == pfns
    assert read_locks(task) == locks
    assert _events(kernel) == (16, 0)
    assert (mem.refcount[pfns] == rc0 + 1024).all()
    assert all(mem.flags[p] & PG_referenced for p in pfns)
    assert [lookup_pte(task, a + i * P) for i in range(16)] == ptes_before
    assert task.mm.flags & MMF_HAS_PINNED
    assert kernel.vmstat["nr_foll_pin_acquired"] == 16
    unpin_user_pages(kernel, pages, 16)
    assert (mem.refcount[pfns] == rc0).all()


async def test_unpopulated_suffix_goes_to_the_slow_path(kernel: Kernel, task: Task) -> None:
    """B.16: pages 0-9 populated, 10-15 empty: the walk takes 10, the slow path (mmap_lock read
    once) faults in the rest; fast_only returns 10 and takes no lock."""
    a = await _populated(task, 16, touched=10)
    pages = page_array(16)
    locks = read_locks(task)
    assert get_user_pages_fast_only(task.mm, a, 16, FOLL_WRITE, pages) == 10
    assert read_locks(task) == locks
    assert _events(kernel) == (10, 0)
    put_pages(kernel, pages, 10)
    pages = page_array(16)
    assert await get_user_pages_fast(task.mm, a, 16, FOLL_WRITE, pages) == 16
    assert read_locks(task) == locks + 1
    assert _events(kernel) == (20, 1)
    assert pages.tolist() == [pfn_at(task, a + i * P) for i in range(16)]
    put_pages(kernel, pages, 16)


async def test_fast_only_alias_is_the_2014_name(kernel: Kernel, task: Task) -> None:
    """Seed 003 / A.2: __get_user_pages_fast is get_user_pages_fast_only (FOLL_GET, no lock)."""
    a = await _populated(task, 4)
    pages = page_array(4)
    assert __get_user_pages_fast(task.mm, a, 4, 0, pages) == 4
    put_pages(kernel, pages, 4)


async def test_prot_none_stops_the_walk_and_the_slow_path_fails_partially(
    kernel: Kernel, task: Task
) -> None:
    """B.17 (PROT_NONE PTE) + B.18: the walk stops at the protnone page; the slow path then
    fails with -EFAULT, so the call returns the fast count."""
    a = await _populated(task, 8)
    await sys_mprotect(task, a + 5 * P, 3 * P, PROT_NONE)
    pages = page_array(8)
    assert await get_user_pages_fast(task.mm, a, 8, 0, pages) == 5
    assert _events(kernel) == (5, 1)
    put_pages(kernel, pages, 5)


async def test_slow_path_error_after_fast_success_returns_the_fast_count(
    kernel: Kernel, task: Task
) -> None:
    """B.18: pages 0-3 writable, page 4 in a PROT_READ VMA, WRITE for 8 → 4 (not -EFAULT)."""
    a = await _populated(task, 8)
    await sys_mprotect(task, a + 4 * P, 4 * P, PROT_READ)
    pages = page_array(8)
    assert await pin_user_pages_fast(task.mm, a, 8, FOLL_WRITE, pages) == 4
    assert kernel.vmstat["nr_foll_pin_acquired"] == 4
    unpin_user_pages(kernel, pages, 4)


async def test_read_only_pte_after_fork_stops_a_write_pin(kernel: Kernel, task: Task) -> None:
    """B.17 (R/O PTE with WRITE, e.g. after fork): the walk takes the pages the parent wrote
    again, the slow path breaks COW for the rest; every page ends up exclusive."""
    a = await _populated(task, 8)
    child = await fork(task)
    await write_user(task, a, b"p" * (3 * P))  # pages 0-2 writable again in the parent
    pages = page_array(8)
    assert await pin_user_pages_fast(task.mm, a, 8, FOLL_WRITE, pages) == 8
    assert _events(kernel) == (3, 1)
    assert all(kernel.mem.flags[p] & PG_anon_exclusive for p in pages.tolist())
    unpin_user_pages(kernel, pages, 8)
    kernel.do_exit(child)


async def test_read_pin_of_shared_anon_must_unshare(kernel: Kernel, task: Task) -> None:
    """B.17 (R/O PIN of a non-exclusive anon page): gup_must_unshare stops the walk; the slow
    path unshares, so the pinned pages are exclusive and the child keeps its own."""
    a = await _populated(task, 8)
    child = await fork(task)
    await write_user(task, a, b"p" * (2 * P))
    pages = page_array(8)
    assert await pin_user_pages_fast(task.mm, a, 8, 0, pages) == 8
    assert _events(kernel) == (2, 1)
    assert all(kernel.mem.flags[p] & PG_anon_exclusive for p in pages.tolist())
    assert all(pfn_at(child, a + i * P) != pages[i] for i in range(2, 8))
    unpin_user_pages(kernel, pages, 8)
    kernel.do_exit(child)


async def test_zero_page_is_special_and_left_to_the_slow_path(kernel: Kernel, task: Task) -> None:
    """B.17 (special PTE incl. the shared zero page): GUP-fast never returns the zero page;
    the slow path does (FOLL_GET takes a real reference on it)."""
    a = await _populated(task, 8, touched=4)
    assert await read_user_bytes(task, a + 4 * P, 4 * P) == bytes(4 * P)
    assert pfn_at(task, a + 4 * P) == kernel.mem.zero_pfn
    pages = page_array(8)
    assert get_user_pages_fast_only(task.mm, a, 8, 0, pages) == 4
    put_pages(kernel, pages, 4)
    pages = page_array(8)
    assert await get_user_pages_fast(task.mm, a, 8, 0, pages) == 8
    assert pages[4:].tolist() == [kernel.mem.zero_pfn] * 4
    put_pages(kernel, pages, 8)


async def test_longterm_pin_of_movable_pages_migrates_in_the_slow_path(
    make_kernel: MakeKernel,
) -> None:
    """B.17 (LONGTERM on a movable page): the walk stops at the first ZONE_MOVABLE page, the
    slow path migrates the rest out of it (A.6); every pinned page is longterm-pinnable."""
    kernel = make_kernel(movable_bytes=16 * MiB)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 8 * P)
    mem = kernel.mem
    mem.memalloc_pin = True  # the first 3 pages come from the normal zone
    await write_user(task, a, b"n" * (3 * P))
    mem.memalloc_pin = False
    await write_user(task, a + 3 * P, b"m" * (5 * P))
    assert mem.in_movable(pfn_at(task, a + 3 * P))
    pages = page_array(8)
    assert await pin_user_pages_fast(task.mm, a, 8, FOLL_WRITE | FOLL_LONGTERM, pages) == 8
    assert kernel.vmstat["fast_gup"] == 3
    assert not any(mem.in_movable(p) for p in pages.tolist())
    unpin_user_pages(kernel, pages, 8)


@pytest.mark.parametrize(
    ("nr", "flags", "expected"),
    [
        ((1 << 52) - 1, 0, -errno.EOVERFLOW),
        (2, FOLL_TOUCH, -errno.EINVAL),
        (2, FOLL_PIN, -errno.EINVAL),
        (2, FOLL_DUMP, -errno.EINVAL),
        (0, 0, 0),
    ],
)
async def test_argument_errors(
    kernel: Kernel, task: Task, nr: int, flags: int, expected: int
) -> None:
    """B.19: overflow → -EOVERFLOW; internal or non-whitelisted flags → -EINVAL; nr 0 → 0."""
    a = await _populated(task, 2)
    pages = page_array(2)
    assert await get_user_pages_fast(task.mm, a, nr, flags, pages) == expected
    assert _events(kernel) == (0, 0)


async def test_range_beyond_task_size_is_efault(kernel: Kernel, task: Task) -> None:
    """B.19: end > TASK_SIZE_MAX → -EFAULT, before any walk."""
    pages = page_array(4)
    assert await get_user_pages_fast(task.mm, TASK_SIZE - P, 2, 0, pages) == -errno.EFAULT
    assert get_user_pages_fast_only(task.mm, TASK_SIZE - P, 2, 0, pages) == -errno.EFAULT


async def test_odd_write_protect_seq_sends_pins_to_the_slow_path(
    kernel: Kernel, task: Task
) -> None:
    """B.20: fork is inside copy_page_range (seq odd, mmap_lock held for write): the fast walk
    pins nothing and the slow path blocks on mmap_lock until fork ends."""
    a = await _populated(task, 8)
    mm = task.mm
    pages = page_array(8)
    await mm.mmap_lock.write_lock()
    mm.write_protect_seq += 1
    pin = asyncio.ensure_future(pin_user_pages_fast(mm, a, 8, FOLL_WRITE, pages))
    await asyncio.sleep(0.01)
    assert not pin.done()
    mm.write_protect_seq += 1
    mm.mmap_lock.write_unlock()
    assert await pin == 8
    assert _events(kernel) == (0, 1)
    unpin_user_pages(kernel, pages, 8)
    assert kernel.vmstat["nr_foll_pin_acquired"] == kernel.vmstat["nr_foll_pin_released"]


async def test_write_protect_seq_change_during_the_walk_unpins_the_pass(
    kernel: Kernel, task: Task
) -> None:
    """B.20: a fork that ran while the walker was mid-walk (seq changed by the end) makes the
    pass drop every pin it took: 0 pinned, acquired - released == 0."""
    a = await _populated(task, 8)
    mm = task.mm
    mem = kernel.mem
    pfns = [pfn_at(task, a + i * P) for i in range(8)]
    rc0 = mem.refcount[pfns].copy()

    def forked() -> None:
        mm.write_protect_seq += 2  # copy_page_range() began and ended meanwhile

    in_hook(kernel, "grabbed", forked)
    pages = page_array(8)
    assert gup_fast(mm, a, a + 8 * P, FOLL_PIN | FOLL_WRITE, pages) == 0
    assert (mem.refcount[pfns] == rc0).all()
    assert kernel.vmstat["fast_gup"] == 0
    assert not kernel.extra_refs.any()


async def test_pte_changed_during_grab_is_undone(kernel: Kernel, task: Task) -> None:
    """B.21: a PTE cleared between the grab and the recheck: that grab (and the later ones of
    the batch) are dropped, the walk stops there and the slow path faults a new page."""
    a = await _populated(task, 8)
    mm = task.mm
    vma = mm.vma_lookup(a)
    assert vma is not None
    old = pfn_at(task, a + 5 * P)
    freed = kernel.vmstat["pgfree"]
    faults = kernel.vmstat["pgfault"]
    in_hook(kernel, "grabbed", lambda: zap_page_range_single(vma, a + 5 * P, a + 6 * P))
    pages = page_array(8)
    assert await pin_user_pages_fast(mm, a, 8, FOLL_WRITE, pages) == 8
    assert _events(kernel) == (5, 1)
    assert kernel.vmstat["pgfree"] == freed + 1  # the undo dropped the last ref of ``old``
    assert kernel.vmstat["pgfault"] == faults + 1  # the slow path faulted page 5 anew
    assert kernel.vmstat["nr_foll_pin_acquired"] == 8  # undone grabs are not pins
    assert pages.tolist() == [pfn_at(task, a + i * P) for i in range(8)]
    assert old >= 0
    unpin_user_pages(kernel, pages, 8)


async def test_pmd_thp_pinned_with_one_grab(kernel: Kernel, task: Task) -> None:
    """B.3 through the fast path: 512 pages of a PMD THP: refcount +512, _pincount 512,
    acquired +512; unpinned page by page it balances; nr=123 from subpage 0 pins 123."""
    a = await mmap_anon(task, 4 * MiB)
    await sys_madvise(task, a, 4 * MiB, MADV_HUGEPAGE)
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await write_user(task, h, b"T")
    mem = kernel.mem
    head = pfn_at(task, h)
    assert lookup_pte(task, h) & 0x80
    rc0 = int(mem.refcount[head])
    pages = page_array(512)
    assert await pin_user_pages_fast(task.mm, h, 512, FOLL_WRITE, pages) == 512
    assert pages.tolist() == list(range(head, head + 512))
    assert int(mem.refcount[head]) == rc0 + 512
    assert int(mem.folio_pincount(head)) == 512
    assert kernel.vmstat["nr_foll_pin_acquired"] == 512
    assert _events(kernel) == (512, 0)
    for p in pages.tolist():
        unpin_user_page(kernel, p)
    assert int(mem.folio_pincount(head)) == 0
    assert kernel.vmstat["nr_foll_pin_released"] == 512
    assert await pin_user_pages_fast(task.mm, h, 123, 0, pages) == 123
    assert int(mem.folio_pincount(head)) == 123
    unpin_user_pages(kernel, pages, 123)
    assert get_user_pages_fast_only(task.mm, h + 7 * P, 9, 0, pages) == 9
    assert int(mem.refcount[head]) == rc0 + 9
    assert int(mem.folio_pincount(head)) == 0
    put_pages(kernel, pages, 9)


async def test_fast_only_on_a_thp_tail_succeeds(kernel: Kernel, task: Task) -> None:
    """Seed 003 (futex on a THP tail): get_user_pages_fast_only of a tail page returns it."""
    a = await mmap_anon(task, 4 * MiB)
    await sys_madvise(task, a, 4 * MiB, MADV_HUGEPAGE)
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await write_user(task, h + 100 * P, b"futex")
    head = pfn_at(task, h)
    pages = page_array(1)
    assert get_user_pages_fast_only(task.mm, h + 100 * P, 1, 0, pages) == 1
    assert pages[0] == head + 100
    put_pages(kernel, pages, 1)


async def test_generic_arch_always_takes_the_slow_path(make_kernel: MakeKernel) -> None:
    """A.8 generic (the 2008 fallback macro): no lockless walk; every call takes mmap_lock and
    counts fast_gup_slow; fast_only returns 0 (the 2014 THP-tail futex loop, seed 003)."""
    kernel = make_kernel(arch="generic")
    task = kernel.spawn("t", "s")
    a = await _populated(task, 8)
    pages = page_array(8)
    locks = read_locks(task)
    assert get_user_pages_fast_only(task.mm, a, 8, 0, pages) == 0
    assert await pin_user_pages_fast(task.mm, a, 8, FOLL_WRITE, pages) == 8
    gets = page_array(8)
    assert await get_user_pages_fast(task.mm, a, 8, 0, gets) == 8
    assert _events(kernel) == (0, 2)
    assert read_locks(task) == locks + 2
    assert kernel.mem.folio_maybe_dma_pinned(pages[0])
    put_pages(kernel, gets, 8)
    unpin_user_pages(kernel, pages, 8)


async def test_accessed_bit_is_left_alone_by_the_fast_path(kernel: Kernel, task: Task) -> None:
    """B.15 (no FOLL_TOUCH): a PTE whose accessed bit was cleared stays clear after GUP-fast."""
    a = await _populated(task, 2)
    mm = task.mm
    from vkernel.kernel.pgtable import pte_slot

    s = pte_slot(mm, a)
    mm.mem.u64[s] &= np.uint64(~_PAGE_ACCESSED & ((1 << 64) - 1))
    pages = page_array(2)
    assert get_user_pages_fast_only(mm, a, 2, 0, pages) == 2
    assert not int(mm.mem.u64[s]) & _PAGE_ACCESSED
    put_pages(kernel, pages, 2)


async def _thp_at(task: Task) -> int:
    """A written, PMD-mapped THP; its aligned address."""
    a = await mmap_anon(task, 4 * MiB)
    await sys_madvise(task, a, 4 * MiB, MADV_HUGEPAGE)
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await write_user(task, h, b"T" * (2 * MiB))
    assert lookup_pte(task, h) & 0x80
    return h


async def test_pmd_changed_during_the_thp_grab_is_undone(kernel: Kernel, task: Task) -> None:
    """B.21 for a PMD leaf (A.7 §4, 'recheck pmd_val(orig) == *pmdp'): the PMD is split between
    the grab and the recheck; the whole grab is dropped and the slow path takes the pages."""
    h = await _thp_at(task)
    from vkernel.kernel.pgtable import pmd_slot
    from vkernel.kernel.thp import split_huge_pmd

    mm = task.mm
    head = pfn_at(task, h)
    rc0 = int(kernel.mem.refcount[head])
    in_hook(kernel, "grabbed", lambda: split_huge_pmd(mm, pmd_slot(mm, h)))
    pages = page_array(16)
    assert await pin_user_pages_fast(mm, h, 16, FOLL_WRITE, pages) == 16
    assert _events(kernel) == (0, 1)
    assert pages.tolist() == list(range(head, head + 16))
    assert int(kernel.mem.folio_pincount(head)) == 16
    unpin_user_pages(kernel, pages, 16)
    # split: 512 PTE mappings take one reference each instead of the PMD's one
    assert int(kernel.mem.refcount[head]) == rc0 + 511


async def test_pte_mapped_thp_subpages_pin_the_folio(kernel: Kernel, task: Task) -> None:
    """A.5 through the PTE walk: subpages of a PTE-mapped THP take refcount +1 and _pincount +1
    each on the head; a changed subpage PTE undoes exactly its own grabs."""
    h = await _thp_at(task)
    from vkernel.kernel.pgtable import pmd_slot
    from vkernel.kernel.thp import split_huge_pmd

    mm = task.mm
    split_huge_pmd(mm, pmd_slot(mm, h))
    head = pfn_at(task, h)
    mem = kernel.mem
    rc0 = int(mem.refcount[head])
    pages = page_array(32)
    assert get_user_pages_fast_only(mm, h, 32, 0, pages) == 32
    assert int(mem.refcount[head]) == rc0 + 32
    put_pages(kernel, pages, 32)
    vma = mm.vma_lookup(h)
    assert vma is not None
    in_hook(kernel, "grabbed", lambda: zap_page_range_single(vma, h + 20 * P, h + 21 * P))
    assert gup_fast(mm, h, h + 32 * P, FOLL_PIN | FOLL_WRITE, pages) == 20
    assert int(mem.folio_pincount(head)) == 20
    assert int(mem.refcount[head]) == rc0 - 1 + 20  # one PTE gone, 20 pins
    unpin_user_pages(kernel, pages, 20)
    assert int(mem.folio_pincount(head)) == 0


async def test_longterm_read_pin_of_shmem_must_unshare_in_the_fast_path(
    kernel: Kernel, task: Task
) -> None:
    """A.7 §3 / A.6: with no VMA, a R/O LONGTERM pin of a non-anon (shmem) page 'must unshare',
    so the walk stops; the slow path sees the shared VMA (not COW) and pins it. A short-term
    R/O pin of the same page is taken by the walk."""
    a = await mmap_anon(task, 4 * P, prot=PROT_READ, flags=SHARED_ANON)
    assert await read_user_bytes(task, a, 4 * P) == bytes(4 * P)
    pages = page_array(4)
    assert await pin_user_pages_fast(task.mm, a, 4, 0, pages) == 4
    assert _events(kernel) == (4, 0)
    unpin_user_pages(kernel, pages, 4)
    assert await pin_user_pages_fast(task.mm, a, 4, FOLL_LONGTERM, pages) == 4
    assert _events(kernel) == (4, 1)
    assert pages.tolist() == [pfn_at(task, a + i * P) for i in range(4)]
    unpin_user_pages(kernel, pages, 4)


async def test_walk_across_tables_and_a_thp_keeps_page_order(kernel: Kernel, task: Task) -> None:
    """A.7: one call spanning a PTE table, a PMD THP and another PTE table returns every page
    in address order (PTE stretches batched across tables, the PMD leaf in one grab)."""
    a = await mmap_anon(task, 8 * MiB)
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await sys_madvise(task, h + PMD_SIZE, PMD_SIZE, MADV_HUGEPAGE)
    await write_user(task, h, b"x" * (3 * PMD_SIZE))
    assert lookup_pte(task, h + PMD_SIZE) & 0x80
    start = h + PMD_SIZE - 8 * P
    n = 8 + 512 + 8
    pages = page_array(n)
    assert get_user_pages_fast_only(task.mm, start, n, FOLL_WRITE, pages) == n
    assert pages.tolist() == [pfn_at(task, start + i * P) for i in range(n)]
    put_pages(kernel, pages, n)
    # The THP is split (and one subpage zapped) while the walker holds its grab of the PTE
    # table before it: the stale PMD value is caught by the recheck, the THP part goes slow.
    vma = task.mm.vma_lookup(h + PMD_SIZE)
    assert vma is not None
    t = h + PMD_SIZE + 38 * P
    in_hook(kernel, "grabbed", lambda: zap_page_range_single(vma, t, t + P))
    pages = page_array(600)
    assert await get_user_pages_fast(task.mm, h, 600, 0, pages) == 600
    assert _events(kernel) == (n + 512, 1)
    assert pages.tolist() == [pfn_at(task, h + i * P) for i in range(600)]
    put_pages(kernel, pages, 600)
    # Two leaf tables in one batch: a PTE of the second changes after the grab.
    a2 = h + 2 * PMD_SIZE - 300 * P
    vma2 = task.mm.vma_lookup(a2 + 400 * P)
    assert vma2 is not None
    t2 = a2 + 350 * P
    in_hook(kernel, "grabbed", lambda: zap_page_range_single(vma2, t2, t2 + P))
    pages = page_array(600)
    assert await get_user_pages_fast(task.mm, a2, 600, 0, pages) == 600
    assert _events(kernel) == (n + 512 + 350, 2)
    assert pages.tolist() == [pfn_at(task, a2 + i * P) for i in range(600)]
    put_pages(kernel, pages, 600)
