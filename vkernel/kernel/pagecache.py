"""The page cache (mm/filemap.c, mm/readahead.c, mm/page-writeback.c, mm/truncate.c).

An :class:`AddressSpace` maps a file's page index to a pfn; each cached page holds one
reference (the cache's), and struct page records ``mapping`` (the address space's id, from
``PhysMem.register_mapping``) and ``index``. The shmem object behind anonymous shared
mappings (:class:`vkernel.kernel.vma.ShmemObject`) is an AddressSpace too, and so is every
shmem file's: the audit counts every cache's references the same way.

The page lock is PG_locked plus a per-pfn wait queue (wait_on_page_bit): ``folio_lock``,
``folio_lock_killable`` (EINTR when the task is killed), ``folio_unlock`` waking every
waiter. Reads of missing pages run as background bios that own the locked pages and unlock
them on completion; every reader (the one that started the I/O included) waits on the page
lock killably, so a killed reader unwinds with EINTR while the I/O completes on its own, and
concurrent readers of one page share one I/O.
"""

from __future__ import annotations

import asyncio
import errno
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from vkernel.kernel.errors import KernelError
from vkernel.kernel.uapi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_dirty,
    PG_locked,
    PG_lru,
    PG_shmem,
    PG_swapbacked,
    PG_uptodate,
    PG_writeback,
)

if TYPE_CHECKING:
    from vkernel.kernel.blockdev import BlockDevice
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.task import Task
    from vkernel.kernel.vma import VMA

IntArray = npt.NDArray[np.int64]

DEFAULT_RA_PAGES = 32
"""Readahead window in pages (read_ahead_kb = 128)."""
MAX_BIO_PAGES = 256
"""Largest bio the page cache builds (1 MiB, BIO_MAX_VECS)."""
SHMEM_FLAGS = PG_shmem | PG_uptodate | PG_swapbacked | PG_lru
FILE_FLAGS = PG_lru


class PageHost(Protocol):
    """What the page cache needs from the inode behind a disk-backed address space (a_ops)."""

    bdev: BlockDevice | None

    def bmap_range(self, first: int, n: int) -> IntArray:
        """bmap(): device block of pages [first, first+n), -1 for holes."""
        ...

    def prepare_blocks(self, first: int, n: int) -> int:
        """write_begin()'s block allocation: how many pages from ``first`` have a block."""
        ...


class AddressSpace:
    """struct address_space: the page cache of one file (i_pages) and its state."""

    shmem = False
    """Pages are memory only (tmpfs): never read from or written to a device."""

    def __init__(self, mem: PhysMem, size_bytes: int = 0) -> None:
        self.mem = mem
        self.id = mem.register_mapping(self)
        self.size = size_bytes
        """i_size in bytes (for shmem objects, also the SIGBUS limit of mappings)."""
        self.pages: dict[int, int] = {}
        """Page index → pfn (i_pages); each entry holds one reference on the frame."""
        self.dirty_time: dict[int, float] = {}
        """Page index → monotonic time it was first dirtied (for dirty_expire writeback)."""
        self.host: PageHost | None = None
        self.wb_err = 0
        """errseq of writeback: the errno of a failed writeback, reported once by fsync."""
        self.ra_pages = DEFAULT_RA_PAGES
        self.ra_next = -1
        """file_ra_state: the page a sequential reader reads next (-1: none yet)."""
        self.mmap_ra_mark = -1
        """The page whose fault starts the next mmap readahead window (PG_readahead)."""
        self.mmap_ra_end = -1
        """Where the current mmap readahead window ends."""
        self.mmap_ra_size = 0
        """The current mmap readahead window in pages (doubles per sequential window)."""
        self.io: set[asyncio.Task[None]] = set()
        """Read bios in flight (they own their locked pages)."""
        self.i_mmap: set[VMA] = set()
        """mapping->i_mmap: the VMAs mapping this file (for unmap_mapping_range)."""

    @property
    def nrpages(self) -> int:
        """mapping->nrpages."""
        return len(self.pages)

    def nr_dirty(self) -> int:
        """Pages marked dirty in this cache."""
        return len(self.dirty_time)

    def release(self) -> None:
        """Forget the mapping id once the cache is empty and the inode gone."""
        self.mem.unregister_mapping(self.id)


