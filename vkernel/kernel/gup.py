"""get_user_pages: the slow path, pin accounting and release (mm/gup.c, include/linux/mm.h).

Pages are pfns (struct page == pfn); ``pages`` is a numpy int64 array filled in ``[0, ret)``,
``None`` meaning "no pages array". Results follow Linux: the number of pages processed or a
negative errno when none was (A.3, A.4). Every reference taken or dropped here is mirrored in
two int32 numpy ledgers the audit adds up: ``kernel.extra_refs`` (refcount, indexed by folio
head) and ``kernel.extra_pins`` (_pincount of large folios, indexed by head >> 9). Batched
grabs and puts update them with one fancy-index (distinct heads) or ``np.add.at`` per call.

Where the model differs from Linux 6.12 (see docs/gup-interface.md, stream A):

- try_grab_folio() also applies the 2019 pin-tracking overflow rule (seed 004): a grab that
  would push the 32-bit refcount past INT32_MAX fails with -EOVERFLOW and changes nothing.
- pinned_vm is charged by the caller (RDMA/io_uring style) with account_pinned_vm() /
  unaccount_pinned_vm(); pin_user_pages*() itself never charges RLIMIT_MEMLOCK.
- A negative entry of a pages array is NULL (skipped by unpin_user_pages, as Linux skips NULL).
- FOLL_LONGTERM migration moves a THP whole (no split fallback when no free 2 MiB block is
  left in the normal zone: that is a migration failure, -ENOMEM); a folio whose mappings the
  rmap walk cannot all find, or with references beyond its mappings, fails likewise.
- Only fatal signals exist, so FOLL_INTERRUPTIBLE changes the fault flags but not
  gup_signal_pending().
- The slow path handles runs of present PTEs and of none anon PTEs vectorised (same result as
  the page-by-page walk; the fatal-signal check is made once per run).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vkernel.kernel import memory, thp
from vkernel.kernel.cred import Capability
from vkernel.kernel.errors import KernelError
from vkernel.kernel.memory import FaultWait, VmFault, handle_mm_fault
from vkernel.kernel.pagecache import AddressSpace, folio_mark_dirty
from vkernel.kernel.pgtable import (
    U64_PFN_MASK,
    U64_PRESENT,
    U64_SHIFT,
    pmd_slot,
    table_of,
    walk_pmds,
)
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
    EHWPOISON,
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_INTERRUPTIBLE,
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_RETRY_NOWAIT,
    FAULT_FLAG_TRIED,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    FOLL_ANON,
    FOLL_DUMP,
    FOLL_FORCE,
    FOLL_GET,
    FOLL_HONOR_NUMA_FAULT,
    FOLL_HWPOISON,
    FOLL_INTERRUPTIBLE,
    FOLL_LONGTERM,
    FOLL_MADV_POPULATE,
    FOLL_NOFAULT,
    FOLL_NOWAIT,
    FOLL_PCI_P2PDMA,
    FOLL_PIN,
    FOLL_REMOTE,
    FOLL_SPLIT_PMD,
    FOLL_TOUCH,
    FOLL_TRIED,
    FOLL_UNLOCKABLE,
    FOLL_WRITE,
    GUP_PIN_COUNTING_BIAS,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    INTERNAL_GUP_FLAGS,
    MMF_HAS_PINNED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PTRS_PER_TABLE,
    VM_FAULT_COMPLETED,
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    VM_IO,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_buddy,
    PG_dirty,
    PG_locked,
    PG_movable_zone,
    PG_referenced,
    PG_shmem,
    PG_writeback,
)
from vkernel.kernel.vma import AnonVma

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.task import Task
    from vkernel.kernel.vma import VMA

PageArray = npt.NDArray[np.int64]
INT32_MAX = (1 << 31) - 1
"""The largest value the 32-bit _refcount can hold (atomic_t)."""
_ANON_EXCL = PG_anon | PG_anon_exclusive
_NO_BATCH = FOLL_DUMP | FOLL_SPLIT_PMD | FOLL_HONOR_NUMA_FAULT
"""Flags whose rules the vectorised PTE run does not model: always walk page by page."""
_VM_UFFD_ANY = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR


class Locked:
    """The ``int *locked`` of the remote variants: 1 on entry; 0 on return = mmap_lock dropped."""

    __slots__ = ("value", "vmf", "wait")

    def __init__(self, value: int = 1) -> None:
        """``int locked = value;``"""
        self.value = value
        self.vmf: VmFault | None = None
        """The fault state kept across re-runs of one page's fault (VM_FAULT_MAJOR)."""
        self.wait: FaultWait | None = None
        """The sleep a fault handed back (memory.VmFault): taken by the retry driver, after
        the lock is released when ``value`` is 0, else with the lock held."""

    def __repr__(self) -> str:
        """Debug form, ``Locked(1)``."""
        return f"Locked({self.value})"


# ---- pin accounting (A.5) ------------------------------------------------------------------------


def try_grab_folio(kernel: Kernel, head_pfn: int, refs: int, flags: int) -> int:
    """try_grab_folio(): take ``refs`` GET references or pins on a folio; 0 or -errno.

    FOLL_GET adds ``refs`` to the refcount. FOLL_PIN adds ``refs*1024`` on a small folio and
    ``refs`` to both refcount and _pincount on a large one; the shared zero page is left alone.
    -ENOMEM if the refcount is <= 0 (a freed folio); -EOVERFLOW (nothing changed) if the 32-bit
    refcount would pass INT32_MAX (the seed-004 overflow rule).
    """
    mem = kernel.mem
    head = head_pfn
    if mem.order[head]:
        head = mem.compound_head(head)
    rc = int(mem.refcount[head])
    if rc <= 0:
        return -errno.ENOMEM
    if flags & FOLL_GET:
        delta = refs
        large = False
        pin = False
    elif flags & FOLL_PIN:
        if head == mem.zero_pfn:
            return 0
        large = bool(mem.order[head])
        delta = refs if large else refs * GUP_PIN_COUNTING_BIAS
        pin = True
    else:
        return 0
    if rc + delta > INT32_MAX:
        return -errno.EOVERFLOW
    mem.refcount[head] = rc + delta
    kernel.extra_refs[head] += delta
    if pin:
        if large:
            mem.large_pincount[head >> HPAGE_PMD_ORDER] += refs
            kernel.extra_pins[head >> HPAGE_PMD_ORDER] += refs
        kernel.vmstat.count("nr_foll_pin_acquired", refs)
    return 0


def _free_if_unused(kernel: Kernel, head: int) -> None:
    """folio_put_refs()' tail: free a folio whose last reference just went."""
    mem = kernel.mem
    rc = int(mem.refcount[head])
    if rc == 0:
        if mem.order[head]:
            mem.free_huge(head)
        else:
            mem.free_pages(np.array([head], dtype=np.int64))
    elif rc == 1 and head == mem.huge_zero_pfn and mem.huge_zero_maps == 0:
        mem.put_huge_zero_page(0)


