"""O_DIRECT pread/pwrite/preadv/pwritev through pinned user pages (A.14, B.68)."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest

from tests.unit.fs.fshelp import P, make_file, pattern, raises
from vkernel.kernel import dio
from vkernel.kernel.audit import audit
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.errors import KernelError
from vkernel.kernel.fs import O_CREAT, O_DIRECT, O_RDWR
from vkernel.kernel.gup import put_pages
from vkernel.kernel.gup_fast import get_user_pages_fast
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mm_api import lookup_pte, sys_mmap, sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, PG_dirty

RW = PROT_READ | PROT_WRITE
PFN_MASK = ((1 << 52) - 1) & ~(P - 1)


async def buf(t: Task, n: int) -> int:
    """An anonymous private mapping of ``n`` bytes."""
    return await sys_mmap(t, 0, n, RW, MAP_PRIVATE | MAP_ANONYMOUS)


async def dfile(k: Kernel, t: Task, data: bytes, name: str = "f") -> int:
    """A disk file holding ``data``; an O_DIRECT|O_RDWR fd to it."""
    fd0 = await make_file(k, t, name, data)
    k.vfs.close(t, fd0)
    fd, _ = k.vfs.do_sys_open(t, name, O_RDWR | O_DIRECT, "disk")
    return fd


def pins(k: Kernel) -> tuple[int, int]:
    """(nr_foll_pin_acquired, nr_foll_pin_released)."""
    return k.vmstat["nr_foll_pin_acquired"], k.vmstat["nr_foll_pin_released"]


def pfn_of(t: Task, addr: int) -> int:
    """The frame mapping ``addr``."""
    return (lookup_pte(t, addr) & PFN_MASK) >> 12


async def test_b68_read_pins_four_pages_and_dirties(kernel: Kernel, task: Task) -> None:
    """B.68: a 3-page read into a buffer at P/2 pins 4 pages with FOLL_WRITE, dirties them and
    unpins them; the data lands; a DIO write pins without dirtying."""
    data = pattern(4 * P, seed=3)
    fd = await dfile(kernel, task, data)
    a = await buf(task, 5 * P)
    await write_user(task, a, b"\0" * (5 * P))  # fault in
    for i in range(5):
        kernel.mem.flags[pfn_of(task, a + i * P)] &= ~np.uint32(PG_dirty)
    acq, rel = pins(kernel)
    n = await dio.vfs_preadv(task, fd, [(a + P // 2, 3 * P)], 0)
    assert n == 3 * P
    assert pins(kernel) == (acq + 4, rel + 4)
    assert all(kernel.mem.flags[pfn_of(task, a + i * P)] & PG_dirty for i in range(4))
    assert await read_user_bytes(task, a + P // 2, 3 * P) == data[: 3 * P]
    for i in range(5):
        kernel.mem.flags[pfn_of(task, a + i * P)] &= ~np.uint32(PG_dirty)
    acq, rel = pins(kernel)
    assert await dio.vfs_pwritev(task, fd, [(a + P // 2, 3 * P)], P) == 3 * P
    assert pins(kernel) == (acq + 4, rel + 4)
    assert not any(kernel.mem.flags[pfn_of(task, a + i * P)] & PG_dirty for i in range(4))
    assert await kernel.vfs.read(task, fd, 3 * P, P) == data[: 3 * P]
    assert audit(kernel) == []


@pytest.mark.parametrize("gup", ["fast", "slow"])
@pytest.mark.parametrize("foll", ["pin", "get"])
async def test_aligned_roundtrip_switches(kernel: Kernel, task: Task, gup: str, foll: str) -> None:
    """Page-aligned preadv/pwritev with every GUP switch; counters as the switch says."""
    fd = await dfile(kernel, task, b"")
    a = await buf(task, 8 * P)
    data = pattern(8 * P, seed=5)
    await write_user(task, a, data)
    acq = kernel.vmstat["nr_foll_pin_acquired"]
    fast, slow = kernel.vmstat["fast_gup"], kernel.vmstat["fast_gup_slow"]
    iov = [(a, 3 * P), (a + 3 * P, 5 * P)]
    assert await dio.vfs_pwritev(task, fd, iov, 0, gup=gup, foll=foll) == 8 * P
    assert kernel.vfs.lookup("f").size == 8 * P
    b = await buf(task, 8 * P)
    await write_user(task, b, b"\1" * (8 * P))  # faulted in: the lockless walk takes it all
    assert await dio.vfs_preadv(task, fd, [(b, 8 * P)], 0, gup=gup, foll=foll) == 8 * P
    assert await read_user_bytes(task, b, 8 * P) == data
    got = kernel.vmstat["nr_foll_pin_acquired"] - acq
    assert got == (16 if foll == "pin" else 0)
    if gup == "fast":
        assert kernel.vmstat["fast_gup"] - fast == 16
        assert kernel.vmstat["fast_gup_slow"] == slow
    else:
        assert kernel.vmstat["fast_gup"] == fast
    assert pins(kernel)[0] == pins(kernel)[1]
    assert audit(kernel) == []


async def test_daemon_wide_switch() -> None:
    """The daemon-wide defaults (set_dio_defaults) apply when a call names no mode."""
    k = Kernel(KernelConfig(memory_bytes=64 << 20))
    dio.set_dio_defaults(k, gup="slow", foll="get")
    with pytest.raises(KernelError):
        dio.set_dio_defaults(k, gup="bogus")
    k.vfs.add_device(DeviceSpec.parse("ram0=ram:16M"))
    t = k.spawn("t", "s")
    fd = await dfile(k, t, pattern(2 * P))
    a = await buf(t, 2 * P)
    acq, fast = k.vmstat["nr_foll_pin_acquired"], k.vmstat["fast_gup"]
    assert await dio.vfs_preadv(t, fd, [(a, 2 * P)], 0) == 2 * P
    assert await read_user_bytes(t, a, 2 * P) == pattern(2 * P)
    assert (k.vmstat["nr_foll_pin_acquired"], k.vmstat["fast_gup"]) == (acq, fast)
    await raises(errno.EINVAL, dio.vfs_preadv(t, fd, [(a, P)], 0, gup="bogus"))
    await k.vfs.quiesce()
    k.do_exit(t)
    await k.vfs.shutdown()
    assert audit(k) == []


async def test_kernel_config_switches() -> None:
    """KernelConfig.dio_gup/dio_foll are the boot-time daemon-wide defaults."""
    k = Kernel(KernelConfig(memory_bytes=64 << 20, dio_gup="slow", dio_foll="get"))
    assert (dio.dio_defaults(k).gup, dio.dio_defaults(k).foll) == ("slow", "get")
    k.vfs.add_device(DeviceSpec.parse("ram0=ram:16M"))
    t = k.spawn("t", "s")
    fd = await dfile(k, t, pattern(P))
    a = await buf(t, P)
    acq = k.vmstat["nr_foll_pin_acquired"]
    assert await dio.vfs_preadv(t, fd, [(a, P)], 0) == P
    assert k.vmstat["nr_foll_pin_acquired"] == acq
    await k.vfs.quiesce()
    k.do_exit(t)
    await k.vfs.shutdown()
    assert audit(k) == []


async def test_alignment_einval(kernel: Kernel, task: Task) -> None:
    """Offset, address or length not a multiple of 512: EINVAL, nothing pinned."""
    fd = await dfile(kernel, task, pattern(4 * P))
    a = await buf(task, 4 * P)
    before = pins(kernel)
    await raises(errno.EINVAL, dio.vfs_preadv(task, fd, [(a, P)], 100))
    await raises(errno.EINVAL, dio.vfs_preadv(task, fd, [(a + 8, P)], 0))
    await raises(errno.EINVAL, dio.vfs_pwritev(task, fd, [(a, 1000)], 0))
    await raises(errno.EINVAL, dio.vfs_pwritev(task, fd, [(a, 512), (a + 1024, 100)], 0))
    assert pins(kernel) == before


async def test_sector_aligned_bounce(kernel: Kernel, task: Task) -> None:
    """512-aligned but not page-aligned: correct bytes, neighbours of the range preserved."""
    data = bytearray(pattern(4 * P, seed=7))
    fd = await dfile(kernel, task, bytes(data))
    a = await buf(task, 4 * P)
    new = pattern(3 * 512 + P, seed=11)
    await write_user(task, a + 1536, new)
    assert await dio.vfs_pwritev(task, fd, [(a + 1536, len(new))], 2560) == len(new)
    data[2560 : 2560 + len(new)] = new
    assert await kernel.vfs.read(task, fd, 4 * P, 0) == bytes(data)
    b = await buf(task, 4 * P)
    assert await dio.vfs_preadv(task, fd, [(b + 512, 2048), (b + 3 * P, 1024)], 1024) == 3072
    assert await read_user_bytes(task, b + 512, 2048) == bytes(data[1024:3072])
    assert await read_user_bytes(task, b + 3 * P, 1024) == bytes(data[3072:4096])
    assert pins(kernel)[0] == pins(kernel)[1]


async def test_read_at_eof_clamped(kernel: Kernel, task: Task) -> None:
    """A read past i_size returns the bytes up to EOF; at EOF it returns 0."""
    fd = await dfile(kernel, task, pattern(P + 1000))
    a = await buf(task, 4 * P)
    assert await dio.vfs_preadv(task, fd, [(a, 4 * P)], 0) == P + 1000
    assert await dio.vfs_preadv(task, fd, [(a, 4 * P)], 2 * P) == 0


async def test_cache_coherence(kernel: Kernel, task: Task) -> None:
    """Dirty cached data is written back before a direct read; a direct write invalidates
    the cache, so a buffered read after it sees the new data."""
    fd = await dfile(kernel, task, pattern(2 * P, seed=1))
    fresh = pattern(2 * P, seed=2)
    assert await kernel.vfs.write(task, fd, fresh, 0) == 2 * P  # dirty in the cache
    a = await buf(task, 2 * P)
    assert await dio.vfs_preadv(task, fd, [(a, 2 * P)], 0) == 2 * P
    assert await read_user_bytes(task, a, 2 * P) == fresh
    newer = pattern(2 * P, seed=9)
    await write_user(task, a, newer)
    assert await kernel.vfs.read(task, fd, 2 * P, 0) == fresh  # cached now
    assert await dio.vfs_pwritev(task, fd, [(a, 2 * P)], 0) == 2 * P
    assert await kernel.vfs.read(task, fd, 2 * P, 0) == newer


async def test_hole_reads_zero_and_f_pos(kernel: Kernel, task: Task) -> None:
    """A hole inside the file reads as zeroes; offset None uses and advances f_pos."""
    fd = await dfile(kernel, task, b"")
    a = await buf(task, 2 * P)
    await write_user(task, a, pattern(P))
    assert await dio.vfs_pwritev(task, fd, [(a, P)], 3 * P) == P
    await write_user(task, a, b"\xff" * (2 * P))
    assert await dio.vfs_preadv(task, fd, [(a, 2 * P)]) == 2 * P
    assert await read_user_bytes(task, a, 2 * P) == b"\0" * (2 * P)
    assert kernel.vfs.fget(task, fd).f_pos == 2 * P


async def test_eio_nothing_leaks(kernel: Kernel, task: Task) -> None:
    """A bad sector in the range: EIO for reads and writes, every pin released."""
    fd = await dfile(kernel, task, pattern(4 * P))
    ino = kernel.vfs.lookup("f")
    blk = int(ino.bmap_range(2, 1)[0])
    kernel.vfs.device("ram0").set_bad_ranges([(blk * 8 + 3, 1)])
    a = await buf(task, 4 * P)
    await write_user(task, a, b"\0" * (4 * P))
    await raises(errno.EIO, dio.vfs_preadv(task, fd, [(a, 4 * P)], 0))
    await raises(errno.EIO, dio.vfs_pwritev(task, fd, [(a, 4 * P)], 0))
    await raises(errno.EIO, dio.vfs_preadv(task, fd, [(a + 512, 2048)], 2 * P))
    assert await dio.vfs_preadv(task, fd, [(a, 2 * P)], 0) == 2 * P
    assert pins(kernel)[0] == pins(kernel)[1]
    kernel.vfs.device("ram0").set_bad_ranges([])
    assert audit(kernel) == []


async def test_efault_partial(kernel: Kernel, task: Task) -> None:
    """A buffer running into unmapped memory: the pinned prefix is transferred and counted;
    a wholly bad buffer is EFAULT."""
    fd = await dfile(kernel, task, pattern(4 * P))
    a = await buf(task, 4 * P)
    await sys_munmap(task, a + 2 * P, 2 * P)
    assert await dio.vfs_preadv(task, fd, [(a, 4 * P)], 0) == 2 * P
    await raises(errno.EFAULT, dio.vfs_preadv(task, fd, [(a + 2 * P, P)], 0))
    assert pins(kernel)[0] == pins(kernel)[1]


async def test_munmap_during_dio(make_fs_kernel: object) -> None:
    """Another task's munmap while a direct read is in flight: the pins keep the frames, munmap
    succeeds, the data lands in the old frames, audit clean after the unpin."""
    k = make_fs_kernel("ram0=ram:16M,latency=30ms")  # type: ignore[operator]
    t = k.spawn("t", "s")
    data = pattern(2 * P, seed=4)
    fd = await dfile(k, t, data)
    await k.vfs.fsync(t, fd)  # nothing for the direct read to write back first
    a = await buf(t, 2 * P)
    await write_user(t, a, b"\0" * (2 * P))
    old = [pfn_of(t, a), pfn_of(t, a + P)]
    watch = np.full(2, -1, dtype=np.int64)  # our own FOLL_GET refs, to look at the frames later
    assert await get_user_pages_fast(t.mm, a, 2, 0, watch, current=t) == 2
    io = asyncio.create_task(dio.vfs_preadv(t, fd, [(a, 2 * P)], 0))
    await asyncio.sleep(0.01)
    assert k.mem.refcount[old[0]] >= 1024
    await sys_munmap(t, a, 2 * P)
    assert lookup_pte(t, a) == 0
    assert k.mem.refcount[old[0]] >= 1024  # frames kept alive by the pins
    assert await io == 2 * P
    mv = k.mem.mv
    assert bytes(mv[old[0] << 12 : (old[0] << 12) + P]) == data[:P]
    assert bytes(mv[old[1] << 12 : (old[1] << 12) + P]) == data[P:]
    put_pages(k, watch, 2)
    assert pins(k)[0] == pins(k)[1]
    assert audit(k) == []


async def test_cancel_waits_for_device(make_fs_kernel: object) -> None:
    """The caller cancelled with bios in flight: the unpin waits for the device."""
    k = make_fs_kernel("ram0=ram:16M,latency=30ms")  # type: ignore[operator]
    t = k.spawn("t", "s")
    fd = await dfile(k, t, pattern(4 * P))
    await k.vfs.fsync(t, fd)
    a = await buf(t, 4 * P)
    dev = k.vfs.device("ram0")
    io = asyncio.create_task(dio.vfs_preadv(t, fd, [(a, 4 * P)], 0))
    await asyncio.sleep(0.01)
    assert dev.stats.inflight > 0
    io.cancel()
    with pytest.raises(asyncio.CancelledError):
        await io
    assert dev.stats.inflight == 0
    assert pins(k)[0] == pins(k)[1]
    assert audit(k) == []


async def test_not_direct_and_enospc(make_fs_kernel: object) -> None:
    """Without O_DIRECT the vector calls copy through the cache; a full device: ENOSPC."""
    k = make_fs_kernel("ram0=ram:1M")  # type: ignore[operator]
    t = k.spawn("t", "s")
    fd, _ = k.vfs.do_sys_open(t, "g", O_CREAT | O_RDWR, "disk")
    a = await buf(t, 2 * P)
    await write_user(t, a, pattern(2 * P))
    assert await dio.vfs_pwritev(t, fd, [(a, P), (a + P, P)], 0) == 2 * P
    b = await buf(t, 2 * P)
    assert await dio.vfs_preadv(t, fd, [(b, 2 * P)], 0) == 2 * P
    assert await read_user_bytes(t, b, 2 * P) == pattern(2 * P)
    fd2, _ = k.vfs.do_sys_open(t, "h", O_CREAT | O_RDWR | O_DIRECT, "disk")
    big = await buf(t, 2 << 20)
    n = await dio.vfs_pwritev(t, fd2, [(big, 2 << 20)], 4 << 20)
    assert 0 < n < 2 << 20  # the blocks there were: a short write
    await raises(errno.ENOSPC, dio.vfs_pwritev(t, fd2, [(big, P)], 0))
    assert pins(k)[0] == pins(k)[1]
