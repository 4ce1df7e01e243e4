"""Page faults, COW and unmapping (mm/memory.c).

The fault core is synchronous: anonymous and shmem faults never sleep, so GUP-fast and the
user-access paths call it without an ``await``. Batch helpers vectorise over one leaf table.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel import thp
from vkernel.kernel.mm import MM_ANONPAGES, MM_SHMEMPAGES
from vkernel.kernel.pgtable import (
    U64_PFN_MASK,
    U64_PRESENT,
    U64_SHIFT,
    pmd_slot,
    pte_alloc,
    pte_modify,
    pte_modify_vec,
    table_of,
    walk_pmds,
)
from vkernel.kernel.physmem import ONE32
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
    _PAGE_UFFD_WP,
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_TRIED,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    PAGE_MASK,
    PAGE_SHIFT,
    PMD_MASK,
    PMD_SIZE,
    PTRS_PER_TABLE,
    VM_FAULT_ERROR,
    VM_FAULT_FALLBACK,
    VM_FAULT_MAJOR,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_SHARED,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_lru,
    PG_shmem,
    PG_swapbacked,
    PG_uptodate,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.task import Task

from vkernel.kernel.vma import VMA

ANON_FLAGS = PG_anon | PG_anon_exclusive | PG_uptodate | PG_swapbacked | PG_lru
_U64_DIRTY_BITS = np.uint64(_PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_ACCESSED)
_U64_HWDIRTY = np.uint64(_PAGE_DIRTY)


# ---- mapping new anonymous pages ---------------------------------------------------------------


def _new_anon_pte_bits(vma: VMA, write: bool) -> int:
    """mk_pte() + maybe_mkwrite(pte_mkdirty()) bits for a new anonymous page."""
    bits = vma.vm_page_prot | _PAGE_ACCESSED
    if write:
        bits |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
        if vma.vm_flags & VM_WRITE:
            bits |= _PAGE_RW
    return bits


def do_anonymous_page(vma: VMA, addr: int, pslot: int, flags: int) -> int:
    """do_anonymous_page(): zero page for a read, a new anon-exclusive zeroed page for a write."""
    mm = vma.mm
    mem = mm.mem
    if vma.vm_flags & VM_SHARED:
        return VM_FAULT_SIGBUS
    if not flags & FAULT_FLAG_WRITE:
        mem.u64[pslot] = (mem.zero_pfn << PAGE_SHIFT) | vma.vm_page_prot | _PAGE_SPECIAL
        mem.zero_maps += 1
        return 0
    anon = vma.anon_vma_prepare()
    pfn = mem.alloc_page(movable=True)
    if pfn < 0:
        return VM_FAULT_OOM
    mem.flags[pfn] |= ANON_FLAGS
    mem.mapping[pfn] = anon.id
    mem.index[pfn] = vma.linear_page_index(addr)
    mem.mapcount[pfn] = 1
    mem.u64[pslot] = (pfn << PAGE_SHIFT) | _new_anon_pte_bits(vma, True)
    mm.add_rss(MM_ANONPAGES, 1)
    return 0


def do_anonymous_pages(vma: VMA, table: int, base_addr: int, idx: np.ndarray, write: bool) -> int:
    """do_anonymous_page() for many none PTEs of one leaf table at once (the CPU faulting a run).

    ``idx`` are PTE indices in ``table`` (whose first entry maps ``base_addr``). Returns how many
    were populated; fewer than ``len(idx)`` only when memory ran out.
    """
    mm = vma.mm
    mem = mm.mem
    n = len(idx)
    if not n:
        return 0
    slots = table * PTRS_PER_TABLE + idx
    if not write:
        mem.u64[slots] = np.uint64((mem.zero_pfn << PAGE_SHIFT) | vma.vm_page_prot | _PAGE_SPECIAL)
        mem.zero_maps += n
        return n
    anon = vma.anon_vma_prepare()
    avail = mem.nr_free_pages
    if avail < n:
        n = avail
        idx = idx[:n]
        slots = slots[:n]
        if not n:
            return 0
    pfns = mem.alloc_pages_bulk(n, movable=True)
    if pfns is None:
        return 0
    mem.flags[pfns] |= np.uint32(ANON_FLAGS)
    mem.mapping[pfns] = anon.id
    addrs = base_addr + (idx.astype(np.int64) << PAGE_SHIFT)
    mem.index[pfns] = vma.vm_pgoff + ((addrs - vma.vm_start) >> PAGE_SHIFT)
    mem.mapcount[pfns] = 1
    mem.u64[slots] = (pfns.astype(np.uint64) << U64_SHIFT) | np.uint64(
        _new_anon_pte_bits(vma, True)
    )
    mm.add_rss(MM_ANONPAGES, n)
    return n


def do_shmem_fault(vma: VMA, addr: int, pslot: int, flags: int) -> int:
    """do_read_fault()/do_shared_fault() via shmem_fault(): find or allocate the page, map it."""
    mm = vma.mm
    mem = mm.mem
    obj = vma.shmem
    assert obj is not None
    idx = vma.linear_page_index(addr)
    if idx << PAGE_SHIFT >= obj.size:
        return VM_FAULT_SIGBUS
    pfn = obj.pages.get(idx, -1)
    if pfn < 0:
        pfn = mem.alloc_page(movable=True)
        if pfn < 0:
            return VM_FAULT_OOM
        mem.flags[pfn] |= PG_shmem | PG_uptodate | PG_swapbacked | PG_lru
        mem.mapping[pfn] = obj.id
        mem.index[pfn] = idx
        obj.pages[idx] = pfn
    mem.refcount[mem.compound_head(pfn)] += 1
    mem.mapcount[pfn] += 1
    bits = vma.vm_page_prot | _PAGE_ACCESSED
    if flags & FAULT_FLAG_WRITE:
        bits |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
        mem.flags[pfn] |= PG_dirty
    mem.u64[pslot] = (pfn << PAGE_SHIFT) | bits
    mm.add_rss(MM_SHMEMPAGES, 1)
    return 0


# ---- write-protect faults (COW) -----------------------------------------------------------------


def wp_page_copy(vma: VMA, addr: int, pslot: int, pte: int, unshare: bool) -> int:
    """wp_page_copy(): copy the old page (zero-fill for the zero page) into a new exclusive one."""
    mm = vma.mm
    mem = mm.mem
    old = (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT
    anon = vma.anon_vma_prepare()
    new = mem.alloc_page(movable=True)
    if new < 0:
        return VM_FAULT_OOM
    is_zero = old == mem.zero_pfn
    if not is_zero:
        mem.mv[new << PAGE_SHIFT : (new + 1) << PAGE_SHIFT] = mem.mv[
            old << PAGE_SHIFT : (old + 1) << PAGE_SHIFT
        ]
    mem.flags[new] |= ANON_FLAGS
    mem.mapping[new] = anon.id
    mem.index[new] = vma.linear_page_index(addr)
    mem.mapcount[new] = 1
    if unshare:
        bits = vma.vm_page_prot | _PAGE_ACCESSED | (pte & (_PAGE_SOFT_DIRTY | _PAGE_UFFD_WP))
    else:
        bits = _new_anon_pte_bits(vma, True)
    mem.u64[pslot] = (new << PAGE_SHIFT) | bits
    if is_zero:
        mem.zero_maps -= 1
        mm.add_rss(MM_ANONPAGES, 1)
    else:
        if not mem.flags[old] & PG_anon:
            mm.add_rss(MM_SHMEMPAGES, -1)
            mm.add_rss(MM_ANONPAGES, 1)
        mem.mapcount[old] -= 1
        mem.put_folio(mem.compound_head(old))
    return 0


def do_wp_page(vma: VMA, addr: int, pslot: int, pte: int, flags: int) -> int:
    """do_wp_page(): reuse vs copy decided by refcount (A.10); UNSHARE keeps the PTE read-only."""
    mm = vma.mm
    mem = mm.mem
    unshare = bool(flags & FAULT_FLAG_UNSHARE)
    if vma.vm_flags & (VM_SHARED | VM_MAYSHARE):
        if unshare:
            return 0
        # wp_page_shared(): no COW for shared mappings, just make it writable and dirty.
        mem.u64[pslot] = pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_ACCESSED
        return 0
    pfn = (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT
    if pfn != mem.zero_pfn and not pte & _PAGE_SPECIAL and mem.flags[pfn] & PG_anon:
        head = mem.compound_head(pfn)
        reuse = bool(mem.flags[pfn] & PG_anon_exclusive)
        if not reuse and not mem.order[head] and mem.refcount[head] == 1:
            # wp_can_reuse_anon_folio(): small folio, nobody else holds a reference.
            mem.flags[pfn] |= PG_anon_exclusive
            reuse = True
        if reuse:
            if unshare:
                return 0
            e = pte | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_ACCESSED
            if vma.vm_flags & VM_WRITE:
                e |= _PAGE_RW
            mem.u64[pslot] = e
            mm.kernel.vmstat.count("pgreuse")
            return 0
    return wp_page_copy(vma, addr, pslot, pte, unshare)


def do_wp_pages(vma: VMA, table: int, base_addr: int, idx: np.ndarray) -> tuple[int, int]:
    """do_wp_page() for a run of write-protected PTEs of one leaf table (private anon VMA).

    Same decisions as the single-page path, vectorised: anon-exclusive or (small and refcount 1)
    → reuse (pgreuse); otherwise copy (zero page → fresh zeroed page). PTEs the batch does not
    handle (uffd-wp, special non-zero pfns, non-anon pages) are left for the per-page path.
    Returns ``(handled, oom_index)``: ``oom_index`` is the first index not copied for lack of
    memory, or -1.
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    slots = table * PTRS_PER_TABLE + idx
    ptes = u[slots]
    pfns = ((ptes & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
    zero = pfns == mem.zero_pfn
    special = (ptes & np.uint64(_PAGE_SPECIAL | _PAGE_UFFD_WP)) != 0
    pflags = mem.flags[pfns]
    anon = (pflags & PG_anon) != 0
    ok = (anon & ~special) | (zero & ((ptes & np.uint64(_PAGE_UFFD_WP)) == 0))
    if not ok.all():
        slots, ptes, pfns, zero, pflags, anon, idx = (
            x[ok] for x in (slots, ptes, pfns, zero, pflags, anon, idx)
        )
    if not len(slots):
        return 0, -1
    heads = mem.compound_heads(pfns)
    small = mem.order[heads] == 0
    excl = (pflags & PG_anon_exclusive) != 0
    reuse = anon & (excl | (small & (mem.refcount[heads] == 1)))
    wbits = np.uint64(
        _PAGE_DIRTY
        | _PAGE_SOFT_DIRTY
        | _PAGE_ACCESSED
        | (_PAGE_RW if vma.vm_flags & VM_WRITE else 0)
    )
    nreuse = int(np.count_nonzero(reuse))
    if nreuse:
        mem.flags[pfns[reuse]] |= np.uint32(PG_anon_exclusive)
        u[slots[reuse]] = ptes[reuse] | wbits
        mm.kernel.vmstat.count("pgreuse", nreuse)
    copy = ~reuse
    ncopy = int(np.count_nonzero(copy))
    oom = -1
    if ncopy:
        cidx = np.flatnonzero(copy)
        avail = mem.nr_free_pages
        if avail < ncopy:
            oom = int(idx[cidx[avail]])
            cidx = cidx[:avail]
            ncopy = avail
    if ncopy:
        new = mem.alloc_pages_bulk(ncopy, movable=True)
        assert new is not None
        old = pfns[cidx]
        czero = zero[cidx]
        src = old[~czero]
        if len(src):
            mem.frames[new[~czero]] = mem.frames[src]
        anon_vma = vma.anon_vma_prepare()
        mem.flags[new] |= np.uint32(ANON_FLAGS)
        mem.mapping[new] = anon_vma.id
        addrs = base_addr + (idx[cidx].astype(np.int64) << PAGE_SHIFT)
        mem.index[new] = vma.vm_pgoff + ((addrs - vma.vm_start) >> PAGE_SHIFT)
        mem.mapcount[new] = 1
        u[slots[cidx]] = (new.astype(np.uint64) << U64_SHIFT) | np.uint64(
            _new_anon_pte_bits(vma, True)
        )
        nzero = int(np.count_nonzero(czero))
        if nzero:
            mem.zero_maps -= nzero
            mm.add_rss(MM_ANONPAGES, nzero)
        if len(src):
            np.subtract.at(mem.mapcount, src, ONE32)
            mem.put_folios(mem.compound_heads(src))
    return nreuse + ncopy, oom


# ---- the fault entry -------------------------------------------------------------------------


def handle_pte_fault(vma: VMA, addr: int, pslot: int, flags: int) -> int:
    """handle_pte_fault()."""
    mem = vma.mm.mem
    pte = mem.u64.item(pslot)
    if not pte:
        if vma.is_anonymous():
            return do_anonymous_page(vma, addr, pslot, flags)
        return do_shmem_fault(vma, addr, pslot, flags)
    if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return VM_FAULT_SIGBUS
    if not pte & _PAGE_PRESENT and vma.is_accessible():
        # do_numa_page(): restore the VMA's protection. A PROT_NONE VMA's entries are not NUMA
        # hints: a FOLL_FORCE write or unshare goes on to do_wp_page below.
        mem.u64[pslot] = pte_modify(pte, vma.vm_page_prot)
        return 0
    if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE):
        if not pte & _PAGE_RW:
            return do_wp_page(vma, addr, pslot, pte, flags)
        if flags & FAULT_FLAG_WRITE:
            pte |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    mem.u64[pslot] = pte | _PAGE_ACCESSED
    return 0


def thp_eligible(vma: VMA, haddr: int) -> bool:
    """thp_vma_suitable_order() + allowable orders: the aligned 2 MiB lies inside a THP VMA."""
    return (
        haddr >= vma.vm_start
        and haddr + PMD_SIZE <= vma.vm_end
        and vma.thp_enabled(vma.mm.kernel.config.thp)
    )


def __handle_mm_fault(vma: VMA, addr: int, flags: int) -> int:
    """__handle_mm_fault(): allocate the upper levels, try a huge PMD, else the PTE level."""
    mm = vma.mm
    u = mm.mem.u64
    slot = pmd_slot(mm, addr, alloc=True)
    if slot < 0:
        return VM_FAULT_OOM
    e = u.item(slot)
    write_like = flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE)
    if not e and thp_eligible(vma, addr & PMD_MASK):
        if flags & FAULT_FLAG_WRITE:
            ret = thp.do_huge_pmd_anonymous_page(vma, addr & PMD_MASK, slot)
        else:
            ret = thp.do_huge_zero_page(vma, slot)
        if not ret & VM_FAULT_FALLBACK:
            return ret
        e = u.item(slot)
    elif e & _PAGE_PSE:
        if write_like and not e & _PAGE_RW:
            ret = thp.do_huge_pmd_wp_page(vma, slot, bool(flags & FAULT_FLAG_UNSHARE))
            if not ret & VM_FAULT_FALLBACK:
                return ret
        else:
            e |= _PAGE_ACCESSED
            if flags & FAULT_FLAG_WRITE:
                e |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
            u[slot] = e
            return 0
    t = pte_alloc(mm, slot)
    if t < 0:
        return VM_FAULT_OOM
    return handle_pte_fault(vma, addr, t * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511), flags)