# ---- the page lock and the writeback bit (mm/filemap.c wait_on_page_bit) --------------------


class PageWaitTable:
    """page_waitqueue(): per-pfn lists of sleepers on PG_locked or PG_writeback."""

    def __init__(self) -> None:
        self.waiters: dict[int, list[asyncio.Future[None]]] = {}

    def wake(self, pfn: int) -> None:
        """wake_up_page(): wake every sleeper on ``pfn`` (they recheck their condition)."""
        for fut in self.waiters.pop(pfn, ()):
            if not fut.done():
                fut.set_result(None)


_tables: weakref.WeakKeyDictionary[PhysMem, PageWaitTable] = weakref.WeakKeyDictionary()


def page_waitqueue(mem: PhysMem) -> PageWaitTable:
    """The wait table of ``mem`` (one per machine, like the hashed page wait queues)."""
    t = _tables.get(mem)
    if t is None:
        t = _tables[mem] = PageWaitTable()
    return t


def eintr() -> KernelError:
    """The error a killed sleeper unwinds with."""
    return KernelError(errno.EINTR, "killed while waiting on a page")


async def _wait_page(mem: PhysMem, pfn: int, task: Task | None, ready: Callable[[], bool]) -> None:
    """folio_wait_bit_common(): sleep until ``ready()``; killable when ``task`` is given."""
    wq = page_waitqueue(mem)
    loop = asyncio.get_running_loop()
    while not ready():
        if task is not None and task.fatal_signal_pending():
            raise eintr()
        fut: asyncio.Future[None] = loop.create_future()
        wq.waiters.setdefault(pfn, []).append(fut)

        def hook(f: asyncio.Future[None] = fut) -> None:
            if not f.done():
                f.set_result(None)

        if task is not None:
            task.add_kill_hook(hook)
        try:
            await fut
        finally:
            if task is not None:
                task.remove_kill_hook(hook)
            lst = wq.waiters.get(pfn)
            if lst is not None and fut in lst:
                lst.remove(fut)
                if not lst:
                    del wq.waiters[pfn]
    if task is not None and task.fatal_signal_pending():
        raise eintr()


def folio_test_locked(mem: PhysMem, pfn: int) -> bool:
    """folio_test_locked()."""
    return bool(mem.flags[pfn] & PG_locked)


def folio_trylock(mem: PhysMem, pfn: int) -> bool:
    """folio_trylock(): take the page lock if free."""
    if mem.flags[pfn] & PG_locked:
        return False
    mem.flags[pfn] |= PG_locked
    return True


async def folio_lock(mem: PhysMem, pfn: int, task: Task | None = None) -> None:
    """folio_lock() (or folio_lock_killable() when ``task`` is given): sleep for PG_locked."""
    while not folio_trylock(mem, pfn):
        await _wait_page(mem, pfn, task, lambda: not folio_test_locked(mem, pfn))


async def folio_lock_killable(mem: PhysMem, pfn: int, task: Task) -> None:
    """folio_lock_killable(): the page lock, or EINTR if ``task`` is killed while waiting."""
    await folio_lock(mem, pfn, task)


lock_page = folio_lock


def folios_unlock(mem: PhysMem, pfns: IntArray) -> None:
    """folio_unlock() of many pages at once (end of a read bio)."""
    mem.flags[pfns] &= ~np.uint32(PG_locked)
    wq = page_waitqueue(mem)
    if wq.waiters:
        for p in pfns.tolist():
            if p in wq.waiters:
                wq.wake(p)


def folio_unlock(mem: PhysMem, pfn: int) -> None:
    """folio_unlock(): clear PG_locked and wake the waiters."""
    mem.flags[pfn] &= ~np.uint32(PG_locked)
    page_waitqueue(mem).wake(pfn)


unlock_page = folio_unlock


async def folio_wait_locked(mem: PhysMem, pfn: int, task: Task | None = None) -> None:
    """folio_wait_locked_killable(): wait for the lock to be released without taking it.

    This is what __folio_lock_or_retry() does when it may drop mmap_lock: wait, then retry.
    """
    await _wait_page(mem, pfn, task, lambda: not folio_test_locked(mem, pfn))


