"""The batched io_submit path (dio_batch): merged pins and bios, per-iocb results in a batch;
each I/O pins with FOLL_WRITE for reads and unpins dirtying (kernel-semantics.md A.14, B.68)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import numpy as np
import pytest

from tests.unit.dio.test_dio_sync import buf, dfile, pfn_of, pins
from tests.unit.fs.fshelp import P, pattern
from vkernel.kernel import aio, dio
from vkernel.kernel.audit import audit
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import PG_dirty


async def _reap(ctx: aio.KioCtx, n: int) -> dict[int, int]:
    """user_data → res of ``n`` completions."""
    evs: list[aio.IoEvent] = []
    while len(evs) < n:
        got = await ctx.getevents(1, n, 2.0)
        assert got, "completions missing"
        evs += got
    return {e.user_data: e.res for e in evs}


def _count_grabs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record every (start, pages) the extraction pins with one GUP call."""
    calls: list[tuple[int, int]] = []
    real = dio._grab_pages
    lockless = dio._grab_pages_lockless  # a call's first half (its slow half is no new call)

    async def spy(task: Task, start: int, n: int, *a: Any) -> int:
        calls.append((start, n))
        return await real(task, start, n, *a)

    def spy_lockless(task: Task, start: int, n: int, *a: Any) -> tuple[int, int, int]:
        calls.append((start, n))
        return lockless(task, start, n, *a)

    monkeypatch.setattr(dio, "_grab_pages", spy)
    monkeypatch.setattr(dio, "_grab_pages_lockless", spy_lockless)
    return calls