def gup_put_folio(kernel: Kernel, head_pfn: int, refs: int, flags: int) -> None:
    """gup_put_folio(): drop ``refs`` references (FOLL_GET) or pins (FOLL_PIN) of a folio."""
    mem = kernel.mem
    head = head_pfn
    if mem.order[head]:
        head = mem.compound_head(head)
    pin = bool(flags & FOLL_PIN)
    if pin and head == mem.zero_pfn:
        return
    large = bool(mem.order[head])
    delta = refs * GUP_PIN_COUNTING_BIAS if pin and not large else refs
    if kernel.extra_refs[head] < delta:
        raise RuntimeError(f"put of pfn {head}: {delta} references not held")
    if pin:
        if large:
            blk = head >> HPAGE_PMD_ORDER
            if kernel.extra_pins[blk] < refs:
                raise RuntimeError(f"unpin of pfn {head}: {refs} pins not held")
            mem.large_pincount[blk] -= refs
            kernel.extra_pins[blk] -= refs
        kernel.vmstat.count("nr_foll_pin_released", refs)
    mem.refcount[head] -= delta
    kernel.extra_refs[head] -= delta
    _free_if_unused(kernel, head)


def gup_must_unshare(vma: VMA | None, flags: int, pfn: int, mem: PhysMem | None = None) -> bool:
    """gup_must_unshare(): a R/O pin of this page must first break COW (FAULT_FLAG_UNSHARE).

    True only for FOLL_PIN without FOLL_WRITE, and then for an anon page that is not
    PageAnonExclusive, or a non-anon page pinned FOLL_LONGTERM in a COW mapping (any non-anon
    page with ``vma`` None, as GUP-fast cannot tell). The zero page is not anon. GUP-fast,
    having no VMA, passes ``mem`` (its ``mm.mem``) instead.
    """
    if (flags & (FOLL_WRITE | FOLL_PIN)) != FOLL_PIN:
        return False
    if mem is None:
        if vma is None:
            raise TypeError("gup_must_unshare() without a VMA needs mem")
        mem = vma.mm.mem
    f = int(mem.flags[pfn])
    if not f & PG_anon:
        if not flags & FOLL_LONGTERM:
            return False
        if vma is None:
            return True
        return vma.is_cow_mapping()
    return not f & PG_anon_exclusive


def is_valid_gup_args(
    pages: PageArray | None, locked: Locked | None, gup_flags: int, to_set: int
) -> bool:
    """is_valid_gup_args(): the argument checks every GUP entry point makes (A.1)."""
    return valid_gup_flags(pages, locked, gup_flags, to_set) is not None


def valid_gup_flags(
    pages: PageArray | None, locked: Locked | None, gup_flags: int, to_set: int
) -> int | None:
    """is_valid_gup_args() returning the flags to use (``*gup_flags_p``), or None if invalid."""
    if gup_flags & INTERNAL_GUP_FLAGS:
        return None
    gup_flags |= to_set
    if locked is not None:
        if locked.value != 1:
            return None
        gup_flags |= FOLL_UNLOCKABLE
    if (gup_flags & (FOLL_PIN | FOLL_GET)) == (FOLL_PIN | FOLL_GET):
        return None
    if not gup_flags & FOLL_PIN and gup_flags & FOLL_LONGTERM:
        return None
    if gup_flags & (FOLL_GET | FOLL_PIN) and pages is None:
        return None
    if gup_flags & FOLL_LONGTERM and gup_flags & FOLL_PCI_P2PDMA:
        return None
    return gup_flags


# ---- release (unpin_user_page*, put_page) --------------------------------------------------------


def _grouped_heads(kernel: Kernel, pages: PageArray, npages: int) -> tuple[PageArray, PageArray]:
    """gup_folio_next(): the folios of pages[:npages] (NULL = negative skipped) and page counts."""
    p = np.asarray(pages[:npages], dtype=np.int64)
    p = p[p >= 0]
    heads = kernel.mem.compound_heads(p)
    uniq, counts = np.unique(heads, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64)


def gup_put_folios(kernel: Kernel, heads: PageArray, counts: PageArray, flags: int) -> None:
    """gup_put_folio() for many distinct folio heads at once (unpin_user_pages' batches).

    All-or-nothing: if any folio does not hold the references being dropped, RuntimeError is
    raised before anything changes.
    """
    mem = kernel.mem
    if not len(heads):
        return
    pin = bool(flags & FOLL_PIN)
    if pin:
        keep = heads != mem.zero_pfn
        if not keep.all():
            heads, counts = heads[keep], counts[keep]
            if not len(heads):
                return
    large = mem.order[heads] > 0
    delta = np.where(large | (not pin), counts, counts * GUP_PIN_COUNTING_BIAS)
    er = kernel.extra_refs
    short = er[heads] < delta
    if short.any():
        i = int(short.argmax())
        raise RuntimeError(f"put of pfn {int(heads[i])}: {int(delta[i])} references not held")
    if pin and large.any():
        blk = heads[large] >> HPAGE_PMD_ORDER
        lc = counts[large]
        ep = kernel.extra_pins
        short = ep[blk] < lc
        if short.any():
            i = int(short.argmax())
            h = int(blk[i]) << HPAGE_PMD_ORDER
            raise RuntimeError(f"unpin of pfn {h}: {int(lc[i])} pins not held")
        lc32 = lc.astype(np.int32)
        mem.large_pincount[blk] -= lc32
        ep[blk] -= lc32
    d32 = delta.astype(np.int32)
    mem.refcount[heads] -= d32
    er[heads] -= d32
    if pin:
        kernel.vmstat.count("nr_foll_pin_released", int(counts.sum()))
    rc = mem.refcount[heads]
    dead = heads[rc == 0]
    if len(dead):
        mem.free_folios(dead)
    hz = mem.huge_zero_pfn
    if hz >= 0 and mem.huge_zero_maps == 0 and mem.refcount[hz] == 1 and (heads == hz).any():
        mem.put_huge_zero_page(0)


_UNGROUPED_MAX = 1 << 20
"""Larger puts are grouped by folio first (the int32 ledgers' per-call deltas stay in range)."""
_BIAS32 = np.int32(GUP_PIN_COUNTING_BIAS)
_ONE32 = np.int32(1)


def _put_pages(kernel: Kernel, pages: PageArray, npages: int, flags: int, dirty: bool) -> None:
    """gup_put_folio() for each page of pages[:npages] (NULL skipped), not grouped by folio.

    Every page drops its share (1024 or 1 on a small folio, 1 on a large folio's refcount and
    _pincount) with one ``ufunc.at`` per array. The "held" check reads the ledgers after the
    drop: if a folio went short, the ledgers are restored and the grouped
    :func:`gup_put_folios` raises its RuntimeError, so nothing changes (all-or-nothing).
    ``dirty`` marks the folios dirty first (unpin_user_pages_dirty_lock).
    """
    mem = kernel.mem
    p = np.asarray(pages[:npages], dtype=np.int64)
    if len(p) > _UNGROUPED_MAX:
        heads, counts = _grouped_heads(kernel, pages, npages)
        if dirty:
            _mark_dirty(kernel, heads)
        gup_put_folios(kernel, heads, counts, flags)
        return
    if not len(p):
        return
    if p.min() < 0:
        p = p[p >= 0]
    order = mem.order[p]
    large = (order != 0) if order.any() else None
    heads = p if large is None else mem.compound_heads(p)
    pin = bool(flags & FOLL_PIN)
    keep = None  # the zero-page filter, computed once for the dirtying and the unpin
    if pin or dirty:
        nz = heads != mem.zero_pfn
        if not nz.all():
            keep = nz
    if dirty:
        _mark_dirty(kernel, heads if keep is None else heads[keep], nonzero=True)
    if pin and keep is not None:
        heads = heads[keep]
        large = None if large is None else large[keep]
    if not len(heads):
        return
    d: np.int32 | npt.NDArray[np.int32] = _ONE32
    if pin:
        d = _BIAS32 if large is None else np.where(large, _ONE32, _BIAS32)
    er = kernel.extra_refs
    np.subtract.at(er, heads, d)
    if (er[heads] < 0).any():
        np.add.at(er, heads, d)
        return _refuse(kernel, heads, flags)
    if pin and large is not None and large.any():
        blk = heads[large] >> HPAGE_PMD_ORDER
        ep = kernel.extra_pins
        np.subtract.at(ep, blk, _ONE32)
        if (ep[blk] < 0).any():
            np.add.at(ep, blk, _ONE32)
            np.add.at(er, heads, d)
            return _refuse(kernel, heads, flags)
        np.subtract.at(mem.large_pincount, blk, _ONE32)
    if pin:
        kernel.vmstat.count("nr_foll_pin_released", len(heads))
    rc = mem.refcount
    np.subtract.at(rc, heads, d)
    left = rc[heads]
    if not left.all():
        mem.free_folios(np.unique(heads[left == 0]))
    hz = mem.huge_zero_pfn
    if (
        hz >= 0
        and large is not None
        and mem.huge_zero_maps == 0
        and rc[hz] == 1
        and (heads == hz).any()
    ):
        mem.put_huge_zero_page(0)


