"""FOLL_LONGTERM: migration out of ZONE_MOVABLE, failure modes, memalloc_pin, pinned_vm and
RLIMIT_MEMLOCK, VmPin (kernel-semantics.md A.6, B.39-B.41)."""

from __future__ import annotations

import errno

import numpy as np

from tests.unit.gup.guphelp import mm_of, page_array, vm
from tests.unit.mm.mmhelp import RW, SHARED_ANON, MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel import gup
from vkernel.kernel.cred import Capability, Cred, Rlimit
from vkernel.kernel.gup import PageArray
from vkernel.kernel.mm_api import fork, lookup_pte, proc_status_mm, read_user_bytes, write_user
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import _PAGE_PSE, FOLL_LONGTERM, FOLL_WRITE, HPAGE_PMD_NR


async def pin_lt(task: Task, start: int, n: int, flags: int, pages: PageArray) -> int:
    """pin_user_pages(FOLL_LONGTERM) under the task's mmap_lock."""
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        return await gup.pin_user_pages(mm, start, n, flags | FOLL_LONGTERM, pages, current=task)


async def test_migration_of_unpinnable_pages(make_kernel: MakeKernel) -> None:
    """B.40: of 8 pages, 2 and 5 sit in the movable zone: the first pass pins 8, unpins all 8,
    migrates the two, pins 8 again (acquired +16, released +8); their PTEs map new pages with
    the same content; the other pages did not move."""
    kernel = make_kernel(movable_bytes=16 * MiB)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 8 * P)
    await write_user(task, a, b"".join(bytes([i]) * P for i in range(8)))
    for i in (0, 1, 3, 4, 6, 7):
        assert gup.migrate_folio_out_of_movable(kernel, pfn_at(task, a + i * P))
    before = [pfn_at(task, a + i * P) for i in range(8)]
    movable = [kernel.mem.in_movable(p) for p in before]
    assert movable == [False, False, True, False, False, True, False, False]
    acq, rel, mig = (
        vm(task, "nr_foll_pin_acquired"),
        vm(task, "nr_foll_pin_released"),
        vm(task, "pgmigrate_success"),
    )
    pages = page_array(8)
    assert await pin_lt(task, a, 8, FOLL_WRITE, pages) == 8
    assert vm(task, "nr_foll_pin_acquired") == acq + 16
    assert vm(task, "nr_foll_pin_released") == rel + 8
    assert vm(task, "pgmigrate_success") == mig + 2
    after = [pfn_at(task, a + i * P) for i in range(8)]
    assert [int(p) for p in pages] == after
    for i in range(8):
        assert not kernel.mem.in_movable(after[i])
        assert (after[i] == before[i]) == (i not in (2, 5))
        assert bytes(kernel.mem.frames[after[i]][:2]) == bytes([i]) * 2
    assert await read_user_bytes(task, a + 5 * P, 3) == b"\x05" * 3
    gup.unpin_user_pages(kernel, pages, 8)


async def test_migration_failure_leaves_nothing_pinned(make_kernel: MakeKernel) -> None:
    """B.40: a movable page that cannot migrate (an extra FOLL_GET reference) → -ENOMEM with
    zero pins held; nothing moved."""
    kernel = make_kernel(movable_bytes=16 * MiB)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"\x07" * 4 * P)
    mm = mm_of(task)
    ref = page_array(1)
    async with mm.mmap_lock.read(task):
        assert await gup.get_user_pages(mm, a + 2 * P, 1, 0, ref) == 1
    before = [pfn_at(task, a + i * P) for i in range(4)]
    pages = page_array(4)
    assert await pin_lt(task, a, 4, 0, pages) == -errno.ENOMEM
    assert vm(task, "nr_foll_pin_acquired") == vm(task, "nr_foll_pin_released")
    assert not kernel.extra_pins.any()
    assert vm(task, "pgmigrate_fail") >= 1
    assert pfn_at(task, a + 2 * P) == before[2]
    gup.put_page(kernel, int(ref[0]))


async def test_longterm_faults_allocate_outside_movable(make_kernel: MakeKernel) -> None:
    """A.6 memalloc_pin_save(): pages faulted in by a LONGTERM pin come from the normal zone,
    so nothing needs migrating; an ordinary fault still prefers the movable zone."""
    kernel = make_kernel(movable_bytes=16 * MiB)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 16 * P)
    pages = page_array(16)
    mig = vm(task, "pgmigrate_success")
    assert await pin_lt(task, a, 16, FOLL_WRITE, pages) == 16
    assert not any(kernel.mem.in_movable(int(p)) for p in pages)
    assert vm(task, "pgmigrate_success") == mig
    assert not kernel.mem.memalloc_pin
    gup.unpin_user_pages(kernel, pages, 16)
    b = await mmap_anon(task, P)
    await write_user(task, b, b"x")
    assert kernel.mem.in_movable(pfn_at(task, b))


