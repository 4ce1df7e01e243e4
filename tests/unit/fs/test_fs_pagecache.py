"""The page cache over a block device: latency on a miss only, one I/O for concurrent readers,
EIO with partial counts, writeback, truncate and punch hole, killable page-lock waits."""

from __future__ import annotations

import asyncio
import errno
import time

from tests.unit.fs.conftest import MakeFsKernel
from tests.unit.fs.fshelp import P, make_file, pattern, raises
from vkernel.kernel import pagecache
from vkernel.kernel.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, O_CREAT, O_RDWR
from vkernel.kernel.uapi import PG_buddy, PG_dirty, PG_locked, PG_uptodate, PG_writeback

LAT = 0.05
"""Device latency of these tests: 50 ms per request."""


async def test_miss_waits_for_the_device_and_a_hit_does_not(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 1000:g}ms")
    t = k.spawn("t", "s")
    data = pattern(4 * P)
    fd = await make_file(k, t, "f", data)
    await k.vfs.fsync(t, fd)
    assert k.vfs.drop_caches() == 4
    dev = k.vfs.devices["d"]
    t0 = time.monotonic()
    assert await k.vfs.read(t, fd, 4 * P, 0) == data
    assert time.monotonic() - t0 >= LAT
    assert dev.stats.reads == 1
    assert k.vmstat["pgpgin"] == 16  # KiB
    t0 = time.monotonic()
    assert await k.vfs.read(t, fd, 4 * P, 0) == data
    assert time.monotonic() - t0 < LAT
    assert dev.stats.reads == 1


async def test_concurrent_readers_of_one_page_share_one_io(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 1000:g}ms", readahead=False)
    tasks = [k.spawn(f"t{i}", "s") for i in range(5)]
    fd = await make_file(k, tasks[0], "f", pattern(P))
    await k.vfs.fsync(tasks[0], fd)
    k.vfs.drop_caches()
    fds = [k.vfs.do_sys_open(t, "f", O_RDWR)[0] for t in tasks]
    got = await asyncio.gather(*(k.vfs.read(t, f, P, 0) for t, f in zip(tasks, fds, strict=True)))
    assert all(g == pattern(P) for g in got)
    assert k.vfs.devices["d"].stats.reads == 1


