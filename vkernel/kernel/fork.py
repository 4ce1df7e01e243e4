"""fork(): duplicate an address space with COW (kernel/fork.c dup_mmap, mm/memory.c copy_page_range,
mm/huge_memory.c copy_huge_pmd).
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel import thp
from vkernel.kernel.errors import KernelError
from vkernel.kernel.memory import ANON_FLAGS
from vkernel.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MmStruct
from vkernel.kernel.pgtable import (
    U64_NOT_ACCESSED,
    U64_NOT_DIRTY,
    U64_NOT_RW,
    U64_PFN_MASK,
    U64_PRESENT,
    U64_RW,
    U64_SHIFT,
    pgtable_alloc,
    pmd_slot,
    pte_alloc,
    pte_alloc_bulk,
    table_of,
    walk_pmds,
)
from vkernel.kernel.physmem import ONE32, PhysMem
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_UFFD_WP,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    MMF_HAS_PINNED,
    PAGE_SHIFT,
    PMD_SHIFT,
    PMD_SIZE,
    PTE_MARKER_POISONED,
    PTRS_PER_TABLE,
    PUD_SHIFT,
    VM_DONTCOPY,
    VM_LOCKED,
    VM_LOCKONFAULT,
    VM_SHARED,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_shmem,
)
from vkernel.kernel.userfaultfd import (
    UserfaultfdForkCtx,
    dup_userfaultfd,
    dup_userfaultfd_complete,
    dup_userfaultfd_fail,
)
from vkernel.kernel.vma import VMA, AnonVma

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel

_U64_NOT_UFFD_WP = np.uint64(~_PAGE_UFFD_WP & 0xFFFFFFFFFFFFFFFF)
_ANON_EXCL = np.uint32(PG_anon_exclusive)
_NOT_ANON_EXCL = np.uint32(~PG_anon_exclusive & 0xFFFFFFFF)


def folio_maybe_dma_pinned_vec(mm: MmStruct, heads: np.ndarray) -> np.ndarray:
    """folio_maybe_dma_pinned() for many heads: pincount > 0 if large, refcount >= 1024 if small."""
    mem = mm.mem
    small = mem.order[heads] == 0
    rc = mem.refcount[heads].view(np.uint32)
    out: np.ndarray = np.where(small, rc >= 1024, mem.pincount_of(heads) > 0)
    return out


def copy_present_page(dst_vma: VMA, src_pfn: int, src_pte: int, addr: int) -> int:
    """copy_present_page(): the child gets its own copy of a maybe-pinned exclusive anon page."""
    mem = dst_vma.mm.mem
    new = mem.alloc_page(movable=True)
    if new < 0:
        raise KernelError(errno.ENOMEM, "out of memory copying a pinned page at fork")
    mem.mv[new << PAGE_SHIFT : (new + 1) << PAGE_SHIFT] = mem.mv[
        src_pfn << PAGE_SHIFT : (src_pfn + 1) << PAGE_SHIFT
    ]
    anon = dst_vma.anon_vma_prepare()
    mem.flags[new] |= ANON_FLAGS
    mem.mapping[new] = anon.id
    mem.index[new] = dst_vma.linear_page_index(addr)
    mem.mapcount[new] = 1
    pte = (new << PAGE_SHIFT) | dst_vma.vm_page_prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if dst_vma.vm_flags & VM_WRITE:
        pte |= _PAGE_RW
    if src_pte & _PAGE_UFFD_WP and dst_vma.vm_flags & VM_UFFD_WP:
        pte |= _PAGE_UFFD_WP
    return pte


def copy_pte_markers(dst_vma: VMA, s: np.ndarray, d: np.ndarray, idx: np.ndarray) -> None:
    """copy_nonpresent_pte() → copy_pte_marker(): PTE_MARKER_POISONED is always copied, the
    uffd-wp marker only into a VM_UFFD_WP child VMA; a marker left empty is not installed."""
    keep = np.uint64(PTE_MARKER_POISONED | (_PAGE_UFFD_WP if dst_vma.vm_flags & VM_UFFD_WP else 0))
    d[idx] = s[idx] & keep


def copy_pte_range(dst_vma: VMA, src_vma: VMA, src_t: int, dst_t: int, a: int, b: int) -> None:
    """copy_pte_range()/copy_present_ptes(), vectorised over one leaf table."""
    src_mm = src_vma.mm
    dst_mm = dst_vma.mm
    mem = src_mm.mem
    u = mem.u64
    i0 = (a >> PAGE_SHIFT) & 511
    n = (b - a) >> PAGE_SHIFT
    s = u[src_t * PTRS_PER_TABLE + i0 : src_t * PTRS_PER_TABLE + i0 + n]
    d = u[dst_t * PTRS_PER_TABLE + i0 : dst_t * PTRS_PER_TABLE + i0 + n]
    present = (s & U64_PRESENT) != 0
    markers = np.flatnonzero((s != 0) & ~present)
    if len(markers):
        copy_pte_markers(dst_vma, s, d, markers)
    idx = np.flatnonzero(present)
    if not len(idx):
        return
    pv = s[idx]
    pfns = ((pv & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
    is_cow = src_vma.is_cow_mapping()
    zero = pfns == mem.zero_pfn
    normal = ~zero
    child = pv.copy()
    npfns = pfns[normal]
    heads = mem.compound_heads(npfns)
    pflags = mem.flags[npfns]
    anon = (pflags & PG_anon) != 0
    early = np.zeros(len(npfns), dtype=bool)
    if is_cow and src_mm.flags & MMF_HAS_PINNED and len(npfns):
        early = anon & ((pflags & _ANON_EXCL) != 0) & folio_maybe_dma_pinned_vec(src_mm, heads)
    nidx = np.flatnonzero(normal)
    if early.any():
        for j in np.flatnonzero(early).tolist():
            k = int(nidx[j])
            addr = a + ((int(idx[k])) << PAGE_SHIFT)
            child[k] = np.uint64(copy_present_page(dst_vma, int(npfns[j]), int(pv[k]), addr))
        dst_mm.add_rss(MM_ANONPAGES, int(np.count_nonzero(early)))
    shared = ~early
    sh_pfns = npfns[shared]
    if len(sh_pfns):
        np.add.at(mem.mapcount, sh_pfns, ONE32)
        np.add.at(mem.refcount, heads[shared], ONE32)
        sh_anon = anon[shared]
        if sh_anon.any():
            mem.flags[sh_pfns[sh_anon]] &= _NOT_ANON_EXCL
        na = int(np.count_nonzero(sh_anon))
        if na:
            dst_mm.add_rss(MM_ANONPAGES, na)
        if na != len(sh_pfns):
            nsh = int(np.count_nonzero(mem.flags[heads[shared]] & PG_shmem))
            if nsh:
                dst_mm.add_rss(MM_SHMEMPAGES, nsh)
            if na + nsh != len(sh_pfns):
                dst_mm.add_rss(MM_FILEPAGES, len(sh_pfns) - na - nsh)
    nz = int(np.count_nonzero(zero))
    if nz:
        mem.zero_maps += nz
    # Entries copied by sharing (zero page + shared pages): write-protect both sides if COW.
    share_mask = zero.copy()
    share_mask[nidx[shared]] = True
    if is_cow:
        wp = share_mask & ((pv & U64_RW) != 0)
        if wp.any():
            s[idx[wp]] = pv[wp] & U64_NOT_RW
            child[wp] &= U64_NOT_RW
    if src_vma.vm_flags & VM_SHARED:
        child[share_mask] &= U64_NOT_DIRTY
    child[share_mask] &= U64_NOT_ACCESSED
    if not dst_vma.vm_flags & VM_UFFD_WP:
        child[share_mask] &= _U64_NOT_UFFD_WP
    d[idx] = child


def copy_huge_pmd(dst_vma: VMA, src_vma: VMA, src_slot: int, addr: int) -> bool:
    """copy_huge_pmd(): share a PMD-mapped THP COW; False (after splitting) if it may be pinned."""
    src_mm = src_vma.mm
    dst_mm = dst_vma.mm
    mem = src_mm.mem
    u = mem.u64
    e = u.item(src_slot)
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    if (
        src_mm.flags & MMF_HAS_PINNED
        and mem.flags[head] & PG_anon_exclusive
        and mem.folio_pincount(head) > 0
    ):
        thp.split_huge_pmd(src_mm, src_slot)
        return False
    deposit = pgtable_alloc(dst_mm)
    if deposit < 0:
        raise KernelError(errno.ENOMEM, "out of memory for a page table at fork")
    dslot = pmd_slot(dst_mm, addr, alloc=True)
    if dslot < 0:
        from vkernel.kernel.pgtable import tlb_remove_table

        tlb_remove_table(dst_mm, deposit)
        raise KernelError(errno.ENOMEM, "out of memory for a page table at fork")
    if mem.is_huge_zero(head):
        mem.huge_zero_maps += 1
        u[dslot] = e & ~_PAGE_ACCESSED
        dst_mm.deposited[dslot] = deposit
        return True
    mem.refcount[head] += 1
    mem.entire_mapcount[head >> HPAGE_PMD_ORDER] += 1
    mem.flags[head] &= _NOT_ANON_EXCL
    e &= ~_PAGE_RW
    u[src_slot] = e
    child = e & ~_PAGE_ACCESSED
    if not dst_vma.vm_flags & VM_UFFD_WP:
        child &= ~_PAGE_UFFD_WP
    u[dslot] = child
    dst_mm.deposited[dslot] = deposit
    dst_mm.add_rss(MM_ANONPAGES, HPAGE_PMD_NR)
    return True


def vma_needs_copy(dst_vma: VMA, src_vma: VMA) -> bool:
    """vma_needs_copy(): page tables are copied when there is anonymous memory, or when the
    child VMA is uffd-wp registered (the protection lives only in the PTEs and markers);
    otherwise shmem and file pages just refault in the child."""
    return bool(dst_vma.vm_flags & VM_UFFD_WP) or src_vma.anon_vma is not None


def _early_copy_mask(src_vma: VMA, pfns: np.ndarray) -> np.ndarray | None:
    """page_needs_cow_for_dma() over many normal pfns: None when no page can need it."""
    src_mm = src_vma.mm
    if not (src_vma.is_cow_mapping() and src_mm.flags & MMF_HAS_PINNED and len(pfns)):
        return None
    mem = src_mm.mem
    pflags = mem.flags[pfns]
    cand = ((pflags & PG_anon) != 0) & ((pflags & _ANON_EXCL) != 0)
    if not cand.any():
        return None
    early = np.zeros(len(pfns), dtype=bool)
    ci = np.flatnonzero(cand)
    early[ci] = folio_maybe_dma_pinned_vec(src_mm, mem.compound_heads(pfns[ci]))
    return early if early.any() else None


class _Scratch:
    """Work arrays for copy_pte_tables(), kept between forks.

    A 512-table batch needs 2 MiB per u64 array; allocating such temporaries afresh costs more
    in host page faults (malloc hands big blocks back to the kernel on free) than the numpy
    work itself, so the hot arrays are reused and written with ``out=``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.s = np.empty(0, dtype=np.uint64)
        self.t = np.empty(0, dtype=np.uint64)
        self.f = np.empty(0, dtype=np.uint32)
        self.m = np.empty(0, dtype=bool)
        self.x = np.empty(0, dtype=np.int64)
        self.m2 = np.empty(0, dtype=bool)

    def grow(self, n: int) -> None:
        """Room for ``n`` entries."""
        if n > self.n:
            self.n = n
            self.s = np.empty(n, dtype=np.uint64)
            self.t = np.empty(n, dtype=np.uint64)
            self.f = np.empty(n, dtype=np.uint32)
            self.m = np.empty(n, dtype=bool)
            self.x = np.empty(n, dtype=np.int64)
            self.m2 = np.empty(n, dtype=bool)


