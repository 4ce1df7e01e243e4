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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from vkernel.kernel import dio, dio_batch
from vkernel.kernel.eager import start_eager
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.uapi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from vkernel.kernel.fs import Inode
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
_MAX_RW = 0x7FFFF000
"""MAX_RW_COUNT: the longest transfer of one call."""
_PMASK = PAGE_SIZE - 1


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


class IoEventArrays(NamedTuple):
    """io_uring's CQ ring as arrays: one completion per index (user_data, res and the times
    fio reports as slat/clat)."""

    user_data: np.ndarray
    res: np.ndarray
    submit_ns: np.ndarray
    issue_ns: np.ndarray
    complete_ns: np.ndarray


_CqChunk = tuple[np.ndarray, np.ndarray, int, int, int]
"""Completions posted together: user_data, res, and their shared submit/issue/complete times."""


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
        self.inflight: set[asyncio.Future[None]] = set()
        """One task per io_submit() with I/O still in flight."""
        self.nr_inflight = 0
        """Iocbs submitted and not yet completed (each holds a ring slot)."""
        self.done: deque[IoEvent] = deque()
        self.cq: deque[_CqChunk] = deque()
        """Completions of the array path, a chunk per group posted together."""
        self.nr_cq = 0
        """Completions held in ``cq``."""
        self.dead = False
        self.submitted = 0
        self.completed = 0
        self._wake = asyncio.Event()

    def free_slots(self) -> int:
        """Slots left in the ring (in flight and unreaped completions use one each)."""
        return self.nr_events - self.nr_inflight - len(self.done) - self.nr_cq

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

    async def _wait_events(self, min_nr: int, max_nr: int, timeout: float | None) -> None:
        """read_events(): sleep until ``min_nr`` completions are ready, the timeout passes, or
        nothing is left in flight."""
        if min_nr < 0 or max_nr < min_nr:
            raise einval("bad min_nr/max_nr", field="min_nr")
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.done) + self.nr_cq < min_nr and self.nr_inflight:
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()  # no wait_for(): it costs a task per call
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break

    async def getevents(
        self, min_nr: int, max_nr: int, timeout: float | None = None
    ) -> list[IoEvent]:
        """io_getevents(): wait for at least ``min_nr`` (or the timeout), reap up to ``max_nr``."""
        await self._wait_events(min_nr, max_nr, timeout)
        out: list[IoEvent] = []
        while self.done and len(out) < max_nr:
            out.append(self.done.popleft())
        while self.cq and len(out) < max_nr:  # array completions, as events
            ud, res, sub, iss, comp = self._pop_chunk(max_nr - len(out))
            out.extend(
                IoEvent(u, r, sub, iss, comp)
                for u, r in zip(ud.tolist(), res.tolist(), strict=True)
            )
        return out

    def _pop_chunk(self, most: int) -> _CqChunk:
        """The oldest chunk of the CQ, or its first ``most`` completions."""
        ud, res, sub, iss, comp = self.cq[0]
        if len(ud) > most:
            self.cq[0] = (ud[most:], res[most:], sub, iss, comp)
            ud, res = ud[:most], res[:most]
        else:
            self.cq.popleft()
        self.nr_cq -= len(ud)
        return ud, res, sub, iss, comp

    async def getevents_array(
        self, min_nr: int, max_nr: int, timeout: float | None = None
    ) -> IoEventArrays:
        """io_uring_wait_cqe_nr() + the CQ array: io_getevents() whose events come back as
        arrays (the array path's completions without an object per I/O)."""
        await self._wait_events(min_nr, max_nr, timeout)
        uds: list[np.ndarray] = []
        ress: list[np.ndarray] = []
        times: list[tuple[int, int, int, int]] = []
        got = 0
        while self.done and got < max_nr:  # per-iocb completions (fsync, buffered, …)
            e = self.done.popleft()
            uds.append(np.array([e.user_data], dtype=np.uint64))
            ress.append(np.array([e.res], dtype=np.int64))
            times.append((1, e.submit_ns, e.issue_ns, e.complete_ns))
            got += 1
        while self.cq and got < max_nr:
            ud, res, sub, iss, comp = self._pop_chunk(max_nr - got)
            uds.append(ud)
            ress.append(res)
            times.append((len(ud), sub, iss, comp))
            got += len(ud)
        if len(uds) == 1:  # one chunk: its times fill the arrays
            c, sub, iss, comp = times[0]
            i64 = np.int64
            return IoEventArrays(
                uds[0],
                ress[0],
                np.full(c, sub, dtype=i64),
                np.full(c, iss, dtype=i64),
                np.full(c, comp, dtype=i64),
            )
        if uds:
            ud, res = np.concatenate(uds), np.concatenate(ress)
        else:
            ud, res = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        counts = [c for c, *_ in times]
        return IoEventArrays(
            ud,
            res,
            np.repeat(np.asarray([t[1] for t in times], dtype=np.int64), counts),
            np.repeat(np.asarray([t[2] for t in times], dtype=np.int64), counts),
            np.repeat(np.asarray([t[3] for t in times], dtype=np.int64), counts),
        )

    # ---- the struct-of-arrays submission path ------------------------------------------

    def io_submit_sqes(
        self,
        opcode: np.ndarray,
        fd: np.ndarray,
        addr: np.ndarray,
        length: np.ndarray,
        offset: np.ndarray,
        user_data: np.ndarray,
    ) -> int:
        """io_submit_sqes(): io_submit() of one-buffer iocbs given as arrays (io_uring's SQ
        array: entry i is opcode[i] on fd[i], the buffer addr[i]/length[i], at offset[i]);
        as many as fit, in one task. EAGAIN if none fits, EINVAL for arrays of unequal
        length or a destroyed context. Completions are reaped with :meth:`getevents_array`
        (or :meth:`getevents`)."""
        if self.dead:
            raise einval("context destroyed", field="ctx")
        # copies, as io_uring reads each SQE once: the caller may reuse its arrays at once, a
        # submission that sleeps still reads them, and the prep clamps lengths in place
        cols = [np.array(a, dtype=np.int64) for a in (opcode, fd, addr, length, offset)]
        ud = np.array(user_data, dtype=np.uint64)  # the completions keep it
        total = len(ud)
        if any(c.ndim != 1 or len(c) != total for c in cols) or ud.ndim != 1:
            raise einval("submission arrays of unequal length", field="sqes")
        n = min(total, self.free_slots())
        if total and n <= 0:
            raise KernelError(errno.EAGAIN, "AIO ring full")
        if n <= 0:
            return 0
        if n < total:
            cols = [c[:n] for c in cols]
            ud = ud[:n]
        now = time.perf_counter_ns()
        self.nr_inflight += n
        op, fdv, av, lv, pv = cols
        self.submitted += n
        coro = self._run_sqes(op, fdv, av, lv, pv, ud, now)
        if (self.gup or dio.dio_defaults(dio._kernel(self.task)).gup) == "fast":
            # io_submit() runs io_submit_one() in the caller (and brd completes there): the
            # submission goes as far as it can before returning, a task only if it sleeps.
            # Slow GUP keeps its own task from the start (mmap_lock accounts holds per task).
            t = start_eager(coro)
            if t is None:
                return n
        else:
            t = asyncio.ensure_future(coro)
        self.inflight.add(t)
        t.add_done_callback(self.inflight.discard)
        return n

    def _post_array(
        self, ud: np.ndarray, res: np.ndarray, submit_ns: int, issue_ns: int, now: int = 0
    ) -> None:
        """aio_complete() of a group as one CQ chunk."""
        k = len(ud)
        if not k:
            return
        self.cq.append((ud, res, submit_ns, issue_ns, now or time.perf_counter_ns()))
        self.nr_cq += k
        self.nr_inflight -= k
        self.completed += k
        self._wake.set()

    async def _run_sqes(
        self,
        ops: np.ndarray,
        fds: np.ndarray,
        addr: np.ndarray,
        length: np.ndarray,
        pos: np.ndarray,
        ud: np.ndarray,
        submit_ns: int,
    ) -> None:
        """io_submit_one() over the arrays: prep checks vectorised (EBADF, EINVAL per entry),
        page-aligned direct I/O on inline devices through
        :func:`dio_batch.iomap_dio_submit_array`, everything else through the per-iocb batch."""
        issue = time.perf_counter_ns()
        n = len(ops)
        res = np.zeros(n, dtype=np.int64)
        posted = np.zeros(n, dtype=np.bool_)
        slow = np.zeros(n, dtype=np.bool_)
        groups: list[tuple[Inode, bool, np.ndarray | None]] = []
        cancelled = False
        try:
            fin = self._prep_sqes(ops, fds, addr, length, pos, res, slow, groups)
            if fin.any():
                self._post_array(ud[fin], res[fin], submit_ns, issue)
                posted |= fin
            slow_task = None
            if slow.any():
                idx = np.flatnonzero(slow)
                cbs = [
                    Iocb(o, f, [(a, ln)], p, u)
                    for o, f, a, ln, p, u in zip(
                        ops[idx].tolist(),
                        fds[idx].tolist(),
                        addr[idx].tolist(),
                        length[idx].tolist(),
                        pos[idx].tolist(),
                        ud[idx].tolist(),
                        strict=True,
                    )
                ]
                posted |= slow  # _run_batch posts them, one IoEvent each
                slow_task = asyncio.ensure_future(self._run_batch(cbs, submit_ns))
                self.inflight.add(slow_task)  # destroy() waits for it too
                slow_task.add_done_callback(self.inflight.discard)
            if groups:
                g, f = dio._modes(self.task, self.gup, self.foll)
                for ino, write, sel in groups:
                    whole = sel is None  # the whole submission, or the entries ``sel``
                    gud = ud if whole else ud[sel]
                    went: list[np.ndarray] = []

                    def post_ahead(
                        idx: np.ndarray,
                        r: np.ndarray,
                        gud: np.ndarray = gud,
                        sel: np.ndarray | None = sel,
                        went: list[np.ndarray] = went,
                    ) -> None:
                        # The iocbs before one whose GUP sleeps complete on their own.
                        self._post_array(gud[idx], r, submit_ns, issue)
                        posted[idx if sel is None else sel[idx]] = True
                        went.append(idx)

                    out, cut = await dio_batch.iomap_dio_submit_array(
                        self.task,
                        ino,
                        write,
                        addr if whole else addr[sel],
                        length if whole else length[sel],
                        pos if whole else pos[sel],
                        g,
                        f,
                        post_ahead,
                    )
                    if went:  # the rest: those not posted ahead
                        rest = np.ones(len(gud), dtype=np.bool_)
                        rest[np.concatenate(went)] = False
                        self._post_array(gud[rest], out[rest], submit_ns, issue)
                    else:
                        self._post_array(gud, out, submit_ns, issue)
                    posted[slice(None) if whole else sel] = True
                    if cut:
                        cancelled = True
                        break
            if slow_task is not None:
                await asyncio.shield(slow_task)
        except KernelError as e:
            self._post_rest(ud, posted, -e.errno, submit_ns, issue)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # noqa: BLE001 -- the process died under the request (no fd table)
            self._post_rest(ud, posted, -errno.EIO, submit_ns, issue)
        finally:
            self._post_rest(ud, posted, -errno.ECANCELED, submit_ns, issue)
        if cancelled:
            raise asyncio.CancelledError

    def _post_rest(
        self, ud: np.ndarray, posted: np.ndarray, res: int, submit_ns: int, issue: int
    ) -> None:
        """Complete every entry not yet posted with ``res`` (never leak a slot)."""
        left = ~posted
        if left.any():
            self._post_array(ud[left], np.full(int(left.sum()), res, np.int64), submit_ns, issue)
            posted |= left

    def _prep_sqes(
        self,
        ops: np.ndarray,
        fds: np.ndarray,
        addr: np.ndarray,
        length: np.ndarray,
        pos: np.ndarray,
        res: np.ndarray,
        slow: np.ndarray,
        groups: list[tuple[Inode, bool, np.ndarray | None]],
    ) -> np.ndarray:
        """The synchronous part of io_submit_one() for the arrays, vectorised: the mask of
        entries finished at once (``res`` set: -errno, or 0 for an empty or past-EOF read);
        ``slow`` marks those for the per-iocb path (fsync, noop, buffered files, sector-only
        alignment, files with cached pages, unallocated write blocks, queued devices);
        ``groups`` gets (inode, write, indices) of the rest."""
        fin = np.zeros(len(ops), dtype=np.bool_)
        if self._prep_uniform(ops, fds, addr, length, pos, groups):
            return fin
        write = (ops == IOCB_CMD_PWRITE) | (ops == IOCB_CMD_PWRITEV)
        rw = write | (ops == IOCB_CMD_PREAD) | (ops == IOCB_CMD_PREADV)
        other = ~rw
        if other.any():  # fsync/fdsync/noop run on their own; an unknown opcode is EINVAL
            known = (ops == IOCB_CMD_FSYNC) | (ops == IOCB_CMD_FDSYNC) | (ops == IOCB_CMD_NOOP)
            slow |= other & known
            bad = other & ~known
            res[bad] = -errno.EINVAL
            fin |= bad
        if not rw.any():
            return fin
        bad_iov = (length < 0) | (addr < 0) | (length > _MAX_RW)
        fdv = fds[rw]
        ufds = [int(fdv[0])] if (fdv == fdv[0]).all() else np.unique(fdv).tolist()
        for fd in ufds:
            on = rw & (fds == fd) if len(ufds) > 1 else rw
            try:
                _, readable, writable, ino, lbs = dio_batch._fd_entry(self.task, fd)
            except KernelError as e:
                res[on] = -e.errno
                fin |= on
                continue
            # fdget + FMODE_READ/FMODE_WRITE, then the offset, then import_iovec, then alignment
            ebadf = on & np.where(write, not writable, not readable)
            einv = on & ~ebadf & ((pos < 0) | bad_iov)
            err = ebadf | einv
            res[ebadf] = -errno.EBADF
            res[einv] = -errno.EINVAL
            fin |= err
            ok = on & ~err
            if ino is None:  # not O_DIRECT on a disk file: the page-cache path
                slow |= ok
                continue
            mis = ok & (((pos | addr | length) & (lbs - 1)) != 0)
            res[mis] = -errno.EINVAL
            fin |= mis
            ok &= ~mis
            zero = ok & (length == 0)
            fin |= zero  # res 0
            ok &= ~zero
            size = ino.size
            rd = ok & ~write
            past = rd & (pos >= size)
            fin |= past
            ok &= ~past
            if rd.any():  # clamp reads at EOF, rounded up to the block size
                clamp = -(-(size - pos) // lbs) * lbs
                length[:] = np.where(rd & ~past & (length > clamp), clamp, length)
            self._route_direct(ino, write, ok, pos, addr, length, slow, groups)
        return fin

    def _prep_uniform(
        self,
        ops: np.ndarray,
        fds: np.ndarray,
        addr: np.ndarray,
        length: np.ndarray,
        pos: np.ndarray,
        groups: list[tuple[Inode, bool, np.ndarray | None]],
    ) -> bool:
        """The common submission checked with a few reductions: one read (or write) opcode on
        one O_DIRECT fd, every entry valid, page-aligned, non-empty, inside the file (and its
        blocks allocated for a write), no cached pages, a device completing inline. True when
        it all holds (``groups`` gets the whole batch); False sends it to the per-entry
        checks, which give every entry its own result."""
        o0 = int(ops[0])
        if o0 not in _RW_OPS or not (ops == o0).all():
            return False
        f0 = int(fds[0])
        if not (fds == f0).all():
            return False
        try:
            _, readable, writable, ino, _lbs = dio_batch._fd_entry(self.task, f0)
        except KernelError:
            return False
        write = o0 in _WRITE_OPS
        if ino is None or not (writable if write else readable):
            return False
        lmin, lmax = int(length.min()), int(length.max())
        if lmin <= 0 or lmax > _MAX_RW or int(pos.min()) < 0 or int(addr.min()) < 0:
            return False
        if int(np.bitwise_or.reduce(pos | addr | length)) & _PMASK:
            return False
        m = ino.mapping
        bdev = ino.bdev
        if (m is not None and (m.pages or m.dirty_time)) or bdev is None:
            return False
        if not bdev.completes_inline():
            return False
        end = int((pos + length).max())
        if write:  # one-page overwrites only: allocation is the per-entry path's
            bmap = ino.blocks
            if lmax != PAGE_SIZE or end > len(bmap) << PAGE_SHIFT:
                return False
            if int(bmap[pos >> PAGE_SHIFT].min()) < 0:
                return False
        elif end > ino.size:  # the EOF clamp is the per-entry path's
            return False
        groups.append((ino, write, None))
        return True

    def _route_direct(
        self,
        ino: Inode,
        write: np.ndarray,
        ok: np.ndarray,
        pos: np.ndarray,
        addr: np.ndarray,
        length: np.ndarray,
        slow: np.ndarray,
        groups: list[tuple[Inode, bool, np.ndarray | None]],
    ) -> None:
        """Split the valid direct entries of one file: the array path takes page-aligned ones
        on a device that completes inline, when the file has no cached pages and a write's
        blocks exist; the per-iocb batch the rest (bounce, coherence, allocation, queues)."""
        if not ok.any():
            return
        m = ino.mapping
        bdev = ino.bdev
        fast = ok & (((pos | addr | length) & _PMASK) == 0)
        if (
            (m is not None and (m.pages or m.dirty_time))
            or bdev is None
            or not bdev.completes_inline()
        ):
            fast[:] = False
        wr = np.flatnonzero(fast & write)
        if len(wr):  # overwrites only: allocation (ENOSPC, short writes) is the batch's
            bmap = ino.blocks
            first = pos[wr] >> PAGE_SHIFT
            npg = length[wr] >> PAGE_SHIFT
            fidx = np.repeat(first, npg) + dio_batch._intra(npg, int(npg.sum()))
            inside = fidx < len(bmap)
            have = np.zeros(len(fidx), dtype=np.bool_)
            have[inside] = bmap[fidx[inside]] >= 0
            starts = np.cumsum(npg) - npg
            fast[wr] = np.logical_and.reduceat(have, starts)
        slow |= ok & ~fast
        for w in (False, True):
            sel = fast & (write if w else ~write)
            if sel.any():
                groups.append((ino, w, np.flatnonzero(sel)))

    async def destroy(self) -> None:
        """io_destroy() / exit_aio(): no more submissions; wait for every I/O in flight."""
        self.dead = True
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        self.done.clear()
