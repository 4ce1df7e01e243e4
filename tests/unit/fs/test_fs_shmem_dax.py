"""shmem files (the shmem object of MAP_SHARED|MAP_ANONYMOUS, nr_shmem) and dax files."""

from __future__ import annotations

from tests.unit.fs.fshelp import P, make_file, pattern
from vkernel.kernel.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PG_buddy, PG_shmem
from vkernel.kernel.vma import ShmemObject


async def test_shmem_file_is_backed_by_a_shmem_object(kernel: Kernel, task: Task) -> None:
    data = pattern(3 * P)
    fd = await make_file(kernel, task, "s", data, "shmem")
    ino = kernel.vfs.names["s"]
    assert isinstance(ino.mapping, ShmemObject)  # what do_shmem_fault maps
    assert ino.mapping.size == 3 * P
    pfns = list(ino.mapping.pages.values())
    assert all(kernel.mem.flags[p] & PG_shmem for p in pfns)
    assert all(kernel.mem.mapping[p] == ino.mapping.id for p in pfns)
    assert kernel.vmstat["nr_shmem"] == 3
    assert await kernel.vfs.read(task, fd, 4 * P, 0) == data
    await kernel.vfs.fsync(task, fd)  # a no-op, no device involved


async def test_shmem_holes_read_as_zeros_without_allocating(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "s", b"", "shmem")
    await kernel.vfs.ftruncate(task, fd, 8 * P)
    assert await kernel.vfs.read(task, fd, 8 * P, 0) == bytes(8 * P)
    assert kernel.vfs.stat("s").cached_pages == 0
    assert kernel.vmstat["nr_shmem"] == 0


async def test_shmem_punch_hole_and_unlink_free_pages(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "s", pattern(4 * P), "shmem")
    ino = kernel.vfs.names["s"]
    assert ino.mapping is not None
    p1 = ino.mapping.pages[1]
    await kernel.vfs.fallocate(task, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, P, P)
    assert kernel.mem.flags[p1] & PG_buddy
    assert kernel.vmstat["nr_shmem"] == 3
    assert await kernel.vfs.read(task, fd, P, P) == bytes(P)
    kernel.vfs.close(task, fd)
    kernel.vfs.do_unlink(task, "s")
    assert kernel.vmstat["nr_shmem"] == 0


async def test_dax_file_data_lives_in_device_frames(kernel: Kernel, task: Task) -> None:
    data = pattern(2 * P + 5)
    fd = await make_file(kernel, task, "x", data, "dax", "pmem0")
    ino = kernel.vfs.names["x"]
    assert ino.mapping is None  # no page cache
    dev = kernel.vfs.devices["pmem0"]
    blk = int(ino.bmap_range(1, 1)[0])
    pfn = int(dev.block_pfns(blk, 1)[0])  # type: ignore[attr-defined]
    assert kernel.mem.frames[pfn].tobytes() == data[P : 2 * P]
    assert await kernel.vfs.read(task, fd, 3 * P, 0) == data
    assert dev.stats.reads == dev.stats.writes == 0  # direct access, no bios
    await kernel.vfs.fallocate(task, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, P)
    assert await kernel.vfs.read(task, fd, 3 * P, 0) == data[:10] + bytes(P) + data[P + 10 :]
    await kernel.vfs.ftruncate(task, fd, 100)
    assert await kernel.vfs.read(task, fd, 3 * P, 0) == data[:10] + bytes(90)


async def test_new_dax_blocks_read_as_zeros(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "x", b"\xff" * 4 * P, "dax", "pmem0")
    kernel.vfs.close(task, fd)
    kernel.vfs.do_unlink(task, "x")
    await kernel.vfs.sync_all()  # freed blocks become reusable
    fd = await make_file(kernel, task, "y", b"", "dax", "pmem0")
    await kernel.vfs.write(task, fd, b"a", 3 * P)
    await kernel.vfs.fallocate(task, fd, 0, 0, 3 * P)
    assert await kernel.vfs.read(task, fd, 4 * P, 0) == bytes(3 * P) + b"a"