async def folio_wait_writeback(mem: PhysMem, pfn: int, task: Task | None = None) -> None:
    """folio_wait_writeback(): sleep while PG_writeback is set."""
    await _wait_page(mem, pfn, task, lambda: not mem.flags[pfn] & PG_writeback)


def folio_end_writeback(mem: PhysMem, pfn: int) -> None:
    """folio_end_writeback(): clear PG_writeback and wake the waiters."""
    mem.flags[pfn] &= ~np.uint32(PG_writeback)
    page_waitqueue(mem).wake(pfn)


# ---- cache insertion and removal ------------------------------------------------------------


def filemap_add_folios(mapping: AddressSpace, indices: list[int], locked: bool) -> IntArray:
    """filemap_add_folio() for each index: fresh zeroed pages, cache-referenced, maybe locked.

    Raises ENOMEM (ENOSPC for shmem) when memory is exhausted (no reclaim is modelled).
    """
    mem = mapping.mem
    pfns = mem.alloc_pages_bulk(len(indices), movable=True)
    if pfns is None:
        err = errno.ENOSPC if mapping.shmem else errno.ENOMEM
        raise KernelError(err, "out of memory for the page cache")
    flags = SHMEM_FLAGS if mapping.shmem else FILE_FLAGS
    if locked:
        flags |= PG_locked
    mem.flags[pfns] |= np.uint32(flags)
    mem.mapping[pfns] = mapping.id
    mem.index[pfns] = np.asarray(indices, dtype=np.int64)
    mapping.pages.update(zip(indices, pfns.tolist(), strict=True))
    return pfns


def folio_mark_dirty(mapping: AddressSpace, index: int, pfn: int) -> None:
    """folio_mark_dirty(): PG_dirty, and the time for dirty_expire_centisecs."""
    mapping.mem.flags[pfn] |= PG_dirty
    mapping.dirty_time.setdefault(index, time.monotonic())


def _remove_page(mapping: AddressSpace, index: int) -> int:
    """__filemap_remove_folio(): out of the cache; returns the pfn whose cache ref is dropped."""
    pfn = mapping.pages.pop(index)
    mapping.dirty_time.pop(index, None)
    mem = mapping.mem
    mem.flags[pfn] &= ~np.uint32(PG_dirty)
    return pfn


def _drop_refs(mapping: AddressSpace, pfns: list[int]) -> None:
    """folio_put() of the cache's references: a frame still referenced elsewhere survives."""
    if pfns:
        mem = mapping.mem
        arr = np.array(pfns, dtype=np.int64)
        survivors = arr[mem.refcount[arr] > 1]
        if len(survivors):
            # Detached from the file, kept alive by its other users (folio->mapping = NULL).
            mem.mapping[survivors] = 0
        mem.put_folios(mem.compound_heads(arr))


def truncate_inode_pages_sync(mapping: AddressSpace, first: int, last: int) -> list[int]:
    """The non-sleeping part of truncate_inode_pages_range(): drop idle pages in [first, last).

    Returns the indices of pages that are locked or under writeback (the caller waits).
    """
    mem = mapping.mem
    if last - first < len(mapping.pages):
        idxs = [i for i in range(first, last) if i in mapping.pages]
    else:
        idxs = [i for i in mapping.pages if first <= i < last]
    busy: list[int] = []
    drop: list[int] = []
    for i in idxs:
        pfn = mapping.pages[i]
        if mem.flags[pfn] & (PG_locked | PG_writeback):
            busy.append(i)
        else:
            drop.append(_remove_page(mapping, i))
    _drop_refs(mapping, drop)
    return busy


async def truncate_inode_pages_range(mapping: AddressSpace, first: int, last: int) -> None:
    """truncate_inode_pages_range(): remove pages [first, last), waiting for locked ones."""
    busy = truncate_inode_pages_sync(mapping, first, last)
    mem = mapping.mem
    while busy:
        i = busy.pop()
        pfn = mapping.pages.get(i)
        if pfn is None:
            continue
        await folio_lock(mem, pfn)
        try:
            await folio_wait_writeback(mem, pfn)
        finally:
            folio_unlock(mem, pfn)
        if mapping.pages.get(i) == pfn and not mem.flags[pfn] & (PG_locked | PG_writeback):
            _drop_refs(mapping, [_remove_page(mapping, i)])
        elif i in mapping.pages:
            busy.append(i)