def mm_account_fault(mm: MmStruct, task: Task | None, flags: int, ret: int, count: int = 1) -> None:
    """mm_account_fault(): pgfault for every completed attempt (not RETRY); the faulting task's
    (``current``'s) min_flt/maj_flt unless the fault failed. TRIED faults count as major."""
    if ret & VM_FAULT_RETRY:
        return
    mm.kernel.vmstat.count("pgfault", count)
    if ret & VM_FAULT_ERROR or task is None:
        return
    if ret & VM_FAULT_MAJOR or flags & FAULT_FLAG_TRIED:
        task.maj_flt += count
    else:
        task.min_flt += count


def handle_mm_fault(vma: VMA, address: int, flags: int, task: Task | None = None) -> int:
    """handle_mm_fault(): resolve one fault; returns VM_FAULT_* bits (0 on success).

    ``task`` is ``current`` for the accounting (pgfault, min_flt/maj_flt). Anonymous and shmem
    faults never block, so this never returns VM_FAULT_RETRY today; callers must still honour it.
    """
    flags, ret = sanitize_fault_flags(vma, flags)
    if not ret:
        hook = _TEST_FAULT_HOOKS.get(vma) if _TEST_FAULT_HOOKS else None
        r = hook(vma, address & PAGE_MASK, flags) if hook is not None else None
        ret = __handle_mm_fault(vma, address & PAGE_MASK, flags) if r is None else r
    mm_account_fault(vma.mm, task, flags, ret)
    return ret


