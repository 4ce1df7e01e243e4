"""struct mm_struct: one address space (include/linux/mm_types.h, kernel/fork.c mm_alloc)."""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING

from vkernel.kernel.errors import KernelError
from vkernel.kernel.mmap_lock import MmapLock
from vkernel.kernel.pgtable import pgtable_alloc
from vkernel.kernel.uapi import MMAP_BASE, PAGE_SHIFT, VM_LOCKED
from vkernel.kernel.vma import VMA

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel

MM_FILEPAGES = 0
MM_ANONPAGES = 1
MM_SWAPENTS = 2
MM_SHMEMPAGES = 3


class MmStruct:
    """mm_struct: VMAs (sorted by address), page tables, mmap_lock and counters."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.mem = kernel.mem
        self.pgtables_bytes = 0
        self.pgd = pgtable_alloc(self)
        if self.pgd < 0:
            raise KernelError(errno.ENOMEM, "out of memory for a page directory")
        self.vmas: list[VMA] = []
        self._ends: list[int] = []
        self.mmap_lock = MmapLock()
        self.write_protect_seq = 0
        """seqcount_t: odd while fork write-protects this mm in copy_page_range()."""
        self.flags = 0
        self.mmap_base = MMAP_BASE
        self.total_vm = 0
        self.locked_vm = 0
        self.pinned_vm = 0
        self.data_vm = 0
        self.hiwater_vm = 0
        self.hiwater_rss = 0
        self.rss_stat = [0, 0, 0, 0]
        self.deposited: dict[int, int] = {}
        """pgtable_trans_huge_deposit(): PMD slot → the PTE table kept for splitting its THP."""
        self.dead = False

    # ---- VMA tree ---------------------------------------------------------------------------

    @property
    def map_count(self) -> int:
        """mm->map_count."""
        return len(self.vmas)

    def find_vma(self, addr: int) -> VMA | None:
        """find_vma(): the first VMA with vm_end > addr."""
        i = bisect.bisect_right(self._ends, addr)
        return self.vmas[i] if i < len(self.vmas) else None

    def vma_lookup(self, addr: int) -> VMA | None:
        """vma_lookup(): the VMA containing ``addr``."""
        v = self.find_vma(addr)
        return v if v is not None and v.vm_start <= addr else None

    def find_vma_intersection(self, start: int, end: int) -> VMA | None:
        """find_vma_intersection()."""
        v = self.find_vma(start)
        return v if v is not None and v.vm_start < end else None

    def vmas_in(self, start: int, end: int) -> list[VMA]:
        """for_each_vma_range(): the VMAs overlapping [start, end)."""
        i = bisect.bisect_right(self._ends, start)
        out = []
        while i < len(self.vmas) and self.vmas[i].vm_start < end:
            out.append(self.vmas[i])
            i += 1
        return out

    def prev_vma(self, vma: VMA) -> VMA | None:
        """vma_prev()."""
        i = self._index(vma)
        return self.vmas[i - 1] if i > 0 else None

    def next_vma(self, vma: VMA) -> VMA | None:
        """vma_next()."""
        i = self._index(vma)
        return self.vmas[i + 1] if i + 1 < len(self.vmas) else None

    def _index(self, vma: VMA) -> int:
        """Position of ``vma`` in the sorted VMA list."""
        i = bisect.bisect_left(self._ends, vma.vm_end)
        while self.vmas[i] is not vma:
            i += 1
        return i

    def insert_vma(self, vma: VMA) -> None:
        """vma_link(): add a VMA (ranges must not overlap)."""
        i = bisect.bisect_left(self._ends, vma.vm_end)
        self.vmas.insert(i, vma)
        self._ends.insert(i, vma.vm_end)
        self.total_vm += vma.size >> PAGE_SHIFT
        self.hiwater_vm = max(self.hiwater_vm, self.total_vm)
        if vma.vm_flags & VM_LOCKED:
            self.locked_vm += vma.size >> PAGE_SHIFT
        if vma.shmem is not None:
            vma.shmem.get()
        if vma.vm_file is not None:
            vma.vm_file.get()
        fm = vma.f_mapping()
        if fm is not None:
            fm.i_mmap.add(vma)
        if vma.dax is not None:
            vma.dax.i_mmap.add(vma)

    def remove_vma(self, vma: VMA) -> None:
        """vma_iter_clear() + remove_vma(): unlink a VMA (its pages must already be zapped)."""
        i = self._index(vma)
        del self.vmas[i]
        del self._ends[i]
        vma.detached = True
        self.total_vm -= vma.size >> PAGE_SHIFT
        if vma.vm_flags & VM_LOCKED:
            self.locked_vm -= vma.size >> PAGE_SHIFT
        fm = vma.f_mapping()
        if fm is not None:
            fm.i_mmap.discard(vma)
        if vma.dax is not None:
            vma.dax.i_mmap.discard(vma)
        if vma.shmem is not None:
            vma.shmem.put()
        if vma.vm_file is not None:
            vma.vm_file.put()

    def resize_vma(self, vma: VMA, start: int, end: int) -> None:
        """vma_shrink()/vma_expand(): change a VMA's bounds in place (no overlap allowed)."""
        i = self._index(vma)
        vma.vm_pgoff += (start - vma.vm_start) >> PAGE_SHIFT
        self.total_vm += ((end - start) - vma.size) >> PAGE_SHIFT
        if vma.vm_flags & VM_LOCKED:
            self.locked_vm += ((end - start) - vma.size) >> PAGE_SHIFT
        self.hiwater_vm = max(self.hiwater_vm, self.total_vm)
        vma.vm_start = start
        vma.vm_end = end
        self._ends[i] = end

    # ---- counters ---------------------------------------------------------------------------

    def add_rss(self, member: int, delta: int) -> None:
        """add_mm_counter(), keeping the RSS high-water mark."""
        self.rss_stat[member] += delta
        if delta > 0:
            rss = self.rss_stat[MM_FILEPAGES] + self.rss_stat[MM_ANONPAGES]
            rss += self.rss_stat[MM_SHMEMPAGES]
            self.hiwater_rss = max(self.hiwater_rss, rss)

    def get_mm_rss(self) -> int:
        """get_mm_rss(): resident pages."""
        return (
            self.rss_stat[MM_FILEPAGES] + self.rss_stat[MM_ANONPAGES] + self.rss_stat[MM_SHMEMPAGES]
        )

    def check_alive(self) -> None:
        """After sleeping on mmap_lock: the owner may have exited meanwhile (EINTR, like a kill)."""
        if self.dead:
            raise KernelError(errno.EINTR, "the process exited while waiting for mmap_lock")

    # ---- teardown ---------------------------------------------------------------------------

    def exit_mmap(self) -> None:
        """exit_mmap(): unmap every VMA and free every page-table page."""
        if self.dead:
            return
        from vkernel.kernel.memory import unmap_vmas
        from vkernel.kernel.pgtable import free_all_pgtables

        unmap_vmas(self, list(self.vmas))
        for vma in list(self.vmas):
            self.remove_vma(vma)
        free_all_pgtables(self)
        self.dead = True
