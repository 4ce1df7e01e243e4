"""fork: COW, reuse vs copy, DONTFORK, pinned pages, mmap_lock kills (A.10, A.11, B.28-B.37)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from tests.unit.mm.mmhelp import MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import (
    fork,
    read_user_bytes,
    sys_madvise,
    sys_mmap,
    sys_mprotect,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    GUP_PIN_COUNTING_BIAS,
    MADV_DONTFORK,
    MADV_WIPEONFORK,
    MMF_HAS_PINNED,
    PROT_READ,
    PROT_WRITE,
    PG_anon_exclusive,
)


async def test_basic_cow_after_fork_no_leak_into_child(kernel: Kernel, task: Task) -> None:
    """B.28: after fork the parent's memset is not visible in the child (base pages)."""
    a = await mmap_anon(task, 16 * P)
    await write_user(task, a, b"\x11" * 16 * P)
    seq = task.mm.write_protect_seq
    child = await fork(task)
    assert task.mm.write_protect_seq == seq + 2
    pfn = pfn_at(task, a)
    assert pfn_at(child, a) == pfn
    assert kernel.mem.refcount[pfn] == 2
    assert kernel.mem.mapcount[pfn] == 2
    assert not kernel.mem.flags[pfn] & PG_anon_exclusive
    await write_user(task, a, b"\xff" * 16 * P)
    assert await read_user_bytes(child, a, 16 * P) == b"\x11" * 16 * P
    assert kernel.mem.refcount[pfn] == 1
    assert child.ppid == task.pid
    assert child.owner == task.owner
    kernel.do_exit(child)


async def test_cow_after_mprotect_cycle_in_parent(kernel: Kernel, task: Task) -> None:
    """B.28 (mprotect variant): mprotect(R)→mprotect(RW) in the parent still COWs shared pages."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"\x22" * 4 * P)
    child = await fork(task)
    await sys_mprotect(task, a, 4 * P, PROT_READ)
    await sys_mprotect(task, a, 4 * P, PROT_READ | PROT_WRITE)
    await write_user(task, a, b"\xff" * 4 * P)
    assert await read_user_bytes(child, a, 4 * P) == b"\x22" * 4 * P
    kernel.do_exit(child)


async def test_mprotect_cycle_keeps_exclusive_pages_writable(kernel: Kernel, task: Task) -> None:
    """B.31: R→RW on an exclusive page makes it writable again: no fault, no copy."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"x")
    pfn = pfn_at(task, a)
    await sys_mprotect(task, a, P, PROT_READ)
    await sys_mprotect(task, a, P, PROT_READ | PROT_WRITE)
    faults = kernel.vmstat["pgfault"]
    await write_user(task, a, b"y")
    assert pfn_at(task, a) == pfn
    assert kernel.vmstat["pgfault"] == faults


async def test_reuse_when_child_is_gone_refcount_one(kernel: Kernel, task: Task) -> None:
    """B.37b / B.30: non-exclusive page, refcount 1 → reuse (pgreuse +1), becomes exclusive."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"r")
    child = await fork(task)
    kernel.do_exit(child)
    pfn = pfn_at(task, a)
    reuse = kernel.vmstat["pgreuse"]
    await write_user(task, a, b"s")
    assert pfn_at(task, a) == pfn
    assert kernel.vmstat["pgreuse"] == reuse + 1
    assert kernel.mem.flags[pfn] & PG_anon_exclusive


async def test_extra_reference_forces_copy(kernel: Kernel, task: Task) -> None:
    """B.37c / B.32 (CVE-2020-29374): a GUP-style extra ref (refcount 2) forces a copy."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"old")
    child = await fork(task)
    kernel.do_exit(child)
    pfn = pfn_at(task, a)
    kernel.mem.refcount[pfn] += 1
    kernel.extra_refs[pfn] += 1
    reuse = kernel.vmstat["pgreuse"]
    await write_user(task, a, b"new")
    assert pfn_at(task, a) != pfn
    assert kernel.vmstat["pgreuse"] == reuse
    assert bytes(kernel.mem.frames[pfn][:3]) == b"old"
    kernel.mem.put_folio(pfn)
    kernel.extra_refs[pfn] -= 1


