"""AioService: preadv/pwritev into process memory (O_DIRECT through pinned pages) and AIO rings.

Thin: decode, check the process is the session's (``owned_task``), call
:mod:`vkernel.kernel.dio` / :mod:`vkernel.kernel.aio`, encode. A Ring stream is one
``KioCtx``; the iocbs of one RingRequest are one ``io_submit`` (one kernel batch: merged
pins and bios, see :mod:`vkernel.kernel.dio_batch`); an ``IocbBatch`` goes as arrays
straight into ``KioCtx.io_submit_sqes`` and ``batch_completions`` answers from
``getevents_array`` (no object per I/O on either side); when the stream ends (the client closes it, the session dies, the daemon stops)
the context is destroyed, which waits for the device before the pins go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from vkernel.api.process import owned_task
from vkernel.api.rpc import RpcFailure, require_session
from vkernel.kernel import aio, dio
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.kernel import Kernel
from vkernel.sessions import SessionTable
from vkernel.v1 import aio_service_pb2 as pb
from vkernel.v1 import aio_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

MAX_RING_OPS = 4096
"""Iocbs per RingRequest."""
_GUP = {pb.GUP_MODE_FAST: "fast", pb.GUP_MODE_SLOW: "slow"}
_FOLL = {pb.FOLL_MODE_PIN: "pin", pb.FOLL_MODE_GET: "get"}
_GUP_PB = {v: k for k, v in _GUP.items()}
_FOLL_PB = {v: k for k, v in _FOLL.items()}
_OPS = {
    pb.AIO_OPCODE_READ: aio.IOCB_CMD_PREADV,
    pb.AIO_OPCODE_WRITE: aio.IOCB_CMD_PWRITEV,
    pb.AIO_OPCODE_FSYNC: aio.IOCB_CMD_FSYNC,
    pb.AIO_OPCODE_FDSYNC: aio.IOCB_CMD_FDSYNC,
    pb.AIO_OPCODE_NOOP: aio.IOCB_CMD_NOOP,
}


_OP_TABLE = np.full(max(_OPS) + 1, -1, dtype=np.int64)
"""AioOpcode → IOCB_CMD_* as an array (-1: unknown, EINVAL per entry)."""
for _pbop, _cmd in _OPS.items():
    _OP_TABLE[_pbop] = _cmd


def _sqes(b: pb.IocbBatch) -> tuple[np.ndarray, ...]:
    """IocbBatch's packed fields → the SQ arrays of KioCtx.io_submit_sqes (one conversion per
    field, no object per iocb)."""
    n = len(b.user_data)
    ops = np.fromiter(b.opcodes, dtype=np.int64, count=len(b.opcodes))
    known = (ops >= 0) & (ops < len(_OP_TABLE))
    cmd = np.where(known, _OP_TABLE[np.where(known, ops, 0)], -1)
    fds = np.fromiter(b.fds, dtype=np.int64, count=len(b.fds))
    # uint64 addresses and lengths past 2**63 wrap negative: EINVAL per entry, as Linux's
    bases = np.fromiter(b.bases, dtype=np.uint64, count=len(b.bases)).view(np.int64)
    lens = np.fromiter(b.lens, dtype=np.uint64, count=len(b.lens)).view(np.int64)
    offs = np.fromiter(b.offsets, dtype=np.int64, count=len(b.offsets))
    ud = np.fromiter(b.user_data, dtype=np.uint64, count=n)
    return cmd, fds, bases, lens, offs, ud


def _batch_len(b: pb.IocbBatch) -> int:
    """The longest of an IocbBatch's arrays (unequal lengths are EINVAL later; the limit
    holds for every field)."""
    return max(
        len(b.opcodes), len(b.fds), len(b.bases), len(b.lens), len(b.offsets), len(b.user_data)
    )


def _iov(vs: Any) -> list[tuple[int, int]]:
    """IoVec messages → (base, len) pairs."""
    return [(v.base, v.len) for v in vs]


class AioServicer(pb_grpc.AioServiceServicer):
    """Thin servicer over the kernel's direct-I/O path and AIO contexts."""

    def __init__(self, kernel: Kernel, sessions: SessionTable) -> None:
        self._kernel = kernel
        self._sessions = sessions
        self._streams: set[asyncio.Task[Any]] = set()
        self._teardowns: set[asyncio.Task[None]] = set()

    def stop_streams(self) -> None:
        """Daemon shutdown: end every Ring stream (their contexts drain in the background)."""
        for task in list(self._streams):
            task.cancel()

    async def drain(self) -> None:
        """Wait for destroyed contexts' I/O (daemon shutdown, tests)."""
        while self._teardowns:
            await asyncio.gather(*list(self._teardowns), return_exceptions=True)

    async def Rw(self, request: pb.RwRequest, context: Context) -> pb.RwResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        offset = None if request.offset == -1 else request.offset
        gup, foll = _GUP.get(request.gup), _FOLL.get(request.foll)
        iov = _iov(request.iov)
        if request.write:
            n = await dio.vfs_pwritev(task, request.fd, iov, offset, gup=gup, foll=foll)
        else:
            n = await dio.vfs_preadv(task, request.fd, iov, offset, gup=gup, foll=foll)
        return pb.RwResponse(bytes=n)

    async def SetDioDefaults(
        self, request: pb.SetDioDefaultsRequest, context: Context
    ) -> pb.SetDioDefaultsResponse:
        require_session(context, self._sessions)
        dio.set_dio_defaults(self._kernel, _GUP.get(request.gup), _FOLL.get(request.foll))
        d = dio.dio_defaults(self._kernel)
        return pb.SetDioDefaultsResponse(gup=_GUP_PB[d.gup], foll=_FOLL_PB[d.foll])

    def _teardown(self, ctx: aio.KioCtx) -> None:
        """io_destroy() in its own task: it survives the stream's cancellation."""
        t = asyncio.ensure_future(ctx.destroy())
        self._teardowns.add(t)
        t.add_done_callback(self._teardowns.discard)

    async def Ring(
        self, request_iterator: AsyncIterator[pb.RingRequest], context: Context
    ) -> AsyncIterator[pb.RingResponse]:
        session = require_session(context, self._sessions)
        me = asyncio.current_task()
        if me is not None:
            self._streams.add(me)
            me.add_done_callback(self._streams.discard)
        ctx: aio.KioCtx | None = None
        try:
            async for request in request_iterator:
                if session.closed:
                    raise RpcFailure(
                        grpc.StatusCode.UNAUTHENTICATED, "the session has ended", "SESSION_EXPIRED"
                    )
                if ctx is None:
                    if not request.HasField("setup"):
                        raise einval("the first message must carry setup", "setup")
                    s = request.setup
                    task = owned_task(self._kernel, session, s.pid)
                    ctx = aio.KioCtx(
                        task, s.queue_depth, gup=_GUP.get(s.gup), foll=_FOLL.get(s.foll)
                    )
                elif request.HasField("setup"):
                    raise einval("setup only in the first message", "setup")
                if len(request.submit) + _batch_len(request.submit_batch) > MAX_RING_OPS:
                    raise einval(f"more than {MAX_RING_OPS} iocbs in one message", "submit")
                yield await self._step(ctx, request)
        finally:
            if ctx is not None:
                self._teardown(ctx)

    async def _step(self, ctx: aio.KioCtx, request: pb.RingRequest) -> pb.RingResponse:
        """io_submit() of the message's iocbs as one batch (the per-iocb ones, then the
        arrays of ``submit_batch`` through io_submit_sqes), then io_getevents() (as arrays
        with ``batch_completions``)."""
        out = pb.RingResponse()
        submitted = 0
        try:
            if request.submit:
                cbs = [
                    aio.Iocb(_OPS.get(c.opcode, -1), c.fd, _iov(c.iov), c.offset, c.user_data)
                    for c in request.submit
                ]
                submitted = ctx.submit(cbs)
            b = request.submit_batch
            if submitted == len(request.submit) and _batch_len(b):
                submitted += ctx.io_submit_sqes(*_sqes(b))
        except KernelError as e:
            out.errno, out.message = e.errno, e.message
        out.submitted = submitted
        max_nr = request.max_complete or ctx.nr_events
        min_nr = min(request.min_complete, max_nr)
        timeout = request.timeout_seconds or None
        if request.batch_completions:
            ev = await ctx.getevents_array(min_nr, max_nr, timeout)
            cb = out.completion_batch
            cb.user_data.extend(ev.user_data.tolist())
            cb.res.extend(ev.res.tolist())
            cb.submit_ns.extend(np.maximum(ev.issue_ns - ev.submit_ns, 0).tolist())
            cb.complete_ns.extend(np.maximum(ev.complete_ns - ev.issue_ns, 0).tolist())
            out.inflight = ctx.nr_inflight
            return out
        evs = await ctx.getevents(min_nr, max_nr, timeout)
        out.completions.extend(
            pb.Completion(
                user_data=e.user_data,
                res=e.res,
                submit_ns=max(0, e.issue_ns - e.submit_ns),
                complete_ns=max(0, e.complete_ns - e.issue_ns),
            )
            for e in evs
        )
        out.inflight = ctx.nr_inflight
        return out
