"""Faults and user access: zero page, anon-exclusive pages, SIGSEGV/SIGBUS, OOM (A.9, A.10)."""

from __future__ import annotations

import itertools
import signal

import pytest

from tests.unit.mm.mmhelp import SHARED_ANON, MakeKernel, MiB, P, errname, mmap_anon, pfn_at
from vkernel.kernel.errors import KernelError, UserFault
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.memory import handle_mm_fault
from vkernel.kernel.mm_api import (
    audit,
    fork,
    pagemap,
    read_user,
    read_user_bytes,
    sys_madvise,
    sys_mprotect,
    sys_munmap,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    MADV_DONTNEED,
    PROT_NONE,
    PROT_READ,
    VM_FAULT_SIGSEGV,
    PG_anon,
    PG_anon_exclusive,
)


async def test_read_fault_maps_the_shared_zero_page(kernel: Kernel, task: Task) -> None:
    """A.10 do_anonymous_page: a read maps the zero page (special PTE), no allocation."""
    a = await mmap_anon(task, 4 * P)
    free = kernel.mem.nr_free_pages
    assert await read_user_bytes(task, a, 4 * P) == bytes(4 * P)
    assert pfn_at(task, a) == kernel.mem.zero_pfn
    assert kernel.vmstat["nr_zero_page"] == 4
    assert task.mm.rss_stat[1] == 0
    # PUD, PMD and PTE tables were allocated, nothing else.
    assert kernel.mem.nr_free_pages == free - 3
    assert kernel.vmstat["pgfault"] == 4
    assert task.min_flt == 4


async def test_write_fault_allocates_an_anon_exclusive_page(kernel: Kernel, task: Task) -> None:
    """A.10 do_anonymous_page: a write gets a new zeroed page, anon-exclusive, refcount 1."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a + 10, b"hello")
    pfn = pfn_at(task, a)
    mem = kernel.mem
    assert mem.refcount[pfn] == 1
    assert mem.mapcount[pfn] == 1
    assert mem.flags[pfn] & PG_anon
    assert mem.flags[pfn] & PG_anon_exclusive
    assert await read_user_bytes(task, a, 16) == bytes(10) + b"hello" + bytes(1)
    assert await read_user_bytes(task, a + P, 1) == b"\0"


async def test_write_after_read_replaces_zero_page(kernel: Kernel, task: Task) -> None:
    """A.10 (B.37f): a write to a zero-page PTE allocates a zeroed page (wp_page_copy)."""
    a = await mmap_anon(task, P)
    await read_user_bytes(task, a, 1)
    await write_user(task, a + 1, b"z")
    assert pfn_at(task, a) != kernel.mem.zero_pfn
    assert kernel.vmstat["nr_zero_page"] == 0
    assert await read_user_bytes(task, a, 3) == b"\0z\0"


async def test_access_spans_vmas_and_stops_at_the_first_bad_page(task: Task) -> None:
    """A.9:
    do_user_addr_fault: bytes before the fault are written; SIGSEGV names the first bad byte."""
    a = await mmap_anon(task, 4 * P)
    await sys_mprotect(task, a + 2 * P, P, PROT_READ)
    with pytest.raises(UserFault) as ei:
        await write_user(task, a + P, b"q" * (3 * P))
    assert ei.value.signo == signal.SIGSEGV
    assert ei.value.address == a + 2 * P
    assert await read_user_bytes(task, a + P, P) == b"q" * P
    assert await read_user_bytes(task, a + 2 * P, P) == bytes(P)
    with pytest.raises(UserFault) as ei:
        await read_user_bytes(task, a + 4 * P - 2, 8)
    assert ei.value.address == a + 4 * P


async def test_prot_none_and_holes_give_sigsegv(task: Task) -> None:
    """A.9:
    access_error(): PROT_NONE VMAs and unmapped addresses give SIGSEGV; the task survives."""
    a = await mmap_anon(task, P, prot=PROT_NONE)
    for coro in (
        read_user_bytes(task, a, 1),
        write_user(task, a, b"x"),
        read_user_bytes(task, 0x1000, 1),
    ):
        with pytest.raises(UserFault) as ei:
            await coro
        assert ei.value.signo == signal.SIGSEGV
    b = await mmap_anon(task, P)
    await write_user(task, b, b"ok")


async def test_read_user_streams_chunks_of_at_most_1mib(task: Task) -> None:
    """A.9, §9: read_user yields ≤ 1 MiB chunks in order."""
    a = await mmap_anon(task, 3 * MiB)
    await write_user(task, a, bytes(range(256)) * (3 * MiB // 256))
    sizes = []
    out = bytearray()
    async for chunk in read_user(task, a + 5, 3 * MiB - 10):
        sizes.append(len(chunk))
        out += chunk
    assert max(sizes) <= MiB
    assert bytes(out) == (bytes(range(256)) * (3 * MiB // 256))[5:-5]


async def test_madv_dontneed_drops_pages(kernel: Kernel, task: Task) -> None:
    """A.10, B.13: MADV_DONTNEED: the range's pages are freed; private anon reads back zeros."""
    a = await mmap_anon(task, 8 * P)
    await write_user(task, a, b"x" * 8 * P)
    free = kernel.mem.nr_free_pages
    await sys_madvise(task, a + 2 * P, 4 * P, MADV_DONTNEED)
    assert kernel.mem.nr_free_pages == free + 4
    assert await read_user_bytes(task, a + P, 6 * P) == b"x" * P + bytes(4 * P) + b"x" * P