async def test_exclusive_page_reuse_counts_pgreuse(kernel: Kernel, task: Task) -> None:
    """B.37a: a write to an exclusive R/O-mapped page (PTE write-protected by hand) reuses."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"a")
    pfn = pfn_at(task, a)
    # Write-protect the PTE by hand, as soft-dirty/uffd-wp tracking would.
    from vkernel.kernel.pgtable import pte_slot

    slot = pte_slot(task.mm, a)
    kernel.mem.u64[slot] = kernel.mem.u64.item(slot) & ~2
    reuse = kernel.vmstat["pgreuse"]
    await write_user(task, a, b"b")
    assert pfn_at(task, a) == pfn
    assert kernel.vmstat["pgreuse"] == reuse + 1


async def test_dontfork_and_wipeonfork(kernel: Kernel, task: Task) -> None:
    """A.11: MADV_DONTFORK VMAs are absent in the child; MADV_WIPEONFORK ones are empty."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"d" * 4 * P)
    await sys_madvise(task, a, P, MADV_DONTFORK)
    await sys_madvise(task, a + 2 * P, P, MADV_WIPEONFORK)
    child = await fork(task)
    assert child.mm.vma_lookup(a) is None
    assert await read_user_bytes(child, a + P, P) == b"d" * P
    assert await read_user_bytes(child, a + 2 * P, P) == bytes(P)
    from vkernel.kernel.errors import UserFault

    with pytest.raises(UserFault):
        await read_user_bytes(child, a, 1)
    kernel.do_exit(child)


