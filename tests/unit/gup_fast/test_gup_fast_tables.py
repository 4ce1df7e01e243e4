"""Page-table freeing versus a parked GUP-fast walker, per arch (A.8, B.22, seeds 000/003).

The walker runs in a worker thread (another CPU) and parks inside the test hook with IRQs
off; the event loop meanwhile unmaps the range and frees its page tables.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.gup_fast.gfhelp import P, ParkedWalker, pte_table_of
from tests.unit.mm.mmhelp import MakeKernel, MiB, mmap_anon, pfn_at
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import audit, lookup_pte, sys_madvise, sys_munmap, write_user
from vkernel.kernel.task import Task
from vkernel.kernel.tlb import (
    PageTableUseAfterFree,
    rcu_barrier,
    tlb_remove_table_sync_one,
    tlb_state,
)
from vkernel.kernel.uapi import (
    FOLL_GET,
    FOLL_PIN,
    FOLL_WRITE,
    MADV_COLLAPSE,
    PG_buddy,
    PG_pgtable,
)


async def _setup(make_kernel: MakeKernel, arch: str) -> tuple[Kernel, Task, int, int]:
    """A kernel of ``arch``, 16 pages written at a 2 MiB-aligned address: (kernel, task, addr,
    its PTE table)."""
    kernel = make_kernel(arch=arch)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 4 * MiB)
    a = (a + 2 * MiB - 1) & ~(2 * MiB - 1)
    await write_user(task, a, b"d" * (16 * P))
    return kernel, task, a, pte_table_of(task.mm, a)


def _is_free(kernel: Kernel, pfn: int) -> bool:
    return bool(kernel.mem.flags[pfn] & PG_buddy)


async def test_x86_munmap_waits_for_the_walker_before_freeing_the_table(
    make_kernel: MakeKernel,
) -> None:
    """B.22 IPI mode (x86_64): the TLB-shootdown IPI cannot complete while the walker has IRQs
    off, so munmap does not return and the PTE table stays allocated until it leaves; the
    walker then reads the old (cleared) entries, takes nothing, and nothing was used after free.
    """
    kernel, task, a, table = await _setup(make_kernel, "x86_64")
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    assert tlb_state(kernel).irqs_off == 1
    unmap = asyncio.ensure_future(sys_munmap(task, a, 2 * MiB))
    await asyncio.sleep(0.05)
    assert not unmap.done()
    assert not _is_free(kernel, table)
    assert kernel.mem.flags[table] & PG_pgtable
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(unmap, 5)
    assert _is_free(kernel, table)
    st = tlb_state(kernel)
    assert (st.irqs_off, st.ipi_waits, st.uaf_detected) == (0, 1, 0)


async def test_arm64_munmap_returns_and_the_free_waits_for_a_grace_period(
    make_kernel: MakeKernel,
) -> None:
    """B.22 RCU-table-free mode (arm64, seed 003): munmap completes at once; the table sits in
    an mmu_table_batch until the grace period, which cannot end while the walker has IRQs off.
    """
    kernel, task, a, table = await _setup(make_kernel, "arm64")
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    await asyncio.wait_for(sys_munmap(task, a, 2 * MiB), 5)
    st = tlb_state(kernel)
    assert [table] in st.rcu_pending
    assert not _is_free(kernel, table)
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(rcu_barrier(kernel), 5)
    assert _is_free(kernel, table)
    assert (st.rcu_batches, st.ipi_waits, st.uaf_detected) == (1, 0, 0)


async def test_arm64_without_a_batch_page_falls_back_to_ipi_and_wait(
    make_kernel: MakeKernel,
) -> None:
    """B.22 batch-alloc-failure mode: tlb_remove_table_one() calls tlb_remove_table_sync_one()
    (an IPI that waits for the IRQ-off walker) before freeing: munmap waits, as on x86."""
    kernel, task, a, table = await _setup(make_kernel, "arm64")
    tlb_state(kernel).force_batch_alloc_failure = True
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    unmap = asyncio.ensure_future(sys_munmap(task, a, 2 * MiB))
    await asyncio.sleep(0.05)
    assert not unmap.done()
    assert not _is_free(kernel, table)
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(unmap, 5)
    assert _is_free(kernel, table)
    st = tlb_state(kernel)
    assert st.sync_one >= 1
    assert not st.rcu_pending


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
async def test_unsafe_table_free_is_detected_as_use_after_free(
    make_kernel: MakeKernel, arch: str
) -> None:
    """A.8 with the protection switched off (debug knob): the table is freed under the parked
    walker and poisoned; the walker re-reads it after the park, sees the poison and reports a
    use-after-free. The poison is wiped once the walker has left."""
    kernel, task, a, table = await _setup(make_kernel, arch)
    st = tlb_state(kernel)
    st.unsafe_table_free = True
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    await asyncio.wait_for(sys_munmap(task, a, 2 * MiB), 5)
    assert _is_free(kernel, table)
    assert kernel.mem.frames[table].any()  # poisoned
    w.release()
    with pytest.raises(PageTableUseAfterFree):
        await w.result()
    assert st.uaf_detected == 1
    await asyncio.sleep(0.01)  # the completion runs on the loop
    assert not kernel.mem.frames[table].any()


async def test_walker_parked_after_its_grab_undoes_it_when_munmap_zapped(
    make_kernel: MakeKernel,
) -> None:
    """B.22 'W sees either the old entries (and its grab is undone) or none': a walker parked
    between grab and recheck keeps the pages alive through munmap's zap; the recheck sees the
    cleared PTEs and drops the pins, which frees the pages; munmap (x86) waited for it."""
    kernel, task, a, table = await _setup(make_kernel, "x86_64")
    pfns = [pfn_at(task, a + i * P) for i in range(16)]
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_PIN | FOLL_WRITE, stage="grabbed")
    await w.start()
    unmap = asyncio.ensure_future(sys_munmap(task, a, 2 * MiB))
    await asyncio.sleep(0.05)
    assert not unmap.done()
    assert not any(_is_free(kernel, p) for p in pfns)  # held by the speculative grab
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(unmap, 5)
    assert all(_is_free(kernel, p) for p in pfns)
    assert _is_free(kernel, table)
    assert not kernel.extra_refs.any()
    assert audit(kernel) == []


async def test_thp_split_ipi_is_waited_for_by_the_syscall_tail(make_kernel: MakeKernel) -> None:
    """Seed 003: THP split/collapse broadcast an IPI (tlb_remove_table_sync_one); with a walker
    IRQ-off the unmapper's tlb_finish_mmu waits for it; with none it costs nothing."""
    kernel, task, a, _table = await _setup(make_kernel, "arm64")
    st = tlb_state(kernel)
    tlb_remove_table_sync_one(kernel)
    assert (st.sync_one, st.ipis) == (1, 0)
    w = ParkedWalker(kernel, task.mm, a, 4, FOLL_GET | FOLL_WRITE)
    await w.start()
    tlb_remove_table_sync_one(kernel)
    unmap = asyncio.ensure_future(sys_munmap(task, a + 1 * MiB, P))
    await asyncio.sleep(0.05)
    assert not unmap.done()
    w.release()
    assert await w.result() == 4
    await asyncio.wait_for(unmap, 5)
    from vkernel.kernel.gup import put_pages

    put_pages(kernel, w.pages, 4)
    assert st.ipis == 1