# ---- TEST ONLY: an injectable ->fault ----------------------------------------------------------

FaultHook = Callable[["VMA", int, int], "int | None"]
_TEST_FAULT_HOOKS: weakref.WeakKeyDictionary[VMA, FaultHook] = weakref.WeakKeyDictionary()


def has_test_fault_hook(vma: VMA) -> bool:
    """TEST ONLY: whether ``vma`` has an injected ->fault (batch fault paths must not bypass it)."""
    return bool(_TEST_FAULT_HOOKS) and vma in _TEST_FAULT_HOOKS


def set_test_fault_hook(vma: VMA, hook: FaultHook | None) -> None:
    """TEST ONLY: give ``vma`` a ->fault that answers ``hook(vma, addr, fault_flags)`` first.

    The hook returns VM_FAULT_* bits (e.g. RETRY or COMPLETED, after dropping mmap_lock itself
    as a blocking handler does) or None to run the normal fault. Anonymous faults never block,
    so this is how the GUP retry protocol is exercised until userfaultfd and files produce
    VM_FAULT_RETRY for real. ``hook=None`` removes it.
    """
    if hook is None:
        _TEST_FAULT_HOOKS.pop(vma, None)
    else:
        _TEST_FAULT_HOOKS[vma] = hook


def sanitize_fault_flags(vma: VMA, flags: int) -> tuple[int, int]:
    """sanitize_fault_flags(): the flags to use, or VM_FAULT_SIGSEGV for impossible ones."""
    if flags & FAULT_FLAG_UNSHARE:
        if flags & FAULT_FLAG_WRITE:
            return flags, VM_FAULT_SIGSEGV
        if not vma.is_cow_mapping():
            flags &= ~FAULT_FLAG_UNSHARE
    elif flags & FAULT_FLAG_WRITE:
        # Write faults need VM_MAYWRITE, and without VM_WRITE only COW mappings (FOLL_FORCE).
        if not vma.vm_flags & VM_MAYWRITE:
            return flags, VM_FAULT_SIGSEGV
        if not vma.vm_flags & VM_WRITE and not vma.is_cow_mapping():
            return flags, VM_FAULT_SIGSEGV
    if flags & FAULT_FLAG_TRIED and not flags & FAULT_FLAG_ALLOW_RETRY:
        return flags, VM_FAULT_SIGSEGV
    return flags, 0


