"""Transparent huge pages: PMD-mapped 2 MiB anonymous folios (mm/huge_memory.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.pgtable import pgtable_alloc, pmd_slot, table_of, tlb_remove_table
from vkernel.kernel.physmem import ONE32
from vkernel.kernel.tlb import tlb_remove_table_sync_one
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_TABLE,
    _PAGE_UFFD_WP,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PMD_SIZE,
    PTRS_PER_TABLE,
    VM_FAULT_FALLBACK,
    VM_FAULT_OOM,
    VM_NOHUGEPAGE,
    VM_SHARED,
    VM_SPECIAL,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_head,
    PG_lru,
    PG_swapbacked,
    PG_tail,
    PG_uptodate,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.vma import VMA

MM_ANONPAGES = 1
_NOT_PFN_PSE = ~(_PAGE_PFN_MASK | _PAGE_PSE) & 0xFFFFFFFFFFFFFFFF
_ARANGE = np.arange(HPAGE_PMD_NR, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


def new_anon_huge_pmd(vma: VMA, head: int, haddr: int) -> int:
    """folio_add_new_anon_rmap() + mk_huge_pmd(): make a fresh 2 MiB folio anon-exclusive in
    ``vma`` at ``haddr`` and return the dirty, young PMD that maps it (writable if VM_WRITE)."""
    mem = vma.mm.mem
    anon = vma.anon_vma_prepare()
    sl = slice(head, head + HPAGE_PMD_NR)
    mem.flags[sl] |= np.uint32(PG_anon | PG_uptodate | PG_swapbacked)
    mem.flags[head] |= PG_anon_exclusive | PG_lru
    mem.mapping[sl] = anon.id
    mem.index[sl] = vma.linear_page_index(haddr) + np.arange(HPAGE_PMD_NR)
    mem.entire_mapcount[head >> HPAGE_PMD_ORDER] = 1
    pmd = (head << PAGE_SHIFT) | vma.vm_page_prot | _PAGE_PSE | _PAGE_ACCESSED
    pmd |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_WRITE:
        pmd |= _PAGE_RW
    return pmd


def do_huge_pmd_anonymous_page(vma: VMA, haddr: int, slot: int) -> int:
    """do_huge_pmd_anonymous_page(): map a new zeroed, anon-exclusive 2 MiB folio by one PMD.

    Only write faults get here (vkernel has no huge zero page: reads fall back to 4 KiB).
    Returns 0, VM_FAULT_OOM (no deposit table) or VM_FAULT_FALLBACK (no free 2 MiB block).
    """
    mm = vma.mm
    mem = mm.mem
    deposit = pgtable_alloc(mm)
    if deposit < 0:
        return VM_FAULT_OOM
    head = mem.alloc_huge(movable=True)
    if head < 0:
        tlb_remove_table(mm, deposit)
        mm.kernel.vmstat.count("thp_fault_fallback")
        return VM_FAULT_FALLBACK
    mem.u64[slot] = new_anon_huge_pmd(vma, head, haddr)
    mm.deposited[slot] = deposit
    mm.add_rss(MM_ANONPAGES, HPAGE_PMD_NR)
    mm.kernel.vmstat.count("thp_fault_alloc")
    return 0


def do_huge_zero_page(vma: VMA, slot: int) -> int:
    """do_huge_pmd_anonymous_page() read path: map the huge zero folio read-only by one PMD."""
    mm = vma.mm
    mem = mm.mem
    head = mem.get_huge_zero_page()
    if head < 0:
        return VM_FAULT_FALLBACK
    vma.anon_vma_prepare()  # vmf_anon_prepare() runs before the zero-page choice
    deposit = pgtable_alloc(mm)
    if deposit < 0:
        mem.put_huge_zero_page(0)
        return VM_FAULT_OOM
    mem.u64[slot] = (head << PAGE_SHIFT) | vma.vm_page_prot | _PAGE_PSE
    mem.huge_zero_maps += 1
    mm.deposited[slot] = deposit
    return 0


def zap_huge_pmd(mm: MmStruct, slot: int) -> None:
    """zap_huge_pmd(): drop a PMD mapping of a THP and withdraw its deposited table."""
    mem = mm.mem
    e = mem.u64.item(slot)
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    mem.u64[slot] = 0
    if mem.is_huge_zero(head):
        tlb_remove_table(mm, mm.deposited.pop(slot))
        mem.put_huge_zero_page()
        return
    mem.entire_mapcount[head >> HPAGE_PMD_ORDER] -= 1
    mm.add_rss(MM_ANONPAGES, -HPAGE_PMD_NR)
    deposit = mm.deposited.pop(slot)
    tlb_remove_table(mm, deposit)
    mem.put_folio(head)


def split_huge_pmd(mm: MmStruct, slot: int) -> None:
    """__split_huge_pmd(): one PMD mapping becomes 512 PTEs of the subpages (folio stays whole).

    On arm64 the split broadcasts an IPI that waits out lockless walkers (seed 003).
    """
    mem = mm.mem
    if mm.kernel.config.arch == "arm64":
        tlb_remove_table_sync_one(mm.kernel)
    u = mem.u64
    e = u.item(slot)
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    t = mm.deposited.pop(slot)
    bits = np.uint64(e & _NOT_PFN_PSE)
    base = t * PTRS_PER_TABLE
    if mem.is_huge_zero(head):
        # __split_huge_zero_page_pmd(): 512 special PTEs of the small zero page.
        u[base : base + HPAGE_PMD_NR] = (
            np.uint64((mem.zero_pfn << PAGE_SHIFT) | _PAGE_SPECIAL) | bits
        )
        u[slot] = (t << PAGE_SHIFT) | _PAGE_TABLE
        mem.zero_maps += HPAGE_PMD_NR
        mm.kernel.vmstat.count("thp_split_pmd")
        mem.put_huge_zero_page()
        return
    u[base : base + HPAGE_PMD_NR] = (_ARANGE + np.uint64(head << PAGE_SHIFT)) | bits
    u[slot] = (t << PAGE_SHIFT) | _PAGE_TABLE
    sl = slice(head, head + HPAGE_PMD_NR)
    mem.refcount[head] += HPAGE_PMD_NR - 1
    mem.mapcount[sl] += 1
    mem.entire_mapcount[head >> HPAGE_PMD_ORDER] -= 1
    if mem.flags[head] & PG_anon_exclusive:
        mem.flags[sl] |= np.uint32(PG_anon_exclusive)
    mm.kernel.vmstat.count("thp_split_pmd")


def split_folio(mem: PhysMem, head: int) -> int:
    """split_folio() → __split_huge_page() of an anon THP mapped only by PTEs (after
    split_huge_pmd): 512 order-0 pages, each keeping its own PTE mappings (its refcount becomes
    its mapcount) and its AnonExclusive bit; subpages nobody maps are freed. A folio still
    PMD-mapped, pinned or holding references beyond its mappings (GUP) cannot be split
    (can_split_folio()): -EBUSY. Returns 0 on success."""
    b = head >> HPAGE_PMD_ORDER
    if not mem.order[head] or not mem.flags[head] & PG_anon or mem.is_huge_zero(head):
        return -errno.EINVAL
    if mem.entire_mapcount[b] or mem.large_pincount[b]:
        return -errno.EBUSY
    sl = slice(head, head + HPAGE_PMD_NR)
    mc = mem.mapcount[sl].astype(np.int64)
    if int(mem.refcount[head]) != int(mc.sum()):
        return -errno.EBUSY
    mem.flags[sl] &= ~np.uint32(PG_head | PG_tail)
    mem.flags[sl] |= np.uint32(PG_anon | PG_uptodate | PG_swapbacked | PG_lru)
    mem.order[sl] = 0
    mem.refcount[sl] = mc.astype(mem.refcount.dtype)
    unmapped = head + np.flatnonzero(mc == 0)
    if len(unmapped):
        mem.free_pages(unmapped.astype(np.int64))
    mem.vmstat.count("thp_split_page")
    return 0


def do_huge_pmd_wp_page(vma: VMA, slot: int, unshare: bool) -> int:
    """do_huge_pmd_wp_page(): reuse an exclusive (or refcount==1) THP, else split and fall back."""
    mm = vma.mm
    mem = mm.mem
    e = mem.u64.item(slot)
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    if mem.is_huge_zero(head):
        split_huge_pmd(mm, slot)
        return VM_FAULT_FALLBACK
    if not mem.flags[head] & PG_anon_exclusive:
        if mem.refcount[head] == 1:
            mem.flags[head] |= PG_anon_exclusive
        else:
            split_huge_pmd(mm, slot)
            return VM_FAULT_FALLBACK
    if unshare:
        return 0
    e |= _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_WRITE:
        e |= _PAGE_RW
    mem.u64[slot] = e
    return 0


# ---- MADV_COLLAPSE (mm/khugepaged.c) -------------------------------------------------------------

SCAN_SUCCEED = 1
SCAN_PMD_NULL = 2
SCAN_PMD_MAPPED = 4
SCAN_EXCEED_NONE_PTE = 5
SCAN_PTE_NON_PRESENT = 8
SCAN_PTE_UFFD_WP = 9
SCAN_PAGE_RO = 11
SCAN_PAGE_NULL = 13
SCAN_PAGE_COUNT = 16
SCAN_PAGE_ANON = 19
SCAN_ALLOC_HUGE_PAGE_FAIL = 21
_SCAN_CONTINUE = frozenset(
    {
        SCAN_PMD_NULL,
        SCAN_PTE_NON_PRESENT,
        SCAN_PTE_UFFD_WP,
        SCAN_PAGE_RO,
        SCAN_PAGE_NULL,
        SCAN_PAGE_COUNT,
    }
)


def collapse_allowed(vma: VMA) -> bool:
    """thp_vma_allowable_order(..., tva_flags=0): MADV_COLLAPSE ignores the sysfs mode."""
    return vma.is_anonymous() and not vma.vm_flags & (VM_NOHUGEPAGE | VM_SPECIAL | VM_SHARED)


def collapse_huge_page(vma: VMA, haddr: int) -> int:
    """hpage_collapse_scan_pmd() + collapse_huge_page(): replace 512 PTEs by one exclusive THP.

    Returns a SCAN_* result. Pages with references beyond their mappings (GUP pins) refuse
    (SCAN_PAGE_COUNT); the old PTE table becomes the new PMD's deposit.
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    slot = pmd_slot(mm, haddr)
    if slot < 0 or not u.item(slot):
        return SCAN_PMD_NULL
    e = u.item(slot)
    if e & _PAGE_PSE:
        return SCAN_PMD_MAPPED
    t = table_of(e)
    base = t * PTRS_PER_TABLE
    ptes = u[base : base + PTRS_PER_TABLE].copy()
    if ((ptes & np.uint64(_PAGE_UFFD_WP)) != 0).any():
        return SCAN_PTE_UFFD_WP
    present = (ptes & np.uint64(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    if ((ptes != 0) & ~present).any():
        return SCAN_PTE_NON_PRESENT
    pidx = np.flatnonzero(present)
    pfns = ((ptes[pidx] & np.uint64(_PAGE_PFN_MASK)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    real = pfns != mem.zero_pfn
    ridx = pidx[real]
    rpfns = pfns[real]
    if len(rpfns):
        if ((mem.flags[rpfns] & PG_anon) == 0).any():
            return SCAN_PAGE_ANON
        heads = mem.compound_heads(rpfns)
        for h in np.unique(heads).tolist():
            order = int(mem.order[h])
            nr = 1 << order
            mapped = int(mem.mapcount[h : h + nr].sum())
            if order:
                mapped += int(mem.entire_mapcount[h >> HPAGE_PMD_ORDER])
            if int(mem.refcount[h]) != mapped:
                return SCAN_PAGE_COUNT
    if not ((ptes[pidx] & np.uint64(_PAGE_RW)) != 0).any():
        return SCAN_PAGE_RO
    head = mem.alloc_huge(movable=True)
    if head < 0:
        return SCAN_ALLOC_HUGE_PAGE_FAIL
    tlb_remove_table_sync_one(mm.kernel)  # pmdp_collapse_flush(): GUP-fast must be out
    if len(rpfns):
        mem.frames[head + ridx] = mem.frames[rpfns]
        np.subtract.at(mem.mapcount, rpfns, ONE32)
        mem.put_folios(mem.compound_heads(rpfns))
    mem.zero_maps -= int(np.count_nonzero(~real))
    u[base : base + PTRS_PER_TABLE] = 0
    u[slot] = new_anon_huge_pmd(vma, head, haddr)
    mm.deposited[slot] = t
    mm.add_rss(MM_ANONPAGES, HPAGE_PMD_NR - len(rpfns))
    return SCAN_SUCCEED


def madvise_collapse(vma: VMA, start: int, end: int) -> int:
    """madvise_collapse(): collapse every aligned 2 MiB of [start, end); 0 or a negative errno."""
    if not collapse_allowed(vma):
        return -errno.EINVAL
    hstart = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    hend = end & ~(PMD_SIZE - 1)
    thps = 0
    last_fail = SCAN_SUCCEED
    for addr in range(hstart, hend, PMD_SIZE):
        result = collapse_huge_page(vma, addr)
        if result in (SCAN_SUCCEED, SCAN_PMD_MAPPED):
            thps += 1
        elif result in _SCAN_CONTINUE:
            last_fail = result
        else:
            last_fail = result
            break
    if thps == (hend - hstart) // PMD_SIZE:
        return 0
    if last_fail == SCAN_ALLOC_HUGE_PAGE_FAIL:
        return -errno.ENOMEM
    if last_fail == SCAN_EXCEED_NONE_PTE:
        return -errno.EBUSY
    if last_fail == SCAN_PAGE_COUNT:
        return -errno.EAGAIN
    return -errno.EINVAL
