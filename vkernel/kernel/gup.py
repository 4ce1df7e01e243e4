"""get_user_pages: the slow path, pin accounting and release (mm/gup.c, include/linux/mm.h).

Pages are pfns (struct page == pfn); ``pages`` is a numpy int64 array filled in ``[0, ret)``,
``None`` meaning "no pages array". Results follow Linux: the number of pages processed or a
negative errno when none was (A.3, A.4). Every reference taken or dropped here is mirrored in
``kernel.extra_refs`` (refcount) and ``kernel.extra_pins`` (_pincount of large folios), keyed
by folio head, so the audit stays exact.

Where the model differs from Linux 6.12 (see docs/gup-interface.md, stream A):

- try_grab_folio() also applies the 2019 pin-tracking overflow rule (seed 004): a grab that
  would push the 32-bit refcount past INT32_MAX fails with -EOVERFLOW and changes nothing.
- pinned_vm is charged by the caller (RDMA/io_uring style) with account_pinned_vm() /
  unaccount_pinned_vm(); pin_user_pages*() itself never charges RLIMIT_MEMLOCK.
- A negative entry of a pages array is NULL (skipped by unpin_user_pages, as Linux skips NULL).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vkernel.kernel.uapi import (
    FOLL_GET,
    FOLL_LONGTERM,
    FOLL_PCI_P2PDMA,
    FOLL_PIN,
    FOLL_UNLOCKABLE,
    FOLL_WRITE,
    GUP_PIN_COUNTING_BIAS,
    INTERNAL_GUP_FLAGS,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
)

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.vma import VMA

PageArray = npt.NDArray[np.int64]
INT32_MAX = (1 << 31) - 1
"""The largest value the 32-bit _refcount can hold (atomic_t)."""


class Locked:
    """The ``int *locked`` of the remote variants: 1 on entry; 0 on return = mmap_lock dropped."""

    __slots__ = ("value",)

    def __init__(self, value: int = 1) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Locked({self.value})"


# ---- pin accounting (A.5) ------------------------------------------------------------------------


def _extra_sub(counter: dict[int, int], head: int, n: int) -> None:
    """Drop ``n`` from a Counter entry, forgetting it at zero."""
    left = counter[head] - n
    if left:
        counter[head] = left
    else:
        del counter[head]


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
            mem.pincount[head] += refs
            kernel.extra_pins[head] += refs
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
    if flags & FOLL_PIN:
        if head == mem.zero_pfn:
            return
        if mem.order[head]:
            delta = refs
            if kernel.extra_pins.get(head, 0) < refs:
                raise RuntimeError(f"unpin of pfn {head}: {refs} pins not held")
            mem.pincount[head] -= refs
            _extra_sub(kernel.extra_pins, head, refs)
        else:
            delta = refs * GUP_PIN_COUNTING_BIAS
        kernel.vmstat.count("nr_foll_pin_released", refs)
    else:
        delta = refs
    if kernel.extra_refs.get(head, 0) < delta:
        raise RuntimeError(f"put of pfn {head}: {delta} references not held")
    mem.refcount[head] -= delta
    _extra_sub(kernel.extra_refs, head, delta)
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


def _grouped_heads(kernel: Kernel, pages: PageArray, npages: int) -> tuple[list[int], list[int]]:
    """gup_folio_next(): the folios of pages[:npages] (NULL = negative skipped) and page counts."""
    p = np.asarray(pages[:npages], dtype=np.int64)
    p = p[p >= 0]
    if not len(p):
        return [], []
    heads = kernel.mem.compound_heads(p)
    uniq, counts = np.unique(heads, return_counts=True)
    return uniq.tolist(), counts.tolist()


def unpin_user_page(kernel: Kernel, pfn: int) -> None:
    """unpin_user_page(): release one FOLL_PIN pin."""
    gup_put_folio(kernel, kernel.mem.compound_head(pfn), 1, FOLL_PIN)


def unpin_user_pages(kernel: Kernel, pages: PageArray, npages: int) -> None:
    """unpin_user_pages(): release pins on pages[:npages]; pages of one folio in one put."""
    if npages <= 0:
        return
    heads, counts = _grouped_heads(kernel, pages, npages)
    for h, c in zip(heads, counts, strict=True):
        gup_put_folio(kernel, h, c, FOLL_PIN)


def _mark_dirty(kernel: Kernel, heads: list[int]) -> None:
    """folio_mark_dirty() under the folio lock, for each folio not already dirty."""
    if heads:
        kernel.mem.flags[np.array(heads, dtype=np.int64)] |= np.uint32(PG_dirty)


def unpin_user_pages_dirty_lock(
    kernel: Kernel, pages: PageArray, npages: int, make_dirty: bool
) -> None:
    """unpin_user_pages_dirty_lock(): mark each folio dirty (if asked), then unpin it."""
    if npages <= 0:
        return
    heads, counts = _grouped_heads(kernel, pages, npages)
    if make_dirty:
        _mark_dirty(kernel, heads)
    for h, c in zip(heads, counts, strict=True):
        gup_put_folio(kernel, h, c, FOLL_PIN)


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
    """release_pages(): put_page() for pages[:npages] (NULL entries skipped), batched by folio."""
    if npages <= 0:
        return
    heads, counts = _grouped_heads(kernel, pages, npages)
    for h, c in zip(heads, counts, strict=True):
        gup_put_folio(kernel, h, c, FOLL_GET)


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
