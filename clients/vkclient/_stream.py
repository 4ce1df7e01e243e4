"""Long-lived bidi streams of the SDK: the pieces ``AccessStream``, ``UffdReader`` and
``ResolveStream`` share.

A :class:`TaggedStream` is one request, one answer, in order: each request carries a tag the
answer echoes, and one lock keeps a request paired with its answer, as one thread doing one
syscall at a time. The stream opens on first use and is dropped (the next request opens
another) when the daemon ends it or a caller is cancelled between request and answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self

import grpc

from vkclient.errors import from_rpc_error


async def stream_ended(call: Any) -> grpc.RpcError:
    """The status of a stream the daemon ended, as the RpcError a unary call would raise."""
    code = await call.code()
    details = await call.details()
    trailing = await call.trailing_metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def cancelled_under_us() -> bool:
    """Whether a CancelledError out of a grpc.aio call means the call, not this task: a call
    cancelled locally (its channel closed, the Kernel was closed meanwhile) raises
    CancelledError too, though nobody cancelled the task awaiting it."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


class StreamBase:
    """An async context manager that closes the stream on exit."""

    async def close(self) -> None:
        """End the stream (idempotent)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class TaggedStream(StreamBase):
    """One request and its tagged answer at a time on a bidi stream (see the module doc)."""

    _what = "stream"
    """The RPC's name, for the tag-mismatch error."""

    def __init__(self) -> None:
        self._call: Any = None
        self._lock = asyncio.Lock()
        self._tag = 0

    def _open(self) -> Any:
        """Start the RPC (the subclass knows its stub and metadata)."""
        raise NotImplementedError

    async def _roundtrip(self, request: Any) -> Any:
        """Send ``request`` (its ``tag`` is set here) and return its answer."""
        async with self._lock:
            if self._call is None:
                self._call = self._open()
            self._tag += 1
            request.tag = self._tag
            call = self._call
            try:
                await call.write(request)
                resp = await call.read()
            except grpc.RpcError as e:
                self._call = None  # the stream is over; the next request opens another
                raise from_rpc_error(e) from None
            except BaseException as e:
                # Cancelled between the request and its answer: that answer would pair with
                # the next request, so this stream is dropped. The daemon sees the cancel; a
                # request already running there finishes as a thread's syscall would.
                self._call = None
                call.cancel()
                if isinstance(e, asyncio.CancelledError) and cancelled_under_us():
                    raise ConnectionError(f"{self._what}: the connection was closed") from None
                raise
            if resp is grpc.aio.EOF:
                self._call = None
                raise from_rpc_error(await stream_ended(call))
            if resp.tag != request.tag:  # the proto promises order; a mismatch is a bug
                raise RuntimeError(f"{self._what} answered tag {resp.tag} to {request.tag}")
            return resp

    async def close(self) -> None:
        """End the stream (idempotent)."""
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
            call.cancel()
