"""Physical memory and struct page (mm/page_alloc.c, include/linux/mm_types.h).

One shared memfd mapping holds every frame: frame ``n`` is bytes ``[n*4096, (n+1)*4096)``.
struct page is a set of numpy arrays indexed by pfn (25 bytes of metadata per frame):

========== ====== ===========================================================================
array      dtype  meaning
========== ====== ===========================================================================
refcount   int32  _refcount (on the head page for a compound page; tails stay 0)
mapcount   int32  number of PTEs mapping this exact page (Linux's _mapcount + 1)
flags      uint32 PG_* bits (vkernel.kernel.uapi)
order      uint8  compound order, stored on head *and* tails: head = pfn & ~((1<<order)-1)
mapping    int32  id of the anon_vma / shmem object (0 = none)
index      int64  page->index (linear page index in the mapping)
========== ====== ===========================================================================

plus two int32 per 2 MiB block for the large (order-9) folio living there, as Linux keeps them in
the folio's first tail page: ``entire_mapcount`` (PMD mappings) and ``large_pincount`` (_pincount;
read it with :meth:`PhysMem.folio_pincount` / :meth:`PhysMem.pincount_of`). Small folios
have no _pincount: FOLL_PIN counts in their refcount (GUP_PIN_COUNTING_BIAS).

The allocator keeps one free stack of order-0 pfns and one stack of free order-9 blocks per
zone (normal, movable); an order-9 block is split into order-0 pages when the order-0 stack runs
dry, and fully free blocks are coalesced back lazily when an order-9 allocation finds none.
Frames are zeroed when they are freed (vectorised), so every allocation reads back zeros.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.uapi import (
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_FLAG_NAMES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_anon,
    PG_buddy,
    PG_head,
    PG_movable_zone,
    PG_pgtable,
    PG_reserved,
    PG_shmem,
    PG_tail,
    PG_uptodate,
    PG_zero,
)

if TYPE_CHECKING:
    from vkernel.kernel.vmstat import VmStat

IntArray = npt.NDArray[np.int64]

_HP_MASK = HPAGE_PMD_NR - 1
_MADV_POPULATE_WRITE = 23
ONE32 = np.int32(1)
"""A typed 1: ``np.add.at(int32_array, idx, 1)`` with a Python int leaves the fast path."""


class Zone:
    """struct zone: a pfn range with its own free lists (order 0 and order 9 only)."""

    def __init__(self, name: str, start_pfn: int, end_pfn: int) -> None:
        self.name = name
        self.start_pfn = start_pfn
        self.end_pfn = end_pfn
        # The order-0 free stack: int32 pfns (up to 8 TiB of RAM), grown on demand, so a
        # machine whose memory sits in free 2 MiB blocks spends almost nothing on it.
        self._free0 = np.empty(HPAGE_PMD_NR * 2, dtype=np.int32)
        self._top = 0
        self._blocks: list[int] = []
        first_block = (start_pfn + _HP_MASK) & ~_HP_MASK
        last_block = end_pfn & ~_HP_MASK
        if first_block >= last_block:
            self._push0(np.arange(start_pfn, end_pfn, dtype=np.int64))
        else:
            self._push0(np.arange(start_pfn, first_block, dtype=np.int64))
            self._push0(np.arange(last_block, end_pfn, dtype=np.int64))
            # Lowest blocks are handed out last: push high addresses first.
            self._blocks = list(range(last_block - HPAGE_PMD_NR, first_block - 1, -HPAGE_PMD_NR))

    @property
    def nr_free(self) -> int:
        """zone_page_state(NR_FREE_PAGES)."""
        return self._top + len(self._blocks) * HPAGE_PMD_NR

    @property
    def nr_free_blocks(self) -> int:
        """free_area[HPAGE_PMD_ORDER].nr_free."""
        return len(self._blocks)

    def contains(self, pfn: int) -> bool:
        """zone_spans_pfn()."""
        return self.start_pfn <= pfn < self.end_pfn

    def _push0(self, pfns: npt.NDArray[np.integer[Any]]) -> None:
        """Push free pfns on the order-0 stack."""
        n = len(pfns)
        if n:
            need = self._top + n
            if need > len(self._free0):
                grown = np.empty(max(need, 2 * len(self._free0)), dtype=np.int32)
                grown[: self._top] = self._free0[: self._top]
                self._free0 = grown
            self._free0[self._top : need] = pfns
            self._top = need

    def take0(self, n: int) -> IntArray:
        """rmqueue() of up to ``n`` order-0 pages, splitting order-9 blocks as needed."""
        while self._top < n and self._blocks:
            need = (n - self._top + _HP_MASK) // HPAGE_PMD_NR
            k = min(need, len(self._blocks))
            heads = np.array(self._blocks[-k:], dtype=np.int64)
            del self._blocks[-k:]
            # expand(): the split halves go onto the order-0 list.
            self._push0((heads[:, None] + np.arange(HPAGE_PMD_NR, dtype=np.int64)).ravel()[::-1])
        m = min(n, self._top)
        out = self._free0[self._top - m : self._top][::-1].astype(np.int64)
        self._top -= m
        return out

    def put0(self, pfns: IntArray) -> None:
        """__free_one_page() for order-0 pages (no eager buddy merging)."""
        self._push0(pfns)

    def take_block(self) -> int:
        """rmqueue() at order 9; coalesces fully free blocks first if none is left."""
        if not self._blocks:
            self.coalesce()
        if not self._blocks:
            return -1
        return self._blocks.pop()

    def put_block(self, head: int) -> None:
        """__free_one_page() at order 9."""
        self._blocks.append(head)

    def coalesce(self) -> None:
        """Buddy merging done lazily: move every fully free 2 MiB block back to the order-9 list."""
        if self._top < HPAGE_PMD_NR:
            return
        pfns = self._free0[: self._top]
        blocks = pfns >> HPAGE_PMD_ORDER
        counts = np.bincount(blocks - blocks.min())
        full = np.nonzero(counts == HPAGE_PMD_NR)[0] + blocks.min()
        if not len(full):
            return
        keep = ~np.isin(blocks, full)
        rest = pfns[keep].copy()
        self._top = 0
        self._push0(rest)
        self._blocks.extend(int(b) << HPAGE_PMD_ORDER for b in full[::-1])


class PhysMem:
    """The machine's RAM (a memfd) and mem_map (struct page arrays), plus the page allocator."""

    def __init__(self, memory_bytes: int, movable_bytes: int, vmstat: VmStat) -> None:
        if memory_bytes < 2 * HPAGE_PMD_NR * PAGE_SIZE or memory_bytes % PAGE_SIZE:
            raise einval("memory must be a multiple of 4096 and at least 4 MiB", field="memory")
        if movable_bytes < 0 or movable_bytes % PAGE_SIZE or movable_bytes >= memory_bytes // 2:
            raise einval("movable memory must be page aligned and below half", field="movable")
        self.vmstat = vmstat
        self.nframes = nframes = memory_bytes >> PAGE_SHIFT
        self.fd = os.memfd_create("vkernel-phys", os.MFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, memory_bytes)
        self.map = _mmap.mmap(self.fd, memory_bytes, _mmap.MAP_SHARED)
        self.mv = memoryview(self.map)
        self.u8: npt.NDArray[np.uint8] = np.frombuffer(self.map, dtype=np.uint8)
        self.frames = self.u8.reshape(nframes, PAGE_SIZE)
        self.u64: npt.NDArray[np.uint64] = np.frombuffer(self.map, dtype=np.uint64)
        # struct page
        self.refcount = np.zeros(nframes, dtype=np.int32)
        self.mapcount = np.zeros(nframes, dtype=np.int32)
        self.flags = np.zeros(nframes, dtype=np.uint32)
        self.order = np.zeros(nframes, dtype=np.uint8)
        self.mapping = np.zeros(nframes, dtype=np.int32)
        self.index = np.zeros(nframes, dtype=np.int64)
        self.entire_mapcount = np.zeros((nframes >> HPAGE_PMD_ORDER) + 1, dtype=np.int32)
        self.large_pincount = np.zeros((nframes >> HPAGE_PMD_ORDER) + 1, dtype=np.int32)
        """folio->_pincount of the large folio in each 2 MiB block (index: head >> 9)."""
        # Weak: an anon_vma lives as long as a VMA refers to it; ids are never reused.
        self._mapping_objs: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._next_mapping = 1
        self.memalloc_pin = False
        """PF_MEMALLOC_PIN (memalloc_pin_save) for the synchronous section running: while a
        FOLL_LONGTERM GUP faults or migrates, user allocations avoid the movable zone."""
        self.zero_maps = 0
        """How many PTEs map the shared zero page (vkernel bookkeeping for nr_zero_page)."""
        self.populated_bytes = 0
        """Bytes of the memfd the last prefault() has host-populated so far (0 if never run)."""
        self.prefault_running = False
        """A prefault() is populating the memfd now (False before it starts and once it ends)."""
        self.prefault_policy: int | None = None
        """The scheduling policy the background prefault thread ran at (os.SCHED_IDLE)."""

        movable_frames = movable_bytes >> PAGE_SHIFT
        self.movable_start = nframes - movable_frames
        self.flags[:] = PG_buddy
        self.flags[self.movable_start :] |= PG_movable_zone
        # The shared zero page: pfn 0, reserved, never freed (mm/memory.c empty_zero_page).
        self.zero_pfn = 0
        self.huge_zero_pfn = -1
        self.huge_zero_maps = 0
        """PMDs mapping the huge zero folio; at zero it is freed (the shrinker, done eagerly)."""
        """Head of the huge zero folio (huge_memory.c huge_zero_folio), allocated on first use."""
        self.flags[0] = PG_zero | PG_reserved | PG_uptodate
        self.refcount[0] = 1
        self.normal = Zone("Normal", 1, self.movable_start)
        self.movable = Zone("Movable", self.movable_start, nframes) if movable_frames else None
        self.boot_free = self.nr_free_pages

        vmstat.register_gauge("nr_free_pages", lambda: self.nr_free_pages)
        vmstat.register_gauge("nr_anon_pages", lambda: int(np.count_nonzero(self.flags & PG_anon)))
        vmstat.register_gauge(
            "nr_anon_transparent_hugepages",
            lambda: int(np.count_nonzero((self.flags & (PG_anon | PG_head)) == PG_anon | PG_head)),
        )
        vmstat.register_gauge(
            "nr_page_table_pages", lambda: int(np.count_nonzero(self.flags & PG_pgtable))
        )
        vmstat.register_gauge("nr_shmem", lambda: int(np.count_nonzero(self.flags & PG_shmem)))
        vmstat.register_gauge("nr_zero_page", lambda: self.zero_maps)

    # ---- host memory ----------------------------------------------------------------------

    def prefault(self, background: bool = False, chunk: int = 32 << 20) -> threading.Thread | None:
        """Back every frame with host memory now (MADV_POPULATE_WRITE on the memfd mapping).

        The first touch of a memfd page costs the host a page fault (several µs per 4 KiB page on
        the project machine), which otherwise dominates the first write fault of every frame. The
        movable zone goes first (user pages come from it), then the normal zone, in the order the
        allocator hands frames out. With ``background`` the work runs in a daemon thread (the
        madvise call releases the GIL) at SCHED_IDLE, so it only takes CPU time nothing else
        wants and never competes with serving. Returns the thread, or None when done
        synchronously. Progress shows in :attr:`populated_bytes` and :attr:`prefault_running`.
        """
        ranges = [(self.movable_start, self.nframes), (0, self.movable_start)]

        def populate() -> None:
            """The populate loop (runs in the caller or in the prefault thread)."""
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                madvise = libc.madvise
                madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
            except (OSError, AttributeError, TypeError):
                return
            for lo, hi in ranges:
                off = lo << PAGE_SHIFT
                end = hi << PAGE_SHIFT
                while off < end:
                    n = min(chunk, end - off)
                    if madvise(base + off, n, _MADV_POPULATE_WRITE) != 0:
                        self.frames[off >> PAGE_SHIFT : (off + n) >> PAGE_SHIFT, 0] |= 0
                    off += n
                    self.populated_bytes += n

        def run(idle: bool) -> None:
            """populate() with the progress flag up, at SCHED_IDLE when ``idle``."""
            try:
                if idle:
                    # Linux applies this to the calling thread only; the prefault thread keeps
                    # running (at normal priority) where the policy is unavailable.
                    try:
                        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                        self.prefault_policy = os.sched_getscheduler(0)
                    except (OSError, AttributeError):
                        pass
                populate()
            finally:
                self.prefault_running = False

        self.populated_bytes = 0
        self.prefault_running = True
        if not background:
            run(idle=False)
            return None
        th = threading.Thread(target=run, args=(True,), name="vkernel-prefault", daemon=True)
        try:
            th.start()
        except BaseException:
            self.prefault_running = False
            raise
        return th

    @property
    def prefault_done(self) -> bool:
        """No prefault() is populating the memfd: it has finished, or it never started."""
        return not self.prefault_running

    # ---- bookkeeping ----------------------------------------------------------------------

    @property
    def nr_free_pages(self) -> int:
        """global_zone_page_state(NR_FREE_PAGES)."""
        return self.normal.nr_free + (self.movable.nr_free if self.movable else 0)

    def register_mapping(self, obj: object) -> int:
        """An id to store in page->mapping for an anon_vma or a shmem object."""
        mid = self._next_mapping
        self._next_mapping += 1
        self._mapping_objs[mid] = obj
        return mid

    def unregister_mapping(self, mid: int) -> None:
        """Forget a mapping id once its object is gone."""
        self._mapping_objs.pop(mid, None)

    def mapping_obj(self, mid: int) -> object | None:
        """The object behind page->mapping."""
        return self._mapping_objs.get(mid)

    def check_pfn(self, pfn: int) -> None:
        """pfn_valid() or EINVAL."""
        if not 0 <= pfn < self.nframes:
            raise einval(f"pfn {pfn} out of range (0..{self.nframes - 1})", field="pfn")

    def compound_head(self, pfn: int) -> int:
        """compound_head(): derived from the order stored on every page of the compound."""
        o = int(self.order[pfn])
        return pfn & ~((1 << o) - 1) if o else pfn

    def compound_heads(self, pfns: IntArray) -> IntArray:
        """compound_head() for an array of pfns."""
        o = self.order[pfns].astype(np.int64)
        return pfns & ~((np.int64(1) << o) - 1)

    def folio_pincount(self, head: int) -> int:
        """folio_pincount() of a large folio's head (0 for a small folio, which has none)."""
        return int(self.large_pincount[head >> HPAGE_PMD_ORDER]) if self.order[head] else 0

    def pincount_of(self, heads: IntArray) -> npt.NDArray[np.int32]:
        """folio_pincount() for many folio heads (0 where the folio is small)."""
        pc: npt.NDArray[np.int32] = np.where(
            self.order[heads] > 0, self.large_pincount[heads >> HPAGE_PMD_ORDER], np.int32(0)
        )
        return pc

    def folio_maybe_dma_pinned(self, pfn: int) -> bool:
        """folio_maybe_dma_pinned(): exact _pincount for large folios, refcount bias for small."""
        head = self.compound_head(pfn)
        if self.order[head]:
            return bool(self.large_pincount[head >> HPAGE_PMD_ORDER] > 0)
        return int(np.uint32(self.refcount[head])) >= 1024

    def page_flag_names(self, pfn: int) -> list[str]:
        """The names of the PG_* bits set on ``pfn`` (as %pGp prints them)."""
        f = int(self.flags[pfn])
        return [name for bit, name in PAGE_FLAG_NAMES if f & bit]

    def in_movable(self, pfn: int) -> bool:
        """page_zonenum(page) == ZONE_MOVABLE."""
        return pfn >= self.movable_start

    # ---- allocation -----------------------------------------------------------------------

    def _zones(self, movable: bool) -> list[Zone]:
        """The zones an allocation may use, in fallback order (GFP zonelist)."""
        if movable and self.movable is not None and not self.memalloc_pin:
            return [self.movable, self.normal]
        return [self.normal]

    def _count_alloc(self, pfns: IntArray) -> None:
        """count_vm_events(PGALLOC_*) per zone."""
        n = len(pfns)
        nm = int(np.count_nonzero(pfns >= self.movable_start))
        if nm:
            self.vmstat.count("pgalloc_movable", nm)
        if n - nm:
            self.vmstat.count("pgalloc_normal", n - nm)

    def alloc_pages_bulk(self, n: int, movable: bool = True) -> IntArray | None:
        """alloc_pages_bulk(): ``n`` zeroed order-0 pages with refcount 1, or None (all or none).

        ``movable`` (GFP_HIGHUSER_MOVABLE) lets user pages come from the movable region first.
        """
        zones = self._zones(movable)
        if sum(z.nr_free for z in zones) < n:
            return None
        parts: list[IntArray] = []
        got = 0
        for z in zones:
            if got == n:
                break
            part = z.take0(n - got)
            parts.append(part)
            got += len(part)
        pfns = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.flags[pfns] &= ~np.uint32(PG_buddy)
        self.refcount[pfns] = 1
        self._count_alloc(pfns)
        return pfns

    def alloc_page(self, movable: bool = True) -> int:
        """alloc_page(): one zeroed page with refcount 1, or -1 when memory is exhausted."""
        for z in self._zones(movable):
            if z.nr_free:
                pfn = int(z.take0(1)[0])
                self.flags[pfn] &= ~np.uint32(PG_buddy)
                self.refcount[pfn] = 1
                self.vmstat.count(
                    "pgalloc_movable" if pfn >= self.movable_start else "pgalloc_normal"
                )
                return pfn
        return -1

    def alloc_huge(self, movable: bool = True) -> int:
        """alloc_pages(order=9) as a compound page (head/tail flags, order): head pfn or -1."""
        for z in self._zones(movable):
            head = z.take_block()
            if head >= 0:
                sl = slice(head, head + HPAGE_PMD_NR)
                self.flags[sl] &= ~np.uint32(PG_buddy)
                self.flags[head] |= PG_head
                self.flags[head + 1 : head + HPAGE_PMD_NR] |= PG_tail
                self.order[sl] = HPAGE_PMD_ORDER
                self.refcount[head] = 1
                self.entire_mapcount[head >> HPAGE_PMD_ORDER] = 0
                self.large_pincount[head >> HPAGE_PMD_ORDER] = 0
                self.vmstat.count(
                    "pgalloc_movable" if head >= self.movable_start else "pgalloc_normal",
                    HPAGE_PMD_NR,
                )
                return head
        return -1

    def get_huge_zero_page(self) -> int:
        """get_huge_zero_folio(): the 2 MiB zero folio (reserved), allocated once; -1 if none."""
        if self.huge_zero_pfn < 0:
            head = self.alloc_huge(movable=False)
            if head < 0:
                return -1
            self.flags[head : head + HPAGE_PMD_NR] |= np.uint32(PG_zero | PG_reserved | PG_uptodate)
            self.huge_zero_pfn = head
        return self.huge_zero_pfn

    def put_huge_zero_page(self, nmaps: int = 1) -> None:
        """Drop PMD mappings of the huge zero folio; free it when none is left (nor GUP refs)."""
        self.huge_zero_maps -= nmaps
        hz = self.huge_zero_pfn
        if self.huge_zero_maps == 0 and hz >= 0 and self.refcount[hz] == 1:
            head, self.huge_zero_pfn = self.huge_zero_pfn, -1
            self.free_huge(head)

    def is_huge_zero(self, pfn: int) -> bool:
        """is_huge_zero_pfn(): ``pfn`` is the head of the huge zero folio."""
        return pfn == self.huge_zero_pfn

    def alloc_pgtable_page(self) -> int:
        """pagetable_alloc(): a zeroed table page from the normal zone, flagged PG_pgtable."""
        pfn = self.alloc_page(movable=False)
        if pfn >= 0:
            self.flags[pfn] |= PG_pgtable
        return pfn

    def alloc_pgtable_pages(self, n: int) -> IntArray | None:
        """``n`` alloc_pgtable_page() calls at once: the same frames in the same order, or None
        (nothing taken) unless the normal zone's order-0 free stack holds them all already."""
        z = self.normal
        if z._top < n:
            return None
        pfns = z.take0(n)
        self.flags[pfns] &= ~np.uint32(PG_buddy)
        self.flags[pfns] |= np.uint32(PG_pgtable)
        self.refcount[pfns] = 1
        self._count_alloc(pfns)
        return pfns

    # ---- freeing --------------------------------------------------------------------------

    def _reset(self, pfns: IntArray | slice) -> None:
        """free_pages_prepare(): zero the frames and reset struct page to a free state."""
        self.frames[pfns] = 0
        self.refcount[pfns] = 0
        self.mapcount[pfns] = 0
        self.flags[pfns] &= np.uint32(PG_movable_zone)
        self.flags[pfns] |= np.uint32(PG_buddy)
        self.order[pfns] = 0
        self.mapping[pfns] = 0
        self.index[pfns] = 0

    def free_pages(self, pfns: IntArray) -> None:
        """free_unref_page() for order-0 pages: zero them and put them back on the free lists."""
        if not len(pfns):
            return
        if np.any(self.flags[pfns] & (PG_buddy | PG_reserved)):
            raise KernelError(errno.EINVAL, "double free or reserved page")
        self._reset(pfns)
        mov = pfns >= self.movable_start
        if self.movable is not None and mov.any():
            self.movable.put0(pfns[mov])
            self.normal.put0(pfns[~mov])
        else:
            self.normal.put0(pfns)
        self.vmstat.count("pgfree", len(pfns))

    def free_huge(self, head: int) -> None:
        """free_compound_page() of an order-9 folio."""
        sl = slice(head, head + HPAGE_PMD_NR)
        self._reset(sl)
        self.entire_mapcount[head >> HPAGE_PMD_ORDER] = 0
        self.large_pincount[head >> HPAGE_PMD_ORDER] = 0
        zone = self.movable if self.movable and head >= self.movable_start else self.normal
        zone.put_block(head)
        self.vmstat.count("pgfree", HPAGE_PMD_NR)

    def free_folios(self, heads: IntArray) -> None:
        """free_unref_folios(): free folios of any order given their head pfns."""
        if not len(heads):
            return
        big = self.order[heads] > 0
        if big.any():
            for h in heads[big].tolist():
                self.free_huge(h)
            heads = heads[~big]
        self.free_pages(heads)

    def put_folios(self, heads: IntArray) -> None:
        """folio_put() for each head (duplicates allowed): drop a ref, free those reaching 0."""
        if not len(heads):
            return
        np.subtract.at(self.refcount, heads, ONE32)
        uniq = np.unique(heads)
        dead = uniq[self.refcount[uniq] == 0]
        self.free_folios(dead)

    def put_folio(self, head: int) -> None:
        """folio_put(): drop one reference, free the folio at zero."""
        self.refcount[head] -= 1
        if self.refcount[head] == 0:
            if self.order[head]:
                self.free_huge(head)
            else:
                self.free_pages(np.array([head], dtype=np.int64))