async def test_fork_copies_maybe_pinned_exclusive_pages_early(kernel: Kernel, task: Task) -> None:
    """A.11 / B.34: with MMF_HAS_PINNED, a maybe-pinned exclusive page is copied for the child."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"p" * 2 * P)
    pinned = pfn_at(task, a)
    other = pfn_at(task, a + P)
    kernel.mem.refcount[pinned] += GUP_PIN_COUNTING_BIAS
    kernel.extra_refs[pinned] += GUP_PIN_COUNTING_BIAS
    task.mm.flags |= MMF_HAS_PINNED
    child = await fork(task)
    assert pfn_at(child, a) != pinned
    assert pfn_at(child, a + P) == other
    assert kernel.mem.flags[pinned] & PG_anon_exclusive
    # The parent's page stays writable: no COW fault when it writes, the pin sees it.
    faults = kernel.vmstat["pgfault"]
    await write_user(task, a, b"q")
    assert kernel.vmstat["pgfault"] == faults
    assert pfn_at(task, a) == pinned
    assert await read_user_bytes(child, a, 1) == b"p"
    kernel.mem.refcount[pinned] -= GUP_PIN_COUNTING_BIAS
    kernel.extra_refs[pinned] -= GUP_PIN_COUNTING_BIAS
    kernel.do_exit(child)


async def test_fork_of_a_large_region_shares_every_page(make_kernel: MakeKernel) -> None:
    """A.11: the per-leaf-table copy shares all 8192 pages of 32 MiB: refcount and mapcount 2,
    not exclusive, write-protected in both; the child reads the data (speed: bench/bench_mm)."""
    import numpy as np

    from vkernel.kernel.mm_api import pagemap

    k = make_kernel(memory_bytes=128 << 20)
    t = k.spawn("big", "s")
    a = await mmap_anon(t, 32 * MiB)
    await write_user(t, a, b"\1" * (32 * MiB))
    child = await fork(t)
    ents = np.frombuffer(pagemap(t, a, 8192), dtype="<u8")
    pfns = (ents & np.uint64((1 << 55) - 1)).astype(np.int64)
    assert (k.mem.refcount[pfns] == 2).all()
    assert (k.mem.mapcount[pfns] == 2).all()
    assert not (k.mem.flags[pfns] & PG_anon_exclusive).any()
    assert np.array_equal(
        np.frombuffer(pagemap(child, a, 8192), dtype="<u8") & np.uint64((1 << 55) - 1),
        pfns.astype(np.uint64),
    )
    assert await read_user_bytes(child, a + 31 * MiB, 1) == b"\1"
    k.do_exit(child)
    k.do_exit(t)


async def test_fork_oom_fails_cleanly(make_kernel: MakeKernel) -> None:
    """A.11: dup_mmap failure: ENOMEM, the partial child mm is torn down, the parent is intact."""
    k = make_kernel(memory_bytes=4 << 20)
    t = k.spawn("p", "s")
    a = await mmap_anon(t, 8 * MiB)
    with pytest.raises(KernelError):
        await write_user(t, a, b"z" * (8 * MiB))
    with pytest.raises(KernelError) as ei:
        await fork(t)
    assert ei.value.errno == errno.ENOMEM
    assert len(k.tasks) == 1
    assert await read_user_bytes(t, a, 1) == b"z"


async def test_killed_while_waiting_for_mmap_lock_unwinds(kernel: Kernel, task: Task) -> None:
    """§4: a task killed while waiting on mmap_lock gets EINTR and leaves nothing behind."""
    mm = task.mm
    await mm.mmap_lock.write_lock()
    waiter = asyncio.ensure_future(sys_mmap(task, 0, P, PROT_READ, 0x22))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    kernel.kill(task, 9)
    with pytest.raises(KernelError) as ei:
        await waiter
    assert ei.value.errno == errno.EINTR
    mm.mmap_lock.write_unlock()
    assert not mm.vmas


async def test_unshare_fault_gives_an_exclusive_read_only_copy(kernel: Kernel, task: Task) -> None:
    """B.29 / A.10: FAULT_FLAG_UNSHARE on a shared COW page copies it, PTE stays R/O; a later
    write reuses the now-exclusive copy (pgreuse +1) and the child keeps the old data."""
    from vkernel.kernel.memory import handle_mm_fault
    from vkernel.kernel.mm_api import lookup_pte
    from vkernel.kernel.uapi import FAULT_FLAG_ALLOW_RETRY, FAULT_FLAG_KILLABLE, FAULT_FLAG_UNSHARE

    a = await mmap_anon(task, P)
    await write_user(task, a, b"shared")
    child = await fork(task)
    old = pfn_at(task, a)
    vma = task.mm.vma_lookup(a)
    flags = FAULT_FLAG_UNSHARE | FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
    assert handle_mm_fault(vma, a, flags, task) == 0
    new = pfn_at(task, a)
    assert new != old
    assert kernel.mem.flags[new] & PG_anon_exclusive
    assert not lookup_pte(task, a) & 2
    reuse = kernel.vmstat["pgreuse"]
    await write_user(task, a, b"S")
    assert pfn_at(task, a) == new
    assert kernel.vmstat["pgreuse"] == reuse + 1
    assert await read_user_bytes(child, a, 6) == b"shared"
    # Unshare of an already exclusive page is a no-op.
    assert handle_mm_fault(vma, a, flags, task) == 0
    assert pfn_at(task, a) == new
    kernel.do_exit(child)


async def test_kill_between_read_chunks_stops_the_stream(kernel: Kernel, task: Task) -> None:
    """§4: a process killed while its memory is being streamed: the stream ends with EINTR."""
    from vkernel.kernel.mm_api import read_user

    a = await mmap_anon(task, 4 * MiB)
    await write_user(task, a, b"k" * (4 * MiB))
    it = read_user(task, a, 4 * MiB)
    first = await it.__anext__()
    assert len(first) == MiB
    kernel.kill(task, 9)
    with pytest.raises(KernelError) as ei:
        await it.__anext__()
    assert ei.value.errno in (errno.EINTR, errno.ESRCH)


async def test_cow_out_of_memory_is_enomem_and_consistent(make_kernel: MakeKernel) -> None:
    """A.10 wp_page_copy OOM → VM_FAULT_OOM → ENOMEM for the store; the audit stays clean and
    the pages before the failure were copied and written."""
    k = make_kernel(memory_bytes=4 << 20)
    t = k.spawn("p", "s")
    a = await mmap_anon(t, 5 * MiB // 2)
    await write_user(t, a, b"1" * (5 * MiB // 2))
    child = await fork(t)
    free = k.mem.nr_free_pages
    with pytest.raises(KernelError) as ei:
        await write_user(t, a, b"2" * (5 * MiB // 2))
    assert ei.value.errno == errno.ENOMEM
    assert k.mem.nr_free_pages == 0
    assert free > 0
    from vkernel.kernel.mm_api import audit

    assert audit(k) == []
    assert await read_user_bytes(t, a, 1) == b"2"
    assert await read_user_bytes(child, a, 5 * MiB // 2) == b"1" * (5 * MiB // 2)
    k.do_exit(child)
    await write_user(t, a, b"3" * (5 * MiB // 2))
    assert await read_user_bytes(t, a + MiB, 1) == b"3"