async def test_exit_with_a_parked_walker_frees_tables_once_it_leaves(
    make_kernel: MakeKernel,
) -> None:
    """A.8 (exit_mmap): the exiting task cannot wait, so its unlinked tables stay queued for
    the IPI and are freed as soon as the last IRQ-off walker restores IRQs."""
    kernel, task, a, table = await _setup(make_kernel, "x86_64")
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    kernel.do_exit(task)
    assert not _is_free(kernel, table)
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(rcu_barrier(kernel), 5)
    assert _is_free(kernel, table)
    assert tlb_state(kernel).ipi_pending == []


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
async def test_thp_collapse_waits_out_a_walker(make_kernel: MakeKernel, arch: str) -> None:
    """A.8 (khugepaged: pmdp_collapse_flush + tlb_remove_table_sync_one): MADV_COLLAPSE of a
    range a walker is reading does not complete while the walker has IRQs off; the walker
    sees the collapsed (cleared) PTE table and takes nothing from it."""
    kernel, task, a, table = await _setup(make_kernel, arch)
    await write_user(task, a, b"c" * (2 * MiB))
    w = ParkedWalker(kernel, task.mm, a, 16, FOLL_GET)
    await w.start()
    collapse = asyncio.ensure_future(sys_madvise(task, a, 2 * MiB, MADV_COLLAPSE))
    await asyncio.sleep(0.05)
    assert not collapse.done()
    w.release()
    assert await w.result() == 0
    await asyncio.wait_for(collapse, 5)
    assert lookup_pte(task, a) & 0x80  # now PMD-mapped
    assert not _is_free(kernel, table)  # the old PTE table is the new PMD's deposit
    assert tlb_state(kernel).sync_one >= 1