# ---- unmapping -----------------------------------------------------------------------------------


def zap_pte_range(mm: MmStruct, table: int, i0: int, i1: int) -> None:
    """zap_pte_range(): clear PTEs [i0, i1) of one table, dropping mapcounts and references."""
    mem = mm.mem
    base = table * PTRS_PER_TABLE
    s = mem.u64[base + i0 : base + i1]
    nz = np.flatnonzero(s)
    if not len(nz):
        return
    vals = s[nz]
    pv = vals[(vals & U64_PRESENT) != 0]
    if len(pv):
        pfns = ((pv & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
        zero = pfns == mem.zero_pfn
        nzero = int(np.count_nonzero(zero))
        if nzero:
            mem.zero_maps -= nzero
            pfns = pfns[~zero]
            pv = pv[~zero]
        if len(pfns):
            np.subtract.at(mem.mapcount, pfns, ONE32)
            heads = mem.compound_heads(pfns)
            anon = (mem.flags[heads] & PG_anon) != 0
            nanon = int(np.count_nonzero(anon))
            if nanon:
                mm.add_rss(MM_ANONPAGES, -nanon)
            if nanon != len(pfns):
                mm.add_rss(MM_SHMEMPAGES, nanon - len(pfns))
                dirty = ~anon & ((pv & _U64_HWDIRTY) != 0)
                if dirty.any():
                    mem.flags[pfns[dirty]] |= np.uint32(PG_dirty)
            s[:] = 0
            mem.put_folios(heads)
            return
    s[:] = 0


def unmap_page_range(mm: MmStruct, start: int, end: int) -> None:
    """unmap_page_range(): zap every mapping in [start, end); partial huge PMDs are split first."""
    u = mm.mem.u64
    for slot, a, b in walk_pmds(mm, start, end):
        e = u.item(slot)
        if not e:
            continue
        if e & _PAGE_PSE:
            if b - a == PMD_SIZE:
                thp.zap_huge_pmd(mm, slot)
                continue
            thp.split_huge_pmd(mm, slot)
            e = u.item(slot)
        i0 = (a >> PAGE_SHIFT) & 511
        zap_pte_range(mm, table_of(e), i0, i0 + ((b - a) >> PAGE_SHIFT))


def unmap_vmas(mm: MmStruct, vmas: list[VMA]) -> None:
    """unmap_vmas()."""
    for vma in vmas:
        unmap_page_range(mm, vma.vm_start, vma.vm_end)


def zap_page_range_single(vma: VMA, start: int, end: int) -> None:
    """zap_page_range_single(): MADV_DONTNEED's zap of part of one VMA."""
    unmap_page_range(vma.mm, max(start, vma.vm_start), min(end, vma.vm_end))


def split_huge_pmds_in(mm: MmStruct, start: int, end: int) -> None:
    """split_huge_pmd_address() at both ends of a range cutting THPs (vma_adjust_trans_huge)."""
    u = mm.mem.u64
    for addr in (start, end):
        if addr & ~PMD_MASK:
            slot = pmd_slot(mm, addr)
            if slot >= 0 and u.item(slot) & _PAGE_PSE:
                thp.split_huge_pmd(mm, slot)


def split_all_huge_pmds(mm: MmStruct, start: int, end: int) -> None:
    """Split every huge PMD in [start, end) (used before moving page tables)."""
    u = mm.mem.u64
    for slot, _a, _b in walk_pmds(mm, start, end):
        if u.item(slot) & _PAGE_PSE:
            thp.split_huge_pmd(mm, slot)


# ---- mprotect -----------------------------------------------------------------------------------


def change_protection(vma: VMA, start: int, end: int) -> None:
    """change_protection(): rewrite PTEs/PMDs of [start, end) to ``vma.vm_page_prot``.

    Like MM_CP_TRY_CHANGE_WRITABLE, private writable VMAs get RW back on exclusive anon pages
    (can_change_pte_writable), so an mprotect(R)→mprotect(RW) cycle does not force a COW.
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    newprot = vma.vm_page_prot
    try_writable = bool(vma.vm_flags & VM_WRITE) and not vma.vm_flags & VM_SHARED
    for slot, a, b in walk_pmds(mm, start, end):
        e = u.item(slot)
        if not e:
            continue
        if e & _PAGE_PSE:
            if b - a < PMD_SIZE:
                thp.split_huge_pmd(mm, slot)
                e = u.item(slot)
            else:
                ne = pte_modify(e, newprot) | _PAGE_PSE
                head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
                if mem.is_huge_zero(head) or e & _PAGE_UFFD_WP:
                    ne &= ~_PAGE_RW
                elif try_writable and mem.flags[head] & PG_anon_exclusive and ne & _PAGE_PRESENT:
                    ne |= _PAGE_RW
                u[slot] = ne
                continue
        base = table_of(e) * PTRS_PER_TABLE
        i0 = (a >> PAGE_SHIFT) & 511
        s = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
        pm = np.flatnonzero((s & U64_PRESENT) != 0)
        if not len(pm):
            continue
        old = s[pm]
        new = pte_modify_vec(old, newprot)
        if try_writable and newprot & _PAGE_PRESENT:
            pfns = ((old & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
            ok = (mem.flags[pfns] & PG_anon_exclusive) != 0
            ok &= (old & np.uint64(_PAGE_SPECIAL | _PAGE_UFFD_WP)) == 0
            new[ok] |= np.uint64(_PAGE_RW)
        s[pm] = new
