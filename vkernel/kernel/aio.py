"""Asynchronous I/O contexts (fs/aio.c ``struct kioctx``, in the spirit of io_uring / libaio).

A context belongs to one process and has a queue depth (``io_setup(nr_events)``).
:meth:`KioCtx.submit` (``io_submit``) starts one asyncio task per call, however many iocbs it
carries: the O_DIRECT reads and writes among them run as one batch through
:func:`vkernel.kernel.dio_batch.iomap_dio_submit` (pins merged across iocbs, bios merged in a
plug, inline completion on a RAM disk, batched unpin), the others (fsync, noop, buffered
files) each as they would alone. :meth:`KioCtx.getevents` (``io_getevents``) reaps
completions, each carrying ``res`` (bytes, or -errno) and the caller's ``user_data``. Errors
found at submission (bad fd, bad opcode, EINVAL alignment …) complete the iocb with -errno,
as io_uring does; a full ring refuses what does not fit (EAGAIN when nothing fits).

:meth:`KioCtx.destroy` (``io_destroy`` / the process exiting) waits for the I/Os in flight --
a direct I/O's frames stay pinned until its bios completed, never freed under DMA -- and
drops completions nobody reaped.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vkernel.kernel import dio, dio_batch
from vkernel.kernel.errors import KernelError, einval

if TYPE_CHECKING:
    from vkernel.kernel.task import Task

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_CMD_NOOP = 6
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8

AIO_MAX_NR = 65536
"""fs.aio-max-nr: the largest ring."""
_RW_OPS = frozenset((IOCB_CMD_PREAD, IOCB_CMD_PREADV, IOCB_CMD_PWRITE, IOCB_CMD_PWRITEV))
_WRITE_OPS = frozenset((IOCB_CMD_PWRITE, IOCB_CMD_PWRITEV))


@dataclass(slots=True)
class Iocb:
    """struct iocb: one request (``iov`` holds (address, length) user buffers)."""

    opcode: int
    fd: int
    iov: list[tuple[int, int]] = field(default_factory=list)
    offset: int = 0
    user_data: int = 0


@dataclass(slots=True)
class IoEvent:
    """struct io_event (+ the times fio reports as slat/clat: submit, issue, completion)."""

    user_data: int
    res: int
    submit_ns: int = 0
    issue_ns: int = 0
    complete_ns: int = 0


class KioCtx:
    """struct kioctx: a ring of ``nr_events`` I/Os of one process."""

    def __init__(
        self, task: Task, nr_events: int, *, gup: str | None = None, foll: str | None = None
    ) -> None:
        if nr_events <= 0 or nr_events > AIO_MAX_NR:
            raise einval(f"queue depth {nr_events} out of range", field="nr_events")
        self.task = task
        self.nr_events = nr_events
        self.gup = gup
        self.foll = foll
        self.inflight: set[asyncio.Task[None]] = set()
        """One task per io_submit() with I/O still in flight."""
        self.nr_inflight = 0
        """Iocbs submitted and not yet completed (each holds a ring slot)."""
        self.done: deque[IoEvent] = deque()
        self.dead = False
        self.submitted = 0
        self.completed = 0
        self._wake = asyncio.Event()

    def free_slots(self) -> int:
        """Slots left in the ring (in flight and unreaped completions use one each)."""
        return self.nr_events - self.nr_inflight - len(self.done)

    def submit(self, iocbs: list[Iocb]) -> int:
        """io_submit(): start as many iocbs as fit, in one task; EAGAIN if none fits, EINVAL
        once destroyed."""
        if self.dead:
            raise einval("context destroyed", field="ctx")
        n = min(len(iocbs), self.free_slots())
        if iocbs and n <= 0:
            raise KernelError(errno.EAGAIN, "AIO ring full")
        if n <= 0:
            return 0
        now = time.perf_counter_ns()
        self.nr_inflight += n
        t = asyncio.ensure_future(self._run_batch(iocbs[:n], now))
        self.inflight.add(t)
        t.add_done_callback(self.inflight.discard)
        self.submitted += n
        return n

    def _post(self, cb: Iocb, res: int, submit_ns: int, issue_ns: int, now: int = 0) -> None:
        """aio_complete(): the event goes to the ring, the slot moves to it at once."""
        self.nr_inflight -= 1
        now = now or time.perf_counter_ns()
        self.done.append(IoEvent(cb.user_data, res, submit_ns, issue_ns, now))
        self.completed += 1
        self._wake.set()

    async def _run_batch(self, cbs: list[Iocb], submit_ns: int) -> None:
        """io_submit_one() for each iocb: direct reads/writes batched, the rest one by one."""
        issue = time.perf_counter_ns()
        posted = [False] * len(cbs)

        def post(i: int, res: int, now: int = 0) -> None:
            if not posted[i]:
                posted[i] = True
                self._post(cbs[i], res, submit_ns, issue, now)

        reqs: list[dio_batch.DioReq] = []
        others: list[asyncio.Task[None]] = []
        try:
            reqs = self._prep(cbs, post, issue, others)
            if reqs:
                g, f = dio._modes(self.task, self.gup, self.foll)

                def complete(group: list[dio_batch.DioReq]) -> None:
                    """aio_complete() of iocbs that completed together (post(), inlined)."""
                    now = time.perf_counter_ns()
                    done = self.done
                    n = 0
                    for r in group:
                        i = r.idx
                        if not posted[i]:
                            posted[i] = True
                            done.append(IoEvent(cbs[i].user_data, r.res, submit_ns, issue, now))
                            n += 1
                    self.nr_inflight -= n
                    self.completed += n
                    self._wake.set()

                await dio_batch.iomap_dio_submit(self.task, reqs, g, f, complete)
        except KernelError as e:
            for r in reqs:
                post(r.idx, -e.errno)
        except asyncio.CancelledError:
            for r in reqs:
                post(r.idx, -errno.ECANCELED)
        except Exception:  # noqa: BLE001 -- the process died under the request (no fd table)
            for r in reqs:
                post(r.idx, -errno.EIO)
        finally:
            if others:
                await asyncio.gather(*others, return_exceptions=True)
            if not all(posted):  # nothing should be left; never leak a slot
                for i in range(len(cbs)):
                    post(i, -errno.ECANCELED)

    def _prep(
        self,
        cbs: list[Iocb],
        post: Callable[[int, int, int], None],
        issue: int,
        others: list[asyncio.Task[None]],
    ) -> list[dio_batch.DioReq]:
        """The synchronous part of io_submit_one(): direct I/O requests for the batch; errors
        and immediate results posted; other opcodes started on their own."""
        reqs: list[dio_batch.DioReq] = []
        t = self.task
        files: dio_batch.FdCache = {}
        prep = dio_batch.dio_prep
        for i, cb in enumerate(cbs):
            op = cb.opcode
            if op in _RW_OPS:
                try:
                    got = prep(t, cb.fd, cb.iov, cb.offset, op in _WRITE_OPS, i, files)
                except KernelError as e:
                    post(i, -e.errno, 0)
                    continue
                if isinstance(got, dio_batch.DioReq):
                    reqs.append(got)
                    continue
                if got >= 0:
                    post(i, got, 0)
                    continue
            others.append(asyncio.ensure_future(self._one(i, cb, post)))
        return reqs

    async def _one(self, i: int, cb: Iocb, post: Callable[[int, int, int], None]) -> None:
        """An iocb outside the direct batch (fsync, noop, a buffered file)."""
        try:
            res = await self._do(cb)
        except KernelError as e:
            res = -e.errno
        except asyncio.CancelledError:
            res = -errno.ECANCELED
        except Exception:  # noqa: BLE001 -- the process died under the request (no fd table)
            res = -errno.EIO
        post(i, res, 0)

    async def _do(self, cb: Iocb) -> int:
        """The request's operation."""
        t = self.task
        op = cb.opcode
        if op in (IOCB_CMD_PREAD, IOCB_CMD_PREADV):
            return await dio.vfs_preadv(t, cb.fd, cb.iov, cb.offset, gup=self.gup, foll=self.foll)
        if op in (IOCB_CMD_PWRITE, IOCB_CMD_PWRITEV):
            return await dio.vfs_pwritev(t, cb.fd, cb.iov, cb.offset, gup=self.gup, foll=self.foll)
        if op in (IOCB_CMD_FSYNC, IOCB_CMD_FDSYNC):
            vfs = dio._kernel(t).vfs
            await vfs.fsync(t, cb.fd, op == IOCB_CMD_FDSYNC)
            return 0
        if op == IOCB_CMD_NOOP:
            return 0
        raise einval(f"unknown opcode {op}", field="opcode")

    async def getevents(
        self, min_nr: int, max_nr: int, timeout: float | None = None
    ) -> list[IoEvent]:
        """io_getevents(): wait for at least ``min_nr`` (or the timeout), reap up to ``max_nr``."""
        if min_nr < 0 or max_nr < min_nr:
            raise einval("bad min_nr/max_nr", field="min_nr")
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.done) < min_nr and (self.nr_inflight or not self.done):
            if not self.nr_inflight:
                break
            self._wake.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break
        out: list[IoEvent] = []
        while self.done and len(out) < max_nr:
            out.append(self.done.popleft())
        return out

    async def destroy(self) -> None:
        """io_destroy() / exit_aio(): no more submissions; wait for every I/O in flight."""
        self.dead = True
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        self.done.clear()
