"""The ALLOW_RETRY protocol with real producers (A.9, B.23-B.27; seed 001): faults on file
pages that sleep on device I/O or on a page held locked, through user accesses and GUP."""

from __future__ import annotations

import asyncio
import errno
import signal

import pytest

from tests.unit.fs.conftest import MakeFsKernel
from tests.unit.fs.fshelp import P, make_file, pattern
from tests.unit.gup.guphelp import mm_of, page_array
from vkernel.kernel import gup
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.gup import Locked
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import sys_madvise, sys_mmap, sys_munmap
from vkernel.kernel.pagecache import folio_trylock, folio_unlock
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    FOLL_NOWAIT,
    FOLL_WRITE,
    MADV_POPULATE_READ,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
)

SLOW = "ram0=ram:16M,latency=80ms"


async def cold_file(k: Kernel, t: Task, npages: int = 4) -> int:
    """A disk file of ``npages`` written, synced and dropped from the cache: its next read
    goes to the device. Returns the address of a shared read-only mapping of it."""
    fd = await make_file(k, t, "cold", pattern(npages * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    return await sys_mmap(t, 0, npages * P, PROT_READ, MAP_SHARED, fd, 0)


async def held_page(k: Kernel, t: Task) -> tuple[int, int]:
    """A cached file page held locked by "someone else"; returns (address, pfn)."""
    fd = await make_file(k, t, "held", pattern(2 * P))
    a = await sys_mmap(t, 0, 2 * P, PROT_READ, MAP_SHARED, fd, 0)
    mapping = k.vfs.lookup("held").mapping
    assert mapping is not None
    pfn = mapping.pages[0]
    assert folio_trylock(k.mem, pfn)
    return a, pfn


@pytest.mark.parametrize("retry", [True, False])
async def test_fault_sleeping_on_io_drops_mmap_lock(
    make_fs_kernel: MakeFsKernel, retry: bool
) -> None:
    """Seed 001: with ALLOW_RETRY a fault waiting for the device releases mmap_lock, so an
    mmap (a writer) gets through during the I/O; with --no-fault-retry it waits for the I/O."""
    k = make_fs_kernel(SLOW, readahead=False, fault_retry=retry)
    t = k.spawn("t", "s")
    a = await cold_file(k, t)
    mm = mm_of(t)
    reader = asyncio.create_task(read_user_bytes(t, a, 4))
    await asyncio.sleep(0.01)
    assert not reader.done()
    assert mm.mmap_lock.is_locked() is not retry
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b = await sys_mmap(t, 0, P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    waited = loop.time() - t0
    if retry:
        assert waited < 0.04  # well under the read's 80 ms: nothing held the lock
        assert not reader.done()
    else:
        assert reader.done() or waited > 0.04
    assert await reader == pattern(4 * P)[:4]
    await sys_munmap(t, b, P)
    assert audit(k) == []


async def test_b23_gup_unlocked_on_a_locked_page(kernel: Kernel, task: Task) -> None:
    """B.23 with a page held locked: the first fault drops mmap_lock and waits; after the
    unlock GUP retakes the lock and refaults with TRIED; 1 page, lock released at exit,
    maj_flt +1 (TRIED counts as major), pgfault +1 (the RETRY is not counted, B.27)."""
    a, pfn = await held_page(kernel, task)
    mm = mm_of(task)
    pages = page_array(1)
    pgfault, maj = kernel.vmstat["pgfault"], task.maj_flt
    g = asyncio.create_task(gup.get_user_pages_unlocked(mm, a, 1, pages, 0, current=task))
    await asyncio.sleep(0.005)
    assert not g.done()
    assert not mm.mmap_lock.is_locked()  # dropped while the fault sleeps
    folio_unlock(kernel.mem, pfn)
    assert await g == 1
    assert int(pages[0]) == pfn
    assert not mm.mmap_lock.is_locked()
    assert task.maj_flt == maj + 1
    assert kernel.vmstat["pgfault"] == pgfault + 1
    gup.put_page(kernel, pfn)


async def test_b24_remote_lock_contracts(kernel: Kernel, task: Task) -> None:
    """B.24 with real sleeps: (A) no sleep → lock kept, locked=1; (B) a sleep → the lock was
    released, locked=0; (C) locked=None → no ALLOW_RETRY: the wait happens holding the lock."""
    a, pfn = await held_page(kernel, task)
    mm = mm_of(task)
    pages = page_array(1)
    await mm.mmap_lock.read_lock(task)
    locked = Locked(1)
    assert await gup.get_user_pages_remote(mm, a + P, 1, 0, pages, locked) == 1  # case A
    assert locked.value == 1
    gup.put_page(kernel, int(pages[0]))
    g = asyncio.create_task(gup.get_user_pages_remote(mm, a, 1, 0, pages, locked))  # case B
    await asyncio.sleep(0.005)
    assert not mm.mmap_lock.is_locked()
    folio_unlock(kernel.mem, pfn)
    assert await g == 1
    assert locked.value == 0
    assert not mm.mmap_lock.is_locked()
    gup.put_page(kernel, pfn)
    # Case C: zap the PTE so the page must fault again, hold it locked, no ``locked``.
    await sys_munmap(task, a, 2 * P)
    fd = kernel.vfs.do_sys_open(task, "held", 2)[0]
    a = await sys_mmap(task, 0, 2 * P, PROT_READ, MAP_SHARED, fd, 0)
    assert folio_trylock(kernel.mem, pfn)
    async with mm.mmap_lock.read(task):
        g = asyncio.create_task(gup.get_user_pages_remote(mm, a, 1, 0, pages, None))
        await asyncio.sleep(0.005)
        assert not g.done()
        assert mm.mmap_lock.readers == 1  # held through the wait
        folio_unlock(kernel.mem, pfn)
        assert await g == 1
        assert mm.mmap_lock.readers == 1
    gup.put_page(kernel, pfn)


async def test_foll_nowait_returns_without_waiting(kernel: Kernel, task: Task) -> None:
    """RETRY_NOWAIT (FOLL_NOWAIT): the fault returns RETRY at once, the lock is kept, GUP
    returns 0 pages; nothing waited."""
    a, pfn = await held_page(kernel, task)
    mm = mm_of(task)
    pages = page_array(1)
    locked = Locked(1)
    async with mm.mmap_lock.read(task):
        assert await gup.get_user_pages_remote(mm, a, 1, FOLL_NOWAIT, pages, locked) == 0
        assert locked.value == 1
        assert mm.mmap_lock.readers == 1
    folio_unlock(kernel.mem, pfn)


@pytest.mark.parametrize("retry", [True, False])
async def test_kill_during_io_wait_inside_a_fault(
    make_fs_kernel: MakeFsKernel, retry: bool
) -> None:
    """A fault sleeping on a slow read is killable (KILLABLE): the access ends with EINTR
    long before the I/O completes; the I/O finishes on its own and the audit is clean."""
    k = make_fs_kernel("ram0=ram:16M,latency=300ms", readahead=False, fault_retry=retry)
    t = k.spawn("t", "s")
    a = await cold_file(k, t)
    reader = asyncio.create_task(read_user_bytes(t, a, 4))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    t.send_fatal_signal(signal.SIGKILL)
    with pytest.raises(KernelError) as ei:
        await reader
    assert ei.value.errno == errno.EINTR
    assert loop.time() - t0 < 0.1
    assert not mm_of(t).mmap_lock.is_locked()
    k.do_exit(t)
    await k.vfs.quiesce()
    assert audit(k) == []


async def test_gup_kill_while_the_fault_sleeps(kernel: Kernel, task: Task) -> None:
    """A.3 with a real sleep: a fatal signal while the first fault waits (lock dropped) ends
    GUP with -EINTR; nothing is pinned, the lock is not held."""
    a, pfn = await held_page(kernel, task)
    mm = mm_of(task)
    pages = page_array(1)
    g = asyncio.create_task(gup.pin_user_pages_unlocked(mm, a, 1, pages, 0, current=task))
    await asyncio.sleep(0.005)
    task.send_fatal_signal(signal.SIGKILL)
    assert await g == -errno.EINTR
    assert not mm.mmap_lock.is_locked()
    folio_unlock(kernel.mem, pfn)
    assert audit(kernel) == []


async def test_madv_populate_read_of_a_cold_file(make_fs_kernel: MakeFsKernel) -> None:
    """MADV_POPULATE_READ faults a cold file mapping in (sleeping on the reads)."""
    k = make_fs_kernel("ram0=ram:16M,latency=2ms")
    t = k.spawn("t", "s")
    a = await cold_file(k, t, 8)
    await sys_madvise(t, a, 8 * P, MADV_POPULATE_READ)
    minf, majf = t.min_flt, t.maj_flt
    assert await read_user_bytes(t, a, 8 * P) == pattern(8 * P)
    assert (t.min_flt, t.maj_flt) == (minf, majf)  # all present already


def test_no_fault_retry_option() -> None:
    """--no-fault-retry / VKERNEL_FAULT_RETRY=0 turn ALLOW_RETRY off (default on)."""
    from vkernel.config import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["serve"]), {}, stdout_isatty=False)
    assert cfg.fault_retry
    args = build_parser().parse_args(["serve", "--no-fault-retry"])
    assert not config_from_args(args, {}, stdout_isatty=False).fault_retry
    env = {"VKERNEL_FAULT_RETRY": "0"}
    assert not config_from_args(
        build_parser().parse_args(["serve"]), env, stdout_isatty=False
    ).fault_retry


async def test_b26_completed_from_dirty_throttling(kernel: Kernel, task: Task) -> None:
    """B.26 with a real producer: above the dirty limit a shared write fault throttles
    (writes the file back) after dropping mmap_lock and returns VM_FAULT_COMPLETED; GUP treats
    it as "lock dropped, redo this page" and returns the page; pgfault counts it once."""
    kernel.vfs.dirty_limit_pages = 2
    fd = await make_file(kernel, task, "thr", pattern(8 * P))
    await kernel.vfs.fsync(task, fd)
    a = await sys_mmap(task, 0, 8 * P, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    mm = mm_of(task)
    mapping = kernel.vfs.lookup("thr").mapping
    assert mapping is not None
    pages = page_array(8)
    acquired = mm.mmap_lock.stats()["read_acquired"]
    assert await gup.pin_user_pages_unlocked(mm, a, 8, pages, FOLL_WRITE, current=task) == 8
    assert mm.mmap_lock.stats()["read_acquired"] - acquired >= 3  # dropped and retaken
    assert [int(p) for p in pages] == [mapping.pages[i] for i in range(8)]
    assert mapping.nr_dirty() <= 2 + 1  # throttled: written back along the way
    assert not mm.mmap_lock.is_locked()
    gup.unpin_user_pages(kernel, pages, 8)
    # The same through user stores: every byte lands, the file ends up consistent.
    await write_user(task, a, b"\xee" * 8 * P)
    await kernel.vfs.fsync(task, fd)
    assert await kernel.vfs.read(task, fd, 8 * P, 0) == b"\xee" * 8 * P
    assert audit(kernel) == []


async def test_truncate_racing_a_sleeping_fault(make_fs_kernel: MakeFsKernel) -> None:
    """A fault sleeping on a read (mmap_lock dropped) while the file is truncated below the
    page: the retried fault sees i_size and gives SIGBUS; no PTE is left past EOF."""
    from vkernel.kernel.errors import UserFault
    from vkernel.kernel.mm_api import lookup_pte

    k = make_fs_kernel("ram0=ram:16M,latency=20ms", readahead=False)
    t = k.spawn("t", "s")
    a = await cold_file(k, t)
    fd = k.vfs.do_sys_open(t, "cold", 2)[0]
    reader = asyncio.create_task(read_user_bytes(t, a + 3 * P, 1))
    await asyncio.sleep(0.005)
    assert not mm_of(t).mmap_lock.is_locked()
    await k.vfs.ftruncate(t, fd, P)
    with pytest.raises(UserFault) as ei:
        await reader
    assert ei.value.signo == signal.SIGBUS
    assert lookup_pte(t, a + 3 * P) == 0
    await k.vfs.quiesce()
    assert audit(k) == []


async def test_map_populate_of_a_cold_file(make_fs_kernel: MakeFsKernel) -> None:
    """MAP_POPULATE on a file mapping reads it in at mmap time (sleeping on the I/O)."""
    from vkernel.kernel.uapi import MAP_POPULATE

    k = make_fs_kernel("ram0=ram:16M,latency=1ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "pop", pattern(16 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    a = await sys_mmap(t, 0, 16 * P, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0)
    faults = t.min_flt + t.maj_flt
    assert await read_user_bytes(t, a, 16 * P) == pattern(16 * P)
    assert t.min_flt + t.maj_flt == faults


async def test_handle_mm_fault_sleepable(kernel: Kernel, task: Task) -> None:
    """The async wrapper: with ALLOW_RETRY the first fault on a locked page releases
    mmap_lock, sleeps until the unlock and returns RETRY; the TRIED fault then completes under
    the lock; without ALLOW_RETRY the wait happens holding the lock and the result is 0."""
    from vkernel.kernel.memory import handle_mm_fault_sleepable
    from vkernel.kernel.uapi import (
        FAULT_FLAG_ALLOW_RETRY,
        FAULT_FLAG_KILLABLE,
        FAULT_FLAG_TRIED,
        VM_FAULT_RETRY,
    )

    a, pfn = await held_page(kernel, task)
    mm = mm_of(task)
    flags = FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
    await mm.mmap_lock.read_lock(task)
    vma = mm.vma_lookup(a)
    assert vma is not None
    loop = asyncio.get_running_loop()
    loop.call_later(0.005, folio_unlock, kernel.mem, pfn)
    assert await handle_mm_fault_sleepable(vma, a, flags, task) == VM_FAULT_RETRY
    assert not mm.mmap_lock.is_locked()
    await mm.mmap_lock.read_lock(task)
    vma = mm.vma_lookup(a)
    assert vma is not None
    assert await handle_mm_fault_sleepable(vma, a, flags | FAULT_FLAG_TRIED, task) == 0
    mapping = kernel.vfs.lookup("held").mapping
    assert mapping is not None
    other = mapping.pages[1]
    assert folio_trylock(kernel.mem, other)
    loop.call_later(0.005, folio_unlock, kernel.mem, other)
    assert await handle_mm_fault_sleepable(vma, a + P, FAULT_FLAG_KILLABLE, task) == 0
    assert mm.mmap_lock.readers == 1
    mm.mmap_lock.read_unlock()
