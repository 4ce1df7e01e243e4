"""Physical memory, struct page and the allocator (DESIGN.md §5; kernel-semantics A.5)."""

from __future__ import annotations

import os

import numpy as np

from tests.unit.mm.mmhelp import MakeKernel
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.uapi import HPAGE_PMD_NR, PG_buddy, PG_reserved, PG_zero


def test_struct_page_metadata_fits_32_bytes_per_frame(kernel: Kernel) -> None:
    """§5: struct page arrays plus the GUP ledgers cost at most 32 bytes per frame."""
    mem = kernel.mem
    per_frame = (
        sum(
            a.nbytes
            for a in (
                mem.refcount,
                mem.mapcount,
                mem.flags,
                mem.order,
                mem.mapping,
                mem.index,
                mem.entire_mapcount,
                mem.large_pincount,
                kernel.extra_refs,
                kernel.extra_pins,
            )
        )
        / mem.nframes
    )
    assert per_frame <= 32
    assert mem.refcount.dtype == np.int32
    assert len(mem.large_pincount) == len(kernel.extra_pins) == len(mem.entire_mapcount)


def test_pincount_lives_per_2mib_block(kernel: Kernel) -> None:
    """_pincount is kept per large folio (its 2 MiB block); a small folio reads 0."""
    mem = kernel.mem
    head = mem.alloc_huge()
    small = mem.alloc_page()
    mem.large_pincount[head // HPAGE_PMD_NR] = 3
    assert mem.folio_pincount(head) == 3
    assert mem.folio_pincount(small) == 0
    assert mem.pincount_of(np.array([head, small], dtype=np.int64)).tolist() == [3, 0]
    assert mem.folio_maybe_dma_pinned(head + 5)
    mem.large_pincount[head // HPAGE_PMD_NR] = 0
    assert not mem.folio_maybe_dma_pinned(head)
    mem.free_huge(head)
    mem.free_pages(np.array([small], dtype=np.int64))


def test_zero_page_is_reserved_and_never_free(kernel: Kernel) -> None:
    """A.10: the shared zero page exists from boot, flagged zero+reserved, refcount 1."""
    mem = kernel.mem
    assert mem.flags[mem.zero_pfn] & PG_zero
    assert mem.flags[mem.zero_pfn] & PG_reserved
    assert not mem.flags[mem.zero_pfn] & PG_buddy
    assert mem.refcount[mem.zero_pfn] == 1


def test_freed_frames_read_back_zero_when_reallocated(kernel: Kernel) -> None:
    """§5: a frame allocated again after being freed reads as zeros."""
    mem = kernel.mem
    free0 = mem.nr_free_pages
    pfns = mem.alloc_pages_bulk(100)
    assert pfns is not None
    mem.frames[pfns] = 0xAB
    mem.free_pages(pfns)
    again = mem.alloc_pages_bulk(100)
    assert again is not None
    assert not mem.frames[again].any()
    assert mem.refcount[again].tolist() == [1] * 100
    mem.put_folios(again)
    assert mem.nr_free_pages == free0
    assert kernel.vmstat["pgfree"] == 200


def test_order9_blocks_split_and_coalesce(kernel: Kernel) -> None:
    """§5: order-9 blocks split into order 0 when needed and come back when fully free."""
    mem = kernel.mem
    blocks0 = mem.normal.nr_free_blocks
    pfns = mem.alloc_pages_bulk(mem.normal._top + 1, movable=False)
    assert pfns is not None
    assert mem.normal.nr_free_blocks == blocks0 - 1
    mem.free_pages(pfns)
    heads = []
    for _ in range(blocks0):
        h = mem.alloc_huge(movable=False)
        assert h >= 0
        assert h % HPAGE_PMD_NR == 0
        heads.append(h)
    assert mem.alloc_huge(movable=False) == -1
    for h in heads:
        mem.put_folio(h)
    assert mem.normal.nr_free_blocks == blocks0


def test_movable_region_is_at_the_top_and_preferred_for_user_pages(make_kernel: MakeKernel) -> None:
    """§5: movable frames are the highest ones; user (movable) allocations use them first."""
    k = make_kernel(memory_bytes=64 << 20, movable_bytes=8 << 20)
    mem = k.mem
    assert mem.movable_start == mem.nframes - (8 << 20) // 4096
    p = mem.alloc_page(movable=True)
    assert mem.in_movable(p)
    q = mem.alloc_pgtable_page()
    assert not mem.in_movable(q)
    assert k.vmstat["pgalloc_movable"] == 1
    assert k.vmstat["pgalloc_normal"] == 1
    mem.put_folio(p)
    mem.put_folio(q)


def test_out_of_memory_returns_none_and_keeps_counts(make_kernel: MakeKernel) -> None:
    """§5: an allocation larger than free memory fails without taking anything."""
    k = make_kernel(memory_bytes=4 << 20)
    mem = k.mem
    free = mem.nr_free_pages
    assert mem.alloc_pages_bulk(free + 1) is None
    assert mem.nr_free_pages == free
    assert k.vmstat["nr_free_pages"] == free


def test_prefault_backs_memory_without_changing_state(make_kernel: MakeKernel) -> None:
    """§5, §9:
    PhysMem.prefault(): host-populates the memfd; frames stay zero, allocator untouched."""
    k = make_kernel(memory_bytes=8 << 20, movable_bytes=2 << 20)
    free = k.mem.nr_free_pages
    assert k.mem.prefault() is None
    th = k.mem.prefault(background=True)
    assert th is not None
    th.join(10)
    assert k.mem.nr_free_pages == free
    assert not k.mem.frames.any()


def test_prefault_reports_progress_and_runs_background_at_sched_idle(
    make_kernel: MakeKernel,
) -> None:
    """§5:
    PhysMem.prefault(): populated_bytes climbs to the memory size; the background thread runs
    at SCHED_IDLE, the synchronous call at the caller's own policy."""
    k = make_kernel(memory_bytes=16 << 20, movable_bytes=4 << 20)
    mem = k.mem
    assert (mem.populated_bytes, mem.prefault_running, mem.prefault_done) == (0, False, True)
    policy = os.sched_getscheduler(0)
    assert mem.prefault() is None
    assert mem.populated_bytes == 16 << 20
    assert (mem.prefault_running, mem.prefault_done, mem.prefault_policy) == (False, True, None)
    assert os.sched_getscheduler(0) == policy
    th = mem.prefault(background=True, chunk=1 << 20)
    assert th is not None
    th.join(30)
    assert not th.is_alive()
    assert mem.populated_bytes == mem.nframes * 4096 == 16 << 20
    assert (mem.prefault_running, mem.prefault_done) == (False, True)
    assert mem.prefault_policy == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == policy


def test_bad_boot_parameters_are_einval() -> None:
    """§7: a bad THP mode or memory size is EINVAL naming the field."""
    import pytest

    from vkernel.kernel.errors import KernelError
    from vkernel.kernel.kernel import KernelConfig

    for cfg, field in [
        (KernelConfig(memory_bytes=64 << 20, thp="sometimes"), "thp"),
        (KernelConfig(memory_bytes=1 << 20), "memory"),
        (KernelConfig(memory_bytes=64 << 20, movable_bytes=40 << 20), "movable"),
    ]:
        with pytest.raises(KernelError) as ei:
            Kernel(cfg)
        assert ei.value.metadata["field"] == field
