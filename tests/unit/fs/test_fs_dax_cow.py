"""Seed 002 / B.38: a dax fault handler that does the COW itself (``cow_page``), DONE_COW or
VM_FAULT_LOCKED without a page (the i_mmap lock held instead of a page lock); one fault where
read-then-copy costs two; a truncate never leaves a PTE past EOF."""

from __future__ import annotations

import signal

import pytest

from tests.unit.fs.fshelp import P, make_file, pattern
from vkernel.kernel import memory
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import UserFault
from vkernel.kernel.fs import Inode
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import lookup_pte, proc_status_mm, sys_mmap, sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE

RW = PROT_READ | PROT_WRITE


async def dax_file(k: Kernel, t: Task, data: bytes) -> int:
    """A dax file holding ``data`` on pmem0; returns an O_RDWR fd."""
    return await make_file(k, t, "dx", data, "dax", "pmem0")


@pytest.fixture(params=[memory.DAX_COW_DONE, memory.DAX_COW_LOCKED])
def cow_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the handler finishing by DONE_COW and by LOCKED-without-page."""
    mode: str = request.param
    monkeypatch.setattr(memory, "dax_cow_mode", mode)
    return mode


async def test_private_write_is_one_fault(kernel: Kernel, task: Task, cow_mode: str) -> None:
    """A private write fault on a mapped dax extent: one pgfault, one copy (by the handler,
    never again by the core), the file unchanged, the page anonymous; the i_mmap lock of the
    LOCKED form is released by the core."""
    data = pattern(2 * P, seed=9)
    fd = await dax_file(kernel, task, data)
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_PRIVATE, fd, 0)
    pgfault, copies = kernel.vmstat["pgfault"], memory.dax_cow_copies
    await write_user(task, a + 3, b"W")
    assert kernel.vmstat["pgfault"] == pgfault + 1
    assert memory.dax_cow_copies == copies + 1
    got = await read_user_bytes(task, a, P)
    assert got[:3] == data[:3]
    assert got[3:4] == b"W"
    assert got[4:] == data[4:P]
    assert await kernel.vfs.read(task, fd, 2 * P, 0) == data
    assert proc_status_mm(task)["RssAnon"] == 4
    ino = kernel.vfs.lookup("dx")
    assert ino.i_mmap_locked == 0
    assert audit(kernel) == []
    await sys_munmap(task, a, 2 * P)


async def test_read_then_write_costs_two_faults(kernel: Kernel, task: Task) -> None:
    """The path seed 002 replaces: read fault maps the device frame read-only, the write then
    faults again and copies (wp_page_copy): two pgfaults."""
    fd = await dax_file(kernel, task, pattern(P))
    a = await sys_mmap(task, 0, P, RW, MAP_PRIVATE, fd, 0)
    pgfault = kernel.vmstat["pgfault"]
    await read_user_bytes(task, a, 1)
    await write_user(task, a, b"W")
    assert kernel.vmstat["pgfault"] == pgfault + 2
    assert (await kernel.vfs.read(task, fd, 1, 0)) == pattern(P)[:1]
    await sys_munmap(task, a, P)


async def test_hole_cow_is_zeroes_without_a_copy(kernel: Kernel, task: Task, cow_mode: str) -> None:
    """A private write over a hole: the handler zeroes cow_page (no copy), the file stays a
    hole (no block allocated)."""
    fd = await dax_file(kernel, task, b"")
    await kernel.vfs.ftruncate(task, fd, 2 * P)
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_PRIVATE, fd, 0)
    copies = kernel.vfs.lookup("dx").nr_blocks(), memory.dax_cow_copies
    await write_user(task, a + P + 1, b"Z")
    got = await read_user_bytes(task, a + P, P)
    assert got[0] == 0
    assert got[1:2] == b"Z"
    assert got[2:] == bytes(P - 2)
    assert (kernel.vfs.lookup("dx").nr_blocks(), memory.dax_cow_copies) == copies
    await sys_munmap(task, a, 2 * P)


async def test_shared_dax_mapping_writes_the_device(kernel: Kernel, task: Task) -> None:
    """MAP_SHARED dax: stores land in the device frames (read(2) sees them at once)."""
    fd = await dax_file(kernel, task, pattern(P))
    a = await sys_mmap(task, 0, P, RW, MAP_SHARED, fd, 0)
    await write_user(task, a + 7, b"dax!")
    assert (await kernel.vfs.read(task, fd, 11, 0))[7:] == b"dax!"
    await sys_munmap(task, a, P)


async def test_truncate_racing_a_locked_cow_fault(
    kernel: Kernel, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VM_FAULT_LOCKED without a page: while the handler holds the i_mmap lock a truncate
    shrinks i_size (its unmap waits for the lock); the core rechecks i_size under the lock and
    gives SIGBUS instead of installing a PTE past EOF, drops the cow page and the lock."""
    monkeypatch.setattr(memory, "dax_cow_mode", memory.DAX_COW_LOCKED)
    fd = await dax_file(kernel, task, pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_PRIVATE, fd, 0)
    ino: Inode = kernel.vfs.lookup("dx")
    real = memory.dax_fault_cow_page

    def racing(*args: object) -> int:
        ret = real(*args)  # type: ignore[arg-type]
        ino.size = P  # truncate_setsize() ran while we held the i_mmap lock
        return ret

    monkeypatch.setattr(memory, "dax_fault_cow_page", racing)
    with pytest.raises(UserFault) as ei:
        await write_user(task, a + P, b"x")
    assert ei.value.signo == signal.SIGBUS
    assert lookup_pte(task, a + P) == 0
    assert ino.i_mmap_locked == 0
    assert audit(kernel) == []
    await sys_munmap(task, a, 2 * P)


async def test_truncate_unmaps_dax_and_cow_pages(kernel: Kernel, task: Task) -> None:
    """truncate_pagecache(): shared PTEs of device frames and private COW copies past the new
    EOF are zapped; the next access is SIGBUS."""
    fd = await dax_file(kernel, task, pattern(3 * P))
    s = await sys_mmap(task, 0, 3 * P, RW, MAP_SHARED, fd, 0)
    p = await sys_mmap(task, 0, 3 * P, RW, MAP_PRIVATE, fd, 0)
    await read_user_bytes(task, s, 3 * P)
    await write_user(task, p + 2 * P, b"cow")
    await kernel.vfs.ftruncate(task, fd, P)
    assert lookup_pte(task, s + 2 * P) == 0
    assert lookup_pte(task, p + 2 * P) == 0
    assert lookup_pte(task, s) != 0
    for addr in (s + P, p + 2 * P):
        with pytest.raises(UserFault):
            await read_user_bytes(task, addr, 1)
    assert audit(kernel) == []
    await sys_munmap(task, s, 3 * P)
    await sys_munmap(task, p, 3 * P)


async def test_unmapping_dirty_dax_ptes_dirties_no_page_cache(kernel: Kernel, task: Task) -> None:
    """Stores through a shared dax mapping then munmap: the data is in the device frames and
    nothing is left dirty (no page cache to write back)."""
    fd = await dax_file(kernel, task, pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    dirty = kernel.vmstat["nr_dirty"]
    await write_user(task, a, b"D" * 2 * P)
    await sys_munmap(task, a, 2 * P)
    assert kernel.vmstat["nr_dirty"] == dirty
    assert await kernel.vfs.read(task, fd, 2 * P, 0) == b"D" * 2 * P