async def test_shared_anonymous_memory_is_shared_with_the_child(kernel: Kernel, task: Task) -> None:
    """A.10 do_fault, A.11:
    MAP_SHARED|MAP_ANONYMOUS is shmem: parent and child see each other's writes."""
    a = await mmap_anon(task, 2 * P, flags=SHARED_ANON)
    await write_user(task, a, b"parent")
    child = await fork(task)
    assert await read_user_bytes(child, a, 6) == b"parent"
    await write_user(child, a + P, b"child")
    assert await read_user_bytes(task, a + P, 5) == b"child"
    pm = int.from_bytes(pagemap(task, a, 1), "little")
    assert pm >> 61 & 1  # PM_FILE: not an anonymous page
    kernel.do_exit(child)


async def test_oom_on_tiny_memory_leaves_the_kernel_consistent(make_kernel: MakeKernel) -> None:
    """A.9 VM_FAULT_OOM, §5:
    Out of memory: the user access fails with ENOMEM, earlier bytes stay written, audit clean."""
    k = make_kernel(memory_bytes=4 << 20)
    t = k.spawn("oom", "s")
    a = await mmap_anon(t, 8 * MiB)
    with pytest.raises(KernelError) as ei:
        await write_user(t, a, b"y" * (8 * MiB))
    assert errname(ei.value) == "ENOMEM"
    assert k.mem.nr_free_pages == 0
    assert audit(k) == []
    assert await read_user_bytes(t, a, 4) == b"yyyy"
    await sys_munmap(t, a, 8 * MiB)
    assert audit(k) == []
    k.do_exit(t)
    assert k.mem.nr_free_pages == k.mem.boot_free


async def test_unshare_with_write_is_sigsegv(task: Task) -> None:
    """A.9 sanitize_fault_flags: UNSHARE together with WRITE → VM_FAULT_SIGSEGV."""
    a = await mmap_anon(task, P)
    vma = task.mm.vma_lookup(a)
    assert handle_mm_fault(vma, a, FAULT_FLAG_UNSHARE | FAULT_FLAG_WRITE) == VM_FAULT_SIGSEGV


