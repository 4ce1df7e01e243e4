"""THP: PMD-mapped folios, splitting, COW after fork (A.12, B.28 THP variants, B.37d)."""

from __future__ import annotations

from tests.unit.mm.mmhelp import MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import (
    dump_page,
    fork,
    lookup_pte,
    proc_smaps,
    read_user_bytes,
    sys_madvise,
    sys_mprotect,
    sys_munmap,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    HPAGE_PMD_NR,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
    PG_head,
    PG_tail,
)

RW = PROT_READ | PROT_WRITE


async def _thp(task: Task, size: int = 4 * MiB) -> int:
    a = await mmap_anon(task, size)
    await sys_madvise(task, a, size, MADV_HUGEPAGE)
    return a


async def test_write_fault_maps_a_pmd_thp(kernel: Kernel, task: Task) -> None:
    """A.12:
    do_huge_pmd_anonymous_page: first write in an aligned 2 MiB maps an order-9 folio by PMD."""
    a = await _thp(task)
    await write_user(task, a + 5, b"T")
    assert lookup_pte(task, a) & 0x80
    head = pfn_at(task, a)
    mem = kernel.mem
    assert mem.flags[head] & PG_head
    assert mem.flags[head + 1] & PG_tail
    assert dump_page(kernel, head + 7)["compound_head"] == head
    assert dump_page(kernel, head + 7)["order"] == 9
    assert kernel.vmstat["thp_fault_alloc"] == 1
    assert kernel.vmstat["nr_anon_transparent_hugepages"] == 1
    assert "AnonHugePages:      2048 kB" in proc_smaps(task)
    assert await read_user_bytes(task, a + 4, 3) == b"\0T\0"


async def test_thp_always_mode_without_madvise(make_kernel: MakeKernel) -> None:
    """A.12: transparent_hugepage=always: no madvise needed."""
    k = make_kernel(thp="always")
    t = k.spawn("a", "s")
    a = await mmap_anon(t, 2 * MiB)
    await write_user(t, a, b"x")
    assert k.vmstat["thp_fault_alloc"] == 1


async def test_partial_munmap_splits_the_pmd(kernel: Kernel, task: Task) -> None:
    """A.12:
    __split_huge_pmd on partial munmap: PTE-mapped THP, whole block freed with the last map."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"s" * (2 * MiB))
    head = pfn_at(task, a)
    free = kernel.mem.nr_free_pages
    await sys_munmap(task, a + MiB, MiB)
    assert kernel.vmstat["thp_split_pmd"] == 1
    assert not lookup_pte(task, a) & 0x80
    assert pfn_at(task, a + P) == head + 1
    assert kernel.mem.refcount[head] == 256
    assert kernel.mem.nr_free_pages == free  # the folio stays whole while mapped
    await sys_munmap(task, a, MiB)
    assert kernel.mem.flags[head] & 0x8000  # buddy: the whole block went back
    assert kernel.mem.nr_free_pages >= free + HPAGE_PMD_NR


async def test_partial_mprotect_and_dontneed_split(kernel: Kernel, task: Task) -> None:
    """A.12: mprotect / MADV_DONTNEED of part of a THP split the PMD; data is kept."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"m" * (2 * MiB))
    await sys_mprotect(task, a, P, PROT_READ)
    assert kernel.vmstat["thp_split_pmd"] == 1
    assert await read_user_bytes(task, a, 2) == b"mm"
    await sys_madvise(task, a + P, P, MADV_DONTNEED)
    assert await read_user_bytes(task, a + P, 2) == b"\0\0"
    assert await read_user_bytes(task, a + 2 * P, 2) == b"mm"


async def test_cow_of_pmd_thp_after_fork(kernel: Kernel, task: Task) -> None:
    """B.28 THP / A.12: parent write splits the shared PMD and copies only the touched subpage."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"c" * (2 * MiB))
    head = pfn_at(task, a)
    child = await fork(task)
    assert kernel.mem.refcount[head] == 2
    await write_user(task, a + 3 * P, b"\xff" * P)
    assert kernel.vmstat["thp_split_pmd"] == 1
    assert pfn_at(task, a + 3 * P) != head + 3
    assert pfn_at(task, a + 4 * P) == head + 4
    assert await read_user_bytes(child, a + 3 * P, P) == b"c" * P
    # B.37d: PTE-mapped large folio → copy of that subpage only, never reuse.
    await write_user(task, a + 5 * P, b"\xee")
    assert pfn_at(task, a + 5 * P) != head + 5
    kernel.do_exit(child)


async def test_thp_reused_when_child_exits(kernel: Kernel, task: Task) -> None:
    """A.12 do_huge_pmd_wp_page: refcount == 1 → reuse the whole PMD, no split."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"u")
    head = pfn_at(task, a)
    child = await fork(task)
    kernel.do_exit(child)
    await write_user(task, a, b"v")
    assert pfn_at(task, a) == head
    assert lookup_pte(task, a) & 0x80
    assert kernel.vmstat["thp_split_pmd"] == 0