_scratch = _Scratch()
COPY_TABLES_MAX = 256
"""Leaf tables per copy_pte_tables() call: bounds the scratch arrays at 1 MiB each."""


def _share_pfns(mem: PhysMem, npfns: np.ndarray, sc: _Scratch, order_any: bool) -> tuple[int, int]:
    """The child maps the same pages: one more PTE each, one more reference per folio, anon
    pages no longer exclusive. Returns (anon pages, shmem pages)."""
    nn = len(npfns)
    heads = mem.compound_heads(npfns) if order_any else npfns
    np.add.at(mem.mapcount, npfns, ONE32)
    np.add.at(mem.refcount, heads, ONE32)
    pflags = np.take(mem.flags, npfns, out=sc.f[:nn])
    anon = (pflags & PG_anon) != 0
    na = int(np.count_nonzero(anon))
    if na == nn:
        mem.flags[npfns] = np.bitwise_and(pflags, _NOT_ANON_EXCL, out=pflags)
        return na, 0
    if na:
        mem.flags[npfns[anon]] = pflags[anon] & _NOT_ANON_EXCL
    return na, int(np.count_nonzero(mem.flags[heads] & PG_shmem))


COPY_RUNS_DIV = 64
"""_share_pfn_runs() takes over when the pfns form at most one run per this many entries."""


