"""x86-64 4-level page tables stored in physical frames (arch/x86 pgtable*.h, mm/pgtable-generic.c).

Every table is one frame of 512 little-endian u64 entries, read and written through the
``PhysMem.u64`` view of the memfd. Entry slots are addressed by their global u64 index
``table_pfn * 512 + i``. Single-entry paths use ``ndarray.item`` (a Python int); batch paths
take a numpy slice of one leaf table at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vkernel.kernel.tlb import tlb_remove_table as _tlb_remove_table
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PFN_MASK,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_TABLE,
    _PAGE_UFFD_WP,
    _PAGE_USER,
    PAGE_SHIFT,
    PAGE_SIZE,
    PGDIR_SHIFT,
    PGDIR_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PTRS_PER_TABLE,
    PUD_SHIFT,
    PUD_SIZE,
    VM_EXEC,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct

PFN_MASK = _PAGE_PFN_MASK
U64_PFN_MASK = np.uint64(_PAGE_PFN_MASK)
U64_PRESENT = np.uint64(_PAGE_PRESENT | _PAGE_PROTNONE)
U64_P = np.uint64(_PAGE_PRESENT)
U64_RW = np.uint64(_PAGE_RW)
U64_NOT_RW = np.uint64(~_PAGE_RW & 0xFFFFFFFFFFFFFFFF)
U64_ACCESSED = np.uint64(_PAGE_ACCESSED)
U64_NOT_ACCESSED = np.uint64(~_PAGE_ACCESSED & 0xFFFFFFFFFFFFFFFF)
U64_DIRTY = np.uint64(_PAGE_DIRTY | _PAGE_SOFT_DIRTY)
U64_NOT_DIRTY = np.uint64(~_PAGE_DIRTY & 0xFFFFFFFFFFFFFFFF)
U64_SPECIAL = np.uint64(_PAGE_SPECIAL)
U64_SHIFT = np.uint64(PAGE_SHIFT)

_PAGE_CHG_MASK = (
    _PAGE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SPECIAL | _PAGE_SOFT_DIRTY | _PAGE_UFFD_WP
)
"""pte_modify() keeps these bits from the old PTE and takes the rest from the new protection."""
PAGE_CHG_MASK = np.uint64(_PAGE_CHG_MASK)

PAGE_NONE = _PAGE_PROTNONE | _PAGE_ACCESSED
_PAGE_USERBASE = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED


def vm_get_page_prot(vm_flags: int) -> int:
    """vm_get_page_prot(): x86 protection_map[] (PAGE_COPY has no RW: private writes COW)."""
    acc = vm_flags & (VM_READ | VM_WRITE | VM_EXEC)
    if not acc:
        return PAGE_NONE
    prot = _PAGE_USERBASE
    if not vm_flags & VM_EXEC:
        prot |= _PAGE_NX
    if vm_flags & VM_SHARED and vm_flags & VM_WRITE:
        prot |= _PAGE_RW
    return prot


def pte_present(pte: int) -> bool:
    """pte_present(): present or PROT_NONE (a mapped but inaccessible page)."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_none_mostly(pte: int) -> bool:
    """pte_none_mostly(): none, or a uffd-wp marker (userfaultfd treats it as a missing page)."""
    return not pte or pte == _PAGE_UFFD_WP