def zero_user_range(mapping: AddressSpace, pos: int, end: int) -> None:
    """folio_zero_range() on the cached pages covering [pos, end) (partial-page truncation)."""
    mem = mapping.mem
    while pos < end:
        idx = pos >> PAGE_SHIFT
        off = pos & (PAGE_SIZE - 1)
        n = min(end - pos, PAGE_SIZE - off)
        pfn = mapping.pages.get(idx)
        if pfn is not None and mem.flags[pfn] & PG_uptodate:
            mem.frames[pfn, off : off + n] = 0
            if not mapping.shmem:
                folio_mark_dirty(mapping, idx, pfn)
        pos += n


# ---- reading (filemap_read, readahead, read_folio) --------------------------------------------


def _count(mapping: AddressSpace, name: str, pages: int) -> None:
    """count_vm_events(PGPGIN/PGPGOUT) in KiB, as /proc/vmstat reports them."""
    mapping.mem.vmstat.count(name, pages * (PAGE_SIZE // 1024))


async def _read_bio(mapping: AddressSpace, bdev: BlockDevice, block: int, pfns: IntArray) -> None:
    """mpage_read_folio()/end_bio: one bio; on error, retry page by page (pages that fail stay
    !uptodate, so their readers get EIO)."""
    mem = mapping.mem
    try:
        try:
            await bdev.submit_bio(0, block, mem, pfns, None)
            mem.flags[pfns] |= np.uint32(PG_uptodate)
            _count(mapping, "pgpgin", len(pfns))
        except KernelError:
            if len(pfns) == 1:
                raise
            for k, p in enumerate(pfns.tolist()):
                one = np.array([p], dtype=np.int64)
                try:
                    await bdev.submit_bio(0, block + k, mem, one, None)
                except KernelError:
                    continue
                mem.flags[p] |= PG_uptodate
                _count(mapping, "pgpgin", 1)
    except KernelError:
        pass
    finally:
        folios_unlock(mem, pfns)


def _start_io(mapping: AddressSpace, coro: Awaitable[None]) -> None:
    """Run a bio in the background: it owns its locked pages until completion."""
    t = asyncio.ensure_future(coro)
    mapping.io.add(t)
    t.add_done_callback(mapping.io.discard)


def page_cache_ra_unbounded(mapping: AddressSpace, first: int, n: int) -> None:
    """page_cache_ra_unbounded(): add the missing pages of [first, first+n) locked, start reads.

    Holes (no device block) become uptodate zero pages at once; runs of pages contiguous on
    the device become one bio each (up to MAX_BIO_PAGES).
    """
    size_pages = (mapping.size + PAGE_SIZE - 1) >> PAGE_SHIFT
    last = min(first + n, size_pages)
    missing = [i for i in range(first, last) if i not in mapping.pages]
    if not missing:
        return
    host = mapping.host
    mem = mapping.mem
    if mapping.shmem or host is None or host.bdev is None:
        pfns = filemap_add_folios(mapping, missing, locked=False)
        mem.flags[pfns] |= np.uint32(PG_uptodate)
        return
    pfns = filemap_add_folios(mapping, missing, locked=True)
    marr = np.asarray(missing, dtype=np.int64)
    lo = int(marr[0])
    blocks = host.bmap_range(lo, int(marr[-1]) - lo + 1)[marr - lo]
    holes = blocks < 0
    if holes.any():
        hp = pfns[holes]
        mem.flags[hp] |= np.uint32(PG_uptodate)
        folios_unlock(mem, hp)
    keep = np.flatnonzero(~holes)
    if not len(keep):
        return
    bdev = host.bdev
    ki = marr[keep]
    kb = blocks[keep]
    # One bio per run contiguous in the file and on the device, at most MAX_BIO_PAGES long.
    brk = np.flatnonzero((np.diff(ki) != 1) | (np.diff(kb) != 1)) + 1
    starts = np.concatenate([[0], brk]).tolist()
    ends = [*brk.tolist(), len(keep)]
    for s0, e0 in zip(starts, ends, strict=True):
        for s1 in range(s0, e0, MAX_BIO_PAGES):
            e1 = min(e0, s1 + MAX_BIO_PAGES)
            sel = keep[s1:e1]
            _start_io(mapping, _read_bio(mapping, bdev, int(kb[s1]), pfns[sel]))


async def filemap_get_folio_uptodate(
    mapping: AddressSpace, index: int, task: Task | None, ra: int = 0
) -> int:
    """filemap_fault()/read_cache_folio(): the uptodate page at ``index`` (reads it in).

    Waits killably on the page lock (EINTR); EIO if the read failed. The caller holds no
    reference: use the pfn before the next sleep.
    """
    mem = mapping.mem
    retried = False
    while True:
        pfn = mapping.pages.get(index)
        if pfn is None:
            page_cache_ra_unbounded(mapping, index, max(1, ra))
            pfn = mapping.pages.get(index)
            if pfn is None:
                raise KernelError(errno.EIO, "page beyond end of file")
        f = int(mem.flags[pfn])
        if f & PG_uptodate:
            return pfn
        if f & PG_locked:
            await folio_wait_locked(mem, pfn, task)
            if mapping.pages.get(index) == pfn and not mem.flags[pfn] & (PG_uptodate | PG_locked):
                raise KernelError(errno.EIO, f"I/O error reading page {index}")
            continue
        if retried:
            raise KernelError(errno.EIO, f"I/O error reading page {index}")
        # !uptodate and unlocked: an earlier read failed; filemap_read_folio() once more.
        retried = True
        _drop_refs(mapping, [_remove_page(mapping, index)])


async def filemap_read(mapping: AddressSpace, pos: int, count: int, task: Task | None) -> bytes:
    """filemap_read(): copy up to ``count`` bytes at ``pos`` out of the cache, reading misses.

    Like Linux, an I/O error after some bytes were copied returns the short count; an error
    before any byte is raised (EIO, EINTR).
    """
    end = min(pos + count, mapping.size)
    if pos >= end:
        return b""
    out = bytearray(end - pos)
    mem = mapping.mem
    done = 0
    shmem = mapping.shmem
    while pos + done < end:
        cur = pos + done
        idx = cur >> PAGE_SHIFT
        last_idx = (end - 1) >> PAGE_SHIFT
        pfn = mapping.pages.get(idx)
        # Sequential reader: start the next window's I/O now (async readahead), so it is in
        # flight while this window is copied out (page_cache_async_ra).
        if not shmem and mapping.ra_pages and idx > 0 and mapping.ra_next == idx:
            nxt = last_idx + 1
            if nxt not in mapping.pages and nxt << PAGE_SHIFT < mapping.size:
                try:
                    page_cache_ra_unbounded(mapping, nxt, max(mapping.ra_pages, nxt - idx))
                except KernelError:
                    pass  # readahead is best effort (no memory: no readahead)
        if (pfn is None and not shmem) or (pfn is not None and not mem.flags[pfn] & PG_uptodate):
            try:
                ra = max(last_idx - idx + 1, mapping.ra_pages)
                await filemap_get_folio_uptodate(mapping, idx, task, ra)
            except KernelError:
                if done:
                    break
                raise
            if task is not None and task.fatal_signal_pending():
                if done:
                    break
                raise eintr()
        # Copy the run of uptodate cached pages from here without sleeping, in one gather.
        get = mapping.pages.get
        # shmem_file_read_iter(): holes read the zero page; a file's hole ends the run.
        hole = mem.zero_pfn if shmem else -1
        run = [get(i, hole) for i in range(idx, last_idx + 1)]
        if not shmem and -1 in run:
            run = run[: run.index(-1)]
        if run:
            arr = np.fromiter(run, dtype=np.int64, count=len(run))
            bad = np.flatnonzero((mem.flags[arr] & PG_uptodate) == 0)
            if len(bad):
                arr = arr[: bad[0]]
        if not run or not len(arr):
            continue
        off = (pos + done) & (PAGE_SIZE - 1)
        n = min(end - pos - done, len(arr) * PAGE_SIZE - off)
        flat = np.frombuffer(out, dtype=np.uint8)
        flat[done : done + n] = mem.frames[arr].reshape(-1)[off : off + n]
        done += n
        mapping.ra_next = (pos + done) >> PAGE_SHIFT
    return bytes(out[:done]) if done != len(out) else bytes(out)


# ---- writing ---------------------------------------------------------------------------------


async def generic_perform_write(
    mapping: AddressSpace,
    pos: int,
    data: bytes | memoryview,
    task: Task | None,
    prepare: Callable[[int, int], int],
) -> int:
    """generic_perform_write(): copy ``data`` into cache pages at ``pos``, marking them dirty.

    ``prepare(first, n)`` reserves backing store for pages [first, first+n) (block allocation,
    ``write_begin``) and returns how many pages from ``first`` it could reserve (ENOSPC for
    none). Partial pages not yet uptodate are read first. Returns the bytes written (short
    on ENOSPC or a read error after progress).
    """
    mem = mapping.mem
    mv = memoryview(data).cast("B")
    total = len(mv)
    done = 0
    while done < total:
        cur = pos + done
        idx = cur >> PAGE_SHIFT
        off = cur & (PAGE_SIZE - 1)
        n = min(total - done, PAGE_SIZE - off)
        try:
            pfn = mapping.pages.get(idx)
            partial = off != 0 or (n < PAGE_SIZE and cur + n < mapping.size)
            if (
                partial
                and (idx << PAGE_SHIFT) < mapping.size
                and (pfn is None or not mem.flags[pfn] & PG_uptodate)
            ):
                # Read the old page before write_begin allocates a block for a hole: the
                # hole must read as zeros, not as whatever the new block held.
                pfn = await filemap_get_folio_uptodate(mapping, idx, task)
            last_idx = (pos + total - 1) >> PAGE_SHIFT
            got = prepare(idx, last_idx - idx + 1)
            if got <= 0:
                raise KernelError(errno.ENOSPC, "no space left on device")
            limit = idx + got
            pfn = mapping.pages.get(idx)
            if pfn is None and not partial:
                # Whole pages: fresh cache pages are zero-filled and then overwritten.
                run = min(got, (pos + total - cur) >> PAGE_SHIFT)
                if run > 0:
                    missing = [i for i in range(idx, idx + run) if i not in mapping.pages]
                    if missing:
                        pfns = filemap_add_folios(mapping, missing, locked=False)
                        mem.flags[pfns] |= np.uint32(PG_uptodate)
                pfn = mapping.pages.get(idx)
            if pfn is None or not mem.flags[pfn] & PG_uptodate:
                if partial and (idx << PAGE_SHIFT) < mapping.size:
                    continue  # the page went away while we slept: start over
                if pfn is None:
                    pfn = int(filemap_add_folios(mapping, [idx], locked=False)[0])
                else:
                    await folio_wait_locked(mem, pfn, task)
                    if mapping.pages.get(idx) != pfn:
                        continue
                mem.flags[pfn] |= PG_uptodate
        except KernelError:
            if done:
                break
            raise
        # Copy page after page while they are cached and uptodate (no sleep in between).
        while done < total:
            cur = pos + done
            idx = cur >> PAGE_SHIFT
            pfn = mapping.pages.get(idx)
            if idx >= limit or pfn is None or not mem.flags[pfn] & PG_uptodate:
                break
            off = cur & (PAGE_SIZE - 1)
            n = min(total - done, PAGE_SIZE - off)
            base = (pfn << PAGE_SHIFT) + off
            mem.mv[base : base + n] = mv[done : done + n]
            if not mapping.shmem:
                folio_mark_dirty(mapping, idx, pfn)
            else:
                mem.flags[pfn] |= PG_dirty
            done += n
            mapping.size = max(mapping.size, cur + n)
    return done


# ---- writeback (filemap_fdatawrite, write_cache_pages) ------------------------------------------


async def _write_bio(mapping: AddressSpace, bdev: BlockDevice, block: int, pfns: IntArray) -> None:
    """end_bio of a writeback bio: clear PG_writeback, record an error in the mapping."""
    mem = mapping.mem
    try:
        await bdev.submit_bio(1, block, mem, pfns, None)
        _count(mapping, "pgpgout", len(pfns))
    except KernelError as e:
        mapping.wb_err = e.errno  # mapping_set_error()
    finally:
        for p in pfns.tolist():
            folio_end_writeback(mem, p)


async def filemap_fdatawrite(
    mapping: AddressSpace, older_than: float | None = None, task: Task | None = None
) -> int:
    """filemap_write_and_wait(): write back every dirty page (or those dirtied before
    ``older_than``) and wait for the I/O; returns the pages written.

    Each page is locked, its dirty bit moved to PG_writeback, unlocked, and sent in bios of
    pages contiguous on the device; PG_writeback is cleared when the bio completes.
    """
    from vkernel.kernel.memory import page_mkclean

    host = mapping.host
    if mapping.shmem or host is None or host.bdev is None or not mapping.dirty_time:
        return 0
    mem = mapping.mem
    bdev = host.bdev
    idxs = sorted(i for i, t in mapping.dirty_time.items() if older_than is None or t <= older_than)
    picked: list[tuple[int, int]] = []
    for i in idxs:
        pfn = mapping.pages.get(i)
        if pfn is None:
            mapping.dirty_time.pop(i, None)
            continue
        # Uninterruptible, as in write_cache_pages(): pages already moved to PG_writeback
        # must reach their bio, so a fatal signal does not abort the pass half-way.
        await folio_lock(mem, pfn)
        try:
            if mapping.pages.get(i) != pfn or not mem.flags[pfn] & PG_dirty:
                continue
            await folio_wait_writeback(mem, pfn)
            if mapping.i_mmap:
                page_mkclean(mapping.i_mmap, i, pfn)  # later stores fault and redirty
            mem.flags[pfn] &= ~np.uint32(PG_dirty)  # folio_clear_dirty_for_io()
            mapping.dirty_time.pop(i, None)
            mem.flags[pfn] |= PG_writeback
            picked.append((i, pfn))
        finally:
            folio_unlock(mem, pfn)
    if not picked:
        return 0
    pidx = np.array([i for i, _ in picked], dtype=np.int64)
    ppfn = np.array([p for _, p in picked], dtype=np.int64)
    blocks = np.empty(len(picked), dtype=np.int64)
    for k, i in enumerate(pidx.tolist()):
        blocks[k] = host.bmap_range(i, 1)[0]
    bios: list[Awaitable[None]] = []
    s = 0
    while s < len(picked):
        e = s + 1
        while e < len(picked) and e - s < MAX_BIO_PAGES and blocks[e] == blocks[e - 1] + 1:
            e += 1
        if blocks[s] < 0:
            for p in ppfn[s:e].tolist():  # no block (cannot happen: allocated at write)
                folio_end_writeback(mem, p)
        else:
            bios.append(_write_bio(mapping, bdev, int(blocks[s]), ppfn[s:e]))
        s = e
    await asyncio.gather(*bios)
    return len(picked)


def filemap_check_errors(mapping: AddressSpace) -> None:
    """filemap_check_errors(): raise (once) the error of a failed writeback."""
    if mapping.wb_err:
        err, mapping.wb_err = mapping.wb_err, 0
        raise KernelError(err, "writeback failed")


async def wait_io(mapping: AddressSpace) -> None:
    """Wait for the read bios in flight on ``mapping`` (for teardown and tests)."""
    while mapping.io:
        await asyncio.gather(*list(mapping.io), return_exceptions=True)


def drop_clean_pages(mapping: AddressSpace) -> int:
    """invalidate_mapping_pages(): drop clean, idle, unshared pages (drop_caches)."""
    if mapping.shmem:
        return 0
    mem = mapping.mem
    drop = []
    for i, pfn in list(mapping.pages.items()):
        if mem.flags[pfn] & (PG_dirty | PG_locked | PG_writeback) or mem.refcount[pfn] != 1:
            continue
        drop.append(_remove_page(mapping, i))
    _drop_refs(mapping, drop)
    return len(drop)
