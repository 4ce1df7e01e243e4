"""GupService: GUP entry points for driver clients, their handles, DMA, and gup_test.

Thin, like every servicer: decode, call the handle registry (:mod:`vkernel.gup_handles`) or the
kernel's gup_test ioctl, encode. Page lists travel as packed little-endian u64 ``bytes``.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from vkernel.api.process import owned_task
from vkernel.api.rpc import StreamTasks, note_pid, require_live, require_session
from vkernel.gup_handles import GupHandle, GupResult, HandleTable
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.gup_test import gup_test_ioctl
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.uapi import PAGE_SIZE
from vkernel.sessions import Session, SessionTable
from vkernel.v1 import gup_service_pb2 as pb
from vkernel.v1 import gup_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_PID_MAX = 2**31 - 1
_LE_U64 = np.dtype("<u8")
_LE_U32 = np.dtype("<u4")
MAX_BATCH_OPS = 4096
"""Operations per Batch message."""


def pack_pfns(pfns: npt.NDArray[np.int64]) -> bytes:
    """pfns as little-endian u64 bytes."""
    if sys.byteorder == "little":
        return pfns.tobytes()
    return pfns.astype(_LE_U64).tobytes()


def _indices(raw: bytes) -> npt.NDArray[np.int64] | None:
    """Packed little-endian u32 page indices, or None when the field is empty."""
    if not raw:
        return None
    if len(raw) % 4:
        raise einval("indices must be a whole number of little-endian u32", "indices")
    return np.frombuffer(raw, dtype=_LE_U32).astype(np.int64)


def _check_pid(pid: int) -> None:
    if pid <= 0 or pid > _PID_MAX:
        raise einval(f"pid {pid} out of range", field="pid")
    note_pid(pid)


def gup_response(result: GupResult, omit_pfns: bool) -> pb.GupResponse:
    """A GupResult as a GupResponse."""
    handle = result.handle
    return pb.GupResponse(
        handle=handle.id if handle is not None else 0,
        count=result.count,
        pfns=b"" if handle is None or omit_pfns else pack_pfns(handle.pfns),
        lock_dropped=result.lock_dropped,
    )


def handle_info(handle: GupHandle, now: float) -> pb.HandleInfo:
    """One handle as a HandleInfo."""
    return pb.HandleInfo(
        handle=handle.id,
        pid=handle.pid,
        api=pb.GupApi.ValueType(int(handle.api)),
        gup_flags=handle.gup_flags,
        pinned=handle.pinned,
        start=handle.start,
        nr_pages=handle.nr_pages,
        held=handle.nr_held,
        age_seconds=max(0.0, now - handle.created),
    )


class GupServicer(pb_grpc.GupServiceServicer):
    """Thin servicer over the session-owned handle registry."""

    def __init__(
        self,
        kernel: Kernel,
        sessions: SessionTable,
        handles: HandleTable,
        dma_socket_path: str = "",
    ) -> None:
        self._kernel = kernel
        self._sessions = sessions
        self._handles = handles
        self._dma_socket_path = dma_socket_path
        self._streams = StreamTasks()

    def stop_streams(self) -> None:
        """Daemon shutdown: end every Batch stream (long-lived, like Keepalive, so shutdown
        must not wait its grace on them)."""
        self._streams.stop()

    def set_dma_socket_path(self, path: str) -> None:
        """Where GetDmaChannel sends co-located drivers ("" when there is no side channel)."""
        self._dma_socket_path = path

    async def _gup(self, session: Session, request: pb.GupRequest) -> pb.GupResponse:
        _check_pid(request.pid)
        result = await self._handles.gup(
            session,
            request.pid,
            request.api,
            request.start,
            request.nr_pages,
            request.gup_flags,
            request.locked,
        )
        return gup_response(result, request.omit_pfns)

    def _release(self, session: Session, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        released, remaining = self._handles.release(
            session,
            request.handle,
            dirty=request.dirty,
            first=request.first,
            count=request.count,
            indices=_indices(request.indices),
        )
        return pb.ReleaseResponse(released=released, remaining=remaining)

    async def Gup(self, request: pb.GupRequest, context: Context) -> pb.GupResponse:
        session = require_session(context, self._sessions)
        return await self._gup(session, request)

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        session = require_session(context, self._sessions)
        return self._release(session, request)

    async def DmaRead(self, request: pb.DmaReadRequest, context: Context) -> pb.DmaReadResponse:
        session = require_session(context, self._sessions)
        data = await self._handles.dma_read(session, request.handle, request.offset, request.length)
        return pb.DmaReadResponse(data=data)

    async def DmaWrite(self, request: pb.DmaWriteRequest, context: Context) -> pb.DmaWriteResponse:
        session = require_session(context, self._sessions)
        n = await self._handles.dma_write(session, request.handle, request.offset, request.data)
        return pb.DmaWriteResponse(bytes_written=n)

    async def ListHandles(
        self, request: pb.ListHandlesRequest, context: Context
    ) -> pb.ListHandlesResponse:
        import time

        session = require_session(context, self._sessions)
        now = time.monotonic()
        return pb.ListHandlesResponse(
            handles=[handle_info(h, now) for h in self._handles.handles(session)]
        )

    async def GetDmaChannel(
        self, request: pb.GetDmaChannelRequest, context: Context
    ) -> pb.GetDmaChannelResponse:
        require_session(context, self._sessions)
        return pb.GetDmaChannelResponse(
            socket_path=self._dma_socket_path,
            memory_bytes=self._kernel.mem.nframes * PAGE_SIZE,
            page_size=PAGE_SIZE,
        )

    async def Batch(
        self, request_iterator: AsyncIterator[pb.BatchRequest], context: Context
    ) -> AsyncIterator[pb.BatchResponse]:
        # A plain linear generator (no task group, no cancel scope), relayed by the
        # interceptor with context.write, whose await is the backpressure.
        session = require_session(context, self._sessions)
        self._streams.track()
        async for request in request_iterator:
            require_live(session)  # the driver's session ended under its stream
            if len(request.ops) > MAX_BATCH_OPS:
                raise einval(f"more than {MAX_BATCH_OPS} operations in one message", "ops")
            results: list[pb.BatchResult] = []
            for op in request.ops:
                try:
                    if op.HasField("gup"):
                        results.append(pb.BatchResult(gup=await self._gup(session, op.gup)))
                    elif op.HasField("release"):
                        results.append(pb.BatchResult(release=self._release(session, op.release)))
                    else:
                        raise einval("an operation is neither gup nor release", "ops")
                except KernelError as e:
                    results.append(pb.BatchResult(errno=e.errno, message=e.message))
            yield pb.BatchResponse(results=results)

    async def GupTest(self, request: pb.GupTestRequest, context: Context) -> pb.GupTestResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        if task.mm is None:
            raise KernelError(errno.ESRCH, f"process {request.pid} has exited")
        result = await gup_test_ioctl(
            task,
            request.command,
            request.addr,
            request.size,
            request.nr_pages_per_call,
            request.gup_flags,
            request.test_flags,
            list(request.which_pages),
        )
        return pb.GupTestResponse(
            get_delta_usec=result.get_delta_usec,
            put_delta_usec=result.put_delta_usec,
            size=result.size,
            not_pinned=result.not_pinned,
            dumped=[
                pb.DumpedPage(
                    index=index,
                    pfn=int(page["pfn"]),
                    refcount=int(page["refcount"]),
                    mapcount=int(page["mapcount"]),
                    pincount=int(page["pincount"]),
                    flag_names=[str(f) for f in page["flags"]],
                )
                for index, page in result.dumped
            ],
        )