async def test_one_pin_call_and_merged_bio_for_adjacent_reads(
    kernel: Kernel, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 one-page reads into adjacent buffer pages: one pin_user_pages_fast for all 16 pages,
    bios merged across iocbs (one per run of contiguous blocks), every page pinned and unpinned
    once and dirtied, the data in place."""
    data = pattern(16 * P, seed=3)
    fd = await dfile(kernel, task, data)
    a = await buf(task, 16 * P)
    await write_user(task, a, b"\0" * (16 * P))
    for i in range(16):
        kernel.mem.flags[pfn_of(task, a + i * P)] &= ~np.uint32(PG_dirty)
    blocks = kernel.vfs.lookup("f").bmap_range(0, 16)
    runs = 1 + int(np.count_nonzero(np.diff(blocks) != 1))
    dev = kernel.vfs.device("ram0")
    reads0 = dev.stats.reads
    calls = _count_grabs(monkeypatch)
    acq, rel = pins(kernel)
    fast = kernel.vmstat["fast_gup"]
    ctx = aio.KioCtx(task, 16)
    # submitted out of order: the extraction sorts by address, the plug by block
    order = [5, 0, 15, 3, 1, 2, 4, 14, 6, 7, 8, 9, 10, 11, 12, 13]
    ctx.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, i) for i in order])
    assert await _reap(ctx, 16) == dict.fromkeys(range(16), P)
    assert calls == [(a, 16)]
    assert dev.stats.reads - reads0 == runs
    assert pins(kernel) == (acq + 16, rel + 16)
    assert kernel.vmstat["fast_gup"] - fast == 16
    assert await read_user_bytes(task, a, 16 * P) == data
    assert all(kernel.mem.flags[pfn_of(task, a + i * P)] & PG_dirty for i in range(16))
    await ctx.destroy()
    assert audit(kernel) == []


async def test_mixed_batch_results(kernel: Kernel, task: Task) -> None:
    """One submission mixing good reads and writes, a misaligned iocb, a buffer that runs into
    a hole (its prefix), a buffer in the hole (EFAULT), a read just after the hole (succeeds:
    its pages get their own pin call), a sector-aligned read (bounce), a read at EOF, fsync."""
    data = pattern(8 * P, seed=4)
    fd = await dfile(kernel, task, data)
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    w = await buf(task, P)  # before the hole is made (it would be mapped there)
    wdata = pattern(P, seed=9)
    await write_user(task, w, wdata)
    await sys_munmap(task, a + 2 * P, P)  # a hole at page 2 of the buffer
    ctx = aio.KioCtx(task, 16)
    acq, rel = pins(kernel)
    cbs = [
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a, P)], 0, 1),  # good
        aio.Iocb(aio.IOCB_CMD_PREADV, fd, [(a + P, P), (a + 2 * P, P)], P, 2),  # prefix
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 2 * P, P)], 0, 3),  # EFAULT
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 3 * P, P)], 3 * P, 4),  # after the hole
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 4 * P + 512, 1024)], 5 * P + 1024, 5),  # bounce
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 5 * P, P)], 8 * P, 6),  # at EOF
        aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 6 * P + 1, P)], 0, 7),  # EINVAL
        aio.Iocb(aio.IOCB_CMD_PWRITE, fd, [(w, P)], 7 * P, 8),
        aio.Iocb(aio.IOCB_CMD_FSYNC, fd, [], 0, 9),
    ]
    assert ctx.submit(cbs) == len(cbs)
    res = await _reap(ctx, len(cbs))
    assert res == {
        1: P,
        2: P,
        3: -errno.EFAULT,
        4: P,
        5: 1024,
        6: 0,
        7: -errno.EINVAL,
        8: P,
        9: 0,
    }
    assert await read_user_bytes(task, a, 2 * P) == data[: 2 * P]
    assert await read_user_bytes(task, a + 3 * P, P) == data[3 * P : 4 * P]
    bounced = await read_user_bytes(task, a + 4 * P + 512, 1024)
    assert bounced == data[5 * P + 1024 : 5 * P + 2048]
    assert await kernel.vfs.read(task, fd, P, 7 * P) == wdata
    after = pins(kernel)
    assert after[0] - acq == after[1] - rel > 0
    await ctx.destroy()
    assert audit(kernel) == []


async def test_eio_fails_only_the_iocbs_on_the_bad_sector(kernel: Kernel, task: Task) -> None:
    """A bad sector under one iocb of a merged plug: that iocb is EIO, its neighbours in the
    same merged bio succeed (the failed request is retried bio by bio), nothing leaks."""
    data = pattern(8 * P, seed=6)
    fd = await dfile(kernel, task, data)
    await kernel.vfs.fsync(task, fd)  # nothing dirty left to write back through the bad sector
    ino = kernel.vfs.lookup("f")
    blk = int(ino.bmap_range(3, 1)[0])
    dev = kernel.vfs.device("ram0")
    dev.set_bad_ranges([(blk * 8 + 5, 1)])
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    ctx = aio.KioCtx(task, 8)
    ctx.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, i) for i in range(8)])
    res = await _reap(ctx, 8)
    assert res == {i: (-errno.EIO if i == 3 else P) for i in range(8)}
    got = await read_user_bytes(task, a, 8 * P)
    assert got[: 3 * P] == data[: 3 * P]
    assert got[4 * P :] == data[4 * P :]
    ctx.submit([aio.Iocb(aio.IOCB_CMD_PWRITE, fd, [(a + i * P, P)], i * P, i) for i in range(8)])
    res = await _reap(ctx, 8)
    assert res == {i: (-errno.EIO if i == 3 else P) for i in range(8)}
    assert pins(kernel)[0] == pins(kernel)[1]
    dev.set_bad_ranges([])
    await ctx.destroy()
    assert audit(kernel) == []


@pytest.mark.parametrize("foll", ["pin", "get"])
@pytest.mark.parametrize("gup", ["fast", "slow"])
async def test_latency_device_batch(make_fs_kernel: Any, gup: str, foll: str) -> None:
    """On a device with latency and a small queue the bios run as tasks, a failed merged bio
    is resubmitted per iocb, and every switch counts as it should."""
    k = make_fs_kernel("ram0=ram:16M,latency=2ms,qd=2")
    t = k.spawn("t", "s")
    data = pattern(12 * P, seed=8)
    fd = await dfile(k, t, data)
    await k.vfs.fsync(t, fd)
    blk = int(k.vfs.lookup("f").bmap_range(5, 1)[0])
    k.vfs.device("ram0").set_bad_ranges([(blk * 8, 8)])
    a = await buf(t, 12 * P)
    await write_user(t, a, b"\0" * (12 * P))
    acq = k.vmstat["nr_foll_pin_acquired"]
    slow = k.vmstat["fast_gup_slow"]
    lk = t.mm.mmap_lock
    reads0 = lk.stats()["read_acquired"]
    ctx = aio.KioCtx(t, 12, gup=gup, foll=foll)
    ctx.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, i) for i in range(12)])
    res = await _reap(ctx, 12)
    took_lock = lk.stats()["read_acquired"] - reads0
    assert res == {i: (-errno.EIO if i == 5 else P) for i in range(12)}
    got = await read_user_bytes(t, a, 12 * P)
    assert got[: 5 * P] == data[: 5 * P]
    assert got[6 * P :] == data[6 * P :]
    pinned = k.vmstat["nr_foll_pin_acquired"] - acq
    assert pinned == (12 if foll == "pin" else 0)
    assert k.vmstat["nr_foll_pin_acquired"] == k.vmstat["nr_foll_pin_released"]
    assert k.vmstat["fast_gup_slow"] == slow
    assert (took_lock > 0) == (gup == "slow")
    k.vfs.device("ram0").set_bad_ranges([])
    await ctx.destroy()


async def test_cancelled_submission_waits_for_its_bios(make_fs_kernel: Any) -> None:
    """The submission's task is cancelled with bios in flight: it keeps waiting for the device,
    the iocbs complete with their real results, the pins go only after the bios."""
    k = make_fs_kernel("ram0=ram:16M,latency=20ms,qd=2")
    t = k.spawn("t", "s")
    data = pattern(6 * P, seed=2)
    fd = await dfile(k, t, data)
    await k.vfs.fsync(t, fd)
    a = await buf(t, 6 * P)
    ctx = aio.KioCtx(t, 8)
    # pages 0, 2, 4: bios that cannot merge, more of them than the queue depth
    ctx.submit([aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, i) for i in (0, 2, 4)])
    await asyncio.sleep(0.005)
    dev = k.vfs.device("ram0")
    assert dev.stats.inflight > 0
    (batch,) = ctx.inflight
    batch.cancel()
    acq, rel = pins(k)
    assert acq > rel
    await asyncio.gather(batch, return_exceptions=True)
    assert dev.stats.inflight == 0
    assert await _reap(ctx, 3) == {0: P, 2: P, 4: P}
    assert pins(k)[0] == pins(k)[1]
    assert await read_user_bytes(t, a, P) == data[:P]
    await ctx.destroy()
    assert audit(k) == []