def pte_pfn(pte: int) -> int:
    """pte_pfn()."""
    return (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT


def pte_write(pte: int) -> bool:
    """pte_write()."""
    return bool(pte & _PAGE_RW)


def pmd_leaf(pmd: int) -> bool:
    """pmd_leaf() / pmd_trans_huge(): a PMD that maps a 2 MiB page itself."""
    return bool(pmd & _PAGE_PSE)


def pfn_pte(pfn: int, prot: int) -> int:
    """pfn_pte()."""
    return (pfn << PAGE_SHIFT) | prot


def pte_modify(pte: int, newprot: int) -> int:
    """pte_modify(): keep pfn/A/D/special/soft-dirty/uffd-wp, take the rest from ``newprot``."""
    return (pte & _PAGE_CHG_MASK) | (newprot & ~_PAGE_CHG_MASK)


def pte_modify_vec(ptes: np.ndarray, newprot: int) -> np.ndarray:
    """pte_modify() over a numpy array of PTEs."""
    return (ptes & PAGE_CHG_MASK) | np.uint64(newprot & ~_PAGE_CHG_MASK & 0xFFFFFFFFFFFFFFFF)


# ---- table pages ------------------------------------------------------------------------------


def pgtable_alloc(mm: MmStruct) -> int:
    """pte_alloc_one()/pmd_alloc_one()/pud_alloc_one(): a zeroed table frame or -1 (OOM)."""
    pfn = mm.mem.alloc_pgtable_page()
    if pfn >= 0:
        mm.pgtables_bytes += PAGE_SIZE
    return pfn


def tlb_remove_table(mm: MmStruct, pfn: int) -> None:
    """tlb_remove_table(): THE one path by which a page-table page is freed.

    The per-arch protection against lockless walkers lives in ``vkernel.kernel.tlb``: with a
    GUP-fast walker IRQ-off the free waits for the TLB-shootdown IPI (x86_64) or an RCU grace
    period (arm64). Hooks registered in ``kernel.pgtable_free_hooks`` are called with the pfn
    just before the frame goes back to the allocator (which may be after this returns).
    """
    _tlb_remove_table(mm, pfn)


def table_of(entry: int) -> int:
    """pmd_page_vaddr()/pud_pgtable(): the table pfn an upper-level entry points to."""
    return (entry & _PAGE_PFN_MASK) >> PAGE_SHIFT


def _next_level(mm: MmStruct, slot: int, alloc: bool) -> int:
    """pud_alloc()/pmd_alloc(): the table an upper entry points to, allocating it if asked."""
    u = mm.mem.u64
    e = u.item(slot)
    if e:
        return (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    if not alloc:
        return -1
    t = pgtable_alloc(mm)
    if t < 0:
        return -2
    u[slot] = (t << PAGE_SHIFT) | _PAGE_TABLE
    return t


def pmd_slot(mm: MmStruct, addr: int, alloc: bool = False) -> int:
    """pmd_offset() after the pgd/pud walk (allocating with ``alloc``): slot, -1 none, -2 OOM."""
    # Every fault and uaccess walks here: present upper entries are read inline (one item()
    # each), and only a missing one goes through _next_level (none, or allocate).
    u = mm.mem.u64
    slot = mm.pgd * PTRS_PER_TABLE + ((addr >> PGDIR_SHIFT) & 511)
    e = u.item(slot)
    if e:
        pud_t = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    else:
        pud_t = _next_level(mm, slot, alloc)
        if pud_t < 0:
            return pud_t
    slot = pud_t * PTRS_PER_TABLE + ((addr >> PUD_SHIFT) & 511)
    e = u.item(slot)
    if e:
        pmd_t = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    else:
        pmd_t = _next_level(mm, slot, alloc)
        if pmd_t < 0:
            return pmd_t
    return pmd_t * PTRS_PER_TABLE + ((addr >> PMD_SHIFT) & 511)


def pte_alloc(mm: MmStruct, pmdslot: int) -> int:
    """pte_alloc(): the PTE table under ``pmdslot``, allocating it if none; -1 on OOM.

    The caller must have checked that the PMD is not a leaf.
    """
    u = mm.mem.u64
    e = u.item(pmdslot)
    if e:
        return (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    t = pgtable_alloc(mm)
    if t < 0:
        return -1
    u[pmdslot] = (t << PAGE_SHIFT) | _PAGE_TABLE
    return t


def pte_alloc_bulk(mm: MmStruct, pmdslots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """pte_alloc() for many PMD slots, in order: the PTE tables of the first ``k`` slots, where
    ``k < len(pmdslots)`` means the next allocation failed (OOM). The frames are the ones
    pte_alloc() slot by slot would take; the caller must have checked no slot is a leaf."""
    u = mm.mem.u64
    tabs: npt.NDArray[np.int64] = ((u[pmdslots] & U64_PFN_MASK) >> np.uint64(PAGE_SHIFT)).astype(
        np.int64
    )
    missing = np.flatnonzero(tabs == 0)
    if not len(missing):
        return tabs
    new = mm.mem.alloc_pgtable_pages(len(missing))
    if new is None:
        # Too few frames at hand for one take: slot by slot, stopping where memory runs out.
        for k in missing.tolist():
            t = pte_alloc(mm, int(pmdslots[k]))
            if t < 0:
                return tabs[:k]
            tabs[k] = t
        return tabs
    mm.pgtables_bytes += len(new) * PAGE_SIZE
    u[pmdslots[missing]] = (new.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(_PAGE_TABLE)
    tabs[missing] = new
    return tabs


def pte_slot(mm: MmStruct, addr: int) -> int:
    """pte_offset_map(): u64 slot of the PTE for ``addr``; -1 if no PTE table (or a PMD leaf)."""
    ps = pmd_slot(mm, addr)
    if ps < 0:
        return -1
    e = mm.mem.u64.item(ps)
    if not e or e & _PAGE_PSE:
        return -1
    return ((e & _PAGE_PFN_MASK) >> PAGE_SHIFT) * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511)


def walk_pmds(mm: MmStruct, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """walk_page_range() down to PMD level: ``(pmd_slot, chunk_start, chunk_end)`` per 2 MiB chunk.

    Chunks whose PUD or PMD table does not exist are skipped in one step. The PMD entry itself
    may be none, a leaf or point to a PTE table; the caller reads it.
    """
    u = mm.mem.u64
    pgd = mm.pgd * PTRS_PER_TABLE
    addr = start
    while addr < end:
        e = u.item(pgd + ((addr >> PGDIR_SHIFT) & 511))
        if not e:
            addr = (addr & ~(PGDIR_SIZE - 1)) + PGDIR_SIZE
            continue
        pud = table_of(e) * PTRS_PER_TABLE
        pgd_end = min((addr & ~(PGDIR_SIZE - 1)) + PGDIR_SIZE, end)
        while addr < pgd_end:
            e2 = u.item(pud + ((addr >> PUD_SHIFT) & 511))
            pud_end = min((addr & ~(PUD_SIZE - 1)) + PUD_SIZE, pgd_end)
            if not e2:
                addr = pud_end
                continue
            pmd = table_of(e2) * PTRS_PER_TABLE
            while addr < pud_end:
                nxt = min((addr & ~(PMD_SIZE - 1)) + PMD_SIZE, pud_end)
                yield pmd + ((addr >> PMD_SHIFT) & 511), addr, nxt
                addr = nxt


def free_pgtables(mm: MmStruct, start: int, end: int) -> None:
    """free_pgtables(): free every table page covering [start, end) that no VMA still needs."""
    u = mm.mem.u64
    pgd = mm.pgd * PTRS_PER_TABLE
    addr = start & ~(PMD_SIZE - 1)
    # Walk the PGD entries touched by the range, bottom-up freeing per level.
    gaddr = start & ~(PGDIR_SIZE - 1)
    while gaddr < end:
        gslot = pgd + ((gaddr >> PGDIR_SHIFT) & 511)
        ge = u.item(gslot)
        gnext = gaddr + PGDIR_SIZE
        if ge:
            pud_t = table_of(ge)
            paddr = max(gaddr, start & ~(PUD_SIZE - 1))
            while paddr < min(gnext, end):
                pslot = pud_t * PTRS_PER_TABLE + ((paddr >> PUD_SHIFT) & 511)
                pe = u.item(pslot)
                pnext = paddr + PUD_SIZE
                if pe:
                    pmd_t = table_of(pe)
                    maddr = max(paddr, addr)
                    while maddr < min(pnext, end):
                        mslot = pmd_t * PTRS_PER_TABLE + ((maddr >> PMD_SHIFT) & 511)
                        me = u.item(mslot)
                        if (
                            me
                            and not me & _PAGE_PSE
                            and mm.find_vma_intersection(maddr, maddr + PMD_SIZE) is None
                        ):
                            u[mslot] = 0
                            tlb_remove_table(mm, table_of(me))
                        maddr += PMD_SIZE
                    base = pmd_t * PTRS_PER_TABLE
                    if (
                        not u[base : base + PTRS_PER_TABLE].any()
                        and mm.find_vma_intersection(paddr, pnext) is None
                    ):
                        u[pslot] = 0
                        tlb_remove_table(mm, pmd_t)
                paddr = pnext
            base = pud_t * PTRS_PER_TABLE
            if not u[base : base + PTRS_PER_TABLE].any() and (
                mm.find_vma_intersection(gaddr, gnext) is None
            ):
                u[gslot] = 0
                tlb_remove_table(mm, pud_t)
        gaddr = gnext


def free_all_pgtables(mm: MmStruct) -> None:
    """free_pgtables() over the whole space plus pgd_free() at exit: every leaf must be gone."""
    u = mm.mem.u64
    pgd = mm.pgd * PTRS_PER_TABLE
    for gi in np.nonzero(u[pgd : pgd + PTRS_PER_TABLE])[0].tolist():
        pud_t = table_of(u.item(pgd + gi))
        pbase = pud_t * PTRS_PER_TABLE
        for pi in np.nonzero(u[pbase : pbase + PTRS_PER_TABLE])[0].tolist():
            pmd_t = table_of(u.item(pbase + pi))
            mbase = pmd_t * PTRS_PER_TABLE
            for mi in np.nonzero(u[mbase : mbase + PTRS_PER_TABLE])[0].tolist():
                me = u.item(mbase + mi)
                if not me & _PAGE_PSE:
                    u[mbase + mi] = 0
                    tlb_remove_table(mm, table_of(me))
            u[pbase + pi] = 0
            tlb_remove_table(mm, pmd_t)
        u[pgd + gi] = 0
        tlb_remove_table(mm, pud_t)
    tlb_remove_table(mm, mm.pgd)
    mm.pgd = -1


def iter_tables(mm: MmStruct) -> Iterator[tuple[int, int, int]]:
    """Every table of ``mm`` as ``(level, table_pfn, base_addr)``; level 4=PGD … 1=PTE."""
    u = mm.mem.u64
    if mm.pgd < 0:
        return
    yield 4, mm.pgd, 0
    pgd = mm.pgd * PTRS_PER_TABLE
    for gi in np.nonzero(u[pgd : pgd + PTRS_PER_TABLE])[0].tolist():
        pud_t = table_of(u.item(pgd + gi))
        ga = gi << PGDIR_SHIFT
        yield 3, pud_t, ga
        pbase = pud_t * PTRS_PER_TABLE
        for pi in np.nonzero(u[pbase : pbase + PTRS_PER_TABLE])[0].tolist():
            pmd_t = table_of(u.item(pbase + pi))
            pa = ga + (pi << PUD_SHIFT)
            yield 2, pmd_t, pa
            mbase = pmd_t * PTRS_PER_TABLE
            for mi in np.nonzero(u[mbase : mbase + PTRS_PER_TABLE])[0].tolist():
                me = u.item(mbase + mi)
                if not me & _PAGE_PSE:
                    yield 1, table_of(me), pa + (mi << PMD_SHIFT)
