"""AIO contexts (io_setup/io_submit/io_getevents/io_destroy) over O_DIRECT."""

from __future__ import annotations

import asyncio
import errno

import pytest

from tests.unit.dio.test_dio_sync import buf, dfile, pins
from tests.unit.fs.fshelp import P, pattern
from vkernel.kernel import aio
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user


async def test_submit_reap_many(kernel: Kernel, task: Task) -> None:
    """16 reads with user data, reaped in any order; every pin released."""
    data = pattern(16 * P, seed=2)
    fd = await dfile(kernel, task, data)
    a = await buf(task, 16 * P)
    ctx = aio.KioCtx(task, 32)
    cbs = [aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, 100 + i) for i in range(16)]
    assert ctx.submit(cbs) == 16
    evs: list[aio.IoEvent] = []
    while len(evs) < 16:
        evs += await ctx.getevents(1, 16, 1.0)
    assert sorted(e.user_data for e in evs) == list(range(100, 116))
    assert all(e.res == P for e in evs)
    assert all(e.submit_ns <= e.issue_ns <= e.complete_ns for e in evs)
    assert await read_user_bytes(task, a, 16 * P) == data
    assert pins(kernel)[0] == pins(kernel)[1]
    await ctx.destroy()


async def test_errors_complete_with_negative_errno(kernel: Kernel, task: Task) -> None:
    """A misaligned iocb, a bad fd and an unknown opcode complete with -errno."""
    fd = await dfile(kernel, task, pattern(4 * P))
    a = await buf(task, 4 * P)
    ctx = aio.KioCtx(task, 8)
    ctx.submit(
        [
            aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + 1, P)], 0, 1),
            aio.Iocb(aio.IOCB_CMD_PREAD, 99, [(a, P)], 0, 2),
            aio.Iocb(42, fd, [(a, P)], 0, 3),
            aio.Iocb(aio.IOCB_CMD_PWRITE, fd, [(a, P)], 0, 4),
            aio.Iocb(aio.IOCB_CMD_FSYNC, fd, [], 0, 5),
        ]
    )
    evs = await ctx.getevents(5, 5, 1.0)
    res = {e.user_data: e.res for e in evs}
    assert res == {1: -errno.EINVAL, 2: -errno.EBADF, 3: -errno.EINVAL, 4: P, 5: 0}
    await ctx.destroy()


async def test_queue_depth(make_fs_kernel: object) -> None:
    """A full ring takes what fits, then EAGAIN; a reap frees slots."""
    k = make_fs_kernel("ram0=ram:16M,latency=20ms")  # type: ignore[operator]
    t = k.spawn("t", "s")
    fd = await dfile(k, t, pattern(8 * P))
    await k.vfs.fsync(t, fd)
    a = await buf(t, 8 * P)
    ctx = aio.KioCtx(t, 4)
    cbs = [aio.Iocb(aio.IOCB_CMD_PREAD, fd, [(a + i * P, P)], i * P, i) for i in range(6)]
    assert ctx.submit(cbs) == 4
    with pytest.raises(KernelError) as ei:
        ctx.submit(cbs[4:])
    assert ei.value.errno == errno.EAGAIN
    assert len(await ctx.getevents(4, 4, 2.0)) == 4
    assert ctx.submit(cbs[4:] + cbs[:2]) == 4  # reaped slots are free at once
    await ctx.destroy()
    with pytest.raises(KernelError):
        ctx.submit(cbs)
    with pytest.raises(KernelError):
        aio.KioCtx(t, 0)


async def test_destroy_with_io_in_flight_leaks_nothing(make_fs_kernel: object) -> None:
    """The session ends with reads and writes in flight: destroy waits for the device, the
    pins are released after the bios, the process exits, the audit is clean."""
    k = make_fs_kernel("ram0=ram:16M,latency=30ms")  # type: ignore[operator]
    t = k.spawn("t", "s")
    fd = await dfile(k, t, pattern(8 * P))
    await k.vfs.fsync(t, fd)
    a = await buf(t, 8 * P)
    await write_user(t, a, pattern(8 * P, seed=5))
    ctx = aio.KioCtx(t, 16)
    cbs = [
        aio.Iocb(aio.IOCB_CMD_PREAD if i % 2 else aio.IOCB_CMD_PWRITE, fd, [(a + i * P, P)], i * P)
        for i in range(8)
    ]
    ctx.submit(cbs)
    await asyncio.sleep(0.005)
    dev = k.vfs.device("ram0")
    assert dev.stats.inflight > 0
    acq, rel = pins(k)
    assert acq > rel
    k.do_exit(t)  # the process dies first; its pinned frames outlive its mm
    await ctx.destroy()
    assert dev.stats.inflight == 0
    assert pins(k)[0] == pins(k)[1]
    assert audit(k) == []