def _share_pfn_runs(mem: PhysMem, npfns: np.ndarray, sc: _Scratch) -> tuple[int, int] | None:
    """_share_pfns() for small pages whose pfns come in long ascending runs (a region faulted
    in order gets consecutive frames; folio_pte_batch() likewise works on consecutive pfns):
    slices instead of scatter-adds. None, with nothing done, when the runs are too many."""
    nn = len(npfns)
    if nn > 1:
        steps = np.subtract(npfns[1:], npfns[:-1], out=sc.x[: nn - 1])
        brk = np.flatnonzero(np.not_equal(steps, 1, out=sc.m2[: nn - 1]))
        if len(brk) * COPY_RUNS_DIV > nn:
            return None
        bounds = [0, *(brk + 1).tolist(), nn]
    else:
        bounds = [0, nn]
    first = npfns[bounds[:-1]].tolist()
    na = nsh = 0
    for k, p0 in enumerate(first):
        p1 = p0 + bounds[k + 1] - bounds[k]
        mem.mapcount[p0:p1] += ONE32
        mem.refcount[p0:p1] += ONE32
        fl = mem.flags[p0:p1]
        anon = (fl & PG_anon) != 0
        nr = int(np.count_nonzero(anon))
        if nr == p1 - p0:
            fl &= _NOT_ANON_EXCL
        elif nr:
            fl[anon] &= _NOT_ANON_EXCL
        nsh += int(np.count_nonzero(fl & PG_shmem))
        na += nr
    # As _share_pfns(): shmem pages are counted only when not every page is anon.
    return na, (nsh if na != nn else 0)


