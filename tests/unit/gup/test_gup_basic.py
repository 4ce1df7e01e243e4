"""GUP and pin basics: the matrix, pin arithmetic, argument rules, errors, partial counts
(kernel-semantics.md A.1-A.5, B.1-B.14) and the seed-004 overflow rule."""

from __future__ import annotations

import errno
import signal
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from tests.unit.gup.guphelp import mm_of, page_array, vm
from tests.unit.mm.mmhelp import ANON, RW, SHARED_ANON, MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel import gup
from vkernel.kernel.gup import Locked, PageArray
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.memory import set_test_fault_hook
from vkernel.kernel.mm_api import lookup_pte, read_user_bytes, sys_mprotect, write_user
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SPECIAL,
    EHWPOISON,
    FAULT_FLAG_RETRY_NOWAIT,
    FOLL_ANON,
    FOLL_DUMP,
    FOLL_FORCE,
    FOLL_GET,
    FOLL_HWPOISON,
    FOLL_LONGTERM,
    FOLL_MADV_POPULATE,
    FOLL_NOFAULT,
    FOLL_NOWAIT,
    FOLL_PIN,
    FOLL_SPLIT_PMD,
    FOLL_TOUCH,
    FOLL_WRITE,
    GUP_PIN_COUNTING_BIAS,
    HPAGE_PMD_NR,
    INTERNAL_GUP_FLAGS,
    MAP_FIXED,
    MMF_HAS_PINNED,
    PAGE_SHIFT,
    PROT_NONE,
    PROT_READ,
    VM_FAULT_HWPOISON,
    VM_FAULT_RETRY,
    VM_IO,
    VM_PFNMAP,
    PG_anon_exclusive,
    PG_dirty,
)
from vkernel.kernel.vma import VMA

Api = Callable[[Task, int, int, int, PageArray], Awaitable[int]]


