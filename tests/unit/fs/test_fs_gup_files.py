"""GUP on file pages (A.6, B.35, B.39, B.41): the FOLL_LONGTERM file matrix, R/O long-term pins
of private file pages unshare, pinned page-cache pages written by a "device" and unpinned
dirty reach the disk; the audit stays exact with pins held."""

from __future__ import annotations

import errno

import pytest

from tests.unit.fs.fshelp import P, make_file, pattern
from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import pfn_at
from vkernel.kernel import gup
from vkernel.kernel.audit import audit
from vkernel.kernel.gup import PageArray
from vkernel.kernel.gup_fast import pin_user_pages_fast
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm import MmStruct
from vkernel.kernel.mm_api import sys_mmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    FOLL_LONGTERM,
    FOLL_WRITE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    PG_anon,
    PG_dirty,
)

RW = PROT_READ | PROT_WRITE


async def mapped(k: Kernel, t: Task, kind: str, flags: int, name: str = "g") -> int:
    """A 2-page file of ``kind`` mapped with ``flags``, prefaulted by stores (memset)."""
    dev = "pmem0" if kind == "dax" else ""
    fd = await make_file(k, t, f"{name}-{kind}-{flags}", pattern(2 * P), kind, dev)
    a = await sys_mmap(t, 0, 2 * P, RW, flags, fd, 0)
    await write_user(t, a, b"\x01" * 2 * P)
    return a


async def pin(api: str, mm: MmStruct, a: int, n: int, pages: PageArray, flags: int, t: Task) -> int:
    """pin_user_pages_unlocked (slow) or pin_user_pages_fast (lockless walk, then slow)."""
    if api == "fast":
        return await pin_user_pages_fast(mm, a, n, flags, pages, current=t)
    return await gup.pin_user_pages_unlocked(mm, a, n, pages, flags, current=t)


