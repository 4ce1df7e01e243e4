"""Pins vs COW: unshare on R/O pins, reuse, fork with pinned pages, FOLL_GET leaks
(kernel-semantics.md A.10-A.12, B.28-B.37) on anon, shmem and THP memory."""

from __future__ import annotations

import numpy as np

from tests.unit.gup.guphelp import mm_of, page_array, vm
from tests.unit.mm.mmhelp import RW, SHARED_ANON, MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel import gup
from vkernel.kernel.gup import PageArray
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import (
    fork,
    lookup_pte,
    read_user_bytes,
    sys_mprotect,
    sys_munmap,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_PSE,
    _PAGE_RW,
    FOLL_LONGTERM,
    FOLL_WRITE,
    HPAGE_PMD_NR,
    PROT_READ,
    PG_anon_exclusive,
)


async def pin(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    """pin_user_pages() under the task's mmap_lock."""
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        return await gup.pin_user_pages(mm, start, n, flags, pages, current=task)


async def get(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    """get_user_pages() under the task's mmap_lock."""
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        return await gup.get_user_pages(mm, start, n, flags, pages, current=task)


def frame(kernel: Kernel, pfn: int, n: int = 8) -> bytes:
    """The first ``n`` bytes of a frame: what a device reads through a pin."""
    return bytes(kernel.mem.frames[pfn][:n])


async def test_ro_pin_on_shared_page_unshares(kernel: Kernel, task: Task) -> None:
    """B.29: after fork the parent's R/O longterm pin breaks COW by unsharing: a new exclusive
    page mapped read-only; the parent's later write reuses it and the pin sees the write; the
    child keeps the old content."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"original")
    child = await fork(task)
    shared = pfn_at(task, a)
    assert pfn_at(child, a) == shared
    pages = page_array(1)
    assert await pin(task, a, 1, FOLL_LONGTERM, pages) == 1
    new = int(pages[0])
    assert new != shared
    assert pfn_at(task, a) == new
    assert kernel.mem.flags[new] & PG_anon_exclusive
    assert not lookup_pte(task, a) & _PAGE_RW
    await write_user(task, a, b"parent!!")
    assert pfn_at(task, a) == new  # write fault reused the exclusive page
    assert frame(kernel, new) == b"parent!!"
    assert await read_user_bytes(child, a, 8) == b"original"
    gup.unpin_user_pages(kernel, pages, 1)
    kernel.do_exit(child)


async def test_short_term_ro_pin_of_shared_anon_also_unshares(kernel: Kernel, task: Task) -> None:
    """A.10 gup_must_unshare: any R/O FOLL_PIN of a non-exclusive anon page unshares; a R/O
    FOLL_GET never does (it takes a reference on the shared page)."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"\x01" * 2 * P)
    child = await fork(task)
    shared = pfn_at(task, a)
    pages = page_array(2)
    assert await get(task, a, 1, 0, pages) == 1
    assert pages[0] == shared
    assert await pin(task, a + P, 1, 0, pages[1:]) == 1
    assert pages[1] != pfn_at(child, a + P)
    gup.put_page(kernel, int(pages[0]))
    gup.unpin_user_page(kernel, int(pages[1]))
    kernel.do_exit(child)


async def test_ro_pin_on_previously_shared_page_reuses(kernel: Kernel, task: Task) -> None:
    """B.30: fork, child exits: the R/O, non-exclusive page with refcount 1 is reused by the
    unshare (marked exclusive, no copy); a later write reuses it too; the pin sees it."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"before")
    child = await fork(task)
    kernel.do_exit(child)
    pfn = pfn_at(task, a)
    assert not kernel.mem.flags[pfn] & PG_anon_exclusive
    pages = page_array(1)
    assert await pin(task, a, 1, 0, pages) == 1
    assert pages[0] == pfn
    assert kernel.mem.flags[pfn] & PG_anon_exclusive
    await write_user(task, a, b"after!")
    assert pfn_at(task, a) == pfn
    assert frame(kernel, pfn, 6) == b"after!"
    gup.unpin_user_page(kernel, pfn)


async def test_ro_pin_on_ro_mapped_exclusive_page(kernel: Kernel, task: Task) -> None:
    """B.31: an exclusive page mapped R/O (mprotect) takes no unshare fault for a R/O pin;
    after mprotect(RW) a write reuses it and the pin sees the change."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"first")
    pfn = pfn_at(task, a)
    await sys_mprotect(task, a, P, PROT_READ)
    pgfault = vm(task, "pgfault")
    pages = page_array(1)
    assert await pin(task, a, 1, FOLL_LONGTERM, pages) == 1
    assert pages[0] == pfn
    assert vm(task, "pgfault") == pgfault
    await sys_mprotect(task, a, P, RW)
    await write_user(task, a, b"again")
    assert pfn_at(task, a) == pfn
    assert frame(kernel, pfn, 5) == b"again"
    gup.unpin_user_page(kernel, pfn)


async def test_get_reference_forces_a_copy_no_leak(kernel: Kernel, task: Task) -> None:
    """B.32 (a) / B.37 (c): a FOLL_GET reference (vmsplice) taken by the child, which then
    unmaps: the parent's write must copy (refcount > 1), and the reference keeps the old data."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"secret")
    child = await fork(task)
    pages = page_array(1)
    assert await get(child, a, 1, 0, pages) == 1
    old = int(pages[0])
    await sys_munmap(child, a, P)
    await write_user(task, a, b"public")
    assert pfn_at(task, a) != old
    assert frame(kernel, old, 6) == b"secret"
    gup.put_page(kernel, old)
    kernel.do_exit(child)


async def test_get_before_fork_unmap_in_parent(kernel: Kernel, task: Task) -> None:
    """B.32 (b): a GET reference taken before fork, the parent unmaps: the child's write copies
    and the reference keeps the old content."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"old")
    pages = page_array(1)
    assert await get(task, a, 1, 0, pages) == 1
    child = await fork(task)
    await sys_munmap(task, a, P)
    await write_user(child, a, b"new")
    assert pfn_at(child, a) != pages[0]
    assert frame(kernel, int(pages[0]), 3) == b"old"
    gup.put_pages(kernel, pages, 1)
    kernel.do_exit(child)


async def test_rw_longterm_pin_survives_mprotect_cycle(kernel: Kernel, task: Task) -> None:
    """B.33: R/W longterm pin, mprotect(R) then mprotect(RW): the user's write reaches the pinned
    page (exclusive → reuse, never a copy)."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"\x00")
    pages = page_array(1)
    assert await pin(task, a, 1, FOLL_WRITE | FOLL_LONGTERM, pages) == 1
    await sys_mprotect(task, a, P, PROT_READ)
    await sys_mprotect(task, a, P, RW)
    await write_user(task, a, b"\xff" * 8)
    assert pfn_at(task, a) == pages[0]
    assert frame(kernel, int(pages[0])) == b"\xff" * 8
    gup.unpin_user_pages(kernel, pages, 1)


async def test_pinned_page_and_fork(kernel: Kernel, task: Task) -> None:
    """B.34 / A.11: with a real R/W longterm pin, fork gives the child its own copy; the parent's
    page stays mapped writable and exclusive, its writes reach the pin without a COW fault."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"A" * 2 * P)
    pages = page_array(1)
    assert await pin(task, a, 1, FOLL_WRITE | FOLL_LONGTERM, pages) == 1
    pinned = int(pages[0])
    unpinned = pfn_at(task, a + P)
    child = await fork(task)
    assert pfn_at(child, a) != pinned
    assert pfn_at(child, a + P) == unpinned  # not pinned: shared COW as usual
    assert lookup_pte(task, a) & _PAGE_RW
    assert kernel.mem.flags[pinned] & PG_anon_exclusive
    pgfault = vm(task, "pgfault")
    await write_user(task, a, b"B" * 8)
    assert vm(task, "pgfault") == pgfault
    assert frame(kernel, pinned) == b"B" * 8
    assert await read_user_bytes(child, a, 8) == b"A" * 8
    gup.unpin_user_pages(kernel, pages, 1)
    kernel.do_exit(child)


async def test_pinned_thp_and_fork(make_kernel: MakeKernel) -> None:
    """B.34 (THP): a pinned PMD-mapped THP is split in the parent at fork and copied per PTE
    for the child; the parent keeps the pinned folio mapped."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("p", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"T" * 2 * MiB)
    head = pfn_at(task, a)
    pages = page_array(HPAGE_PMD_NR)
    assert await pin(task, a, HPAGE_PMD_NR, FOLL_WRITE, pages) == HPAGE_PMD_NR
    child = await fork(task)
    assert not lookup_pte(task, a) & _PAGE_PSE
    assert pfn_at(task, a + 5 * P) == head + 5
    assert pfn_at(child, a + 5 * P) != head + 5
    await write_user(task, a, b"P" * 4)
    assert frame(kernel, head, 4) == b"PPPP"
    assert await read_user_bytes(child, a, 4) == b"TTTT"
    gup.unpin_user_pages(kernel, pages, HPAGE_PMD_NR)
    kernel.do_exit(child)


async def test_ro_pin_on_shared_thp_splits_then_unshares(make_kernel: MakeKernel) -> None:
    """B.29 (THP): a R/O pin of a THP shared with a child splits the PMD and unshares only the
    pinned subpages into new small pages."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("p", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"S" * 2 * MiB)
    head = pfn_at(task, a)
    child = await fork(task)
    pages = page_array(2)
    assert await pin(task, a + 3 * P, 2, FOLL_LONGTERM, pages) == 2
    assert not lookup_pte(task, a) & _PAGE_PSE
    assert pfn_at(task, a) == head
    for i in range(2):
        p = int(pages[i])
        assert kernel.mem.order[p] == 0
        assert p == pfn_at(task, a + (3 + i) * P)
        assert p != head + 3 + i
        assert frame(kernel, p, 1) == b"S"
    gup.unpin_user_pages(kernel, pages, 2)
    kernel.do_exit(child)


async def test_zero_page_longterm_ro_pin_unshares(kernel: Kernel, task: Task) -> None:
    """B.35 (shared zero page): a R/O LONGTERM pin of the zero page unshares it into an anon
    copy mapped R/O, so a later write through the page table is seen by the pin; a short-term
    R/O pin keeps the zero page (B.35 (c))."""
    a = await mmap_anon(task, 2 * P)
    await read_user_bytes(task, a, 2 * P)
    zero = kernel.mem.zero_pfn
    pages = page_array(2)
    assert await pin(task, a, 1, 0, pages) == 1
    assert pages[0] == zero
    assert await pin(task, a + P, 1, FOLL_LONGTERM, pages[1:]) == 1
    p = int(pages[1])
    assert p != zero
    assert pfn_at(task, a + P) == p
    assert kernel.mem.flags[p] & PG_anon_exclusive
    assert not lookup_pte(task, a + P) & _PAGE_RW
    await write_user(task, a + P, b"seen")
    assert frame(kernel, p, 4) == b"seen"
    gup.unpin_user_pages(kernel, pages, 2)


async def test_huge_zero_page_pins(make_kernel: MakeKernel) -> None:
    """A.12: a short-term R/O pin of the huge zero PMD pins the huge zero folio (refcount and
    _pincount); it stays allocated after munmap until unpinned. A LONGTERM R/O pin unshares."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("z", "s")
    a = await mmap_anon(task, 2 * MiB)
    await read_user_bytes(task, a, 1)
    hz = kernel.mem.huge_zero_pfn
    assert hz >= 0
    pages = page_array(4)
    assert await pin(task, a, 4, 0, pages) == 4
    assert (pages == np.arange(hz, hz + 4)).all()
    assert kernel.mem.folio_pincount(hz) == 4
    await sys_munmap(task, a, 2 * MiB)
    assert kernel.mem.huge_zero_pfn == hz
    gup.unpin_user_pages(kernel, pages, 4)
    assert kernel.mem.huge_zero_pfn == -1
    b = await mmap_anon(task, 2 * MiB)
    await read_user_bytes(task, b, 1)
    assert await pin(task, b, 1, FOLL_LONGTERM, pages) == 1
    assert pages[0] != kernel.mem.huge_zero_pfn
    assert pfn_at(task, b) == pages[0]
    gup.unpin_user_pages(kernel, pages, 1)


async def test_shmem_pins_share_the_page_cache(kernel: Kernel, task: Task) -> None:
    """B.35 / A.6 (shmem): pins of MAP_SHARED|MAP_ANONYMOUS memory reference the page cache
    page itself (no unshare, even R/O LONGTERM: not a COW mapping); writes are seen by the pin
    and by a forked child."""
    a = await mmap_anon(task, P, RW, SHARED_ANON)
    await write_user(task, a, b"cache")
    child = await fork(task)
    pages = page_array(1)
    assert await pin(task, a, 1, FOLL_LONGTERM, pages) == 1
    assert pages[0] == pfn_at(task, a)
    await write_user(child, a, b"child")
    assert frame(kernel, int(pages[0]), 5) == b"child"
    gup.unpin_user_pages(kernel, pages, 1)
    kernel.do_exit(child)


async def test_forced_write_to_shared_cow_page(kernel: Kernel, task: Task) -> None:
    """A.1 FOLL_FORCE: a forced write into a R/O private page shared with a child COWs into an
    exclusive page of the caller's mm; the child keeps the old content."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"orig")
    await sys_mprotect(task, a, P, PROT_READ)
    child = await fork(task)
    from vkernel.kernel.uapi import FOLL_FORCE

    pages = page_array(1)
    assert await get(task, a, 1, FOLL_WRITE | FOLL_FORCE, pages) == 1
    p = int(pages[0])
    assert p != pfn_at(child, a)
    assert kernel.mem.flags[p] & PG_anon_exclusive
    kernel.mem.frames[p][:4] = np.frombuffer(b"bpt!", dtype=np.uint8)
    assert await read_user_bytes(task, a, 4) == b"bpt!"
    assert await read_user_bytes(child, a, 4) == b"orig"
    gup.put_page(kernel, p)
    kernel.do_exit(child)


async def test_forced_access_to_prot_none_shared_page(kernel: Kernel, task: Task) -> None:
    """A.1/A.10: FOLL_FORCE on a PROT_NONE private page shared with a child: the forced write
    and the R/O pin's unshare go to do_wp_page (not do_numa_page: the VMA is inaccessible)
    and COW into an exclusive page; the child keeps its content."""
    from vkernel.kernel.uapi import FOLL_FORCE, PROT_NONE

    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"N" * 2 * P)
    child = await fork(task)
    await sys_mprotect(task, a, 2 * P, PROT_NONE)
    shared = pfn_at(child, a)
    pages = page_array(2)
    assert await get(task, a, 1, FOLL_WRITE | FOLL_FORCE, pages) == 1
    assert pages[0] != shared
    assert await pin(task, a + P, 1, FOLL_FORCE, pages[1:]) == 1
    assert pages[1] != pfn_at(child, a + P)
    assert kernel.mem.flags[int(pages[1])] & PG_anon_exclusive
    assert await read_user_bytes(child, a, 2) == b"NN"
    gup.put_page(kernel, int(pages[0]))
    gup.unpin_user_page(kernel, int(pages[1]))
    kernel.do_exit(child)
