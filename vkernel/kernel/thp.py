"""Transparent huge pages: PMD-mapped 2 MiB anonymous folios (mm/huge_memory.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.pgtable import pgtable_alloc, table_of, tlb_remove_table
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_TABLE,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PTRS_PER_TABLE,
    VM_FAULT_FALLBACK,
    VM_FAULT_OOM,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_lru,
    PG_swapbacked,
    PG_uptodate,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.vma import VMA

MM_ANONPAGES = 1
_NOT_PFN_PSE = ~(_PAGE_PFN_MASK | _PAGE_PSE) & 0xFFFFFFFFFFFFFFFF
_ARANGE = np.arange(HPAGE_PMD_NR, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


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
    mem.u64[slot] = pmd
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
    """__split_huge_pmd(): replace one PMD mapping by 512 PTEs of the subpages (folio stays compound)."""
    mem = mm.mem
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


def pmd_table(mm: MmStruct, slot: int) -> int:
    """The PTE table under a non-leaf PMD."""
    return table_of(mm.mem.u64.item(slot))