async def test_cow_of_pte_mapped_thp_after_fork(kernel: Kernel, task: Task) -> None:
    """B.28 PTE-mapped THP: split first, fork, then the parent's memset does not leak."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"p" * (2 * MiB))
    await sys_mprotect(task, a, P, PROT_READ)
    await sys_mprotect(task, a, P, RW)
    child = await fork(task)
    await write_user(task, a, b"\xff" * (2 * MiB))
    assert await read_user_bytes(child, a, 2 * MiB) == b"p" * (2 * MiB)
    kernel.do_exit(child)
    assert a % PMD_SIZE == 0


async def test_read_fault_maps_the_huge_zero_page(kernel: Kernel, task: Task) -> None:
    """A.12: a read in a THP range maps the huge zero folio by PMD (no RSS); a write then splits
    it into small zero-page PTEs and COWs only the written 4 KiB."""
    a = await _thp(task, 2 * MiB)
    assert await read_user_bytes(task, a, 2 * MiB) == bytes(2 * MiB)
    assert lookup_pte(task, a) & 0x80
    hz = kernel.mem.huge_zero_pfn
    assert pfn_at(task, a + 3 * P) == hz + 3
    assert task.mm.rss_stat[1] == 0
    assert "AnonHugePages:         0 kB" in proc_smaps(task)
    child = await fork(task)
    assert pfn_at(child, a) == hz
    await write_user(task, a + P, b"h")
    assert kernel.vmstat["thp_split_pmd"] == 1
    assert pfn_at(task, a) == kernel.mem.zero_pfn
    assert pfn_at(task, a + P) not in (hz + 1, kernel.mem.zero_pfn)
    assert task.mm.rss_stat[1] == 1
    assert await read_user_bytes(child, a + P, 1) == b"\0"
    kernel.do_exit(child)
    await sys_munmap(task, a, 2 * MiB)


async def _pte_mapped_thp(task: Task) -> int:
    """A PTE-mapped THP: fault a PMD THP, then mprotect one subpage R and back RW (B.36 setup)."""
    a = await _thp(task, 2 * MiB)
    await write_user(task, a, b"o" * (2 * MiB))
    await sys_mprotect(task, a, P, PROT_READ)
    await sys_mprotect(task, a, P, RW)
    assert not lookup_pte(task, a) & 0x80
    return a


async def test_collapse_then_fork_no_leak(kernel: Kernel, task: Task) -> None:
    """B.36a: MADV_COLLAPSE a PTE-mapped THP, fork, parent writes: the child keeps old data."""
    from vkernel.kernel.uapi import MADV_COLLAPSE

    a = await _pte_mapped_thp(task)
    await sys_madvise(task, a, 2 * MiB, MADV_COLLAPSE)
    assert lookup_pte(task, a) & 0x80
    child = await fork(task)
    await write_user(task, a, b"\xff" * (2 * MiB))
    assert await read_user_bytes(child, a, 2 * MiB) == b"o" * (2 * MiB)
    kernel.do_exit(child)


async def test_fork_then_collapse_fully_and_partly_shared(kernel: Kernel, task: Task) -> None:
    """B.36b/c: fork then collapse in the parent. Fully shared: every PTE is R/O after fork, so
    6.12's scan says SCAN_PAGE_RO → EINVAL (cow.c skips that case). Lower half shared (upper half
    DONTFORK, still writable): the parent gets a new exclusive THP, the child keeps its data."""
    import errno

    from vkernel.kernel.errors import KernelError
    from vkernel.kernel.uapi import MADV_COLLAPSE, MADV_DONTFORK

    a = await _pte_mapped_thp(task)
    child = await fork(task)
    with __import__("pytest").raises(KernelError) as ei:
        await sys_madvise(task, a, 2 * MiB, MADV_COLLAPSE)
    assert ei.value.errno == errno.EINVAL
    kernel.do_exit(child)
    b = await _pte_mapped_thp(task)
    await sys_madvise(task, b + MiB, MiB, MADV_DONTFORK)
    child = await fork(task)
    await sys_madvise(task, b + MiB, MiB, 11)  # MADV_DOFORK so the range is one VMA again
    await sys_madvise(task, b, 2 * MiB, MADV_COLLAPSE)
    assert lookup_pte(task, b) & 0x80
    await write_user(task, b, b"\xfe" * (2 * MiB))
    assert await read_user_bytes(child, b, MiB) == b"o" * MiB
    kernel.do_exit(child)


async def test_collapse_refuses_pinned_pages_with_eagain(kernel: Kernel, task: Task) -> None:
    """A.12, B.36:
    MADV_COLLAPSE: a page with an extra (GUP) reference → SCAN_PAGE_COUNT → EAGAIN."""
    import errno

    from vkernel.kernel.errors import KernelError
    from vkernel.kernel.uapi import MADV_COLLAPSE

    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"g" * (2 * MiB))
    pfn = pfn_at(task, a + P)
    kernel.mem.refcount[pfn] += 1
    kernel.extra_refs[pfn] += 1
    try:
        with __import__("pytest").raises(KernelError) as ei:
            await sys_madvise(task, a, 2 * MiB, MADV_COLLAPSE)
        assert ei.value.errno == errno.EAGAIN
    finally:
        kernel.mem.refcount[pfn] -= 1
        kernel.extra_refs[pfn] -= 1
    await sys_madvise(task, a, 2 * MiB, MADV_COLLAPSE)
    assert lookup_pte(task, a) & 0x80
    assert await read_user_bytes(task, a + MiB, 3) == b"ggg"
