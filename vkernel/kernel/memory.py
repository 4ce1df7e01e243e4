"""Page faults, COW and unmapping (mm/memory.c, the fault half of mm/filemap.c).

The fault core is synchronous so await-free callers (batch paths, populate under a held lock)
can use it; GUP-fast never faults. Batch helpers vectorise over one leaf table.

**Sleeping in a fault (the ALLOW_RETRY protocol, A.9).** Anonymous and shmem faults never
sleep; a disk-file fault may have to wait for a page lock (a read in flight, or a page held
locked) or for writeback (a stable page for page_mkwrite). A synchronous function cannot
await, so the handler does what ``__folio_lock_or_retry`` decides and hands the sleep to its
caller through a :class:`VmFault` (``vmf``) passed into ``handle_mm_fault``:

- ``ALLOW_RETRY`` and not ``TRIED`` (and not ``RETRY_NOWAIT``): return VM_FAULT_RETRY with
  ``vmf.wait`` set and ``vmf.unlock`` True. The caller releases mmap_lock *then* awaits the wait
  (killable with KILLABLE) — between the handler's return and the release there is no await,
  so this is Linux dropping the lock inside the handler before it sleeps. The caller reports
  RETRY, retakes the lock and faults again with ``TRIED``.
- ``TRIED`` or no ``ALLOW_RETRY``: RETRY with ``vmf.wait`` set and ``vmf.unlock`` False. The
  caller awaits with mmap_lock held and runs the same fault again (Linux's plain
  ``folio_lock`` under the lock); this inner RETRY is never reported and never counted.
- ``RETRY_NOWAIT``, or no ``vmf`` (a caller that cannot sleep): RETRY at once, lock held, no wait.

Sleepable callers: ``handle_mm_fault_sleepable`` (one page: fixup_user_fault), the user
access loop (``uaccess``: drops the lock around the wait, TRIED for the retried page), GUP's
``faultin_page`` (which stashes the wait on ``Locked``; the retry driver ``__get_user_pages_locked``
sleeps after the lock is gone), and MADV_POPULATE/MAP_POPULATE (they hold the lock through
the syscall and sleep with it held). The userfaultfd issue reuses this: a missing-page handler
sets a wait on the uffd event instead of a page. ``KernelConfig.fault_retry`` (daemon
``--no-fault-retry``) clears ALLOW_RETRY in ``handle_mm_fault`` so every sleep holds the lock.

**Seed 002 (dax COW).** ``do_fault`` sends dax VMAs to ``dax_fault``: a private write fault
preallocates ``cow_page`` and the dax handler fills it (zeroes for a hole, a copy of the
device frame otherwise) and maps it itself (VM_FAULT_DONE_COW): one fault, one copy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel import pagecache, thp
from vkernel.kernel.errors import KernelError
from vkernel.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES
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
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_RETRY_NOWAIT,
    FAULT_FLAG_TRIED,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PMD_SIZE,
    PTE_MARKER_POISONED,
    PTE_MARKER_UFFD_WP,
    PTRS_PER_TABLE,
    VM_FAULT_COMPLETED,
    VM_FAULT_DONE_COW,
    VM_FAULT_ERROR,
    VM_FAULT_FALLBACK,
    VM_FAULT_HWPOISON,
    VM_FAULT_LOCKED,
    VM_FAULT_MAJOR,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_RAND_READ,
    VM_SHARED,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_locked,
    PG_lru,
    PG_shmem,
    PG_swapbacked,
    PG_uptodate,
    PG_writeback,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.physmem import PhysMem
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


def do_anonymous_page(
    vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None = None
) -> int:
    """do_anonymous_page(): zero page for a read, a new anon-exclusive zeroed page for a write;
    a MISSING-registered VMA hands the fault to handle_userfault (userfaultfd_missing)."""
    mm = vma.mm
    mem = mm.mem
    if vma.vm_flags & VM_SHARED:
        return VM_FAULT_SIGBUS
    if vma.vm_flags & VM_UFFD_MISSING:
        from vkernel.kernel.userfaultfd import handle_userfault

        return handle_userfault(vma, addr, flags, vmf, VM_UFFD_MISSING)
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


def _shmem_get_folio(
    vma: VMA, idx: int, flags: int = 0, vmf: VmFault | None = None
) -> tuple[int, int]:
    """shmem_get_folio(SGP_CACHE): ``(vm_fault, pfn)``; a hole gets a fresh zeroed page. A
    userfaultfd VMA hands a cached page to MINOR and a hole to MISSING (handle_userfault)."""
    mem = vma.mm.mem
    obj = vma.shmem
    assert obj is not None
    if idx << PAGE_SHIFT >= obj.size:
        return VM_FAULT_SIGBUS, -1
    pfn = obj.pages.get(idx, -1)
    reason = VM_UFFD_MINOR if pfn >= 0 else VM_UFFD_MISSING
    if vma.vm_flags & reason:
        from vkernel.kernel.userfaultfd import handle_userfault

        addr = vma.vm_start + ((idx - vma.vm_pgoff) << PAGE_SHIFT)
        return handle_userfault(vma, addr, flags, vmf, reason), -1
    if pfn < 0:
        pfn = mem.alloc_page(movable=True)
        if pfn < 0:
            return VM_FAULT_OOM, -1
        mem.flags[pfn] |= PG_shmem | PG_uptodate | PG_swapbacked | PG_lru
        mem.mapping[pfn] = obj.id
        mem.index[pfn] = idx
        obj.pages[idx] = pfn
    return 0, pfn


def finish_fault(vma: VMA, pslot: int, pfn: int, write: bool) -> None:
    """finish_fault() → set_pte_range() of a page-cache page (shmem or file): the PTE's
    reference and mapcount, MM_SHMEMPAGES/MM_FILEPAGES. A read fault of a shared mapping that
    needs dirty tracking (a disk file: writenotify) maps read-only, so the first write faults."""
    mm = vma.mm
    mem = mm.mem
    mem.refcount[mem.compound_head(pfn)] += 1
    mem.mapcount[pfn] += 1
    bits = vma.vm_page_prot | _PAGE_ACCESSED
    if write:
        bits |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    elif vma.mapping is not None:
        bits &= ~_PAGE_RW
    mem.u64[pslot] = (pfn << PAGE_SHIFT) | bits
    mm.add_rss(MM_SHMEMPAGES if mem.flags[pfn] & PG_shmem else MM_FILEPAGES, 1)


def do_shmem_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None = None) -> int:
    """do_read_fault()/do_shared_fault() via shmem_fault(): find or allocate the page, map it."""
    mem = vma.mm.mem
    ret, pfn = _shmem_get_folio(vma, vma.linear_page_index(addr), flags, vmf)
    if ret:
        return ret
    write = bool(flags & FAULT_FLAG_WRITE)
    if write:
        mem.flags[pfn] |= PG_dirty
    finish_fault(vma, pslot, pfn, write)
    return 0


# ---- file faults and the sleep/RETRY protocol ---------------------------------------------------


class FaultWait:
    """A sleep a fault handler needs (the page lock, or PG_writeback for a stable page)."""

    __slots__ = ("mem", "pfn", "task", "throttle", "writeback")

    def __init__(
        self,
        mem: PhysMem,
        pfn: int,
        task: Task | None,
        writeback: bool,
        throttle: pagecache.AddressSpace | None = None,
    ) -> None:
        self.mem = mem
        self.pfn = pfn
        self.task = task
        """Killable for this task (FAULT_FLAG_KILLABLE), else an uninterruptible wait."""
        self.writeback = writeback
        self.throttle = throttle
        """balance_dirty_pages() on this file instead of a page wait."""

    async def sleep(self) -> None:
        """folio_wait_locked_killable() / folio_wait_stable() / balance_dirty_pages()."""
        if self.throttle is not None:
            await pagecache.filemap_fdatawrite(self.throttle, task=self.task)
        elif self.writeback:
            await pagecache.folio_wait_writeback(self.mem, self.pfn, self.task)
        else:
            await pagecache.folio_wait_locked(self.mem, self.pfn, self.task)


class VmFault:
    """The parts of struct vm_fault a sleepable caller keeps across attempts of one fault.

    ``wait`` is set when the handler returned VM_FAULT_RETRY because it must sleep: with
    ``unlock`` the caller releases mmap_lock *before* sleeping (ALLOW_RETRY, not TRIED) and
    reports RETRY upwards; without it (TRIED, or no ALLOW_RETRY) the caller sleeps with the
    lock held and runs the same fault again (Linux's plain ``folio_lock`` in the handler).
    """

    __slots__ = ("addr", "major", "real_address", "reread", "task", "unlock", "wait")

    def __init__(self) -> None:
        self.addr = -1
        """The page the state below belongs to (a fault at another address starts afresh)."""
        self.wait: FaultWait | None = None
        self.unlock = False
        self.major = False
        """The page had to be read from the device (VM_FAULT_MAJOR survives a re-run)."""
        self.reread = False
        """A page left !uptodate by a failed read was dropped and read once more."""
        self.task: Task | None = None
        self.real_address = -1
        """vmf->real_address: the faulting address with its in-page offset."""


def _lock_or_retry(vma: VMA, pfn: int, flags: int, vmf: VmFault | None, wb: bool = False) -> int:
    """__folio_lock_or_retry() (A.9): the handler must sleep on ``pfn``. Returns VM_FAULT_RETRY
    and tells the caller through ``vmf`` how: drop mmap_lock then sleep (ALLOW_RETRY && !TRIED),
    or sleep holding it. RETRY_NOWAIT, or a caller that cannot sleep (no ``vmf``), gets RETRY
    at once with the lock held and nothing to wait for."""
    if flags & FAULT_FLAG_RETRY_NOWAIT or vmf is None:
        return VM_FAULT_RETRY
    task = vmf.task if flags & FAULT_FLAG_KILLABLE else None
    vmf.wait = FaultWait(vma.mm.mem, pfn, task, wb)
    vmf.unlock = bool(flags & FAULT_FLAG_ALLOW_RETRY) and not flags & FAULT_FLAG_TRIED
    return VM_FAULT_RETRY


def filemap_fault(vma: VMA, idx: int, flags: int, vmf: VmFault | None) -> tuple[int, int]:
    """filemap_fault(): ``(vm_fault, pfn)`` of the uptodate page ``idx`` of a disk file.

    A miss starts the read (with readahead) and counts a major fault; a page that is locked
    (I/O in flight, or held by someone) means sleeping (``_lock_or_retry``). Past EOF, or a
    page whose read failed twice → SIGBUS. No sleep happens here: see ``VmFault``.
    """
    mapping = vma.mapping
    assert mapping is not None
    mem = vma.mm.mem
    if idx << PAGE_SHIFT >= mapping.size:
        return VM_FAULT_SIGBUS, -1
    major = VM_FAULT_MAJOR if vmf is not None and vmf.major else 0
    pfn = mapping.pages.get(idx)
    if pfn is not None and not mem.flags[pfn] & (PG_uptodate | PG_locked):
        if flags & FAULT_FLAG_TRIED or (vmf is not None and vmf.reread) or vmf is None:
            return VM_FAULT_SIGBUS, -1  # the read failed (EIO): SIGBUS
        vmf.reread = True
        pagecache.truncate_inode_pages_sync(mapping, idx, idx + 1)
        pfn = None
    if pfn is None:
        ra = 1 if vma.vm_flags & VM_RAND_READ else max(1, mapping.ra_pages)
        try:
            # do_sync_mmap_readahead(): a window from here; its last quarter is the trigger
            # of the next window (PG_readahead, as mapping.mmap_ra_mark).
            pagecache.page_cache_ra_unbounded(mapping, idx, ra)
        except KernelError:
            return VM_FAULT_OOM, -1
        if ra > 1:
            mapping.mmap_ra_mark = idx + ra - max(1, ra // 4)
            mapping.mmap_ra_end = idx + ra
            mapping.mmap_ra_size = ra
        pfn = mapping.pages[idx]
        major = VM_FAULT_MAJOR
        vma.mm.kernel.vmstat.count("pgmajfault")
        if vmf is not None:
            vmf.major = True
    elif idx == mapping.mmap_ra_mark:
        _async_mmap_readahead(mapping)
    if mem.flags[pfn] & PG_locked:
        return _lock_or_retry(vma, pfn, flags, vmf) | major, -1
    return major, pfn


MMAP_RA_MAX_PAGES = 2 * pagecache.MAX_BIO_PAGES
"""Largest mmap readahead window (2 MiB, two bios in flight): what a raised read_ahead_kb
gives a sequential mmap reader in Linux."""


def _async_mmap_readahead(mapping: pagecache.AddressSpace) -> None:
    """do_async_mmap_readahead() → ondemand readahead: a fault reached the trigger page, so
    the reader is sequential: start the next window, twice as large (up to 2 MiB),
    whose first page is the next trigger (async_size = size: one window always in flight)."""
    ra = min(2 * max(1, mapping.mmap_ra_size), MMAP_RA_MAX_PAGES)
    start = mapping.mmap_ra_end
    mapping.mmap_ra_mark = start
    mapping.mmap_ra_end = start + ra
    mapping.mmap_ra_size = ra
    try:
        pagecache.page_cache_ra_unbounded(mapping, start, ra)
    except KernelError:
        pass  # readahead is best effort


FAULT_AROUND_PAGES = 16
"""fault_around_bytes (64 KiB): cached pages mapped around a read fault of a file."""


def uffd_disable_fault_around(vma: VMA) -> bool:
    """uffd_disable_fault_around(): uffd-wp and MINOR VMAs map exactly the faulting page (a
    page mapped around it would escape the monitor's protection or MINOR faults)."""
    return bool(vma.vm_flags & (VM_UFFD_WP | VM_UFFD_MINOR))


def _mappable_cached(
    vma: VMA, mapping: pagecache.AddressSpace, base_addr: int, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """next_uptodate_folio() for the entries ``idx`` of the leaf table whose entry 0 maps
    ``base_addr``: each one's cached pfn (-1: not cached) and whether it can be mapped without
    a fault (cached, inside i_size, uptodate, unlocked, not the PG_readahead trigger page,
    which is left to a real fault)."""
    mem = vma.mm.mem
    fidx = vma.vm_pgoff + ((base_addr - vma.vm_start) >> PAGE_SHIFT) + idx.astype(np.int64)
    get = mapping.pages.get
    pfns = np.fromiter((get(i, -1) for i in fidx.tolist()), dtype=np.int64, count=len(fidx))
    limit = (mapping.size + PAGE_SIZE - 1) >> PAGE_SHIFT
    ok = (pfns >= 0) & (fidx < limit) & (fidx != mapping.mmap_ra_mark)
    fl = mem.flags[np.where(ok, pfns, 0)]
    ok &= ((fl & np.uint32(PG_uptodate)) != 0) & ((fl & np.uint32(PG_locked)) == 0)
    return pfns, ok


def _map_cached_ro(vma: VMA, table: int, idx: np.ndarray, pfns: np.ndarray) -> None:
    """set_pte_range() for cached file pages: read-only young PTEs, a reference and a mapping
    each, file RSS."""
    mem = vma.mm.mem
    bits = (vma.vm_page_prot | _PAGE_ACCESSED) & ~_PAGE_RW
    mem.u64[table * PTRS_PER_TABLE + idx] = (pfns.astype(np.uint64) << U64_SHIFT) | np.uint64(bits)
    np.add.at(mem.refcount, mem.compound_heads(pfns), ONE32)
    np.add.at(mem.mapcount, pfns, ONE32)
    vma.mm.add_rss(MM_FILEPAGES, len(pfns))


def do_read_fault_run(vma: VMA, table: int, base_addr: int, idx: np.ndarray) -> int:
    """do_read_fault() for a run of none PTEs of a disk-file VMA whose pages are cached (the
    CPU reading through a warm mapping): each fault maps its page and the fault-around window
    after it. Handles the leading windows whose first page is cached, uptodate, unlocked and
    not the readahead trigger, mapping every such page of each window in one step; returns
    how many faults that was (the caller counts them). The rest goes through the per-page
    path (which sleeps, reads, retries)."""
    mapping = vma.mapping
    if mapping is None or not len(idx) or uffd_disable_fault_around(vma):
        return 0
    pfns, ok = _mappable_cached(vma, mapping, base_addr, idx)
    take = np.zeros(len(idx), dtype=bool)
    faults = 0
    pos = 0
    n = len(idx)
    while pos < n and ok[pos]:
        end = int(np.searchsorted(idx, idx[pos] + FAULT_AROUND_PAGES))
        take[pos:end] = ok[pos:end]
        faults += 1
        pos = end
    if faults:
        _map_cached_ro(vma, table, idx[take], pfns[take])
    return faults


def do_fault_around(vma: VMA, table: int, base_addr: int, idx: np.ndarray) -> int:
    """do_fault_around() → filemap_map_pages(): map, read-only, the cached pages of ``idx``
    (none PTEs of one leaf table, whose entry 0 maps ``base_addr``) that are uptodate and not
    locked, without faulting; returns how many were mapped. Not counted as faults."""
    mapping = vma.mapping
    if mapping is None or not len(idx) or uffd_disable_fault_around(vma):
        return 0
    pfns, ok = _mappable_cached(vma, mapping, base_addr, idx)
    n = int(ok.sum())
    if n:
        _map_cached_ro(vma, table, idx[ok], pfns[ok])
    return n


def _fault_page(vma: VMA, idx: int, flags: int, vmf: VmFault | None) -> tuple[int, int]:
    """__do_fault() → vma->vm_ops->fault: shmem_fault() or filemap_fault()."""
    if vma.shmem is not None:
        return _shmem_get_folio(vma, idx, flags, vmf)
    return filemap_fault(vma, idx, flags, vmf)


def do_read_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """do_read_fault(): map the page-cache page (read-only unless the mapping is writable
    shared and not dirty-tracked)."""
    ret, pfn = _fault_page(vma, vma.linear_page_index(addr), flags, vmf)
    if pfn < 0:
        return ret
    finish_fault(vma, pslot, pfn, False)
    return ret


def do_cow_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """do_cow_fault(): private write fault of a file page: copy it into a new anon page."""
    mm = vma.mm
    mem = mm.mem
    ret, src = _fault_page(vma, vma.linear_page_index(addr), flags, vmf)
    if src < 0:
        return ret
    anon = vma.anon_vma_prepare()
    new = mem.alloc_page(movable=True)
    if new < 0:
        return VM_FAULT_OOM
    mem.mv[new << PAGE_SHIFT : (new + 1) << PAGE_SHIFT] = mem.mv[
        src << PAGE_SHIFT : (src + 1) << PAGE_SHIFT
    ]
    _map_new_anon(vma, addr, pslot, new, anon.id)
    return ret


def _map_new_anon(vma: VMA, addr: int, pslot: int, new: int, anon_id: int) -> None:
    """finish_fault() of a COW page: a new anon-exclusive page, writable and dirty."""
    mm = vma.mm
    mem = mm.mem
    mem.flags[new] |= ANON_FLAGS
    mem.mapping[new] = anon_id
    mem.index[new] = vma.linear_page_index(addr)
    mem.mapcount[new] = 1
    mem.u64[pslot] = (new << PAGE_SHIFT) | _new_anon_pte_bits(vma, True)
    mm.add_rss(MM_ANONPAGES, 1)


def page_mkwrite(vma: VMA, pfn: int, flags: int, vmf: VmFault | None) -> int:
    """do_page_mkwrite() → filemap_page_mkwrite(): wait for a stable page (no write while it
    is under writeback), then mark it dirty in its file. 0, or RETRY (must sleep)."""
    mem = vma.mm.mem
    if mem.flags[pfn] & PG_writeback:
        return _lock_or_retry(vma, pfn, flags, vmf, wb=True)
    obj = mem.mapping_obj(int(mem.mapping[pfn]))
    if isinstance(obj, pagecache.AddressSpace) and not obj.shmem:
        idx = int(mem.index[pfn])
        # block_page_mkwrite(): a page over a hole gets its block now (ENOSPC → SIGBUS).
        if obj.host is not None and not obj.host.prepare_blocks(idx, 1):
            return VM_FAULT_SIGBUS
        pagecache.folio_mark_dirty(obj, idx, pfn)
    return 0


def fault_dirty_shared_page(vma: VMA, flags: int, vmf: VmFault | None) -> int:
    """fault_dirty_shared_page() → balance_dirty_pages_ratelimited(): above the dirty limit
    (``Vfs.dirty_limit_pages``, vm.dirty_bytes; 0 = none) the faulting task writes the file
    back before going on. With ALLOW_RETRY (not TRIED, not NOWAIT) it does so after dropping
    mmap_lock and the fault returns VM_FAULT_COMPLETED (done, lock released); otherwise it
    throttles holding the lock. The fault itself is complete in both cases."""
    mapping = vma.mapping
    vfs = getattr(vma.mm.kernel, "vfs", None)
    if mapping is None or vfs is None or not vfs.dirty_limit_pages or vmf is None:
        return 0
    if flags & FAULT_FLAG_RETRY_NOWAIT:
        return 0
    if sum(m.nr_dirty() for m in vfs.address_spaces()) <= vfs.dirty_limit_pages:
        return 0
    task = vmf.task if flags & FAULT_FLAG_KILLABLE else None
    vmf.wait = FaultWait(vma.mm.mem, -1, task, False, throttle=mapping)
    vmf.unlock = bool(flags & FAULT_FLAG_ALLOW_RETRY) and not flags & FAULT_FLAG_TRIED
    return VM_FAULT_COMPLETED if vmf.unlock else 0


def do_shared_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """do_shared_fault(): ->fault, ->page_mkwrite (dirty the page), map it writable, then
    fault_dirty_shared_page() (may throttle: VM_FAULT_COMPLETED)."""
    ret, pfn = _fault_page(vma, vma.linear_page_index(addr), flags, vmf)
    if pfn < 0:
        return ret
    if vma.shmem is not None:
        vma.mm.mem.flags[pfn] |= PG_dirty
    else:
        r = page_mkwrite(vma, pfn, flags, vmf)
        if r:
            return r | ret
    finish_fault(vma, pslot, pfn, True)
    return ret | fault_dirty_shared_page(vma, flags, vmf)


# ---- dax (fs/dax.c): device frames mapped directly; seed 002's handler COW ----------------------

DAX_COW_DONE = "done_cow"
DAX_COW_LOCKED = "locked"
dax_cow_mode = DAX_COW_DONE
"""How the dax handler finishes a private write fault: DONE_COW (it maps ``cow_page`` itself,
as fs/dax.c does since 4.10) or VM_FAULT_LOCKED with no page while holding the file's
i_mmap lock (the 2014 form of seed 002; the core maps ``cow_page`` and drops that lock)."""
dax_cow_copies = 0
"""Pages copied for dax COW faults (tests check that the core never copies a second time)."""


def _dax_frame(vma: VMA, idx: int, allocate: bool) -> int:
    """dax_iomap_pfn(): the device frame of page ``idx``; -1 for a hole unless ``allocate``
    (a shared write or read: the block is allocated zeroed), -2 when the device is full."""
    ino = vma.dax
    assert ino is not None
    pfns, holes = ino.vfs._dax_pfns(ino, idx, 1)
    if not holes[0]:
        return int(pfns[0])
    if not allocate:
        return -1
    if not ino.prepare_blocks(idx, 1):
        return -2
    pfns, holes = ino.vfs._dax_pfns(ino, idx, 1)
    return int(pfns[0])


def dax_fault_cow_page(vma: VMA, addr: int, pslot: int, idx: int, cow: int, anon_id: int) -> int:
    """dax_fault_cow_page(): fill ``cow_page`` (zeroes for a hole, a copy of the device frame for
    a mapped extent) and map it (DONE_COW), or leave the mapping to the core with the i_mmap
    lock held (VM_FAULT_LOCKED, no page)."""
    global dax_cow_copies
    mem = vma.mm.mem
    src = _dax_frame(vma, idx, False)
    if src < 0:
        mem.frames[cow] = 0
    else:
        mem.frames[cow] = mem.frames[src]
        dax_cow_copies += 1
    if dax_cow_mode == DAX_COW_LOCKED:
        ino = vma.dax
        assert ino is not None
        ino.i_mmap_locked += 1  # i_mmap_lock_read(): truncate cannot unmap under us
        return VM_FAULT_LOCKED
    _map_new_anon(vma, addr, pslot, cow, anon_id)
    return VM_FAULT_DONE_COW


def dax_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """dax_iomap_pte_fault() behind do_read_fault/do_shared_fault/do_cow_fault for a dax file.

    Device frames are mapped directly (a PTE reference and mapcount on top of the device's own
    reference; MM_FILEPAGES). A private read of a hole maps the zero page. A private write goes
    through do_cow_fault's preallocated ``cow_page`` (seed 002): one fault, one copy.
    """
    mm = vma.mm
    mem = mm.mem
    ino = vma.dax
    assert ino is not None
    idx = vma.linear_page_index(addr)
    if idx << PAGE_SHIFT >= ino.size:
        return VM_FAULT_SIGBUS
    if flags & FAULT_FLAG_WRITE and not vma.vm_flags & VM_SHARED:
        # do_cow_fault(): preallocate cow_page, let ->fault do the COW.
        anon = vma.anon_vma_prepare()
        cow = mem.alloc_page(movable=True)
        if cow < 0:
            return VM_FAULT_OOM
        ret = dax_fault_cow_page(vma, addr, pslot, idx, cow, anon.id)
        if ret & VM_FAULT_DONE_COW:
            return 0
        # VM_FAULT_LOCKED and no page: the i_mmap lock is held instead of a page lock.
        try:
            if idx << PAGE_SHIFT >= ino.size:  # truncated meanwhile: never a PTE past EOF
                mem.put_folio(cow)
                return VM_FAULT_SIGBUS
            _map_new_anon(vma, addr, pslot, cow, anon.id)  # no copy: the handler filled it
        finally:
            ino.i_mmap_locked -= 1
        return 0
    shared = bool(vma.vm_flags & VM_SHARED)
    pfn = _dax_frame(vma, idx, shared)
    if pfn == -2:
        return VM_FAULT_SIGBUS  # ENOSPC
    if pfn < 0:
        mem.u64[pslot] = (mem.zero_pfn << PAGE_SHIFT) | vma.vm_page_prot | _PAGE_SPECIAL
        mem.zero_maps += 1
        return 0
    finish_fault(vma, pslot, pfn, bool(flags & FAULT_FLAG_WRITE))
    return 0


def do_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """do_fault(): read → do_read_fault; private write → do_cow_fault; shared → do_shared_fault."""
    if vma.dax is not None:
        return dax_fault(vma, addr, pslot, flags, vmf)
    if not flags & FAULT_FLAG_WRITE:
        return do_read_fault(vma, addr, pslot, flags, vmf)
    if not vma.vm_flags & VM_SHARED:
        return do_cow_fault(vma, addr, pslot, flags, vmf)
    return do_shared_fault(vma, addr, pslot, flags, vmf)


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
            mm.add_rss(MM_SHMEMPAGES if mem.flags[old] & PG_shmem else MM_FILEPAGES, -1)
            mm.add_rss(MM_ANONPAGES, 1)
        mem.mapcount[old] -= 1
        mem.put_folio(mem.compound_head(old))
    return 0


def do_wp_page(
    vma: VMA, addr: int, pslot: int, pte: int, flags: int, vmf: VmFault | None = None
) -> int:
    """do_wp_page(): reuse vs copy decided by refcount (A.10); UNSHARE keeps the PTE read-only."""
    mm = vma.mm
    mem = mm.mem
    unshare = bool(flags & FAULT_FLAG_UNSHARE)
    if not unshare and pte & _PAGE_UFFD_WP and vma.vm_flags & VM_UFFD_WP:
        # userfaultfd_pte_wp(): a write to a uffd-wp page is the monitor's (B.56), unless
        # WP_ASYNC, where the kernel just drops the protection bit (pagemap bit 57, B.60).
        from vkernel.kernel import userfaultfd

        if not userfaultfd.wp_async(vma):
            return userfaultfd.handle_userfault(vma, addr, flags, vmf, VM_UFFD_WP)
        pte &= ~_PAGE_UFFD_WP
        mem.u64[pslot] = pte
    if vma.vm_flags & (VM_SHARED | VM_MAYSHARE):
        if unshare:
            return 0
        if vma.mapping is not None:
            # wp_page_shared() → do_page_mkwrite(): the page is redirtied in its file.
            r = page_mkwrite(vma, (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT, flags, vmf)
            if r:
                return r
        # wp_page_shared(): no COW for shared mappings, just make it writable and dirty.
        mem.u64[pslot] = pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_ACCESSED
        if vma.mapping is not None:
            return fault_dirty_shared_page(vma, flags, vmf)
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


def do_pte_missing(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """do_pte_missing(): an anonymous page, or the VMA's ->fault (shmem, file, dax)."""
    if vma.is_anonymous():
        return do_anonymous_page(vma, addr, pslot, flags, vmf)
    if vma.shmem is not None and (vma.vm_flags & VM_SHARED or not flags & FAULT_FLAG_WRITE):
        return do_shmem_fault(vma, addr, pslot, flags, vmf)
    return do_fault(vma, addr, pslot, flags, vmf)


def handle_pte_marker(
    vma: VMA, addr: int, pslot: int, pte: int, flags: int, vmf: VmFault | None
) -> int:
    """handle_pte_marker(): poison first (VM_FAULT_HWPOISON); a uffd-wp marker is a missing
    page that was write-protected (pte_marker_handle_uffd_wp)."""
    if pte & PTE_MARKER_POISONED:
        return VM_FAULT_HWPOISON
    if pte & ~PTE_MARKER_UFFD_WP or not pte:
        return VM_FAULT_SIGBUS  # an unknown marker
    mem = vma.mm.mem
    if not vma.vm_flags & VM_UFFD_WP:
        # pte_marker_clear(): a leftover marker of an unregistered range is just dropped; the
        # CPU's retried access faults on the none PTE (run here at once).
        mem.u64[pslot] = 0
        return handle_pte_fault(vma, addr, pslot, flags, vmf)
    ret = do_pte_missing(vma, addr, pslot, flags, vmf)
    new = mem.u64.item(pslot)
    if ret & (VM_FAULT_ERROR | VM_FAULT_RETRY | VM_FAULT_COMPLETED) or not new & _PAGE_PRESENT:
        # A MISSING/MINOR userfault (the marker stays for COPY/CONTINUE), a sleep (the retry
        # finds the marker again) or an error.
        return ret
    # do_anonymous_page()/set_pte_range(): vmf_orig_pte_uffd_wp() → pte_mkuffd_wp(), which
    # also write-protects. A write then faults again on the protected page: the monitor's WP
    # fault (or WP_ASYNC dropping the bit), as the CPU's retried store would.
    mem.u64[pslot] = (new | _PAGE_UFFD_WP) & ~_PAGE_RW
    if flags & FAULT_FLAG_WRITE:
        return handle_pte_fault(vma, addr, pslot, flags, vmf) | (ret & VM_FAULT_MAJOR)
    return ret


def handle_pte_fault(vma: VMA, addr: int, pslot: int, flags: int, vmf: VmFault | None) -> int:
    """handle_pte_fault()."""
    mem = vma.mm.mem
    pte = mem.u64.item(pslot)
    if not pte:
        return do_pte_missing(vma, addr, pslot, flags, vmf)
    if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return handle_pte_marker(vma, addr, pslot, pte, flags, vmf)
    if not pte & _PAGE_PRESENT and vma.is_accessible():
        # do_numa_page(): restore the VMA's protection. A PROT_NONE VMA's entries are not NUMA
        # hints: a FOLL_FORCE write or unshare goes on to do_wp_page below.
        mem.u64[pslot] = pte_modify(pte, vma.vm_page_prot)
        return 0
    if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE):
        if not pte & _PAGE_RW:
            return do_wp_page(vma, addr, pslot, pte, flags, vmf)
        if flags & FAULT_FLAG_WRITE:
            pte |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    mem.u64[pslot] = pte | _PAGE_ACCESSED
    return 0


def thp_suitable(vma: VMA, haddr: int) -> bool:
    """thp_vma_suitable_order() + allowable orders: the aligned 2 MiB lies inside a THP VMA."""
    return (
        haddr >= vma.vm_start
        and haddr + PMD_SIZE <= vma.vm_end
        and vma.thp_enabled(vma.mm.kernel.config.thp)
    )


def thp_eligible(vma: VMA, haddr: int) -> bool:
    """thp_suitable() for a VMA that may get a huge PMD by a fault. A MISSING- or WP-registered
    VMA faults by pages (vkernel: no huge page is installed by a userfault VMA's faults; a
    MISSING fault on a none PMD still leaves the PMD none, see __handle_mm_fault)."""
    return not vma.vm_flags & (VM_UFFD_MISSING | VM_UFFD_WP) and thp_suitable(vma, haddr)


def __handle_mm_fault(vma: VMA, addr: int, flags: int, vmf: VmFault | None = None) -> int:
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
    elif (
        not e
        and vma.vm_flags & VM_UFFD_MISSING
        and vma.is_anonymous()
        and not vma.vm_flags & VM_SHARED
        and thp_suitable(vma, addr & PMD_MASK)
    ):
        # do_huge_pmd_anonymous_page() → handle_userfault(): a MISSING fault of a THP-suitable
        # VMA leaves the PMD none (no page table yet), so UFFDIO_MOVE can move a whole PMD in.
        from vkernel.kernel.userfaultfd import handle_userfault

        vma.anon_vma_prepare()  # vmf_anon_prepare()
        return handle_userfault(vma, addr, flags, vmf, VM_UFFD_MISSING)
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
    return handle_pte_fault(
        vma, addr, t * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511), flags, vmf
    )


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


def handle_mm_fault(
    vma: VMA, address: int, flags: int, task: Task | None = None, vmf: VmFault | None = None
) -> int:
    """handle_mm_fault(): resolve one fault; returns VM_FAULT_* bits (0 on success).

    ``task`` is ``current`` for the accounting (pgfault, min_flt/maj_flt). Synchronous: a
    handler that must sleep returns VM_FAULT_RETRY and describes the sleep in ``vmf`` (see the
    module docstring); without ``vmf`` the caller cannot sleep and gets RETRY with mmap_lock
    held, as RETRY_NOWAIT would. With ``KernelConfig.fault_retry`` off, ALLOW_RETRY is ignored
    (every sleep happens with mmap_lock held) except under RETRY_NOWAIT.
    """
    if not flags & FAULT_FLAG_RETRY_NOWAIT and not vma.mm.kernel.config.fault_retry:
        flags &= ~(FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_TRIED)
    flags, ret = sanitize_fault_flags(vma, flags)
    if not ret:
        if vmf is not None:
            vmf.wait = None
            vmf.task = task
            vmf.real_address = address
            if vmf.addr != address & PAGE_MASK:
                vmf.addr = address & PAGE_MASK
                vmf.major = vmf.reread = False
        hook = _TEST_FAULT_HOOKS.get(vma) if _TEST_FAULT_HOOKS else None
        r = hook(vma, address & PAGE_MASK, flags) if hook is not None else None
        ret = __handle_mm_fault(vma, address & PAGE_MASK, flags, vmf) if r is None else r
    mm_account_fault(vma.mm, task, flags, ret)
    return ret


async def handle_mm_fault_sleepable(vma: VMA, address: int, flags: int, task: Task | None) -> int:
    """handle_mm_fault() for a caller holding mmap_lock for read that may sleep.

    Returns what Linux's handle_mm_fault returns: VM_FAULT_RETRY means mmap_lock was released
    (unless RETRY_NOWAIT) after the sleep the handler needed; the caller retakes the lock and
    faults again with TRIED. Sleeps that must hold the lock are taken here and the fault re-run.
    A kill during a killable sleep under the lock raises EINTR (the lock is still held).
    """
    vmf = VmFault()
    while True:
        ret = handle_mm_fault(vma, address, flags, task, vmf)
        w = vmf.wait
        if w is None:
            return ret
        if vmf.unlock:
            vma.mm.mmap_lock.read_unlock()
            try:
                await w.sleep()
            except KernelError:
                pass  # killed: the caller sees the fatal signal after RETRY
            return ret
        await w.sleep()


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
                shm = (mem.flags[heads] & PG_shmem) != 0
                nshm = int(np.count_nonzero(shm))
                if nshm:
                    mm.add_rss(MM_SHMEMPAGES, -nshm)
                if nanon + nshm != len(pfns):
                    mm.add_rss(MM_FILEPAGES, nanon + nshm - len(pfns))
                dirty = ~anon & ((pv & _U64_HWDIRTY) != 0)
                if dirty.any():
                    # set_page_dirty(): shmem pages, and file pages in their file (dax
                    # device frames have no page cache to dirty).
                    mem.flags[pfns[dirty & shm]] |= np.uint32(PG_dirty)
                    for p in pfns[dirty & ~shm].tolist():
                        obj = mem.mapping_obj(int(mem.mapping[p]))
                        if isinstance(obj, pagecache.AddressSpace):
                            pagecache.folio_mark_dirty(obj, int(mem.index[p]), p)
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
    """zap_page_range_single(): MADV_DONTNEED's zap of part of one VMA. Without
    ZAP_FLAG_DROP_MARKER a uffd-wp registered shmem/file VMA keeps its protection: a uffd-wp
    PTE (or marker) becomes PTE_MARKER_UFFD_WP (zap_install_uffd_wp_if_needed); on anon a zap
    drops everything (an async-WP range then reads as written)."""
    start, end = max(start, vma.vm_start), min(end, vma.vm_end)
    if vma.is_anonymous() or not vma.vm_flags & VM_UFFD_WP:
        unmap_page_range(vma.mm, start, end)
        return
    with zap_install_uffd_wp_if_needed(vma, start, end):
        unmap_page_range(vma.mm, start, end)


@contextmanager
def zap_install_uffd_wp_if_needed(vma: VMA, start: int, end: int) -> Iterator[None]:
    """zap_install_uffd_wp_if_needed() around a zap of [start, end) in a uffd-wp registered
    shmem/file VMA without ZAP_FLAG_DROP_MARKER: every uffd-wp PTE or marker the zap cleared
    becomes PTE_MARKER_UFFD_WP (the protection outlives the mapping; poison is zapped)."""
    mm = vma.mm
    u = mm.mem.u64
    split_huge_pmds_in(mm, start, end)
    keep: list[np.ndarray] = []
    for slot, a, b in walk_pmds(mm, start, end):
        e = u.item(slot)
        if not e or e & _PAGE_PSE:
            continue
        base = table_of(e) * PTRS_PER_TABLE + ((a >> PAGE_SHIFT) & 511)
        s = u[base : base + ((b - a) >> PAGE_SHIFT)]
        wp = (s & np.uint64(_PAGE_UFFD_WP)) != 0
        wp &= (s & np.uint64(PTE_MARKER_POISONED)) == 0  # poison is zapped (should_zap_cows)
        keep.append(base + np.flatnonzero(wp))
    yield
    for slots in keep:
        # Only where the zap emptied the PTE (a private mapping's COW copies stay mapped).
        slots = slots[u[slots] == 0]
        u[slots] = np.uint64(PTE_MARKER_UFFD_WP)


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


# ---- rmap of file pages: page_mkclean, unmap_mapping_range (mm/rmap.c, mm/memory.c) ------------


def _file_pte_slot(vma: VMA, index: int) -> int:
    """The PTE slot mapping file page ``index`` in ``vma`` (vma_address + page_vma_mapped_walk),
    or -1 when the VMA does not cover it or has no table there."""
    addr = vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)
    if not vma.vm_start <= addr < vma.vm_end:
        return -1
    mm = vma.mm
    slot = pmd_slot(mm, addr)
    if slot < 0:
        return -1
    e = mm.mem.u64.item(slot)
    if not e or e & _PAGE_PSE:
        return -1
    return table_of(e) * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511)


def page_mkclean(vmas: Iterable[VMA], index: int, pfn: int) -> bool:
    """folio_mkclean(): write-protect and clean every shared PTE mapping ``pfn`` at file page
    ``index``, so the next store faults (page_mkwrite) and redirties the page. Returns whether
    a PTE was dirty. (One CPU per mm and no lazy TLB in vkernel: nothing to flush.)"""
    dirty = False
    for vma in list(vmas):
        if not vma.vm_flags & VM_SHARED:
            continue  # private mappings map file pages read-only already
        slot = _file_pte_slot(vma, index)
        if slot < 0:
            continue
        u = vma.mm.mem.u64
        pte = u.item(slot)
        if pte & _PAGE_PRESENT and (pte & _PAGE_PFN_MASK) >> PAGE_SHIFT == pfn:
            dirty |= bool(pte & _PAGE_DIRTY)
            u[slot] = pte & ~(_PAGE_RW | _PAGE_DIRTY)
    return dirty


def unmap_mapping_range(vmas: Iterable[VMA], first: int, last: int, even_cows: bool) -> None:
    """unmap_mapping_range(): zap the PTEs of file pages [first, last) in every VMA mapping the
    file (truncate, hole punch: never a PTE past EOF); private COW copies are kept unless
    ``even_cows`` (truncate drops them too, as truncate_pagecache does)."""
    for vma in list(vmas):
        if vma.detached:
            continue
        lo = max(vma.vm_start, vma.vm_start + ((first - vma.vm_pgoff) << PAGE_SHIFT))
        hi = min(vma.vm_end, vma.vm_start + ((last - vma.vm_pgoff) << PAGE_SHIFT))
        if lo >= hi:
            continue
        if vma.vm_flags & VM_UFFD_WP:
            # unmap_mapping_pages() zaps without ZAP_FLAG_DROP_MARKER: uffd-wp survives a
            # truncate or hole punch as markers.
            with zap_install_uffd_wp_if_needed(vma, lo, hi):
                _unmap_mapping_vma(vma, lo, hi, even_cows)
            continue
        _unmap_mapping_vma(vma, lo, hi, even_cows)


def _unmap_mapping_vma(vma: VMA, lo: int, hi: int, even_cows: bool) -> None:
    """unmap_mapping_range_vma(): zap the file pages of [lo, hi) of one VMA."""
    if even_cows or vma.vm_flags & VM_SHARED:
        unmap_page_range(vma.mm, lo, hi)
        return
    # Keep anonymous COW copies in private mappings: zap only PTEs of file pages.
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    for slot, a, b in walk_pmds(mm, lo, hi):
        e = u.item(slot)
        if not e or e & _PAGE_PSE:
            continue
        base = table_of(e) * PTRS_PER_TABLE
        i0 = (a >> PAGE_SHIFT) & 511
        ptes = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
        pfns = ((ptes & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
        keep = ((ptes & U64_PRESENT) == 0) | (pfns == mem.zero_pfn)
        keep |= (mem.flags[pfns] & PG_anon) != 0
        for j in np.flatnonzero(~keep).tolist():
            zap_pte_range(mm, table_of(e), i0 + j, i0 + j + 1)


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
    # vma_wants_writenotify(): a shared disk mapping stays write-protected where the PTE is
    # clean, so the first store still goes through page_mkwrite (can_change_pte_writable()).
    writenotify = vma.mapping is not None and bool(vma.vm_flags & VM_SHARED)
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
        if writenotify:
            clean = (old & np.uint64(_PAGE_DIRTY)) == 0
            new[clean] &= ~np.uint64(_PAGE_RW)
        if try_writable and newprot & _PAGE_PRESENT:
            pfns = ((old & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
            ok = (mem.flags[pfns] & PG_anon_exclusive) != 0
            ok &= (old & np.uint64(_PAGE_SPECIAL | _PAGE_UFFD_WP)) == 0
            new[ok] |= np.uint64(_PAGE_RW)
        s[pm] = new
