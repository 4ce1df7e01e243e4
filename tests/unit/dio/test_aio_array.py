"""The struct-of-arrays io_submit path (KioCtx.io_submit_sqes / getevents_array): the same
Linux answers as one iocb at a time -- alignment EINVAL, pins taken and released with
dirtying, EIO per entry (kernel-semantics.md A.14, B.68)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import numpy as np
import pytest

from tests.unit.dio.test_aio_batch import _count_grabs
from tests.unit.dio.test_dio_sync import buf, dfile, pfn_of, pins
from tests.unit.fs.fshelp import P, pattern
from vkernel.kernel import aio, dio_batch, pagecache
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.fs import O_DIRECT, O_RDONLY
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import PG_dirty

RD, WR = aio.IOCB_CMD_PREAD, aio.IOCB_CMD_PWRITE


async def _direct_file(k: Kernel, t: Task, data: bytes, name: str = "f") -> int:
    """A disk file with ``data`` written back and its page cache dropped (an O_DIRECT-only
    file, the array path's common case); an O_DIRECT|O_RDWR fd."""
    fd = await dfile(k, t, data, name)
    await k.vfs.fsync(t, fd)
    m = k.vfs.lookup(name).mapping
    assert m is not None
    pagecache.drop_clean_pages(m)
    assert not m.pages
    return fd


def _sqes(rows: list[tuple[int, int, int, int, int, int]]) -> list[np.ndarray]:
    """(opcode, fd, addr, length, offset, user_data) rows → the six SQ arrays."""
    cols = list(zip(*rows, strict=True))
    out = [np.asarray(c, dtype=np.int64) for c in cols[:5]]
    return [*out, np.asarray(cols[5], dtype=np.uint64)]


async def _reap_arrays(ctx: aio.KioCtx, n: int) -> dict[int, int]:
    """user_data → res of ``n`` completions, reaped as arrays."""
    out: dict[int, int] = {}
    while len(out) < n:
        ev = await ctx.getevents_array(1, n, 2.0)
        assert len(ev.res), "completions missing"
        assert len(ev.user_data) == len(ev.res) == len(ev.complete_ns) == len(ev.issue_ns)
        assert (ev.complete_ns >= ev.issue_ns).all()
        assert (ev.issue_ns >= ev.submit_ns).all()
        out.update(zip(ev.user_data.tolist(), ev.res.tolist(), strict=True))
    return out


async def test_array_reads_one_pin_call_dirty_and_balanced(
    kernel: Kernel, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 one-page reads given as arrays, out of order: one pin_user_pages_fast for the 16
    adjacent buffer pages, every page pinned, unpinned and dirtied once, the data in place,
    the completions as arrays; the caller's arrays are not modified."""
    data = pattern(16 * P, seed=11)
    fd = await _direct_file(kernel, task, data)
    a = await buf(task, 16 * P)
    await write_user(task, a, b"\0" * (16 * P))
    for i in range(16):
        kernel.mem.flags[pfn_of(task, a + i * P)] &= ~np.uint32(PG_dirty)
    calls = _count_grabs(monkeypatch)
    acq, rel = pins(kernel)
    fast = kernel.vmstat["fast_gup"]
    order = [5, 0, 15, 3, 1, 2, 4, 14, 6, 7, 8, 9, 10, 11, 12, 13]
    sq = _sqes([(RD, fd, a + i * P, P, i * P, 100 + i) for i in order])
    before = [c.copy() for c in sq]
    ctx = aio.KioCtx(task, 16)
    assert ctx.io_submit_sqes(*sq) == 16
    assert await _reap_arrays(ctx, 16) == {100 + i: P for i in range(16)}
    assert all((b == c).all() for b, c in zip(before, sq, strict=True))
    assert calls == [(a, 16)]
    assert pins(kernel) == (acq + 16, rel + 16)
    assert kernel.vmstat["fast_gup"] - fast == 16
    assert await read_user_bytes(task, a, 16 * P) == data
    assert all(kernel.mem.flags[pfn_of(task, a + i * P)] & PG_dirty for i in range(16))
    await ctx.destroy()
    assert audit(kernel) == []


async def test_array_mixed_valid_and_invalid_entries(kernel: Kernel, task: Task) -> None:
    """One array submission with every kind of entry: each gets its own result (EBADF for a
    closed fd and for a write on a read-only fd, EINVAL for misalignment, a negative offset, an
    unknown opcode, 0 at EOF and for an empty read, a prefix and EFAULT around a hole, the
    bounce path, fsync, a buffered fd, multi-page reads and an overwrite); pins balance."""
    data = pattern(8 * P, seed=12)
    fd = await _direct_file(kernel, task, data)
    ro, _ = kernel.vfs.do_sys_open(task, "f", O_RDONLY | O_DIRECT, "disk")
    plain, _ = kernel.vfs.do_sys_open(task, "f", O_RDONLY, "disk")
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    w = await buf(task, P)
    wdata = pattern(P, seed=13)
    await write_user(task, w, wdata)
    b = await buf(task, P)
    await write_user(task, b, b"\0" * P)
    await sys_munmap(task, a + 2 * P, P)  # a hole at page 2 of the buffer
    acq, rel = pins(kernel)
    rows = [
        (RD, fd, a, P, 0, 1),  # good
        (RD, fd, a + P, 2 * P, P, 2),  # runs into the hole: its one-page prefix
        (RD, fd, a + 2 * P, P, 0, 3),  # in the hole: EFAULT
        (RD, fd, a + 3 * P, P, 3 * P, 4),  # after the hole
        (RD, fd, a + 4 * P + 512, 1024, 5 * P + 1024, 5),  # sector-aligned: bounce
        (RD, fd, a + 5 * P, P, 8 * P, 6),  # at EOF
        (RD, fd, a + 6 * P + 1, P, 0, 7),  # misaligned: EINVAL
        (WR, fd, w, P, 7 * P, 8),  # an overwrite
        (aio.IOCB_CMD_FSYNC, fd, 0, 0, 0, 9),
        (RD, 999, a, P, 0, 10),  # no such fd: EBADF
        (WR, ro, w, P, 0, 11),  # write on a read-only fd: EBADF
        (RD, fd, a, P, -P, 12),  # negative offset: EINVAL
        (42, fd, a, P, 0, 13),  # unknown opcode: EINVAL
        (RD, fd, a, 0, 0, 14),  # empty: 0
        (RD, plain, b, P, 2 * P, 15),  # buffered fd: the page-cache path
        (RD, fd, a + 6 * P, 2 * P, 4 * P, 16),  # two pages
    ]
    ctx = aio.KioCtx(task, 32)
    assert ctx.io_submit_sqes(*_sqes(rows)) == len(rows)
    res = await _reap_arrays(ctx, len(rows))
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
        10: -errno.EBADF,
        11: -errno.EBADF,
        12: -errno.EINVAL,
        13: -errno.EINVAL,
        14: 0,
        15: P,
        16: 2 * P,
    }
    assert await read_user_bytes(task, a, 2 * P) == data[: 2 * P]
    assert await read_user_bytes(task, a + 3 * P, P) == data[3 * P : 4 * P]
    assert await read_user_bytes(task, a + 4 * P + 512, 1024) == data[5 * P + 1024 : 5 * P + 2048]
    assert await read_user_bytes(task, a + 6 * P, 2 * P) == data[4 * P : 6 * P]
    assert await read_user_bytes(task, b, P) == data[2 * P : 3 * P]
    assert await kernel.vfs.read(task, fd, P, 7 * P) == wdata
    after = pins(kernel)
    assert after[0] - acq == after[1] - rel > 0
    await ctx.destroy()
    assert audit(kernel) == []


async def test_array_eio_only_on_the_bad_sector(kernel: Kernel, task: Task) -> None:
    """A bad sector under one entry of a merged inline bio: only that entry is EIO (the
    merged request is redone per iocb), for reads and overwrites; the pins balance and the
    failed read's page is released clean."""
    data = pattern(8 * P, seed=14)
    fd = await _direct_file(kernel, task, data)
    blk = int(kernel.vfs.lookup("f").bmap_range(3, 1)[0])
    dev = kernel.vfs.device("ram0")
    dev.set_bad_ranges([(blk * 8 + 5, 1)])
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    kernel.mem.flags[pfn_of(task, a + 3 * P)] &= ~np.uint32(PG_dirty)
    ctx = aio.KioCtx(task, 8)
    ctx.io_submit_sqes(*_sqes([(RD, fd, a + i * P, P, i * P, i) for i in range(8)]))
    assert await _reap_arrays(ctx, 8) == {i: (-errno.EIO if i == 3 else P) for i in range(8)}
    got = await read_user_bytes(task, a, 8 * P)
    assert got[: 3 * P] == data[: 3 * P]
    assert got[4 * P :] == data[4 * P :]
    assert not kernel.mem.flags[pfn_of(task, a + 3 * P)] & PG_dirty
    ctx.io_submit_sqes(*_sqes([(WR, fd, a + i * P, P, i * P, i) for i in range(8)]))
    assert await _reap_arrays(ctx, 8) == {i: (-errno.EIO if i == 3 else P) for i in range(8)}
    assert pins(kernel)[0] == pins(kernel)[1]
    dev.set_bad_ranges([])
    await ctx.destroy()
    assert audit(kernel) == []


async def test_array_ring_limits_and_both_reapers(kernel: Kernel, task: Task) -> None:
    """The ring takes what fits (EAGAIN when nothing does), arrays of unequal length are
    EINVAL, and completions of either submit path are reaped by either getevents."""
    data = pattern(8 * P, seed=15)
    fd = await _direct_file(kernel, task, data)
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    ctx = aio.KioCtx(task, 4)
    sq = _sqes([(RD, fd, a + i * P, P, i * P, i) for i in range(6)])
    assert ctx.io_submit_sqes(*sq) == 4
    with pytest.raises(KernelError) as e:
        ctx.io_submit_sqes(*sq)
    assert e.value.errno == errno.EAGAIN
    evs = await ctx.getevents(4, 4, 2.0)  # array completions as IoEvents
    assert sorted((e.user_data, e.res) for e in evs) == [(i, P) for i in range(4)]
    with pytest.raises(KernelError) as e:
        ctx.io_submit_sqes(sq[0], sq[1][:2], sq[2], sq[3], sq[4], sq[5])
    assert e.value.errno == errno.EINVAL
    ctx.submit([aio.Iocb(RD, fd, [(a, P)], 0, 77)])
    ctx.io_submit_sqes(*[c[4:6] for c in sq])
    assert await _reap_arrays(ctx, 3) == {77: P, 4: P, 5: P}
    assert pins(kernel)[0] == pins(kernel)[1]
    await ctx.destroy()
    assert audit(kernel) == []


@pytest.mark.parametrize("foll", ["pin", "get"])
@pytest.mark.parametrize("gup", ["fast", "slow"])
async def test_array_latency_device(make_fs_kernel: Any, gup: str, foll: str) -> None:
    """On a queued device the array submission goes through bio tasks (the per-iocb batch):
    the bad-sector entry alone fails, and every switch counts as it should."""
    k = make_fs_kernel("ram0=ram:16M,latency=2ms,qd=2")
    t = k.spawn("t", "s")
    data = pattern(12 * P, seed=16)
    fd = await _direct_file(k, t, data)
    blk = int(k.vfs.lookup("f").bmap_range(5, 1)[0])
    k.vfs.device("ram0").set_bad_ranges([(blk * 8, 8)])
    a = await buf(t, 12 * P)
    await write_user(t, a, b"\0" * (12 * P))
    acq = k.vmstat["nr_foll_pin_acquired"]
    ctx = aio.KioCtx(t, 12, gup=gup, foll=foll)
    ctx.io_submit_sqes(*_sqes([(RD, fd, a + i * P, P, i * P, i) for i in range(12)]))
    assert await _reap_arrays(ctx, 12) == {i: (-errno.EIO if i == 5 else P) for i in range(12)}
    got = await read_user_bytes(t, a, 12 * P)
    assert got[: 5 * P] == data[: 5 * P]
    assert got[6 * P :] == data[6 * P :]
    assert k.vmstat["nr_foll_pin_acquired"] - acq == (12 if foll == "pin" else 0)
    assert k.vmstat["nr_foll_pin_acquired"] == k.vmstat["nr_foll_pin_released"]
    k.vfs.device("ram0").set_bad_ranges([])
    await ctx.destroy()
    assert audit(k) == []


async def test_array_bios_on_a_queued_device_wait_through_a_cancel(make_fs_kernel: Any) -> None:
    """iomap_dio_submit_array() when the device queues (bio tasks, merged bios, a failed
    merged bio redone per iocb): cancelled with bios in flight it keeps the pins until the
    device is done and returns the real results, flagged cancelled."""
    k = make_fs_kernel("ram0=ram:16M,latency=20ms,qd=2")
    t = k.spawn("t", "s")
    data = pattern(6 * P, seed=17)
    await _direct_file(k, t, data)
    ino = k.vfs.lookup("f")
    blk = int(ino.bmap_range(4, 1)[0])
    dev = k.vfs.device("ram0")
    dev.set_bad_ranges([(blk * 8, 1)])
    a = await buf(t, 6 * P)
    await write_user(t, a, b"\0" * (6 * P))
    addr = np.asarray([a + i * P for i in range(6)], dtype=np.int64)
    ln = np.full(6, P, dtype=np.int64)
    pos = np.asarray([i * P for i in range(6)], dtype=np.int64)
    job = asyncio.ensure_future(
        dio_batch.iomap_dio_submit_array(t, ino, False, addr, ln, pos, "fast", "pin")
    )
    await asyncio.sleep(0.005)
    assert dev.stats.inflight > 0
    job.cancel()
    acq, rel = pins(k)
    assert acq > rel  # still pinned under the bios
    res, cancelled = await job
    assert cancelled
    assert dev.stats.inflight == 0
    assert res.tolist() == [P, P, P, P, -errno.EIO, P]
    assert pins(k)[0] == pins(k)[1]
    got = await read_user_bytes(t, a, 6 * P)
    assert got[: 4 * P] == data[: 4 * P]
    assert got[5 * P :] == data[5 * P :]
    dev.set_bad_ranges([])
    assert audit(k) == []


async def test_array_process_exit_with_ring_destroyed(kernel: Kernel, task: Task) -> None:
    """A process exits after array submissions: destroy waits, nothing is left pinned."""
    data = pattern(8 * P, seed=18)
    fd = await _direct_file(kernel, task, data)
    a = await buf(task, 8 * P)
    await write_user(task, a, b"\0" * (8 * P))
    ctx = aio.KioCtx(task, 8, gup="slow")  # slow GUP: the submission runs in its own task
    ctx.io_submit_sqes(*_sqes([(RD, fd, a + i * P, P, i * P, i) for i in range(8)]))
    assert ctx.inflight
    await ctx.destroy()
    assert pins(kernel)[0] == pins(kernel)[1]
    kernel.do_exit(task)
    assert audit(kernel) == []