async def test_exit_frees_everything(kernel: Kernel) -> None:
    """A.8, §5:
    exit_mmap: every page and page table goes back; free count returns to its boot value."""
    boot = kernel.mem.nr_free_pages
    t = kernel.spawn("e", "s")
    a = await mmap_anon(t, 4 * MiB)
    await write_user(t, a, b"e" * (3 * MiB))
    b = await mmap_anon(t, 2 * P, flags=SHARED_ANON)
    await write_user(t, b, b"s")
    child = await fork(t)
    await write_user(child, a, b"c")
    kernel.do_exit(t)
    kernel.do_exit(child)
    assert kernel.mem.nr_free_pages == boot
    assert kernel.vmstat["nr_page_table_pages"] == 0


async def test_unaligned_write_into_zero_page_mapped_neighbour(kernel: Kernel, task: Task) -> None:
    """A.10: a store that starts mid-page and ends in a zero-page-mapped page COWs that page too
    (the zero page itself is never written; regression for a page-count off-by-one)."""
    a = await mmap_anon(task, 2 * P)
    await read_user_bytes(task, a, 2 * P)
    await write_user(task, a + 10, b"w" * P)
    assert not kernel.mem.frames[kernel.mem.zero_pfn].any()
    assert pfn_at(task, a + P) != kernel.mem.zero_pfn
    assert await read_user_bytes(task, a + P, 11) == b"w" * 10 + b"\0"


async def test_forced_write_fault_on_private_read_only_mapping(kernel: Kernel, task: Task) -> None:
    """A.9 sanitize_fault_flags / B.8b: a FOLL_FORCE-style write fault on a private R/O VMA is
    allowed (COW mapping) and yields an exclusive anon page whose PTE stays read-only."""
    from vkernel.kernel.mm_api import lookup_pte

    a = await mmap_anon(task, P, prot=PROT_READ)
    vma = task.mm.vma_lookup(a)
    assert handle_mm_fault(vma, a, FAULT_FLAG_WRITE) == 0
    pfn = pfn_at(task, a)
    assert kernel.mem.flags[pfn] & PG_anon_exclusive
    assert not lookup_pte(task, a) & 2
    s = await mmap_anon(task, P, prot=PROT_READ, flags=SHARED_ANON)
    assert handle_mm_fault(task.mm.vma_lookup(s), s, FAULT_FLAG_WRITE) == VM_FAULT_SIGSEGV


async def test_munmap_frees_page_tables_through_one_path(kernel: Kernel, task: Task) -> None:
    """A.8:
    free_pgtables(): tables of an unmapped range go back via tlb_remove_table (hooks see them)."""
    freed: list[int] = []
    kernel.pgtable_free_hooks.append(freed.append)
    a = await mmap_anon(task, 4 * MiB)
    await write_user(task, a, b"t" * (4 * MiB))
    tables = kernel.vmstat["nr_page_table_pages"]
    assert tables == 1 + 1 + 1 + 2  # pgd, pud, pmd, two PTE tables
    await sys_munmap(task, a, 4 * MiB)
    assert kernel.vmstat["nr_page_table_pages"] == 1
    assert len(freed) == 4
    assert all(not kernel.mem.frames[p].any() for p in freed)


async def test_read_of_scattered_frames_is_exact(kernel: Kernel, task: Task) -> None:
    """A.9: a read over physically scattered pages returns exactly the bytes, at any offset."""
    a = await mmap_anon(task, 8 * P)
    other = await mmap_anon(task, 8 * P)
    await write_user(task, a, bytes(8 * P))
    # Free the odd pages, let another mapping take those frames, then refault the odd pages.
    for i in (1, 3, 5):
        await sys_madvise(task, a + i * P, P, MADV_DONTNEED)
    await write_user(task, other, bytes(3 * P))
    for i in range(8):
        await write_user(task, a + i * P, bytes([i + 10]) * P)
    pfns = [pfn_at(task, a + i * P) for i in range(8)]
    assert any(q != p + 1 for p, q in itertools.pairwise(pfns))
    want = b"".join(bytes([i + 10]) * P for i in range(8))
    for off, n in [(0, 8 * P), (5, 3 * P), (P - 1, 2), (100, 8 * P - 200)]:
        assert await read_user_bytes(task, a + off, n) == want[off : off + n]