async def test_readahead_reads_a_window_in_one_bio(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(64 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    assert await k.vfs.read(t, fd, 10, 0) == pattern(10)
    assert k.vfs.stat("f").cached_pages == pagecache.DEFAULT_RA_PAGES
    assert k.vfs.devices["d"].stats.reads == 1


async def test_eio_range_fails_the_read_with_a_partial_count_first(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    data = pattern(4 * P)
    fd = await make_file(k, t, "f", data)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    ino = k.vfs.names["f"]
    bad_block = int(ino.bmap_range(2, 1)[0])
    dev = k.vfs.devices["d"]
    dev.set_bad_ranges([(bad_block * 8 + 3, 1)])  # one sector inside page 2
    assert await k.vfs.read(t, fd, 4 * P, 0) == data[: 2 * P]  # short count, like read(2)
    await raises(errno.EIO, k.vfs.read(t, fd, P, 2 * P))  # then the error itself
    assert await k.vfs.read(t, fd, P, 3 * P) == data[3 * P :]  # other pages are fine
    assert dev.stats.errors >= 2
    dev.set_bad_ranges([])
    assert await k.vfs.read(t, fd, 4 * P, 0) == data  # a retry reads the page again


async def test_fsync_writes_dirty_pages_back(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M,latency=1ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(8 * P))
    dev = k.vfs.devices["d"]
    ino = k.vfs.names["f"]
    assert ino.mapping is not None
    pfns = list(ino.mapping.pages.values())
    assert all(k.mem.flags[p] & PG_dirty for p in pfns)
    assert dev.stats.writes == 0
    assert (k.vmstat["nr_file_pages"], k.vmstat["nr_dirty"]) == (8, 8)
    await k.vfs.fsync(t, fd)
    assert (k.vmstat["nr_dirty"], k.vmstat["nr_writeback"]) == (0, 0)
    assert dev.stats.write_bytes >= 8 * P
    assert k.vfs.stat("f").dirty_pages == 0
    assert all(
        k.mem.flags[p] & (PG_dirty | PG_writeback | PG_locked) == 0 and k.mem.flags[p] & PG_uptodate
        for p in pfns
    )
    assert k.vmstat["pgpgout"] == 32
    assert k.vfs.supers["d"].commits == 1


async def test_writeback_sets_pg_writeback_during_the_io(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 1000:g}ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(P))
    ino = k.vfs.names["f"]
    assert ino.mapping is not None
    pfn = ino.mapping.pages[0]
    sync = asyncio.ensure_future(k.vfs.fsync(t, fd))
    await asyncio.sleep(LAT / 2)
    assert k.mem.flags[pfn] & PG_writeback
    assert k.vmstat["nr_writeback"] == 1
    assert not k.mem.flags[pfn] & PG_dirty
    await sync
    assert not k.mem.flags[pfn] & PG_writeback


async def test_flusher_writes_back_expired_dirty_pages(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    await make_file(k, t, "f", pattern(2 * P))
    await k.vfs.writeback_expired()
    assert k.vfs.stat("f").dirty_pages == 2  # not yet expired
    await k.vfs.writeback_expired(time.monotonic() + k.vfs.dirty_expire + 1)
    assert k.vfs.stat("f").dirty_pages == 0
    assert k.vfs.devices["d"].stats.writes == 1


async def test_failed_writeback_is_reported_by_fsync(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(P))
    blk = int(k.vfs.names["f"].bmap_range(0, 1)[0])
    k.vfs.devices["d"].set_bad_ranges([(blk * 8, 8)])
    await raises(errno.EIO, k.vfs.fsync(t, fd))
    await k.vfs.fsync(t, fd)  # reported once (errseq)


async def test_truncate_drops_pages_and_zeroes_the_tail(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    data = pattern(4 * P)
    fd = await make_file(k, t, "f", data)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    await k.vfs.ftruncate(t, fd, P + 100)
    st = k.vfs.stat("f")
    assert (st.size, st.blocks, st.cached_pages) == (P + 100, 16, 1)  # page 1 read for its tail
    assert await k.vfs.read(t, fd, 4 * P, 0) == data[: P + 100]
    await k.vfs.ftruncate(t, fd, 3 * P)
    assert await k.vfs.read(t, fd, 4 * P, 0) == data[: P + 100] + bytes(2 * P - 100)


async def test_punch_hole_zeroes_and_frees(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    data = pattern(6 * P)
    fd = await make_file(k, t, "f", data)
    ino = k.vfs.names["f"]
    assert ino.mapping is not None
    freed = [ino.mapping.pages[i] for i in (2, 3)]
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    await k.vfs.fallocate(t, fd, mode, P + 10, 3 * P)  # [P+10, 4P+10)
    st = k.vfs.stat("f")
    assert st.size == 6 * P
    assert st.blocks == 4 * 8  # pages 2 and 3 deallocated
    assert all(k.mem.flags[p] & PG_buddy for p in freed)
    want = data[: P + 10] + bytes(3 * P) + data[4 * P + 10 :]
    assert await k.vfs.read(t, fd, 6 * P, 0) == want
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    assert await k.vfs.read(t, fd, 6 * P, 0) == want


async def test_punched_page_with_extra_ref_lives_until_released(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(2 * P))
    ino = k.vfs.names["f"]
    assert ino.mapping is not None
    pfn = ino.mapping.pages[1]
    k.mem.refcount[pfn] += 1  # someone (a GUP pin, a mapping) holds it
    k.extra_refs[pfn] += 1
    await k.vfs.fallocate(t, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, P, P)
    assert 1 not in ino.mapping.pages
    assert not k.mem.flags[pfn] & PG_buddy
    assert k.mem.refcount[pfn] == 1
    assert k.mem.mapping[pfn] == 0  # detached from the file
    k.extra_refs[pfn] -= 1
    k.mem.put_folio(pfn)
    assert k.mem.flags[pfn] & PG_buddy


async def test_kill_while_waiting_on_the_page_lock_is_eintr_without_leaks(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 4 * 1000:g}ms")
    t = k.spawn("t", "s")
    victim = k.spawn("v", "s")
    fd = await make_file(k, t, "f", pattern(4 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    vfd, _ = k.vfs.do_sys_open(victim, "f", O_RDWR)
    reader = asyncio.ensure_future(k.vfs.read(victim, vfd, 4 * P, 0))
    other = asyncio.ensure_future(k.vfs.read(t, fd, 4 * P, 0))
    await asyncio.sleep(LAT)
    ino = k.vfs.names["f"]
    assert ino.mapping is not None
    assert k.mem.flags[ino.mapping.pages[0]] & PG_locked
    t0 = time.monotonic()
    k.kill(victim, 9)
    await raises(errno.EINTR, reader)
    assert time.monotonic() - t0 < LAT  # woken at once, not when the I/O completes
    assert await other == pattern(4 * P)  # the I/O itself completed for everyone else
    assert not victim._kill_hooks
    assert not pagecache.page_waitqueue(k.mem).waiters
    k.reap(victim)


async def test_kill_before_waiting_is_eintr(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 1000:g}ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    pfn = int(pagecache.filemap_add_folios(k.vfs.names["f"].mapping, [5], locked=True)[0])  # type: ignore[arg-type]
    t.send_fatal_signal(9)
    await raises(errno.EINTR, pagecache.folio_lock_killable(k.mem, pfn, t))
    pagecache.folio_unlock(k.mem, pfn)


async def test_page_lock_wakes_waiters_in_turn(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    pfn = k.mem.alloc_page()
    order: list[int] = []
    await pagecache.lock_page(k.mem, pfn)

    async def waiter(i: int) -> None:
        await pagecache.folio_lock_killable(k.mem, pfn, t)
        order.append(i)
        await asyncio.sleep(0)
        pagecache.unlock_page(k.mem, pfn)

    ws = [asyncio.ensure_future(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert order == []
    pagecache.unlock_page(k.mem, pfn)
    await asyncio.gather(*ws)
    assert sorted(order) == [0, 1, 2]
    assert not k.mem.flags[pfn] & PG_locked
    k.mem.put_folio(pfn)


async def test_partial_page_write_reads_the_old_page_first(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    data = pattern(2 * P)
    fd = await make_file(k, t, "f", data)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    await k.vfs.write(t, fd, b"XY", P + 5)
    assert k.vfs.devices["d"].stats.reads == 1
    assert await k.vfs.read(t, fd, 2 * P, 0) == data[: P + 5] + b"XY" + data[P + 7 :]


async def test_sparse_write_reads_zeros_in_the_hole(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    fd, _ = k.vfs.do_sys_open(t, "f", O_CREAT | O_RDWR)
    await k.vfs.write(t, fd, b"end", 5 * P)
    await k.vfs.write(t, fd, b"mid", 2 * P + 7)
    assert k.vfs.stat("f").blocks == 2 * 8
    want = bytearray(5 * P + 3)
    want[2 * P + 7 : 2 * P + 10] = b"mid"
    want[5 * P :] = b"end"
    assert await k.vfs.read(t, fd, 6 * P, 0) == bytes(want)
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    assert await k.vfs.read(t, fd, 6 * P, 0) == bytes(want)


async def test_queue_depth_bounds_requests_in_flight(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel(f"d=ram:4M,latency={LAT * 1000:g}ms,qd=2", readahead=False)
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(8 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    dev = k.vfs.devices["d"]
    reads = [asyncio.ensure_future(k.vfs.read(t, fd, 1, i * 2 * P)) for i in range(4)]
    await asyncio.sleep(LAT / 2)
    assert (dev.stats.inflight, dev.stats.queued) == (2, 2)
    t0 = time.monotonic()
    await asyncio.gather(*reads)
    assert time.monotonic() - t0 >= LAT  # the queued pair waited for a slot


async def test_sequential_reader_gets_the_next_window_in_flight(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel("d=ram:4M")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "f", pattern(256 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    await k.vfs.read(t, fd, 64 * P, 0)
    assert k.vfs.stat("f").cached_pages == 64  # the first (synchronous) window only
    await k.vfs.read(t, fd, 64 * P, 64 * P)  # sequential: async readahead of the next window
    assert k.vfs.stat("f").cached_pages == 192
    await k.vfs.read(t, fd, 10, 200 * P)  # a random miss: its synchronous window, no more
    assert k.vfs.stat("f").cached_pages == 192 + pagecache.DEFAULT_RA_PAGES


async def test_partial_write_into_a_reused_block_reads_zeros_around_it(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel("tiny=ram:256K")
    t = k.spawn("t", "s")
    free = k.vfs.supers["tiny"].free_blocks
    fd = await make_file(k, t, "old", b"\xee" * free * P)  # every data block holds 0xee
    await k.vfs.fsync(t, fd)
    k.vfs.close(t, fd)
    k.vfs.do_unlink(t, "old")
    fd = await make_file(k, t, "new", b"")
    await k.vfs.fsync(t, fd)  # the freed blocks are reusable now
    await k.vfs.ftruncate(t, fd, 2 * P)
    await k.vfs.write(t, fd, b"ab", P + 10)  # partial page inside i_size, over a hole
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    want = bytearray(2 * P)
    want[P + 10 : P + 12] = b"ab"
    assert await k.vfs.read(t, fd, 2 * P, 0) == bytes(want)
    await k.vfs.fallocate(t, fd, 0, 2 * P, 8 * P)  # preallocated blocks read as zeros too
    k.vfs.drop_caches()
    assert await k.vfs.read(t, fd, 10 * P, 0) == bytes(want) + bytes(8 * P)
