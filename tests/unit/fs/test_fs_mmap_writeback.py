"""Writeback through mappings: page_mkclean at writeback (a later store faults and redirties),
stable pages under writeback, msync errno rules and MS_SYNC, the flusher, truncate / punch
hole / MADV_REMOVE / MADV_DONTNEED on file mappings."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from tests.unit.fs.conftest import MakeFsKernel
from tests.unit.fs.fshelp import P, make_file, pattern, raises
from tests.unit.gup.guphelp import mm_of
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import UserFault
from vkernel.kernel.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import lookup_pte, sys_madvise, sys_mmap, sys_msync, sys_munmap
from vkernel.kernel.pagecache import filemap_fdatawrite
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    _PAGE_DIRTY,
    _PAGE_RW,
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PROT_READ,
    PROT_WRITE,
    PG_dirty,
    PG_writeback,
)

RW = PROT_READ | PROT_WRITE


def on_device(k: Kernel, name: str, idx: int, n: int) -> bytes:
    """Bytes [0, n) of file page ``idx`` as stored on the device (not the cache)."""
    ino = k.vfs.lookup(name)
    block = int(ino.bmap_range(idx, 1)[0])
    assert ino.sb is not None
    return bytes(ino.sb.bdev.read_raw(block, 1).reshape(-1)[:n])


async def test_writeback_cleans_ptes_and_a_later_store_redirties(
    kernel: Kernel, task: Task
) -> None:
    """fsync: page_mkclean write-protects and cleans the PTE; the next store faults
    (page_mkwrite), the page is dirty again and the next fsync writes the new data."""
    fd = await make_file(kernel, task, "wb", pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await write_user(task, a, b"one")
    mapping = kernel.vfs.lookup("wb").mapping
    assert mapping is not None
    pfn = mapping.pages[0]
    assert lookup_pte(task, a) & _PAGE_RW
    await kernel.vfs.fsync(task, fd)
    assert on_device(kernel, "wb", 0, 3) == b"one"
    pte = lookup_pte(task, a)
    assert not pte & (_PAGE_RW | _PAGE_DIRTY)
    assert not kernel.mem.flags[pfn] & PG_dirty
    pgfault = kernel.vmstat["pgfault"]
    await write_user(task, a, b"two")
    assert kernel.vmstat["pgfault"] == pgfault + 1
    assert kernel.mem.flags[pfn] & PG_dirty
    assert mapping.nr_dirty() == 1
    await kernel.vfs.fsync(task, fd)
    assert on_device(kernel, "wb", 0, 3) == b"two"
    assert audit(kernel) == []


async def test_page_under_writeback_is_stable(make_fs_kernel: MakeFsKernel) -> None:
    """A store to a page whose writeback is in flight waits for the write to complete (the
    device gets the data as it was), then redirties the page."""
    k = make_fs_kernel("ram0=ram:16M,latency=30ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "st", pattern(P))
    a = await sys_mmap(t, 0, P, RW, MAP_SHARED, fd, 0)
    await write_user(t, a, b"old")
    mapping = k.vfs.lookup("st").mapping
    assert mapping is not None
    pfn = mapping.pages[0]
    sync = asyncio.create_task(filemap_fdatawrite(mapping, task=t))
    await asyncio.sleep(0.005)
    assert k.mem.flags[pfn] & PG_writeback
    store = asyncio.create_task(write_user(t, a, b"new"))
    await asyncio.sleep(0.005)
    assert not store.done()
    assert not mm_of(t).mmap_lock.is_locked()  # the fault sleeps without mmap_lock
    await store
    assert not k.mem.flags[pfn] & PG_writeback
    assert k.mem.flags[pfn] & PG_dirty
    await sync
    assert on_device(k, "st", 0, 3) == b"old"
    await k.vfs.fsync(t, fd)
    assert on_device(k, "st", 0, 3) == b"new"


async def test_flusher_writes_pages_dirtied_through_a_mapping(kernel: Kernel, task: Task) -> None:
    """The periodic writeback picks up pages dirtied by stores through a mapping."""
    fd = await make_file(kernel, task, "fl", pattern(P))
    a = await sys_mmap(task, 0, P, RW, MAP_SHARED, fd, 0)
    await kernel.vfs.fsync(task, fd)
    await write_user(task, a + 1, b"bg")
    await kernel.vfs.writeback_expired(now=time.monotonic() + 3600)
    assert on_device(kernel, "fl", 0, 3)[1:] == b"bg"


async def test_msync(kernel: Kernel, task: Task) -> None:
    """msync(2): EINVAL for bad flags, an unaligned address or MS_ASYNC|MS_SYNC; ENOMEM for
    unmapped parts; EBUSY for MS_INVALIDATE of a locked mapping; MS_SYNC writes the file."""
    fd = await make_file(kernel, task, "ms", pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await raises(errno.EINVAL, sys_msync(task, a, P, 8))
    await raises(errno.EINVAL, sys_msync(task, a + 1, P, MS_SYNC))
    await raises(errno.EINVAL, sys_msync(task, a, P, MS_SYNC | MS_ASYNC))
    await sys_msync(task, a, 0, MS_SYNC)
    await write_user(task, a + P, b"msync")
    await sys_msync(task, a, 2 * P, MS_ASYNC)
    assert on_device(kernel, "ms", 1, 5) != b"msync"
    await sys_msync(task, a, 2 * P, MS_SYNC | MS_INVALIDATE)
    assert on_device(kernel, "ms", 1, 5) == b"msync"
    await raises(errno.ENOMEM, sys_msync(task, a, 4 * P, MS_SYNC))
    anon = await sys_mmap(task, 0, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED)
    await raises(errno.EBUSY, sys_msync(task, anon, P, MS_INVALIDATE))
    await sys_msync(task, anon, P, MS_SYNC)


@pytest.mark.parametrize("kind", ["disk", "shmem"])
async def test_truncate_unmaps_mapped_pages(kernel: Kernel, task: Task, kind: str) -> None:
    """truncate: PTEs past the new EOF go (shared pages and private COW copies); the next
    access there is SIGBUS; pages before EOF stay mapped; the audit is exact."""
    fd = await make_file(kernel, task, f"tr-{kind}", pattern(4 * P), kind)
    s = await sys_mmap(task, 0, 4 * P, RW, MAP_SHARED, fd, 0)
    p = await sys_mmap(task, 0, 4 * P, RW, MAP_PRIVATE, fd, 0)
    await read_user_bytes(task, s, 4 * P)
    await write_user(task, p + 3 * P, b"cow")
    await kernel.vfs.ftruncate(task, fd, P + 10)
    assert lookup_pte(task, s) != 0
    for addr in (s + 2 * P, s + 3 * P, p + 3 * P):
        assert lookup_pte(task, addr) == 0
        with pytest.raises(UserFault):
            await read_user_bytes(task, addr, 1)
    assert audit(kernel) == []


@pytest.mark.parametrize("kind", ["disk", "shmem"])
async def test_punch_hole_and_madv_remove(kernel: Kernel, task: Task, kind: str) -> None:
    """A punched hole is unmapped from shared mappings (they read zeros afterwards) while a
    private COW copy survives; MADV_REMOVE punches through a shared writable mapping (EACCES
    through a private one)."""
    fd = await make_file(kernel, task, f"ph-{kind}", pattern(4 * P), kind)
    s = await sys_mmap(task, 0, 4 * P, RW, MAP_SHARED, fd, 0)
    p = await sys_mmap(task, 0, 4 * P, RW, MAP_PRIVATE, fd, 0)
    await read_user_bytes(task, s, 4 * P)
    await write_user(task, p + P, b"mine")
    await kernel.vfs.fallocate(task, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, P, P)
    assert await read_user_bytes(task, s + P, P) == bytes(P)
    assert (await read_user_bytes(task, p + P, 4)) == b"mine"
    assert await read_user_bytes(task, s + 2 * P, 4) == pattern(4 * P)[2 * P : 2 * P + 4]
    await raises(errno.EACCES, sys_madvise(task, p + 2 * P, P, MADV_REMOVE))
    await sys_madvise(task, s + 2 * P, P, MADV_REMOVE)
    assert await read_user_bytes(task, s + 2 * P, P) == bytes(P)
    assert (await kernel.vfs.read(task, fd, P, 2 * P)) == bytes(P)
    assert audit(kernel) == []


async def test_madv_dontneed_on_a_private_file_mapping(kernel: Kernel, task: Task) -> None:
    """MADV_DONTNEED drops a private COW copy: the next read shows the file again."""
    fd = await make_file(kernel, task, "dn", pattern(P))
    p = await sys_mmap(task, 0, P, RW, MAP_PRIVATE, fd, 0)
    await write_user(task, p, b"XX")
    await sys_madvise(task, p, P, MADV_DONTNEED)
    assert await read_user_bytes(task, p, 2) == pattern(P)[:2]
    await sys_munmap(task, p, P)
    assert audit(kernel) == []