def copy_pte_tables(dst_vma: VMA, src_vma: VMA, src_tabs: np.ndarray, dst_tabs: np.ndarray) -> None:
    """copy_pte_range()/copy_present_ptes() (6.12 batches a folio's PTEs with folio_pte_batch())
    over whole leaf tables at once: ``src_tabs[k]`` is copied into ``dst_tabs[k]``.

    Each pair covers a full 2 MiB of the VMA, so the child's table holds nothing else and is
    written whole (empty slots stay 0). The caller keeps page_needs_cow_for_dma() tables out:
    they go through copy_pte_range(), which copies such pages early.
    """
    src_mm = src_vma.mm
    dst_mm = dst_vma.mm
    mem = src_mm.mem
    rows = mem.u64.reshape(-1, PTRS_PER_TABLE)
    n = len(src_tabs) * PTRS_PER_TABLE
    sc = _scratch
    sc.grow(n)
    s = sc.s[:n]
    t = sc.t[:n]
    m = sc.m[:n]
    np.take(rows, src_tabs, axis=0, out=s.reshape(-1, PTRS_PER_TABLE))
    np.bitwise_and(s, U64_PRESENT, out=t)
    np.not_equal(t, 0, out=m)
    all_present = bool(m.all())
    if all_present:
        pv = s
        pfns = t
    else:
        pidx = np.flatnonzero(m)
        pv = s[pidx]
        pfns = np.empty(len(pidx), dtype=np.uint64)
    np.bitwise_and(pv, U64_PFN_MASK, out=pfns)
    np.right_shift(pfns, U64_SHIFT, out=pfns)
    # pfn < 2**52: the same bits read as int64, the index type numpy wants.
    ipfns = pfns.view(np.int64)
    zero = ipfns == mem.zero_pfn
    nzero = int(np.count_nonzero(zero))
    npfns = ipfns[~zero] if nzero else ipfns
    if _early_copy_mask(src_vma, npfns) is not None:
        raise AssertionError("copy_pte_tables: a maybe-pinned exclusive anon page")
    nn = len(npfns)
    if nn:
        order_any = bool(mem.order[npfns].any())
        counts = None if order_any else _share_pfn_runs(mem, npfns, sc)
        if counts is None:
            counts = _share_pfns(mem, npfns, sc, order_any)
        na, nsh = counts
        if na:
            dst_mm.add_rss(MM_ANONPAGES, na)
        if nsh:
            dst_mm.add_rss(MM_SHMEMPAGES, nsh)
        if na + nsh != nn:
            dst_mm.add_rss(MM_FILEPAGES, nn - na - nsh)
    if nzero:
        mem.zero_maps += nzero
    is_cow = src_vma.is_cow_mapping()
    clear = U64_NOT_ACCESSED
    if is_cow:
        clear &= U64_NOT_RW
    if src_vma.vm_flags & VM_SHARED:
        clear &= U64_NOT_DIRTY
    if not dst_vma.vm_flags & VM_UFFD_WP:
        clear &= _U64_NOT_UFFD_WP
    # ``t`` is free again (``pfns`` was read): it takes the RW bits, then the child's PTEs.
    if is_cow and np.bitwise_and(pv, U64_RW, out=t[: len(pv)]).any():
        # COW: the parent's PTEs lose RW too (whole rows written back; unchanged slots keep
        # their value, non-present ones are left alone).
        if all_present:
            wp_s = np.bitwise_and(s, U64_NOT_RW, out=t)
        else:
            wp_s = s.copy()
            wp_s[pidx] = pv & U64_NOT_RW
        rows[src_tabs] = wp_s.reshape(-1, PTRS_PER_TABLE)
    if all_present:
        d = np.bitwise_and(s, clear, out=t)
    else:
        # copy_nonpresent_pte(): markers follow copy_pte_markers(); none stays none.
        keep = PTE_MARKER_POISONED | (_PAGE_UFFD_WP if dst_vma.vm_flags & VM_UFFD_WP else 0)
        d = np.bitwise_and(s, np.uint64(keep), out=t)
        d[pidx] = pv & clear
    rows[dst_tabs] = d.reshape(-1, PTRS_PER_TABLE)