@pytest.mark.parametrize("api", ["slow", "fast"])
@pytest.mark.parametrize("kind", ["shmem", "disk"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("write", [True, False])
async def test_b39_longterm_matrix(
    kernel: Kernel, task: Task, kind: str, shared: bool, write: bool, api: str
) -> None:
    """B.39: R/O long-term pins always succeed, all pins on MAP_PRIVATE succeed, R/W
    long-term pins of MAP_SHARED succeed for shmem and fail with EFAULT for a disk file
    (dirty-tracked); a short-term R/W pin of a shared disk file is fine. GUP-fast refuses the
    file folio (gup_fast_folio_allowed) so the slow path gives the same answer (A.6)."""
    a = await mapped(kernel, task, kind, MAP_SHARED if shared else MAP_PRIVATE)
    mm = mm_of(task)
    pages = page_array(2)
    flags = FOLL_LONGTERM | (FOLL_WRITE if write else 0)
    ret = await pin(api, mm, a, 2, pages, flags, task)
    if write and shared and kind == "disk":
        assert ret == -errno.EFAULT
        ret = await pin(api, mm, a, 2, pages, FOLL_WRITE, task)
    assert ret == 2
    assert audit(kernel) == []
    gup.unpin_user_pages(kernel, pages, 2)
    assert audit(kernel) == []


@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("shared", [True, False])
async def test_longterm_on_dax_is_eopnotsupp(
    kernel: Kernel, task: Task, write: bool, shared: bool
) -> None:
    """B.41: any FOLL_LONGTERM on an fsdax mapping → EOPNOTSUPP; short-term pins work."""
    a = await mapped(kernel, task, "dax", MAP_SHARED if shared else MAP_PRIVATE)
    mm = mm_of(task)
    pages = page_array(1)
    flags = FOLL_WRITE if write else 0
    got = await gup.pin_user_pages_unlocked(mm, a, 1, pages, flags | FOLL_LONGTERM, current=task)
    assert got == -errno.EOPNOTSUPP
    assert await gup.pin_user_pages_unlocked(mm, a, 1, pages, flags, current=task) == 1
    gup.unpin_user_pages(kernel, pages, 1)


@pytest.mark.parametrize("write", [True, False])
async def test_fast_longterm_on_shared_dax_falls_back_to_eopnotsupp(
    kernel: Kernel, task: Task, write: bool
) -> None:
    """A.7 §3: GUP-fast never long-term pins a devmap (dax) frame; the slow path then
    refuses the fsdax VMA with EOPNOTSUPP. Short-term fast pins of dax frames work."""
    a = await mapped(kernel, task, "dax", MAP_SHARED)
    mm = mm_of(task)
    pages = page_array(1)
    flags = FOLL_WRITE if write else 0
    got = await pin_user_pages_fast(mm, a, 1, flags | FOLL_LONGTERM, pages, current=task)
    assert got == -errno.EOPNOTSUPP
    assert await pin_user_pages_fast(mm, a, 1, flags, pages, current=task) == 1
    gup.unpin_user_pages(kernel, pages, 1)
    assert audit(kernel) == []


@pytest.mark.parametrize("kind", ["shmem", "disk"])
async def test_b35_ro_longterm_pin_unshares_a_private_file_page(
    kernel: Kernel, task: Task, kind: str
) -> None:
    """B.35(b)/(c): a private mapping that only read the file maps the page-cache page; a
    short-term R/O pin references that page; a long-term R/O pin unshares it into an anon
    copy first, so later stores through the mapping are seen through the pin."""
    fd = await make_file(kernel, task, f"u-{kind}", pattern(P, seed=5), kind)
    a = await sys_mmap(task, 0, P, RW, MAP_PRIVATE, fd, 0)
    await read_user_bytes(task, a, 1)
    cache_pfn = pfn_at(task, a)
    mapping = kernel.vfs.lookup(f"u-{kind}").mapping
    assert mapping is not None
    assert mapping.pages[0] == cache_pfn
    mm = mm_of(task)
    pages = page_array(1)
    assert await gup.pin_user_pages_unlocked(mm, a, 1, pages, 0, current=task) == 1
    assert int(pages[0]) == cache_pfn  # short-term: no unshare
    gup.unpin_user_pages(kernel, pages, 1)
    assert await gup.pin_user_pages_unlocked(mm, a, 1, pages, FOLL_LONGTERM, current=task) == 1
    pinned = int(pages[0])
    assert pinned != cache_pfn
    assert kernel.mem.flags[pinned] & PG_anon
    assert pfn_at(task, a) == pinned
    await write_user(task, a, b"seen")
    assert bytes(kernel.mem.frames[pinned][:4]) == b"seen"
    assert (await kernel.vfs.read(task, fd, 4, 0)) == pattern(P, seed=5)[:4]
    assert audit(kernel) == []
    gup.unpin_user_pages(kernel, pages, 1)


async def test_device_write_through_a_pin_reaches_the_disk(kernel: Kernel, task: Task) -> None:
    """A "device" writes a pinned page-cache page (DMA into the frame) after writeback
    cleaned it; unpin_user_pages_dirty_lock() redirties it in its file, fsync writes it."""
    fd = await make_file(kernel, task, "dma", pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    mm = mm_of(task)
    pages = page_array(1)
    assert await gup.pin_user_pages_unlocked(mm, a + P, 1, pages, FOLL_WRITE, current=task) == 1
    await kernel.vfs.fsync(task, fd)
    pfn = int(pages[0])
    assert not kernel.mem.flags[pfn] & PG_dirty
    kernel.mem.frames[pfn][:4] = memoryview(b"DMA!")
    assert audit(kernel) == []
    gup.unpin_user_pages_dirty_lock(kernel, pages, 1, True)
    assert kernel.mem.flags[pfn] & PG_dirty
    await kernel.vfs.fsync(task, fd)
    mapping = kernel.vfs.lookup("dma").mapping
    assert mapping is not None
    assert mapping.nr_dirty() == 0
    ino = kernel.vfs.lookup("dma")
    assert ino.sb is not None
    block = int(ino.bmap_range(1, 1)[0])
    assert bytes(ino.sb.bdev.read_raw(block, 1).reshape(-1)[:4]) == b"DMA!"