async def test_longterm_migrates_a_thp(make_kernel: MakeKernel) -> None:
    """A.6 / A.12: a PMD-mapped THP in the movable zone migrates whole to the normal zone
    before a LONGTERM pin; the PMD maps the new folio, content kept."""
    kernel = make_kernel(movable_bytes=16 * MiB, thp="always")
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"H" * 2 * MiB)
    old = pfn_at(task, a)
    assert kernel.mem.in_movable(old)
    pages = page_array(HPAGE_PMD_NR)
    assert await pin_lt(task, a, HPAGE_PMD_NR, FOLL_WRITE, pages) == HPAGE_PMD_NR
    new = pfn_at(task, a)
    assert lookup_pte(task, a) & _PAGE_PSE
    assert not kernel.mem.in_movable(new)
    assert (pages == np.arange(new, new + HPAGE_PMD_NR)).all()
    assert kernel.mem.folio_pincount(new) == HPAGE_PMD_NR
    assert await read_user_bytes(task, a + MiB, 2) == b"HH"
    gup.unpin_user_pages(kernel, pages, HPAGE_PMD_NR)


async def test_longterm_migrates_shmem_mapped_twice(make_kernel: MakeKernel) -> None:
    """A.6: a shmem page mapped by a parent and its child migrates with both PTEs and the page
    cache entry repointed; both processes then see writes through the pin."""
    kernel = make_kernel(movable_bytes=16 * MiB)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, P, RW, SHARED_ANON)
    await write_user(task, a, b"shm")
    child = await fork(task)
    assert await read_user_bytes(child, a, 3) == b"shm"
    old = pfn_at(task, a)
    assert kernel.mem.in_movable(old)
    assert kernel.mem.mapcount[old] == 2
    pages = page_array(1)
    assert await pin_lt(task, a, 1, FOLL_WRITE, pages) == 1
    new = int(pages[0])
    assert not kernel.mem.in_movable(new)
    assert pfn_at(task, a) == new
    assert pfn_at(child, a) == new
    kernel.mem.frames[new][:3] = np.frombuffer(b"dma", dtype=np.uint8)
    assert await read_user_bytes(child, a, 3) == b"dma"
    gup.unpin_user_pages(kernel, pages, 1)
    kernel.do_exit(child)


async def test_longterm_needs_pin(make_kernel: MakeKernel) -> None:
    """B.41: FOLL_LONGTERM through get_user_pages (no FOLL_PIN) is -EINVAL."""
    kernel = make_kernel()
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, P)
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        ret = await gup.get_user_pages(mm, a, 1, FOLL_LONGTERM, page_array(1))
    assert ret == -errno.EINVAL


async def test_pinned_vm_against_rlimit_memlock(make_kernel: MakeKernel) -> None:
    """A.6: pinned_vm is charged against RLIMIT_MEMLOCK (-ENOMEM past it, nothing charged)
    unless the caller has CAP_IPC_LOCK; VmPin in /proc/PID/status shows it; uncharged on release."""
    kernel = make_kernel()
    task = kernel.spawn("t", "s", rlimits={Rlimit.RLIMIT_MEMLOCK: 16 * P})
    mm = mm_of(task)
    a = await mmap_anon(task, 32 * P)
    assert gup.account_pinned_vm(mm, 16, task) == 0
    pages = page_array(16)
    assert await pin_lt(task, a, 16, FOLL_WRITE, pages) == 16
    assert proc_status_mm(task)["VmPin"] == 64
    assert gup.account_pinned_vm(mm, 1, task) == -errno.ENOMEM
    assert mm.pinned_vm == 16
    root = kernel.spawn("r", "s", cred=Cred(uid=0, caps=frozenset({Capability.CAP_IPC_LOCK})))
    root.rlimits[Rlimit.RLIMIT_MEMLOCK] = 0
    assert gup.account_pinned_vm(mm, 8, root) == 0
    assert proc_status_mm(task)["VmPin"] == 96
    gup.unaccount_pinned_vm(mm, 8)
    gup.unpin_user_pages(kernel, pages, 16)
    gup.unaccount_pinned_vm(mm, 16)
    assert proc_status_mm(task)["VmPin"] == 0
    assert gup.account_pinned_vm(mm, 1 << 40, None) == 0
    gup.unaccount_pinned_vm(mm, 1 << 40)


async def test_longterm_chunks_over_movable_thps(make_kernel: MakeKernel) -> None:
    """B.1 (-L) with B.40: LONGTERM pins of 123 pages at a time over THPs in the movable zone:
    the first chunk touching a THP migrates it whole; later chunks find it pinnable; every
    folio ends up outside ZONE_MOVABLE and every call returns its chunk."""
    kernel = make_kernel(movable_bytes=16 * MiB, thp="always")
    task = kernel.spawn("t", "s")
    n = 1024
    a = await mmap_anon(task, n * P)
    await write_user(task, a, b"\x33" * n * P)
    pages = page_array(n)
    done = 0
    while done < n:
        k = min(123, n - done)
        assert await pin_lt(task, a + done * P, k, 0, pages[done:]) == k
        done += k
    assert not any(kernel.mem.in_movable(int(p)) for p in pages)
    assert vm(task, "pgmigrate_success") == n
    assert [int(p) for p in pages[::100]] == [pfn_at(task, a + i * P) for i in range(0, n, 100)]
    assert await read_user_bytes(task, a + 700 * P, 2) == b"\x33\x33"
    gup.unpin_user_pages(kernel, pages, n)
