"""Page-table freeing versus lockless walkers, per ``--arch`` (mm/mmu_gather.c, asm-generic/tlb.h).

GUP-fast walks page tables with no lock at all; what keeps the tables it reads from being freed
under it is that it runs with interrupts disabled (``local_irq_save``). The model:

- **IRQs off** is a per-kernel count, ``TlbState.irqs_off``: GUP-fast raises it for the whole
  walk and lowers it at the end (``local_irq_save``/``local_irq_restore``). The real walker never
  awaits, so on the event loop the count is only ever non-zero *inside* one synchronous call;
  the only way to see it non-zero from elsewhere is a walker parked mid-walk by the test-only
  hook (``TlbState.park_hook``) in another thread -- the model of another CPU.
- **Unlinking is not freeing.** munmap/exit/THP code unlinks a table and hands it to
  :func:`tlb_remove_table`. With no walker IRQ-off (always, outside tests) the frame is freed
  at once: an IPI nobody has to acknowledge completes at once, and an RCU grace period with no
  reader in a read-side section has already ended. With a walker IRQ-off:

  ``x86_64``
      The TLB-shootdown IPI cannot complete while any CPU has IRQs off. The table waits in
      ``ipi_pending``; the unmapper *waits* for the IPI in :func:`tlb_finish_mmu` (an
      ``await`` at the end of munmap, under mmap_lock like Linux's ``tlb_finish_mmu``), which
      returns once every IRQ-off walker has restored IRQs and the tables are freed.
  ``arm64``
      MMU_GATHER_RCU_TABLE_FREE: the table goes into an ``mmu_table_batch`` handed to
      ``call_rcu``; the grace period cannot end while a walker has IRQs off. munmap returns at
      once and the frames are freed when the last walker restores IRQs. If the batch page
      cannot be allocated (debug knob ``force_batch_alloc_failure``), ``tlb_remove_table_one``
      falls back to :func:`tlb_remove_table_sync_one` (an IPI that waits for every IRQ-off
      walker) before freeing: the unmapper then waits, as on x86. THP split broadcasts the
      same IPI (seed 003).
  ``generic``
      No GUP-fast exists (every call takes the slow path), so nothing ever walks locklessly and
      tables are freed at once.

- **THP collapse** (``pmdp_collapse_flush`` + ``tlb_remove_table_sync_one``, every arch) and
  the arm64 split register an IPI from synchronous code, which cannot block: the syscall's
  :func:`tlb_finish_mmu` (munmap, mmap MAP_FIXED, madvise) waits for it instead. Meanwhile
  the walker is kept safe by its PMD/PTE recheck (the collapsed table is zeroed, not freed:
  it becomes the new PMD's deposit).
- **Debug knob** ``unsafe_table_free``: tables are freed at once even under IRQ-off walkers, and
  a frame freed that way is *poisoned* (filled with ``POISON``, like slab's POISON_FREE). A
  parked walker that re-reads its table after the park sees the poison and reports a detected
  use-after-free (``uaf_detected`` and a :class:`PageTableUseAfterFree` raised in the walker).
  When the last walker leaves, poisoned frames still free are zeroed again (the allocator hands
  out zeroed frames); one reallocated meanwhile keeps the poison -- that is the corruption the
  knob demonstrates.

The completion ("the IPI is acknowledged", "the grace period ends") runs on the event-loop
thread: a walker thread that restores IRQs schedules it with ``call_soon_threadsafe``. The
normal fast path pays one integer increment and decrement and one truth test per call; the
thread machinery is only reached when work is pending, which only parked walkers cause.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from vkernel.kernel.uapi import PAGE_SIZE, PTRS_PER_TABLE, PG_buddy

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.mm import MmStruct

POISON = 0x6B6B6B6B6B6B6B6B
"""What a table frame freed under a walker is filled with (the debug knob): slab POISON_FREE."""
U64_POISON = np.uint64(POISON)
MAX_TABLE_BATCH = (PAGE_SIZE - 16) // 8
"""MAX_TABLE_BATCH: table pointers one mmu_table_batch page holds."""

_ATTR = "_vkernel_tlb_state"


class PageTableUseAfterFree(RuntimeError):
    """A lockless walker read a page-table page freed under it (what KASAN would report)."""


class TlbState:
    """Per-kernel lockless-walker and table-freeing state (the CPUs' IRQ state, mmu_gather)."""

    __slots__ = (
        "_loop",
        "_loop_thread",
        "arch",
        "force_batch_alloc_failure",
        "ipi_pending",
        "ipi_waits",
        "ipis",
        "irqs_off",
        "kernel",
        "park_hook",
        "poisoned",
        "rcu_batches",
        "rcu_pending",
        "rcu_tables",
        "sync_one",
        "uaf_detected",
        "unsafe_table_free",
        "waiters",
    )

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.arch = kernel.config.arch
        self.irqs_off = 0
        """Walkers between local_irq_save() and local_irq_restore() (one per 'CPU')."""
        self.unsafe_table_free = False
        """Debug knob: free tables at once even under IRQ-off walkers, poisoning them."""
        self.force_batch_alloc_failure = False
        """Debug knob (arm64): the mmu_table_batch page cannot be allocated."""
        self.park_hook: Callable[[str, int], None] | None = None
        """Test-only: called by GUP-fast mid-walk as ``hook(stage, pfn)`` (see gup_fast)."""
        self.ipi_pending: list[int] = []
        """Unlinked tables waiting for a TLB-shootdown IPI (x86_64; arm64 sync_one fallback)."""
        self.rcu_pending: list[list[int]] = []
        """arm64 mmu_table_batch-es handed to call_rcu, waiting for a grace period."""
        self.poisoned: list[int] = []
        self.waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.ipis = 0
        """IPIs that had to wait for an IRQ-off walker (shootdowns and sync_one)."""
        self.ipi_waits = 0
        """Unmappers that waited in tlb_finish_mmu for an IPI."""
        self.sync_one = 0
        """tlb_remove_table_sync_one() calls."""
        self.rcu_batches = 0
        self.rcu_tables = 0
        self.uaf_detected = 0
        """Walkers that saw a poisoned (freed) table: detected use-after-free."""

    # ---- IRQ state -------------------------------------------------------------------------

    def local_irq_restore(self) -> None:
        """local_irq_restore() of a walker: the last one lets pending IPIs/grace periods end."""
        self.irqs_off -= 1
        if not self.irqs_off and (
            self.ipi_pending or self.rcu_pending or self.poisoned or self.waiters
        ):
            self._kick()

    def _kick(self) -> None:
        """Run the completion on the event-loop thread (now, or scheduled from another thread)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self.complete()
        else:
            loop.call_soon_threadsafe(self.complete)

    def _remember_loop(self) -> None:
        """Note the event loop (thread) the completion must run on."""
        try:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        except RuntimeError:
            self._loop = None

    def complete(self) -> None:
        """No walker has IRQs off: every pending IPI is acknowledged, every grace period ends."""
        if self.irqs_off:
            return
        ipi, self.ipi_pending = self.ipi_pending, []
        batches, self.rcu_pending = self.rcu_pending, []
        for pfn in ipi:
            _free_table(self.kernel, pfn)
        for batch in batches:
            for pfn in batch:  # tlb_remove_table_rcu() → __tlb_remove_table_free()
                _free_table(self.kernel, pfn)
        if self.poisoned:
            mem = self.kernel.mem
            for pfn in self.poisoned:
                if mem.flags[pfn] & PG_buddy:
                    mem.frames[pfn] = 0
            self.poisoned = []
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # ---- freeing ---------------------------------------------------------------------------

    def remove_table(self, pfn: int) -> None:
        """tlb_remove_table() with at least one walker IRQ-off (or the unsafe knob set)."""
        self._remember_loop()
        if self.unsafe_table_free:
            _free_table(self.kernel, pfn)
            if self.irqs_off:
                base = pfn * PTRS_PER_TABLE
                self.kernel.mem.u64[base : base + PTRS_PER_TABLE] = U64_POISON
                self.poisoned.append(pfn)
            return
        if self.arch == "arm64":
            if self.force_batch_alloc_failure:
                # tlb_remove_table_one(): no batch page → IPI-and-wait, then free.
                self.sync_one += 1
                self.ipis += 1
                self.ipi_pending.append(pfn)
            else:
                # tlb_remove_table(): into the current mmu_table_batch, call_rcu when full.
                if not self.rcu_pending or len(self.rcu_pending[-1]) >= MAX_TABLE_BATCH:
                    self.rcu_pending.append([])
                    self.rcu_batches += 1
                self.rcu_pending[-1].append(pfn)
                self.rcu_tables += 1
        else:
            # x86_64: the free waits for the TLB-shootdown IPI.
            if not self.ipi_pending:
                self.ipis += 1
            self.ipi_pending.append(pfn)
        if not self.irqs_off:  # the walker left while we queued
            self._kick()


def _free_table(kernel: Kernel, pfn: int) -> None:
    """__tlb_remove_table(): the frame goes back to the allocator (hooks see it first)."""
    for hook in kernel.pgtable_free_hooks:
        hook(pfn)
    kernel.mem.put_folio(pfn)


def tlb_state(kernel: Kernel) -> TlbState:
    """The kernel's TlbState, created on first use."""
    st: Any = getattr(kernel, _ATTR, None)
    if st is None:
        st = TlbState(kernel)
        setattr(kernel, _ATTR, st)
    return st  # type: ignore[no-any-return]


def tlb_state_or_none(kernel: Kernel) -> TlbState | None:
    """The kernel's TlbState if anything created it (None: no walker ever ran)."""
    st: TlbState | None = getattr(kernel, _ATTR, None)
    return st


def tlb_remove_table(mm: MmStruct, pfn: int) -> None:
    """tlb_remove_table(): free an unlinked table page, or defer it past IRQ-off walkers."""
    mm.pgtables_bytes -= PAGE_SIZE
    kernel = mm.kernel
    st: TlbState | None = getattr(kernel, _ATTR, None)
    if st is None or not (st.irqs_off or st.unsafe_table_free):
        _free_table(kernel, pfn)
    else:
        st.remove_table(pfn)


def tlb_remove_table_sync_one(kernel: Kernel) -> None:
    """tlb_remove_table_sync_one(): an IPI to every CPU; the unmapper's tlb_finish_mmu waits.

    Callers are synchronous (THP split/collapse): the wait itself happens in the syscall's
    :func:`tlb_finish_mmu`, which waits while any walker that was IRQ-off here still is.
    """
    st = tlb_state_or_none(kernel)
    if st is None:
        return
    st.sync_one += 1
    if st.irqs_off:
        st.ipis += 1
        st._remember_loop()
        fut = st._loop.create_future() if st._loop is not None else None
        if fut is not None:
            st.waiters.append(fut)


async def tlb_finish_mmu(mm: MmStruct) -> None:
    """tlb_finish_mmu(): wait for the TLB-shootdown IPI if an IRQ-off walker holds it up.

    Only tables in ``ipi_pending`` (x86_64, arm64 without a batch) make the unmapper wait;
    arm64 RCU batches are freed by the grace period without anyone waiting.
    """
    st: TlbState | None = getattr(mm.kernel, _ATTR, None)
    if st is None or not (st.ipi_pending or st.waiters):
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    st.waiters.append(fut)
    st.ipi_waits += 1
    if not st.irqs_off:
        st.complete()
    await fut


async def rcu_barrier(kernel: Kernel) -> None:
    """rcu_barrier(): wait until every queued table batch (and pending IPI) has been freed."""
    st = tlb_state_or_none(kernel)
    if st is None or not (st.rcu_pending or st.ipi_pending):
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    st.waiters.append(fut)
    if not st.irqs_off:
        st.complete()
    await fut