def _flush_batch(dst_vma: VMA, src_vma: VMA, batch: list[tuple[int, int]]) -> None:
    """Allocate the child's leaf tables for the pending ``(src_table, dst_pmd_slot)`` pairs and
    copy them with copy_pte_tables(); on OOM the tables before the failing one are copied (as
    table by table) and ENOMEM is raised."""
    if not batch:
        return
    arr = np.array(batch, dtype=np.int64)
    batch.clear()
    dst_tabs = pte_alloc_bulk(dst_vma.mm, arr[:, 1])
    k = len(dst_tabs)
    for i in range(0, k, COPY_TABLES_MAX):
        j = min(i + COPY_TABLES_MAX, k)
        copy_pte_tables(dst_vma, src_vma, arr[i:j, 0], dst_tabs[i:j])
    if k < len(arr):
        raise KernelError(errno.ENOMEM, "out of memory for page tables at fork")


def _slow_tables(src_vma: VMA, tabs: list[tuple[int, int]]) -> set[int]:
    """Chunk numbers, among ``(src_table, chunk)``, whose table maps a page that needs an early
    copy (page_needs_cow_for_dma()): those keep the per-table copy_pte_range()."""
    mem = src_vma.mm.mem
    arr = np.array(tabs, dtype=np.int64)
    s = mem.u64.reshape(-1, PTRS_PER_TABLE)[arr[:, 0]].ravel()
    pos = np.flatnonzero((s & U64_PRESENT) != 0)
    pfns = ((s[pos] & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
    normal = pfns != mem.zero_pfn
    early = _early_copy_mask(src_vma, pfns[normal])
    if early is None:
        return set()
    rows = np.unique(pos[normal][early] // PTRS_PER_TABLE)
    return {int(arr[r, 1]) for r in rows.tolist()}


def copy_page_range(dst_vma: VMA, src_vma: VMA) -> None:
    """copy_page_range(): copy the page tables of one VMA, COW-protecting private anon memory.

    Whole leaf tables are copied in batches by copy_pte_tables(). A PMD-mapped THP, a table the
    VMA covers only in part, a table mapping a page that must be copied early (maybe DMA-pinned)
    and a table just split from a pinned THP go through copy_huge_pmd()/copy_pte_range() one by
    one. The batch's leaf tables are allocated and copied before each of those and before a new
    PUD range, so pages and tables are allocated in the same order as copying table by table,
    and an OOM leaves the same tables copied.
    """
    src_mm = src_vma.mm
    dst_mm = dst_vma.mm
    u = src_mm.mem.u64
    if not vma_needs_copy(dst_vma, src_vma):
        return
    is_cow = src_vma.is_cow_mapping()
    chunks = [
        (slot, a, b, u.item(slot))
        for slot, a, b in walk_pmds(src_mm, src_vma.vm_start, src_vma.vm_end)
    ]
    slow: set[int] = set()
    if is_cow and src_mm.flags & MMF_HAS_PINNED:
        tables = [
            (table_of(e), i) for i, (_, _, _, e) in enumerate(chunks) if e and not e & _PAGE_PSE
        ]
        if tables:
            slow = _slow_tables(src_vma, tables)
    if is_cow:
        src_mm.write_protect_seq += 1  # raw_write_seqcount_begin()
    batch: list[tuple[int, int]] = []
    dst_pmd = -1
    dst_pud = -1
    try:
        for i, (slot, a, b, e) in enumerate(chunks):
            if not e:
                continue
            # A partial table (the VMA starts or ends inside it) may hold a neighbour's PTEs.
            one_by_one = i in slow or b - a != PMD_SIZE
            if e & _PAGE_PSE:
                _flush_batch(dst_vma, src_vma, batch)
                if copy_huge_pmd(dst_vma, src_vma, slot, a):
                    continue
                e = u.item(slot)
                one_by_one = True
            # pmd_alloc() once per PUD range: the chunks under it index the same PMD table.
            if a >> PUD_SHIFT != dst_pud:
                _flush_batch(dst_vma, src_vma, batch)
                dslot = pmd_slot(dst_mm, a, alloc=True)
                if dslot < 0:
                    raise KernelError(errno.ENOMEM, "out of memory for page tables at fork")
                dst_pmd = dslot - ((a >> PMD_SHIFT) & (PTRS_PER_TABLE - 1))
                dst_pud = a >> PUD_SHIFT
            dslot = dst_pmd + ((a >> PMD_SHIFT) & (PTRS_PER_TABLE - 1))
            if not one_by_one:
                # The child's leaf table is allocated with the batch, in this same order.
                batch.append((table_of(e), dslot))
                continue
            _flush_batch(dst_vma, src_vma, batch)
            dt = pte_alloc(dst_mm, dslot)
            if dt < 0:
                raise KernelError(errno.ENOMEM, "out of memory for page tables at fork")
            copy_pte_range(dst_vma, src_vma, table_of(e), dt, a, b)
        _flush_batch(dst_vma, src_vma, batch)
    finally:
        if is_cow:
            src_mm.write_protect_seq += 1  # raw_write_seqcount_end()


def dup_mmap(mm: MmStruct, oldmm: MmStruct, fcs: list[UserfaultfdForkCtx]) -> None:
    """dup_mmap(): copy every VMA except VM_DONTCOPY; VM_WIPEONFORK ones start empty. A
    registered VMA goes through dup_userfaultfd (``fcs`` collects the new uffds)."""
    mm.mmap_base = oldmm.mmap_base
    for vma in oldmm.vmas:
        if vma.vm_flags & VM_DONTCOPY:
            continue
        flags = vma.vm_flags & ~(VM_LOCKED | VM_LOCKONFAULT)
        new = VMA(
            mm=mm,
            vm_start=vma.vm_start,
            vm_end=vma.vm_end,
            vm_flags=flags,
            vm_pgoff=vma.vm_pgoff,
            anon_vma=None,
            **vma.file_fields(),  # type: ignore[arg-type]
        )
        new.uffd_ctx = vma.uffd_ctx  # vm_area_dup() copies vm_userfaultfd_ctx
        dup_userfaultfd(new, fcs)
        mm.insert_vma(new)
        if vma.vm_flags & VM_WIPEONFORK:
            continue
        if vma.anon_vma is not None:
            new.anon_vma = AnonVma(mm.mem, parent=vma.anon_vma)
        copy_page_range(new, vma)
    mm.hiwater_rss = mm.get_mm_rss()


async def dup_task(kernel: Kernel, parent: Task) -> Task:
    """kernel_clone()/copy_process(): the child task with a duplicated mm (COW)."""
    oldmm = parent.mm
    if oldmm is None:
        raise KernelError(errno.ESRCH, f"process {parent.pid} has no address space")
    fcs: list[UserfaultfdForkCtx] = []
    async with oldmm.mmap_lock.write(parent):
        oldmm.check_alive()
        mm = MmStruct(kernel)
        try:
            dup_mmap(mm, oldmm, fcs)
        except KernelError:
            dup_userfaultfd_fail(fcs)
            mm.exit_mmap()
            raise
    child = Task(
        pid=kernel._alloc_pid(),
        comm=parent.comm,
        cred=parent.cred,
        rlimits=dict(parent.rlimits),
        owner=parent.owner,
        ppid=parent.pid,
        start_time=time.monotonic(),
    )
    child.mm = mm
    kernel.tasks[child.pid] = child
    if fcs:
        # The FORK events go out after mmap_lock is dropped; fork returns once each was read.
        try:
            await dup_userfaultfd_complete(fcs, child, parent)
        except BaseException:
            _abort_child(kernel, child)
            raise
        if parent.fatal_signal_pending():
            # copy_process(): a fatal signal that arrived meanwhile fails the fork.
            _abort_child(kernel, child)
            raise KernelError(errno.EINTR, "fork interrupted by a fatal signal")
    return child


def _abort_child(kernel: Kernel, child: Task) -> None:
    """The bad_fork_* unwinding: the half-made child goes away without being seen."""
    kernel.do_exit(child)
    kernel.tasks.pop(child.pid, None)