def _refuse(kernel: Kernel, heads: PageArray, flags: int) -> None:
    """A put of references not held: the grouped gup_put_folios() names the folio and raises."""
    uniq, counts = np.unique(heads, return_counts=True)
    gup_put_folios(kernel, uniq.astype(np.int64), counts.astype(np.int64), flags)


def unpin_user_page(kernel: Kernel, pfn: int) -> None:
    """unpin_user_page(): release one FOLL_PIN pin."""
    gup_put_folio(kernel, kernel.mem.compound_head(pfn), 1, FOLL_PIN)


def unpin_user_pages(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """unpin_user_pages(): release pins on pages[:npages] (NULL entries skipped)."""
    if npages <= 0:
        return
    _put_pages(kernel, pages, npages, FOLL_PIN, False)


def _mark_dirty(kernel: Kernel, heads: PageArray, nonzero: bool = False) -> None:
    """folio_mark_dirty() under the folio lock, for each folio not already dirty: a page-cache
    page of a disk file is dirtied in its file, so writeback sends what a device wrote.
    ``nonzero``: the caller already left the zero page out."""
    mem = kernel.mem
    if not nonzero:
        heads = heads[heads != mem.zero_pfn]
    if len(heads):
        mem.flags[heads] |= np.uint32(PG_dirty)
        file = heads[(mem.flags[heads] & np.uint32(PG_anon | PG_shmem)) == 0]
        for p in file.tolist():
            obj = mem.mapping_obj(int(mem.mapping[p]))
            if isinstance(obj, AddressSpace) and obj.host is not None:
                folio_mark_dirty(obj, int(mem.index[p]), p)


def unpin_user_pages_dirty_lock(
    kernel: Kernel, pages: PageArray, npages: int, make_dirty: bool
) -> None:
    """unpin_user_pages_dirty_lock(): mark each folio dirty (if asked), then unpin it."""
    if npages <= 0:
        return
    _put_pages(kernel, pages, npages, FOLL_PIN, make_dirty)


def unpin_user_page_range_dirty_lock(
    kernel: Kernel, pfn: int, npages: int, make_dirty: bool
) -> None:
    """unpin_user_page_range_dirty_lock(): the same for ``npages`` contiguous pages from ``pfn``."""
    if npages <= 0:
        return
    pages = np.arange(pfn, pfn + npages, dtype=np.int64)
    unpin_user_pages_dirty_lock(kernel, pages, npages, make_dirty)


def put_page(kernel: Kernel, pfn: int) -> None:
    """put_page(): drop one FOLL_GET reference taken by get_user_pages*()."""
    gup_put_folio(kernel, kernel.mem.compound_head(pfn), 1, FOLL_GET)


def put_pages(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """release_pages(): put_page() for pages[:npages] (NULL entries skipped), one batch."""
    if npages <= 0:
        return
    _put_pages(kernel, pages, npages, FOLL_GET, False)


# ---- the seeds' names (2014 get_user_pages_locked, 2019 put_user_page*) --------------------------


def put_user_page(kernel: Kernel, pfn: int) -> None:
    """put_user_page() (2019 seed): today's unpin_user_page()."""
    unpin_user_page(kernel, pfn)


def put_user_pages(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """put_user_pages() (2019 seed): today's unpin_user_pages()."""
    unpin_user_pages(kernel, pages, npages)


def put_user_pages_dirty(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """put_user_pages_dirty() (2019 seed): unpin after marking every folio dirty."""
    unpin_user_pages_dirty_lock(kernel, pages, npages, True)


def put_user_pages_dirty_lock(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """put_user_pages_dirty_lock() (2019 seed): unpin_user_pages_dirty_lock(make_dirty=True)."""
    unpin_user_pages_dirty_lock(kernel, pages, npages, True)


# ---- pinned_vm (RLIMIT_MEMLOCK), charged by the pinning subsystem ---------------------------------


def account_pinned_vm(mm: MmStruct, npages: int, task: Task | None) -> int:
    """ib_umem_get()'s charge: ``mm->pinned_vm += npages`` unless it passes RLIMIT_MEMLOCK.

    Returns 0, or -ENOMEM (nothing charged) when the new total exceeds ``task``'s
    RLIMIT_MEMLOCK and ``task`` lacks CAP_IPC_LOCK. ``task`` None (the kernel) has no limit.
    """
    new = mm.pinned_vm + npages
    if task is not None and not task.cred.capable(Capability.CAP_IPC_LOCK):
        lock_limit = task.rlimit_memlock >> PAGE_SHIFT
        if new > lock_limit:
            return -errno.ENOMEM
    mm.pinned_vm = new
    return 0


def unaccount_pinned_vm(mm: MmStruct, npages: int) -> None:
    """ib_umem_release()'s uncharge: ``mm->pinned_vm -= npages``."""
    mm.pinned_vm = max(0, mm.pinned_vm - npages)


# ---- the page-table walk (follow_page_mask) -------------------------------------------------------


class FollowPageContext:
    """struct follow_page_context: ``page_mask`` is HPAGE_PMD_NR-1 after a PMD leaf, else 0."""

    __slots__ = ("page_mask",)

    def __init__(self) -> None:
        """``struct follow_page_context ctx = { NULL };``"""
        self.page_mask = 0


def no_page_table(vma: VMA, flags: int) -> int | None:
    """no_page_table(): NULL (fault it in), or -EFAULT for a FOLL_DUMP hole in anon memory."""
    if flags & FOLL_DUMP and vma.is_anonymous():
        return -errno.EFAULT
    return None


def gup_can_follow_protnone(vma: VMA, flags: int) -> bool:
    """gup_can_follow_protnone(): follow PROT_NONE entries unless FOLL_HONOR_NUMA_FAULT."""
    if not flags & FOLL_HONOR_NUMA_FAULT:
        return True
    return not vma.is_accessible()


def _can_follow_forced_write(entry: int, pfn: int, vma: VMA, flags: int) -> bool:
    """The FOLL_FORCE half of can_follow_write_pte()/can_follow_write_pmd() (A.1)."""
    if not flags & FOLL_FORCE:
        return False
    vf = vma.vm_flags
    if vf & (VM_MAYSHARE | VM_SHARED) or not vf & VM_MAYWRITE or vf & VM_WRITE:
        return False
    mem = vma.mm.mem
    if pfn < 0 or (int(mem.flags[pfn]) & _ANON_EXCL) != _ANON_EXCL:
        return False
    if not vf & VM_SOFTDIRTY and not entry & _PAGE_SOFT_DIRTY:
        return False  # vma_soft_dirty_enabled() and the PTE is not soft-dirty yet
    return not (vf & VM_UFFD_WP and entry & _PAGE_UFFD_WP)


def can_follow_write_pte(pte: int, pfn: int, vma: VMA, flags: int) -> bool:
    """can_follow_write_pte(): writable, or FOLL_FORCE on an exclusive anon page (COW broken)."""
    return bool(pte & _PAGE_RW) or _can_follow_forced_write(pte, pfn, vma, flags)


def can_follow_write_pmd(pmd: int, head: int, vma: VMA, flags: int) -> bool:
    """can_follow_write_pmd(): the PMD-leaf counterpart of can_follow_write_pte()."""
    return bool(pmd & _PAGE_RW) or _can_follow_forced_write(pmd, head, vma, flags)


def follow_page_pte(vma: VMA, address: int, slot: int, flags: int) -> int | None:
    """follow_page_pte(): the page at one PTE slot, grabbed per ``flags``; None = fault needed.

    Negative results are errnos: -EFAULT (FOLL_DUMP on a special page), -EEXIST (a pfn without
    a struct page), -EMLINK (must unshare first) or a try_grab_folio() failure.
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    pte = u.item(slot)
    if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return None if pte else no_page_table(vma, flags)
    if not pte & _PAGE_PRESENT and not gup_can_follow_protnone(vma, flags):
        return None
    pfn = (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT
    page = -1 if pte & _PAGE_SPECIAL else pfn  # vm_normal_page()
    if flags & FOLL_WRITE and not can_follow_write_pte(pte, page, vma, flags):
        return None
    if page < 0:
        if flags & FOLL_DUMP:
            return -errno.EFAULT
        if pfn == mem.zero_pfn:
            page = pfn
        else:
            # follow_pfn_pte(): touch the entry; no struct page to return.
            if flags & FOLL_TOUCH:
                u[slot] = pte | _PAGE_ACCESSED | (_PAGE_DIRTY if flags & FOLL_WRITE else 0)
            return -errno.EEXIST
    if not pte & _PAGE_RW and gup_must_unshare(vma, flags, page, mem):
        return -errno.EMLINK
    head = mem.compound_head(page)
    if flags & (FOLL_GET | FOLL_PIN):
        ret = try_grab_folio(mm.kernel, head, 1, flags)
        if ret:
            return ret
    if flags & FOLL_TOUCH and page != mem.zero_pfn:
        f = int(mem.flags[head])
        if flags & FOLL_WRITE and not pte & _PAGE_DIRTY and not f & PG_dirty:
            f |= PG_dirty  # folio_mark_dirty()
        mem.flags[head] = f | PG_referenced  # folio_mark_accessed()
    return page


def follow_huge_pmd(
    vma: VMA, address: int, slot: int, flags: int, ctx: FollowPageContext
) -> int | None:
    """follow_huge_pmd(): the subpage of a PMD-mapped THP (A.12); page_mask covers the rest."""
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    pmd = u.item(slot)
    head = (pmd & _PAGE_PFN_MASK) >> PAGE_SHIFT
    if flags & FOLL_WRITE and not can_follow_write_pmd(pmd, head, vma, flags):
        return None
    if flags & FOLL_DUMP and mem.is_huge_zero(head):
        return -errno.EFAULT
    if not pmd & _PAGE_PRESENT and not gup_can_follow_protnone(vma, flags):
        return None
    if not pmd & _PAGE_RW and gup_must_unshare(vma, flags, head, mem):
        return -errno.EMLINK
    if flags & (FOLL_GET | FOLL_PIN):
        ret = try_grab_folio(mm.kernel, head, 1, flags)
        if ret:
            return ret
    if flags & FOLL_TOUCH and not mem.is_huge_zero(head):
        # touch_pmd()
        u[slot] = (
            pmd | _PAGE_ACCESSED | (_PAGE_DIRTY | _PAGE_SOFT_DIRTY if flags & FOLL_WRITE else 0)
        )
    ctx.page_mask = HPAGE_PMD_NR - 1
    return head + ((address & ~PMD_MASK) >> PAGE_SHIFT)


def follow_page_mask(vma: VMA, address: int, flags: int, ctx: FollowPageContext) -> int | None:
    """follow_page_mask(): walk to the PTE or PMD leaf of ``address`` and grab the page.

    Returns the pfn, None when a fault is needed, or a negative errno (see follow_page_pte).
    """
    ctx.page_mask = 0
    if (flags & (FOLL_PIN | FOLL_GET)) == (FOLL_PIN | FOLL_GET):
        return -errno.EINVAL
    mm = vma.mm
    u = mm.mem.u64
    slot = pmd_slot(mm, address)
    if slot < 0:
        return no_page_table(vma, flags)
    e = u.item(slot)
    if not e:
        return no_page_table(vma, flags)
    if not e & _PAGE_PSE:
        return follow_page_pte(vma, address, _pte_slot(e, address), flags)
    if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return no_page_table(vma, flags)
    if not e & _PAGE_PRESENT and not gup_can_follow_protnone(vma, flags):
        return no_page_table(vma, flags)
    if flags & FOLL_SPLIT_PMD:
        thp.split_huge_pmd(mm, slot)
        e = u.item(slot)
        return follow_page_pte(vma, address, _pte_slot(e, address), flags)
    return follow_huge_pmd(vma, address, slot, flags, ctx)


def _pte_slot(pmd: int, address: int) -> int:
    """pte_offset_map(): the u64 slot of ``address``'s PTE in the table ``pmd`` points to."""
    return table_of(pmd) * PTRS_PER_TABLE + ((address >> PAGE_SHIFT) & 511)


_U64_P = np.uint64(_PAGE_PRESENT)
_U64_RW = np.uint64(_PAGE_RW)
_U64_SPECIAL = np.uint64(_PAGE_SPECIAL)
_U64_DIRTY = np.uint64(_PAGE_DIRTY)


def _leaf_run(vma: VMA, start: int, nr_pages: int) -> tuple[int, int, int] | None:
    """The PTE table ``start`` maps through (a PMD entry pointing to a table, not a leaf):
    ``(table, first index, entries)`` for up to ``nr_pages`` within the table and the VMA;
    None below two entries (the per-page path is as cheap)."""
    mm = vma.mm
    slot = pmd_slot(mm, start)
    if slot < 0:
        return None
    e = mm.mem.u64.item(slot)
    if not e or e & _PAGE_PSE:
        return None
    i0 = (start >> PAGE_SHIFT) & 511
    n = min(nr_pages, PTRS_PER_TABLE - i0, (vma.vm_end - start) >> PAGE_SHIFT)
    if n < 2:
        return None
    return table_of(e), i0, n


def follow_pte_batch(
    vma: VMA, start: int, nr_pages: int, flags: int, pages: PageArray | None, off: int
) -> int:
    """follow_page_pte() + try_grab_folio() for a run of PTEs of one leaf table at once.

    Takes the longest prefix (within the VMA and the table) of entries the per-page walk would
    return without faulting: present, not special (the zero page aside), small folios,
    writable for FOLL_WRITE, no unshare needed; grabs them, TOUCHes them and fills
    pages[off:off+k]. Returns k (0 = let the per-page path decide: a leaf PMD, a fault …).
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    run = _leaf_run(vma, start, nr_pages)
    if run is None:
        return 0
    t, i0, n = run
    base = t * PTRS_PER_TABLE + i0
    ptes = u[base : base + n]
    pfns = ((ptes & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
    zero = pfns == mem.zero_pfn
    ok = ((ptes & _U64_P) != 0) & (((ptes & _U64_SPECIAL) == 0) | zero)
    if flags & FOLL_WRITE:
        ok &= (ptes & _U64_RW) != 0
    k = n if ok.all() else int(np.argmin(ok))
    if not k:
        return 0
    ptes, pfns, zero = ptes[:k], pfns[:k], zero[:k]
    ok = mem.order[pfns] == 0
    if (flags & (FOLL_WRITE | FOLL_PIN)) == FOLL_PIN:
        ro = (ptes & _U64_RW) == 0
        if ro.any():
            pf = mem.flags[pfns]
            anon = (pf & np.uint32(PG_anon)) != 0
            must = anon & ((pf & np.uint32(PG_anon_exclusive)) == 0)
            if flags & FOLL_LONGTERM and vma.is_cow_mapping():
                must |= ~anon
            ok &= ~(ro & must)
    pin = bool(flags & FOLL_PIN)
    grab = pin or bool(flags & FOLL_GET)
    delta = GUP_PIN_COUNTING_BIAS if pin else 1
    if grab:
        rc = mem.refcount[pfns].astype(np.int64)
        fits = (rc > 0) & (rc + delta <= INT32_MAX)
        ok &= fits | zero if pin else fits
    k = k if ok.all() else int(np.argmin(ok))
    if not k:
        return 0
    ptes, pfns, zero = ptes[:k], pfns[:k], zero[:k]
    nzero = int(np.count_nonzero(zero))
    real = pfns[~zero] if nzero else pfns
    if grab:
        if len(np.unique(real)) != len(real):
            return 0  # the same page twice in one run: leave it to the per-page path
        er = mm.kernel.extra_refs
        if len(real):
            d32 = np.int32(delta)
            mem.refcount[real] += d32
            er[real] += d32
        if pin:
            mm.kernel.vmstat.count("nr_foll_pin_acquired", len(real))
        elif nzero:
            mem.refcount[mem.zero_pfn] += nzero  # FOLL_GET references the zero page
            er[mem.zero_pfn] += nzero
    if flags & FOLL_TOUCH and len(real):
        if flags & FOLL_WRITE:
            clean = (ptes & _U64_DIRTY) == 0
            if clean.any():
                mem.flags[pfns[clean]] |= np.uint32(PG_dirty)
        mem.flags[real] |= np.uint32(PG_referenced)
    if pages is not None:
        pages[off : off + k] = pfns
    return k


def faultin_none_run(vma: VMA, start: int, nr_pages: int, flags: int, current: Task | None) -> int:
    """faultin_page() for a run of none PTEs of an anonymous VMA at once (do_anonymous_pages).

    The same result and accounting as one fault per page; used only where a fault can neither
    block nor fail differently (private anon, an existing PTE table, no test ->fault, no
    FOLL_NOFAULT). Returns how many PTEs were populated (0: let the per-page path fault).
    """
    if flags & (FOLL_NOFAULT | _NO_BATCH) or not vma.is_anonymous() or vma.is_shared():
        return 0
    if memory.has_test_fault_hook(vma) or vma.vm_flags & _VM_UFFD_ANY:
        return 0
    mm = vma.mm
    u = mm.mem.u64
    leaf = _leaf_run(vma, start, nr_pages)
    if leaf is None:
        return 0
    t, i0, n = leaf
    run = u[t * PTRS_PER_TABLE + i0 : t * PTRS_PER_TABLE + i0 + n]
    m = n if not run.any() else int(np.argmax(run != 0))
    if m < 2:
        return 0
    write = bool(flags & FOLL_WRITE)
    idx = np.arange(i0, i0 + m, dtype=np.int64)
    done = memory.do_anonymous_pages(vma, t, start & PMD_MASK, idx, write)
    fault_flags = FAULT_FLAG_WRITE if write else 0
    memory.mm_account_fault(mm, current, fault_flags, 0, done)
    return done


# ---- VMA checks and faulting ----------------------------------------------------------------------


def vma_needs_dirty_tracking(vma: VMA) -> bool:
    """vma_needs_dirty_tracking(): a shared mapping of a file that writes back (disk; not
    shmem, not dax)."""
    return vma.mapping is not None and bool(vma.vm_flags & VM_SHARED)


def writable_file_mapping_allowed(vma: VMA, gup_flags: int) -> bool:
    """writable_file_mapping_allowed(): no writable LONGTERM pins of dirty-tracked files (A.6)."""
    if (gup_flags & (FOLL_PIN | FOLL_LONGTERM)) != (FOLL_PIN | FOLL_LONGTERM):
        return True
    return not vma_needs_dirty_tracking(vma)


def check_vma_flags(vma: VMA, gup_flags: int) -> int:
    """check_vma_flags(): 0 or -errno for a GUP of ``vma`` with ``gup_flags`` (A.1, A.3)."""
    vm_flags = vma.vm_flags
    write = gup_flags & FOLL_WRITE
    vma_anon = vma.is_anonymous()
    if vm_flags & (VM_IO | VM_PFNMAP):
        return -errno.EFAULT
    if gup_flags & FOLL_ANON and not vma_anon:
        return -errno.EFAULT
    if gup_flags & FOLL_LONGTERM and vma.dax is not None:
        return -errno.EOPNOTSUPP  # vma_is_fsdax()
    if write:
        if not vma_anon and not writable_file_mapping_allowed(vma, gup_flags):
            return -errno.EFAULT
        if not vm_flags & VM_WRITE:
            if not gup_flags & FOLL_FORCE:
                return -errno.EFAULT
            if not vma.is_cow_mapping():
                return -errno.EFAULT
    elif not vm_flags & VM_READ:
        if not gup_flags & FOLL_FORCE:
            return -errno.EFAULT
        if not vm_flags & VM_MAYREAD:
            return -errno.EFAULT
    return 0


def vm_fault_to_errno(vm_fault: int, foll_flags: int) -> int:
    """vm_fault_to_errno(): OOM → -ENOMEM; poison → -EHWPOISON/-EFAULT; SIGBUS/SEGV → -EFAULT."""
    if vm_fault & VM_FAULT_OOM:
        return -errno.ENOMEM
    if vm_fault & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
        return -EHWPOISON if foll_flags & FOLL_HWPOISON else -errno.EFAULT
    if vm_fault & (VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV):
        return -errno.EFAULT
    return 0


def faultin_page(
    vma: VMA, address: int, flags: int, unshare: bool, locked: Locked, current: Task | None
) -> int:
    """faultin_page(): fault one page for GUP; 0, -EBUSY (RETRY), -EAGAIN (COMPLETED) or -errno.

    RETRY without RETRY_NOWAIT and COMPLETED mean the handler dropped mmap_lock: ``locked``
    becomes 0.
    """
    if flags & FOLL_NOFAULT:
        return -errno.EFAULT
    fault_flags = 0
    if flags & FOLL_WRITE:
        fault_flags |= FAULT_FLAG_WRITE
    if flags & FOLL_REMOTE:
        fault_flags |= FAULT_FLAG_REMOTE
    if flags & FOLL_UNLOCKABLE:
        fault_flags |= FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
        if flags & FOLL_INTERRUPTIBLE:
            fault_flags |= FAULT_FLAG_INTERRUPTIBLE
    if flags & FOLL_NOWAIT:
        fault_flags |= FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_RETRY_NOWAIT
    if flags & FOLL_TRIED:
        fault_flags |= FAULT_FLAG_TRIED
    if unshare:
        fault_flags |= FAULT_FLAG_UNSHARE
    vmf = locked.vmf
    if vmf is None:
        vmf = locked.vmf = VmFault()
    ret = handle_mm_fault(vma, address, fault_flags, current, vmf)
    if vmf.wait is not None:
        # The handler must sleep: hand the wait to the retry driver. With ALLOW_RETRY and not
        # TRIED the lock goes now (the handler "dropped mmap_lock"); otherwise it is kept and
        # the driver sleeps under it and redoes this page (folio_lock in the handler).
        locked.wait = vmf.wait
        if vmf.unlock:
            vma.mm.mmap_lock.read_unlock()
            locked.value = 0
        return -errno.EAGAIN if ret & VM_FAULT_COMPLETED else -errno.EBUSY
    if ret & VM_FAULT_COMPLETED:
        locked.value = 0
        return -errno.EAGAIN
    if ret & VM_FAULT_ERROR:
        return vm_fault_to_errno(ret, flags) or -errno.EFAULT
    if ret & VM_FAULT_RETRY:
        if not fault_flags & FAULT_FLAG_RETRY_NOWAIT:
            locked.value = 0
        return -errno.EBUSY
    return 0


def _fatal(current: Task | None) -> bool:
    """fatal_signal_pending(current)."""
    return current is not None and current.fatal_signal_pending()


def __get_user_pages(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    off: int,
    locked: Locked,
    current: Task | None,
) -> int:
    """__get_user_pages(): the per-page loop under mmap_lock (A.3); fills pages[off:off+ret].

    Returns the pages processed, or a negative errno if none was; 0 when a fault dropped the
    lock (``locked`` 0) or had to wait under FOLL_NOWAIT.
    """
    if not nr_pages:
        return 0
    mem = mm.mem
    kernel = mm.kernel
    i = 0
    ret = 0
    vma: VMA | None = None
    ctx = FollowPageContext()
    got = 0
    saved_pin = mem.memalloc_pin
    if gup_flags & FOLL_LONGTERM:
        mem.memalloc_pin = True  # memalloc_pin_save(): faults allocate outside ZONE_MOVABLE
    try:
        while nr_pages:
            if vma is None or start >= vma.vm_end:
                if gup_flags & FOLL_MADV_POPULATE:
                    vma = mm.vma_lookup(start)
                    if vma is None:
                        ret = -errno.ENOMEM
                        break
                    if check_vma_flags(vma, gup_flags):
                        ret = -errno.EINVAL
                        break
                else:
                    vma = mm.vma_lookup(start)  # gup_vma_lookup(): never expands the stack
                    if vma is None:
                        ret = -errno.EFAULT
                        break
                    ret = check_vma_flags(vma, gup_flags)
                    if ret:
                        break
            if nr_pages > 1 and not gup_flags & _NO_BATCH:
                if _fatal(current):
                    ret = -errno.EINTR
                    break
                k = follow_pte_batch(vma, start, nr_pages, gup_flags, pages, off + i)
                if k:
                    i += k
                    start += k << PAGE_SHIFT
                    nr_pages -= k
                    continue
                if faultin_none_run(vma, start, nr_pages, gup_flags, current):
                    continue
            while True:  # retry:
                if _fatal(current):
                    ret = -errno.EINTR
                    break
                page = follow_page_mask(vma, start, gup_flags, ctx)
                if page is None or page == -errno.EMLINK:
                    ret = faultin_page(
                        vma, start, gup_flags, page == -errno.EMLINK, locked, current
                    )
                    if ret == 0:
                        continue
                    if ret in (-errno.EBUSY, -errno.EAGAIN):
                        ret = 0
                    break
                if page == -errno.EEXIST:
                    if pages is not None:
                        ret = page
                        break
                elif page < 0:
                    ret = page
                    break
                assert page is not None
                got = page
                ret = 1
                break
            if ret <= 0:
                break
            page_increm = 1 + (~(start >> PAGE_SHIFT) & ctx.page_mask)
            page_increm = min(page_increm, nr_pages)
            if pages is not None:
                if page_increm > 1:
                    head = mem.compound_head(got)
                    if try_grab_folio(kernel, head, page_increm - 1, gup_flags):
                        gup_put_folio(kernel, head, 1, gup_flags)
                        ret = -errno.EFAULT
                        break
                    pages[off + i : off + i + page_increm] = np.arange(
                        got, got + page_increm, dtype=np.int64
                    )
                else:
                    pages[off + i] = got
            i += page_increm
            start += page_increm << PAGE_SHIFT
            nr_pages -= page_increm
    finally:
        mem.memalloc_pin = saved_pin
    return i if i else ret


# ---- the retry driver and the entry points --------------------------------------------------------


async def _gup_sleeping(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    flags: int,
    pages: PageArray | None,
    off: int,
    locked: Locked,
    current: Task | None,
) -> int:
    """__get_user_pages(), taking the sleeps a fault needs *with* mmap_lock held (TRIED, or no
    ALLOW_RETRY: the handler's folio_lock) and going on from the page that slept. A kill during
    such a sleep → -EINTR, or the partial count. Sleeps after a dropped lock are the driver's."""
    done = 0
    while True:
        ret = __get_user_pages(
            mm,
            start + (done << PAGE_SHIFT),
            nr_pages - done,
            flags,
            pages,
            off + done,
            locked,
            current,
        )
        w = locked.wait
        if w is None or not locked.value:
            if ret > 0:
                return done + ret
            return done or ret
        locked.wait = None
        if ret > 0:
            done += ret
        try:
            await w.sleep()
        except KernelError as e:
            return done or -e.errno


def _signal_pending(current: Task | None, flags: int) -> bool:
    """gup_signal_pending(): a fatal signal (vkernel delivers no other kind to a GUP caller)."""
    return _fatal(current)


async def __get_user_pages_locked(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    pages: PageArray | None,
    locked: Locked,
    flags: int,
    *,
    current: Task | None = None,
) -> int:
    """__get_user_pages_locked(): the retry driver (A.3).

    ``locked.value`` 0 on entry: take mmap_lock (killable; failure → -EAGAIN) and release it at
    the end. With FOLL_UNLOCKABLE a fault may drop the lock: retake it and redo that one page
    with FOLL_TRIED, as often as needed; if the lock was ever dropped it is released on return
    with ``locked.value`` 0. A partial count wins over an error.
    """
    if not nr_pages:
        return 0
    lock = mm.mmap_lock
    must_unlock = False
    if not locked.value:
        try:
            await lock.read_lock(current, killable=True)
        except KernelError:
            return -errno.EAGAIN
        must_unlock = True
        locked.value = 1
    elif not lock.is_locked():
        raise RuntimeError("GUP with locked=1 but mmap_lock is not held (mmap_assert_locked)")
    if flags & FOLL_PIN:
        mm.flags |= MMF_HAS_PINNED  # mm_set_has_pinned_flag()
    if pages is not None and not flags & FOLL_PIN:
        flags |= FOLL_GET
    off = 0
    pages_done = 0
    while True:
        ret = await _gup_sleeping(mm, start, nr_pages, flags, pages, off, locked, current)
        if not flags & FOLL_UNLOCKABLE:
            pages_done = ret  # VM_FAULT_RETRY could not trigger
            break
        if ret > 0:
            nr_pages -= ret
            pages_done += ret
            if not nr_pages:
                break
        if locked.value:
            if not pages_done:
                pages_done = ret  # no RETRY, or FOLL_NOWAIT
            break
        # The lock was dropped (RETRY/COMPLETED): seek to the faulting page and redo it alone.
        off += ret
        start += ret << PAGE_SHIFT
        must_unlock = True
        while True:  # retry:
            w, locked.wait = locked.wait, None
            if w is not None:
                try:
                    await w.sleep()  # the handler's sleep, mmap_lock already released
                except KernelError:
                    pass
            if _signal_pending(current, flags):
                ret = -errno.EINTR
                break
            try:
                await lock.read_lock(current, killable=True)
            except KernelError as e:
                ret = -e.errno
                break
            locked.value = 1
            ret = await _gup_sleeping(mm, start, 1, flags | FOLL_TRIED, pages, off, locked, current)
            if locked.value:
                break
        if ret != 1:
            if not pages_done:
                pages_done = ret
            break
        nr_pages -= 1
        pages_done += 1
        if not nr_pages:
            break
        off += 1
        start += PAGE_SIZE
    if locked.wait is not None and not locked.value:
        w, locked.wait = locked.wait, None
        try:
            await w.sleep()  # a !UNLOCKABLE caller never gets here; keep the handler's sleep
        except KernelError:
            pass
    locked.wait = None
    if must_unlock and locked.value:
        lock.read_unlock()
        locked.value = 0
    if pages_done == 0 and not flags & FOLL_NOWAIT:
        return -errno.EFAULT  # WARN_ON_ONCE in Linux: nothing pinned means something is wrong
    return pages_done


async def __gup_longterm_locked(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    pages: PageArray | None,
    locked: Locked,
    gup_flags: int,
    *,
    current: Task | None = None,
) -> int:
    """__gup_longterm_locked(): GUP, then for FOLL_LONGTERM migrate unpinnable folios and re-pin.

    Folios in ZONE_MOVABLE are not longterm-pinnable: every pin is dropped, they are migrated
    to the normal zone and the whole range is pinned again (-EAGAIN loop, A.6). A migration
    failure returns -ENOMEM with nothing pinned.
    """
    if not gup_flags & FOLL_LONGTERM:
        return await __get_user_pages_locked(
            mm, start, nr_pages, pages, locked, gup_flags, current=current
        )
    for _attempt in range(_LONGTERM_MAX_PASSES):
        nr_pinned = await __get_user_pages_locked(
            mm, start, nr_pages, pages, locked, gup_flags, current=current
        )
        if nr_pinned <= 0:
            return nr_pinned
        assert pages is not None  # FOLL_LONGTERM implies FOLL_PIN, which needs pages
        rc = check_and_migrate_movable_pages(mm.kernel, nr_pinned, pages)
        if rc != -errno.EAGAIN:
            return rc if rc else nr_pinned
    return -errno.ENOMEM


_LONGTERM_MAX_PASSES = 16
"""Guard against a livelock of migrate-and-repin (Linux loops while -EAGAIN)."""


async def get_user_pages(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    *,
    current: Task | None = None,
) -> int:
    """get_user_pages(): the caller holds mmap_lock for read; it is never dropped (A.2)."""
    flags = _entry_flags(pages, None, gup_flags, FOLL_TOUCH, nr_pages)
    if flags is None:
        return -errno.EINVAL
    return await __get_user_pages_locked(
        mm, start, nr_pages, pages, Locked(1), flags, current=current
    )


async def get_user_pages_remote(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    locked: Locked | None,
    *,
    current: Task | None = None,
) -> int:
    """get_user_pages_remote(): lock held by the caller; with ``locked`` it may be dropped
    (``locked.value`` 0 on return: released, the caller must not unlock)."""
    flags = _entry_flags(pages, locked, gup_flags, FOLL_TOUCH | FOLL_REMOTE, nr_pages)
    if flags is None:
        return -errno.EINVAL
    return await __get_user_pages_locked(
        mm, start, nr_pages, pages, locked or Locked(1), flags, current=current
    )


async def get_user_pages_unlocked(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    pages: PageArray | None,
    gup_flags: int,
    *,
    current: Task | None = None,
) -> int:
    """get_user_pages_unlocked(): the caller must not hold mmap_lock; GUP takes and releases it."""
    flags = _entry_flags(pages, None, gup_flags, FOLL_TOUCH | FOLL_UNLOCKABLE, nr_pages)
    if flags is None:
        return -errno.EINVAL
    return await __get_user_pages_locked(
        mm, start, nr_pages, pages, Locked(0), flags, current=current
    )


async def pin_user_pages(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    *,
    current: Task | None = None,
) -> int:
    """pin_user_pages(): FOLL_PIN under the caller's mmap_lock (never dropped); 0 if invalid."""
    flags = _entry_flags(pages, None, gup_flags, FOLL_PIN, nr_pages)
    if flags is None:
        return 0
    return await __gup_longterm_locked(
        mm, start, nr_pages, pages, Locked(1), flags, current=current
    )


async def pin_user_pages_remote(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    locked: Locked | None,
    *,
    current: Task | None = None,
) -> int:
    """pin_user_pages_remote(): get_user_pages_remote()'s lock contract with FOLL_PIN."""
    flags = _entry_flags(pages, locked, gup_flags, FOLL_PIN | FOLL_TOUCH | FOLL_REMOTE, nr_pages)
    if flags is None:
        return 0
    return await __gup_longterm_locked(
        mm, start, nr_pages, pages, locked or Locked(1), flags, current=current
    )


async def pin_user_pages_unlocked(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    pages: PageArray | None,
    gup_flags: int,
    *,
    current: Task | None = None,
) -> int:
    """pin_user_pages_unlocked(): get_user_pages_unlocked()'s lock contract with FOLL_PIN."""
    flags = _entry_flags(pages, None, gup_flags, FOLL_PIN | FOLL_TOUCH | FOLL_UNLOCKABLE, nr_pages)
    if flags is None:
        return 0
    return await __gup_longterm_locked(
        mm, start, nr_pages, pages, Locked(0), flags, current=current
    )


async def get_user_pages_locked(
    mm: MmStruct,
    start: int,
    nr_pages: int,
    gup_flags: int,
    pages: PageArray | None,
    locked: Locked,
    *,
    current: Task | None = None,
) -> int:
    """get_user_pages_locked() (2014 seed, removed in 2022): get_user_pages_remote() with
    ``locked``: call with mmap_lock held and ``locked.value`` 1; unlock only if still 1."""
    return await get_user_pages_remote(
        mm, start, nr_pages, gup_flags, pages, locked, current=current
    )


def _entry_flags(
    pages: PageArray | None, locked: Locked | None, gup_flags: int, to_set: int, nr_pages: int
) -> int | None:
    """is_valid_gup_args() plus vkernel's own guards (nr_pages >= 0, pages array long enough)."""
    if nr_pages < 0 or (pages is not None and len(pages) < nr_pages):
        return None
    return valid_gup_flags(pages, locked, gup_flags, to_set)


async def fixup_user_fault(
    mm: MmStruct,
    address: int,
    fault_flags: int,
    unlocked: list[bool] | None,
    *,
    current: Task | None = None,
) -> int:
    """fixup_user_fault(): resolve one fault for a caller holding mmap_lock (futex, KVM).

    0 or -errno (-EFAULT: no VMA or vma_permits_fault() fails; -EINTR: KILLABLE with a fatal
    signal; vm_fault_to_errno()). With ``unlocked`` the handler may drop the lock: it is
    retaken (never returned unlocked) and ``unlocked[0]`` set True.
    """
    if unlocked is not None:
        fault_flags |= FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
    lock = mm.mmap_lock
    while True:
        vma = mm.vma_lookup(address)
        if vma is None:
            return -errno.EFAULT
        need = VM_WRITE if fault_flags & FAULT_FLAG_WRITE else VM_READ
        if not vma.vm_flags & need:  # vma_permits_fault()
            return -errno.EFAULT
        if fault_flags & FAULT_FLAG_KILLABLE and _fatal(current):
            return -errno.EINTR
        vmf = VmFault()
        ret = handle_mm_fault(vma, address, fault_flags, current, vmf)
        if vmf.wait is not None:
            if vmf.unlock:
                lock.read_unlock()
            try:
                await vmf.wait.sleep()
            except KernelError:
                if not vmf.unlock:
                    return -errno.EINTR
            if not vmf.unlock:
                continue
            await lock.read_lock(current, killable=False)
            if unlocked is not None:
                unlocked[0] = True
            fault_flags |= FAULT_FLAG_TRIED
            continue
        if ret & VM_FAULT_COMPLETED:
            await lock.read_lock(current, killable=False)
            if unlocked is not None:
                unlocked[0] = True
            return 0
        if ret & VM_FAULT_ERROR:
            return vm_fault_to_errno(ret, 0) or -errno.EFAULT
        if ret & VM_FAULT_RETRY:
            await lock.read_lock(current, killable=False)
            if unlocked is not None:
                unlocked[0] = True
            fault_flags |= FAULT_FLAG_TRIED
            continue
        return 0


# ---- FOLL_LONGTERM: migrate folios out of ZONE_MOVABLE (mm/gup.c, mm/migrate.c) -------------------


def folio_is_longterm_pinnable(kernel: Kernel, head: int) -> bool:
    """folio_is_longterm_pinnable(): the zero pages always; nothing in ZONE_MOVABLE."""
    mem = kernel.mem
    if head == mem.zero_pfn or mem.is_huge_zero(head):
        return True
    return not mem.in_movable(head)


def check_and_migrate_movable_pages(kernel: Kernel, nr_pages: int, pages: PageArray) -> int:
    """check_and_migrate_movable_pages(): 0 if every pinned folio may stay pinned; otherwise
    unpin all, migrate the unpinnable folios and return -EAGAIN (re-pin), or -ENOMEM."""
    mem = kernel.mem
    p = np.asarray(pages[:nr_pages], dtype=np.int64)
    heads = np.unique(mem.compound_heads(p))
    movable = heads[heads >= mem.movable_start]
    bad = [h for h in movable.tolist() if not folio_is_longterm_pinnable(kernel, h)]
    if not bad:
        return 0
    unpin_user_pages(kernel, pages, nr_pages)
    pages[:nr_pages] = -1
    ok = True
    for h in bad:
        if not migrate_folio_out_of_movable(kernel, h):
            ok = False
    return -errno.EAGAIN if ok else -errno.ENOMEM


def _anon_family(vma_anon: AnonVma | None, target: object) -> bool:
    """anon_vma chain check: does ``vma_anon`` (or an ancestor, via fork) equal ``target``?"""
    a = vma_anon
    while a is not None:
        if a is target:
            return True
        a = a.parent
    return False


def migrate_folio_out_of_movable(kernel: Kernel, head: int) -> bool:
    """migrate_pages(MR_LONGTERM_PIN) of one folio into the normal zone; False on failure.

    rmap_walk(): every PTE/PMD mapping the folio, in every mm, is found from page->mapping
    and page->index and repointed to the copy. Extra references (another GUP, a pin not yet
    dropped) or mappings not found make the migration fail, as folio_migrate_mapping() does.
    """
    from vkernel.kernel.audit import _live_mms

    mem = kernel.mem
    nr = 1 << int(mem.order[head])
    obj = mem.mapping_obj(int(mem.mapping[head]))
    is_shmem = isinstance(obj, AddressSpace)  # shmem or disk page cache: the cache holds a ref
    busy = int(mem.flags[head]) & (PG_locked | PG_writeback)
    if obj is None or kernel.extra_refs[head] or busy:
        kernel.vmstat.count("pgmigrate_fail", nr)
        return False
    idx0 = int(mem.index[head])
    u = mem.u64
    pte_slots: list[int] = []
    pmd_slots: list[int] = []
    for mm in _live_mms(kernel):
        for vma in mm.vmas:
            if is_shmem:
                if vma.f_mapping() is not obj:
                    continue
            elif not _anon_family(vma.anon_vma, obj):
                continue
            a0 = vma.vm_start + ((idx0 - vma.vm_pgoff) << PAGE_SHIFT)
            a1 = a0 + (nr << PAGE_SHIFT)
            lo, hi = max(a0, vma.vm_start), min(a1, vma.vm_end)
            if lo >= hi:
                continue
            for slot, a, b in walk_pmds(mm, lo, hi):
                e = u.item(slot)
                if not e:
                    continue
                if e & _PAGE_PSE:
                    if (e & _PAGE_PFN_MASK) >> PAGE_SHIFT == head:
                        pmd_slots.append(slot)
                    continue
                base = table_of(e) * PTRS_PER_TABLE
                i0 = (a >> PAGE_SHIFT) & 511
                s = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
                pfns = ((s & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
                hit = np.flatnonzero(((s & U64_PRESENT) != 0) & (pfns >= head) & (pfns < head + nr))
                pte_slots.extend((base + i0 + hit).tolist())
    sl = slice(head, head + nr)
    mapped = int(mem.mapcount[sl].sum())
    entire = int(mem.entire_mapcount[head >> HPAGE_PMD_ORDER]) if nr > 1 else 0
    expected_refs = len(pte_slots) + len(pmd_slots) + (nr if is_shmem else 0)
    if (
        len(pte_slots) != mapped
        or len(pmd_slots) != entire
        or int(mem.refcount[head]) != expected_refs
    ):
        kernel.vmstat.count("pgmigrate_fail", nr)
        return False
    new = mem.alloc_huge(movable=False) if nr > 1 else mem.alloc_page(movable=False)
    if new < 0:
        kernel.vmstat.count("pgmigrate_fail", nr)
        return False
    nsl = slice(new, new + nr)
    mem.frames[nsl] = mem.frames[sl]
    keep = np.uint32(PG_movable_zone | PG_buddy)
    mem.flags[nsl] = (mem.flags[sl] & ~keep) | (mem.flags[nsl] & np.uint32(PG_movable_zone))
    mem.mapping[nsl] = mem.mapping[sl]
    mem.index[nsl] = mem.index[sl]
    mem.mapcount[nsl] = mem.mapcount[sl]
    mem.refcount[new] = mem.refcount[head]
    if nr > 1:
        mem.large_pincount[new >> HPAGE_PMD_ORDER] = mem.large_pincount[head >> HPAGE_PMD_ORDER]
        mem.entire_mapcount[new >> HPAGE_PMD_ORDER] = entire
        mem.entire_mapcount[head >> HPAGE_PMD_ORDER] = 0
    delta = (new - head) << PAGE_SHIFT
    for slot in pte_slots + pmd_slots:
        u[slot] = u.item(slot) + delta
    if is_shmem:
        assert isinstance(obj, AddressSpace)
        for k in range(nr):
            obj.pages[idx0 + k] = new + k
    mem.refcount[head] = 0
    mem.mapcount[sl] = 0
    if nr > 1:
        mem.free_huge(head)
    else:
        mem.free_pages(np.array([head], dtype=np.int64))
    kernel.vmstat.count("pgmigrate_success", nr)
    return True