async def _get(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        return await gup.get_user_pages(mm, start, n, flags, pages, current=task)


async def _pin(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        return await gup.pin_user_pages(mm, start, n, flags, pages, current=task)


async def _pin_lt(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    return await gup.pin_user_pages_unlocked(
        mm_of(task), start, n, pages, flags | FOLL_LONGTERM, current=task
    )


async def _get_unlocked(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    return await gup.get_user_pages_unlocked(mm_of(task), start, n, pages, flags, current=task)


async def _pin_remote(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    mm = mm_of(task)
    locked = Locked(1)
    await mm.mmap_lock.read_lock(task)
    try:
        return await gup.pin_user_pages_remote(mm, start, n, flags, pages, locked)
    finally:
        if locked.value:
            mm.mmap_lock.read_unlock()


APIS: dict[str, tuple[Api, bool]] = {
    "get": (_get, False),
    "get_unlocked": (_get_unlocked, False),
    "pin": (_pin, True),
    "pin_longterm": (_pin_lt, True),
    "pin_remote": (_pin_remote, True),
}


def vma_at(task: Task, addr: int) -> VMA:
    """The VMA containing ``addr``."""
    vma = mm_of(task).vma_lookup(addr)
    assert vma is not None
    return vma


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("kind", ["private", "shared", "thp"])
@pytest.mark.parametrize("chunk", [1, 512, 123])
async def test_gup_matrix(
    make_kernel: MakeKernel, api: str, write: bool, kind: str, chunk: int
) -> None:
    """B.1: every API × write × private/shared/THP × nr per call walks a pre-touched 4 MiB
    area chunk by chunk: each call returns the chunk (the last the remainder), pinned folios
    are maybe-DMA-pinned, and releasing everything restores every refcount."""
    kernel = make_kernel(thp="always" if kind == "thp" else "never")
    task = kernel.spawn("gup", "s")
    size = 4 * MiB
    a = await mmap_anon(task, size, RW, SHARED_ANON if kind == "shared" else ANON)
    await write_user(task, a, b"\x5a" * size)
    call, pin = APIS[api]
    npages = size >> PAGE_SHIFT
    pages = page_array(npages)
    before = kernel.mem.refcount.copy()
    done = 0
    while done < npages:
        n = min(chunk, npages - done)
        ret = await call(task, a + done * P, n, FOLL_WRITE if write else 0, pages[done:])
        assert ret == n
        done += n
    assert done == npages
    expect = np.array([pfn_at(task, a + i * P) for i in range(0, npages, 97)])
    assert (pages[::97] == expect).all()
    if pin:
        assert all(kernel.mem.folio_maybe_dma_pinned(int(p)) for p in pages[::61])
        assert vm(task, "nr_foll_pin_acquired") == npages
        gup.unpin_user_pages(kernel, pages, npages)
        assert vm(task, "nr_foll_pin_released") == npages
    else:
        gup.put_pages(kernel, pages, npages)
    assert (kernel.mem.refcount == before).all()
    assert not kernel.extra_refs.any()
    assert not kernel.extra_pins.any()


async def test_pin_refcount_arithmetic_small_page(kernel: Kernel, task: Task) -> None:
    """B.2: a pin adds 1024 to a small page's refcount and counts one acquired pin; unpin
    undoes both; MMF_HAS_PINNED is set and stays set."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"x")
    pfn = pfn_at(task, a)
    r0 = int(kernel.mem.refcount[pfn])
    pages = page_array(1)
    assert await _pin(task, a, 1, FOLL_WRITE, pages) == 1
    assert pages[0] == pfn
    assert kernel.mem.refcount[pfn] == r0 + GUP_PIN_COUNTING_BIAS
    assert kernel.mem.folio_maybe_dma_pinned(pfn)
    assert vm(task, "nr_foll_pin_acquired") == 1
    assert mm_of(task).flags & MMF_HAS_PINNED
    gup.unpin_user_page(kernel, pfn)
    assert kernel.mem.refcount[pfn] == r0
    assert not kernel.mem.folio_maybe_dma_pinned(pfn)
    assert vm(task, "nr_foll_pin_released") == 1
    assert mm_of(task).flags & MMF_HAS_PINNED


async def test_pin_arithmetic_thp(make_kernel: MakeKernel) -> None:
    """B.3: pinning 512 subpages of a PMD THP adds 512 to refcount and _pincount; 512 single
    unpins balance the counters. nr=123 from subpage 0 pins 123."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("thp", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"\x01" * P)
    assert lookup_pte(task, a) & 0x80
    head = pfn_at(task, a)
    r0 = int(kernel.mem.refcount[head])
    pages = page_array(HPAGE_PMD_NR)
    assert await _pin(task, a, HPAGE_PMD_NR, FOLL_WRITE, pages) == HPAGE_PMD_NR
    assert (pages == np.arange(head, head + HPAGE_PMD_NR)).all()
    assert kernel.mem.refcount[head] == r0 + HPAGE_PMD_NR
    assert kernel.mem.folio_pincount(head) == HPAGE_PMD_NR
    assert vm(task, "nr_foll_pin_acquired") == HPAGE_PMD_NR
    for p in pages.tolist():
        gup.unpin_user_page(kernel, p)
    assert kernel.mem.folio_pincount(head) == 0
    assert kernel.mem.refcount[head] == r0
    assert vm(task, "nr_foll_pin_released") == HPAGE_PMD_NR
    assert await _pin(task, a, 123, 0, pages) == 123
    assert kernel.mem.folio_pincount(head) == 123
    assert kernel.mem.refcount[head] == r0 + 123
    gup.unpin_user_pages(kernel, pages, 123)
    assert kernel.mem.folio_pincount(head) == 0


async def test_pin_from_the_middle_of_a_thp(make_kernel: MakeKernel) -> None:
    """B.3 / A.3 step 5: a GUP starting inside a THP covers the rest of it in one step and
    continues on the next folio; pages[] holds the subpages in order."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("thp", "s")
    a = await mmap_anon(task, 4 * MiB)
    await write_user(task, a, b"\x01" * 4 * MiB)
    pages = page_array(600)
    start = a + 300 * P
    assert await _pin(task, start, 600, FOLL_WRITE, pages) == 600
    assert [int(p) for p in pages[::50]] == [pfn_at(task, start + i * P) for i in range(0, 600, 50)]
    h1, h2 = pfn_at(task, a), pfn_at(task, a + 2 * MiB)
    assert kernel.mem.folio_pincount(h1) == 212
    assert kernel.mem.folio_pincount(h2) == 388
    gup.unpin_user_pages(kernel, pages, 600)


async def test_maybe_dma_pinned_false_positive_rule(make_kernel: MakeKernel) -> None:
    """B.4: 1024 FOLL_GET references make a small page look pinned (fuzzy positive); a THP
    with 1024 GET references is not (exact _pincount)."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("t", "s")
    small = await mmap_anon(task, P)
    await write_user(task, small, b"s")
    big = await mmap_anon(task, 2 * MiB)
    await write_user(task, big, b"b")
    sp, bp = pfn_at(task, small), pfn_at(task, big)
    assert gup.try_grab_folio(kernel, sp, 1024, FOLL_GET) == 0
    assert gup.try_grab_folio(kernel, bp, 1024, FOLL_GET) == 0
    assert kernel.mem.folio_maybe_dma_pinned(sp)
    assert not kernel.mem.folio_maybe_dma_pinned(bp)
    assert vm(task, "nr_foll_pin_acquired") == 0
    gup.gup_put_folio(kernel, sp, 1024, FOLL_GET)
    gup.gup_put_folio(kernel, bp, 1024, FOLL_GET)


async def test_zero_page_pin_is_a_no_op(kernel: Kernel, task: Task) -> None:
    """B.5 / A.5: a R/O short-term pin of never-written anon memory returns the zero page and
    touches neither its refcount nor the pin counters; unpinning it does nothing."""
    a = await mmap_anon(task, 4 * P)
    assert await read_user_bytes(task, a, 4 * P) == bytes(4 * P)
    pages = page_array(4)
    assert await _pin(task, a, 4, 0, pages) == 4
    assert (pages == kernel.mem.zero_pfn).all()
    assert kernel.mem.refcount[kernel.mem.zero_pfn] == 1
    assert vm(task, "nr_foll_pin_acquired") == 0
    gup.unpin_user_pages(kernel, pages, 4)
    assert vm(task, "nr_foll_pin_released") == 0


async def test_get_on_the_zero_page_takes_a_reference(kernel: Kernel, task: Task) -> None:
    """A.5: FOLL_GET of the zero page (a read of untouched memory) takes a real reference."""
    a = await mmap_anon(task, 2 * P)
    pages = page_array(2)
    assert await _get(task, a, 2, 0, pages) == 2
    zero = kernel.mem.zero_pfn
    assert (pages == zero).all()
    assert kernel.mem.refcount[zero] == 3
    gup.put_pages(kernel, pages, 2)
    assert kernel.mem.refcount[zero] == 1


async def test_get_pin_mutual_exclusion_and_invalid_args(kernel: Kernel, task: Task) -> None:
    """B.6 / A.1: internal flags, PIN+GET, LONGTERM without PIN, GET/PIN without pages and a
    locked value other than 1 are invalid: get_* → -EINVAL, pin_* → 0; nothing changes."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"\x01" * 4 * P)
    mm = mm_of(task)
    pfn = pfn_at(task, a)
    pages = page_array(4)
    assert await _pin(task, a, 1, FOLL_GET, pages) == 0
    assert await _get(task, a, 1, FOLL_LONGTERM, pages) == -errno.EINVAL
    assert await _get(task, a, 1, FOLL_PIN, pages) == -errno.EINVAL
    bit = 1
    while bit <= INTERNAL_GUP_FLAGS:
        if bit & INTERNAL_GUP_FLAGS:
            assert await _get(task, a, 1, bit, pages) == -errno.EINVAL
            assert await _pin(task, a, 1, bit, pages) == 0
        bit <<= 1
    assert await gup.pin_user_pages_unlocked(mm, a, 1, None, 0) == 0
    async with mm.mmap_lock.read(task):
        assert await gup.get_user_pages_remote(mm, a, 1, 0, pages, Locked(0)) == -errno.EINVAL
        assert await gup.pin_user_pages_remote(mm, a, 1, 0, pages, Locked(2)) == 0
        assert await gup.get_user_pages(mm, a, 0, 0, pages) == 0
    assert kernel.mem.refcount[pfn] == 1
    assert not mm.flags & MMF_HAS_PINNED
    assert not kernel.extra_refs.any()


async def test_partial_count_on_a_vma_hole(kernel: Kernel, task: Task) -> None:
    """B.7 / A.3: a GUP running into a hole returns the pages before it; starting at the hole
    is -EFAULT; the caller owns exactly the returned references."""
    x = await mmap_anon(task, 8 * P)
    from vkernel.kernel.mm_api import sys_munmap

    await sys_munmap(task, x + 4 * P, 2 * P)
    pages = page_array(6)
    assert await _get(task, x, 6, FOLL_WRITE, pages) == 4
    assert (pages[:4] >= 0).all()
    assert (pages[4:] == -1).all()
    assert await _get(task, x + 4 * P, 2, FOLL_WRITE, page_array(2)) == -errno.EFAULT
    gup.put_pages(kernel, pages, 4)


async def test_permission_errors_and_force(kernel: Kernel, task: Task) -> None:
    """B.8 (a)-(e): write to PROT_READ → -EFAULT; with FOLL_FORCE an anon-exclusive COW copy
    whose PTE stays read-only and whose content a user read sees; FORCE on a shared mapping →
    -EFAULT; PROT_NONE read needs FORCE (VM_MAYREAD); VM_IO/VM_PFNMAP → -EFAULT."""
    ro = await mmap_anon(task, 2 * P, PROT_READ)
    assert await read_user_bytes(task, ro, 2 * P) == bytes(2 * P)  # zero page mapped
    pages = page_array(2)
    assert await _get(task, ro, 1, FOLL_WRITE, pages) == -errno.EFAULT
    assert await _get(task, ro, 2, FOLL_WRITE | FOLL_FORCE, pages) == 2
    for i in range(2):
        pfn = int(pages[i])
        assert pfn != kernel.mem.zero_pfn
        assert pfn_at(task, ro + i * P) == pfn
        assert kernel.mem.flags[pfn] & PG_anon_exclusive
        assert not lookup_pte(task, ro + i * P) & _PAGE_RW
    # The GUP caller writes through its reference; the owner reads it.
    kernel.mem.frames[int(pages[0])][:5] = np.frombuffer(b"poked", dtype=np.uint8)
    assert await read_user_bytes(task, ro, 5) == b"poked"
    # A second forced write follows the exclusive R/O PTE without another COW.
    again = page_array(1)
    assert await _get(task, ro, 1, FOLL_WRITE | FOLL_FORCE, again) == 1
    assert again[0] == pages[0]
    gup.put_pages(kernel, pages, 2)
    gup.put_page(kernel, int(again[0]))

    sh = await mmap_anon(task, P, PROT_READ, SHARED_ANON)
    assert await _get(task, sh, 1, FOLL_WRITE | FOLL_FORCE, pages) == -errno.EFAULT

    none = await mmap_anon(task, P, PROT_NONE)
    assert await _get(task, none, 1, 0, pages) == -errno.EFAULT
    assert await _get(task, none, 1, FOLL_FORCE, pages) == 1
    assert pages[0] == kernel.mem.zero_pfn
    gup.put_page(kernel, int(pages[0]))

    io = await mmap_anon(task, 2 * P)
    vma = vma_at(task, io)
    for bad in (VM_IO, VM_PFNMAP):
        vma.set_flags(vma.vm_flags | bad)
        assert await _get(task, io, 1, 0, pages) == -errno.EFAULT
        assert await _pin(task, io, 1, 0, pages) == -errno.EFAULT
        vma.set_flags(vma.vm_flags & ~bad)


async def test_foll_anon_rejects_shmem(kernel: Kernel, task: Task) -> None:
    """A.1: FOLL_ANON rejects a non-anonymous (shmem) VMA with -EFAULT."""
    sh = await mmap_anon(task, P, RW, SHARED_ANON)
    an = await mmap_anon(task, P)
    pages = page_array(1)
    assert await _get(task, sh, 1, FOLL_ANON, pages) == -errno.EFAULT
    assert await _get(task, an, 1, FOLL_ANON, pages) == 1
    gup.put_page(kernel, int(pages[0]))


async def test_foll_nofault(kernel: Kernel, task: Task) -> None:
    """B.9: FOLL_NOFAULT returns the populated prefix and never faults; from a hole → -EFAULT."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"\x01" * 2 * P)
    pages = page_array(4)
    assert await _get(task, a, 4, FOLL_NOFAULT, pages) == 2
    assert await _get(task, a + 2 * P, 2, FOLL_NOFAULT, page_array(2)) == -errno.EFAULT
    assert lookup_pte(task, a + 2 * P) == 0
    gup.put_pages(kernel, pages, 2)


async def test_foll_nowait_stops_without_dropping_the_lock(kernel: Kernel, task: Task) -> None:
    """B.10: a fault that would block under FOLL_NOWAIT returns RETRY with mmap_lock held:
    GUP returns the pages before it (1), or 0 when it is the first page; the lock stays held."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"\x01")
    seen: list[int] = []

    def blocking(vma: VMA, addr: int, flags: int) -> int | None:
        seen.append(flags)
        assert flags & FAULT_FLAG_RETRY_NOWAIT
        return VM_FAULT_RETRY  # would wait for I/O: do not drop the lock (NOWAIT)

    set_test_fault_hook(vma_at(task, a), blocking)
    mm = mm_of(task)
    pages = page_array(2)
    async with mm.mmap_lock.read(task):
        assert await gup.get_user_pages_remote(mm, a, 2, FOLL_NOWAIT, pages, None) == 1
        assert mm.mmap_lock.readers == 1
        assert await gup.get_user_pages_remote(mm, a + P, 1, FOLL_NOWAIT, pages[1:], None) == 0
        assert mm.mmap_lock.readers == 1
    assert len(seen) == 2
    gup.put_page(kernel, int(pages[0]))


async def test_fatal_signal(kernel: Kernel, task: Task) -> None:
    """B.11: with SIGKILL pending, GUP of unpopulated memory is -EINTR; a SIGKILL raised while
    page 3 is being faulted stops the loop before page 3 is counted: 3 pages returned."""
    a = await mmap_anon(task, 8 * P)
    other = kernel.spawn("other", "s")
    b = await mmap_anon(other, 8 * P)

    def kill_at_page_3(vma: VMA, addr: int, flags: int) -> int | None:
        if addr == b + 3 * P:
            other.send_fatal_signal(signal.SIGKILL)
        return None

    set_test_fault_hook(vma_at(other, b), kill_at_page_3)
    pages = page_array(8)
    assert await _get(other, b, 8, FOLL_WRITE, pages) == 3
    gup.put_pages(kernel, pages, 3)
    task.send_fatal_signal(signal.SIGKILL)
    assert await _get(task, a, 8, FOLL_WRITE, page_array(8)) == -errno.EINTR
    assert lookup_pte(task, a) == 0


async def test_fatal_signal_while_waiting_for_the_lock(kernel: Kernel, task: Task) -> None:
    """B.11: get_user_pages_unlocked waiting on a contended mmap_lock when SIGKILL arrives →
    -EAGAIN (mmap_read_lock_killable failed); uncontended with SIGKILL pending → -EINTR."""
    import asyncio

    a = await mmap_anon(task, 4 * P)
    mm = mm_of(task)
    pages = page_array(4)
    await mm.mmap_lock.write_lock(None)
    waiter = asyncio.create_task(gup.get_user_pages_unlocked(mm, a, 4, pages, 0, current=task))
    await asyncio.sleep(0)
    assert mm.mmap_lock.waiters == 1
    task.send_fatal_signal(signal.SIGKILL)
    assert await waiter == -errno.EAGAIN
    mm.mmap_lock.write_unlock()
    assert await gup.get_user_pages_unlocked(mm, a, 4, pages, 0, current=task) == -errno.EINTR
    assert not mm.mmap_lock.is_locked()


async def test_pfn_mapping_without_struct_page(kernel: Kernel, task: Task) -> None:
    """B.12: a special PTE mapping a raw pfn: -EEXIST when pages[] is wanted; counted as done
    (skipped) for a populate-only GUP."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"\x01" * 2 * P)
    mm = mm_of(task)
    from vkernel.kernel.pgtable import pte_slot

    slot = pte_slot(mm, a + P)
    saved = kernel.mem.u64.item(slot)
    raw = kernel.mem.nframes - 1
    kernel.mem.u64[slot] = (raw << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_SPECIAL
    try:
        pages = page_array(2)
        assert await _get(task, a, 2, 0, pages) == 1
        gup.put_page(kernel, int(pages[0]))
        assert await _get(task, a + P, 1, 0, pages) == -errno.EEXIST
        async with mm.mmap_lock.read(task):
            assert await gup.get_user_pages(mm, a, 2, 0, None) == 2
    finally:
        kernel.mem.u64[slot] = saved


async def test_madv_populate_errors(kernel: Kernel, task: Task) -> None:
    """B.13 / A.1 FOLL_MADV_POPULATE: a hole → -ENOMEM, an incompatible VMA → -EINVAL."""
    mm = mm_of(task)
    a = await mmap_anon(task, 2 * P, PROT_READ)
    async with mm.mmap_lock.read(task):
        call = gup.__get_user_pages_locked
        flags = FOLL_MADV_POPULATE | FOLL_TOUCH
        assert await call(mm, a, 2, None, Locked(1), flags) == 2
        assert await call(mm, a, 2, None, Locked(1), flags | FOLL_WRITE) == -errno.EINVAL
        assert await call(mm, a + 2 * P, 1, None, Locked(1), flags) == -errno.ENOMEM


async def test_foll_dump_and_hwpoison(kernel: Kernel, task: Task) -> None:
    """A.1 FOLL_DUMP: an anon hole and the zero page are -EFAULT (not faulted in);
    FOLL_HWPOISON turns VM_FAULT_HWPOISON into -EHWPOISON (else -EFAULT)."""
    a = await mmap_anon(task, 2 * P)
    pages = page_array(2)
    assert await _get(task, a, 1, FOLL_DUMP, pages) == -errno.EFAULT
    assert lookup_pte(task, a) == 0
    await read_user_bytes(task, a, 1)
    assert await _get(task, a, 1, FOLL_DUMP, pages) == -errno.EFAULT
    set_test_fault_hook(vma_at(task, a), lambda v, addr, f: VM_FAULT_HWPOISON)
    assert await _get(task, a + P, 1, FOLL_HWPOISON, pages) == -EHWPOISON
    assert await _get(task, a + P, 1, 0, pages) == -errno.EFAULT


async def test_unpin_dirty_lock_on_shmem(kernel: Kernel, task: Task) -> None:
    """B.14: unpin_user_pages_dirty_lock(make_dirty) dirties every folio and releases the pins;
    make_dirty=False leaves dirty bits alone; NULL entries are skipped."""
    a = await mmap_anon(task, 8 * P, RW, SHARED_ANON)
    assert await read_user_bytes(task, a, 8 * P) == bytes(8 * P)  # clean page cache pages
    pages = page_array(9)
    assert await _pin(task, a, 8, FOLL_WRITE, pages) == 8
    assert not (kernel.mem.flags[pages[:8]] & PG_dirty).any()
    gup.unpin_user_pages_dirty_lock(kernel, pages, 9, make_dirty=True)  # pages[8] is NULL
    assert (kernel.mem.flags[pages[:8]] & PG_dirty).all()
    assert vm(task, "nr_foll_pin_released") == 8
    b = await mmap_anon(task, 4 * P, RW, SHARED_ANON)
    await read_user_bytes(task, b, 4 * P)
    pages = page_array(4)
    assert await _pin(task, b, 4, 0, pages) == 4
    gup.unpin_user_page_range_dirty_lock(kernel, int(pages[0]), 1, make_dirty=False)
    gup.unpin_user_pages_dirty_lock(kernel, pages[1:], 3, make_dirty=False)
    assert not (kernel.mem.flags[pages] & PG_dirty).any()


async def test_foll_touch_marks_dirty_for_writes(kernel: Kernel, task: Task) -> None:
    """A.1 FOLL_TOUCH: get_user_pages(WRITE) marks a clean folio dirty and referenced;
    pin_user_pages (no FOLL_TOUCH) does not."""
    a = await mmap_anon(task, 2 * P, RW, SHARED_ANON)
    await read_user_bytes(task, a, 2 * P)
    pages = page_array(2)
    assert await _pin(task, a, 1, FOLL_WRITE, pages) == 1
    assert not kernel.mem.flags[pages[0]] & PG_dirty
    assert await _get(task, a + P, 1, FOLL_WRITE, pages[1:]) == 1
    assert kernel.mem.flags[pages[1]] & PG_dirty
    gup.unpin_user_page(kernel, int(pages[0]))
    gup.put_page(kernel, int(pages[1]))


async def test_split_pmd(make_kernel: MakeKernel) -> None:
    """A.1 FOLL_SPLIT_PMD: the THP PMD is split before the page is returned."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"\x01")
    assert lookup_pte(task, a) & 0x80
    pages = page_array(4)
    assert await _get(task, a, 4, FOLL_SPLIT_PMD, pages) == 4
    assert not lookup_pte(task, a) & 0x80
    gup.put_pages(kernel, pages, 4)


async def test_overflow_rule(kernel: Kernel, task: Task) -> None:
    """Seed 004 / A.5: a pin that would push the 32-bit refcount past its limit fails with
    -EOVERFLOW and changes nothing; a partial GUP returns the pages before it. A refcount of 0
    (a freed folio) is -ENOMEM."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"\x01" * 2 * P)
    p0, p1 = pfn_at(task, a), pfn_at(task, a + P)
    target = (1 << 31) - 1 - GUP_PIN_COUNTING_BIAS + 1  # one pin would pass INT32_MAX by 1
    force = target - int(kernel.mem.refcount[p1])
    kernel.mem.refcount[p1] += force
    kernel.extra_refs[p1] += force
    try:
        assert gup.try_grab_folio(kernel, p1, 1, FOLL_PIN) == -errno.EOVERFLOW
        assert kernel.mem.refcount[p1] == target
        assert gup.try_grab_folio(kernel, p1, 1, FOLL_GET) == 0  # +1 still fits
        gup.gup_put_folio(kernel, p1, 1, FOLL_GET)
        pages = page_array(2)
        acquired = vm(task, "nr_foll_pin_acquired")
        assert await _pin(task, a + P, 1, FOLL_WRITE, pages) == -errno.EOVERFLOW
        assert await _pin(task, a, 2, FOLL_WRITE, pages) == 1
        assert pages[0] == p0
        assert vm(task, "nr_foll_pin_acquired") == acquired + 1
        gup.unpin_user_page(kernel, p0)
    finally:
        kernel.mem.refcount[p1] -= force
        kernel.extra_refs[p1] -= force
    free = int(kernel.mem.normal.take0(1)[0])
    kernel.mem.normal.put0(np.array([free], dtype=np.int64))
    assert gup.try_grab_folio(kernel, free, 1, FOLL_GET) == -errno.ENOMEM


async def test_put_of_a_reference_not_held_is_refused(kernel: Kernel, task: Task) -> None:
    """A.5: dropping references the kernel does not record as held is a bug, never silent."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"\x01")
    with pytest.raises(RuntimeError):
        gup.unpin_user_page(kernel, pfn_at(task, a))
    with pytest.raises(RuntimeError):
        gup.put_page(kernel, pfn_at(task, a))


async def test_batched_put_not_held_changes_nothing(make_kernel: MakeKernel) -> None:
    """A.5: unpin_user_pages() / put_pages() refuse a batch with any folio whose references
    (or, on a THP, pins) are not held, before changing a single counter or ledger."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("thp", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"\x01" * P)
    head = pfn_at(task, a)
    b = await mmap_anon(task, 2 * P)
    await write_user(task, b, b"\x01" * 2 * P)
    p0, p1 = pfn_at(task, b), pfn_at(task, b + P)
    pages = page_array(3)
    assert await _pin(task, b, 1, FOLL_WRITE, pages) == 1
    assert await _get(task, a, 2, 0, pages[1:]) == 2  # 2 GET refs on the THP, no pins

    def state() -> tuple[list[int], list[int], int, int]:
        heads = [p0, p1, head]
        return (
            kernel.mem.refcount[heads].tolist(),
            kernel.extra_refs[heads].tolist(),
            kernel.mem.folio_pincount(head),
            int(kernel.extra_pins[head // HPAGE_PMD_NR]),
        )

    before = state()
    with pytest.raises(RuntimeError, match=f"pfn {p1}"):
        gup.unpin_user_pages(kernel, np.array([p0, p1], dtype=np.int64), 2)
    with pytest.raises(RuntimeError, match="pins not held"):
        gup.unpin_user_pages(kernel, np.array([p0, head], dtype=np.int64), 2)
    with pytest.raises(RuntimeError, match="pins not held"):
        gup.unpin_user_page(kernel, head + 1)
    with pytest.raises(RuntimeError, match=f"pfn {head}"):
        gup.put_pages(kernel, np.full(3, head, dtype=np.int64), 3)
    with pytest.raises(RuntimeError, match=f"pfn {p0}: 2048 references not held"):
        gup.unpin_user_pages(kernel, np.array([p0, -1, p0], dtype=np.int64), 3)
    assert state() == before
    # The same page twice, held twice: one call drops both (NULL entries skipped).
    assert await _pin(task, b, 1, FOLL_WRITE, page_array(1)) == 1
    gup.unpin_user_pages(kernel, np.array([-1, p0, p0], dtype=np.int64), 3)
    assert (int(kernel.mem.refcount[p0]), int(kernel.extra_refs[p0])) == (1, 0)
    assert await _pin(task, b, 1, FOLL_WRITE, pages) == 1
    assert state() == before
    gup.unpin_user_pages(kernel, pages, 1)
    gup.put_pages(kernel, pages[1:], 2)
    assert not kernel.extra_refs.any()
    assert not kernel.extra_pins.any()
    from vkernel.kernel.audit import audit

    assert audit(kernel) == []


async def test_very_large_puts_are_grouped_by_folio(
    kernel: Kernel, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A.5: above _UNGROUPED_MAX pages a put goes through the grouped gup_put_folios(), with
    the same result (dirty marking, counters, ledgers)."""
    monkeypatch.setattr(gup, "_UNGROUPED_MAX", 2)
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"\x01" * 4 * P)
    pages = page_array(4)
    assert await _pin(task, a, 4, FOLL_WRITE, pages) == 4
    rc = kernel.mem.refcount[pages].tolist()
    kernel.mem.flags[pages] &= ~np.uint32(PG_dirty)
    gup.unpin_user_pages_dirty_lock(kernel, pages, 4, True)
    assert (kernel.mem.flags[pages] & PG_dirty).all()
    assert [r - GUP_PIN_COUNTING_BIAS for r in rc] == kernel.mem.refcount[pages].tolist()
    assert await _get(task, a, 4, 0, pages) == 4
    gup.put_pages(kernel, pages, 4)
    assert not kernel.extra_refs.any()
    from vkernel.kernel.audit import audit

    assert audit(kernel) == []


async def test_unpinned_page_outlives_munmap(kernel: Kernel, task: Task) -> None:
    """A.5: a pinned page survives munmap; the last unpin frees it (no leak, no early free)."""
    from vkernel.kernel.mm_api import sys_munmap

    a = await mmap_anon(task, P)
    await write_user(task, a, b"keep")
    pages = page_array(1)
    assert await _pin(task, a, 1, FOLL_WRITE, pages) == 1
    free0 = kernel.mem.nr_free_pages
    await sys_munmap(task, a, P)
    pfn = int(pages[0])
    assert bytes(kernel.mem.frames[pfn][:4]) == b"keep"
    assert kernel.mem.refcount[pfn] == GUP_PIN_COUNTING_BIAS
    gup.unpin_user_pages(kernel, pages, 1)
    assert kernel.mem.nr_free_pages >= free0 + 1


async def test_seed_aliases(kernel: Kernel, task: Task) -> None:
    """Seeds 001/004: get_user_pages_locked (2014) keeps the locked contract;
    put_user_page(s)/put_user_pages_dirty(_lock) (2019) release pins."""
    a = await mmap_anon(task, 4 * P)
    mm = mm_of(task)
    pages = page_array(4)
    locked = Locked(1)
    await mm.mmap_lock.read_lock(task)
    assert await gup.get_user_pages_locked(mm, a, 4, FOLL_WRITE, pages, locked) == 4
    assert locked.value == 1
    mm.mmap_lock.read_unlock()
    gup.put_pages(kernel, pages, 4)
    assert await _pin(task, a, 4, FOLL_WRITE, pages) == 4
    gup.put_user_page(kernel, int(pages[0]))
    gup.put_user_pages(kernel, pages[1:], 1)
    gup.put_user_pages_dirty(kernel, pages[2:], 1)
    gup.put_user_pages_dirty_lock(kernel, pages[3:], 1)
    assert kernel.mem.flags[pages[3]] & PG_dirty
    assert not kernel.extra_refs.any()


async def test_write_gup_on_read_only_after_mprotect(kernel: Kernel, task: Task) -> None:
    """B.8: mprotect(PROT_READ) after population: a WRITE GUP is -EFAULT, a read GUP works."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"\x01")
    await sys_mprotect(task, a, P, PROT_READ)
    pages = page_array(1)
    assert await _get(task, a, 1, FOLL_WRITE, pages) == -errno.EFAULT
    assert await _get(task, a, 1, 0, pages) == 1
    gup.put_page(kernel, int(pages[0]))


async def test_gup_on_fixed_address_range_spanning_vmas(kernel: Kernel, task: Task) -> None:
    """A.3: one GUP crosses adjacent VMAs with different protections (VMA looked up again)."""
    from vkernel.kernel.mm_api import sys_mmap

    a = await mmap_anon(task, 4 * P)
    await sys_mmap(task, a + 2 * P, 2 * P, PROT_READ, ANON | MAP_FIXED)
    pages = page_array(4)
    assert await _get(task, a, 4, 0, pages) == 4
    gup.put_pages(kernel, pages, 4)
    assert await _get(task, a, 4, FOLL_WRITE, pages) == 2
    gup.put_pages(kernel, pages, 2)
