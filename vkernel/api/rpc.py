"""Cross-cutting RPC concerns in one interceptor: TCP token, errno mapping, rpc_finished logs.

Servicers stay thin: they raise KernelError (or RpcFailure) and this layer turns it into a
gRPC status; every call ends with exactly one ``rpc_finished`` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
import structlog

from vkernel.api.errors import status_for, status_for_kernel_error
from vkernel.kernel.errors import KernelError
from vkernel.sessions import Session, SessionTable

log = structlog.get_logger("vkernel.rpc")

SESSION_METADATA_KEY = "vkernel-session"
# Calls that need neither the TCP token nor a session: probes and discovery.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
# Calls that live as long as their client does; shutdown does not wait for them (an idle
# Access stream would otherwise hold the whole grace; server.stop() ends it).
LONG_LIVED_METHODS = frozenset(
    {
        "/vkernel.v1.SessionService/Keepalive",
        "/grpc.health.v1.Health/Watch",
        "/vkernel.v1.MemoryService/Access",
    }
)


class RpcFailure(Exception):
    """A status the API layer decides on itself (UNAUTHENTICATED …), not a kernel errno."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status_for(code, message, reason)


@dataclass
class CallInfo:
    """What one call learned about itself, for its rpc_finished line."""

    method: str
    session: str | None = None
    pid: int | None = None


_current_call: ContextVar[CallInfo | None] = ContextVar("vkernel_call", default=None)


def note_pid(pid: int) -> None:
    """Record the process a call acts on, for its log line."""
    info = _current_call.get()
    if info is not None:
        info.pid = pid


def require_session(context: grpc.aio.ServicerContext[Any, Any], table: SessionTable) -> Session:
    """The caller's live session from its metadata, or UNAUTHENTICATED."""
    token = _metadata_value(context, SESSION_METADATA_KEY)
    if token is None:
        raise RpcFailure(
            grpc.StatusCode.UNAUTHENTICATED, "no vkernel-session metadata", "NO_SESSION"
        )
    session = table.lookup(token)
    if session is None:
        raise RpcFailure(
            grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session", "SESSION_EXPIRED"
        )
    info = _current_call.get()
    if info is not None:
        info.session = session.id
    return session


def require_live(session: Session) -> None:
    """UNAUTHENTICATED when ``session`` ended under a long-lived stream of its own."""
    if session.closed:
        raise RpcFailure(
            grpc.StatusCode.UNAUTHENTICATED, "the session has ended", "SESSION_EXPIRED"
        )


class StreamTasks:
    """The handler tasks of a servicer's long-lived streams, so daemon shutdown can end them
    at once instead of waiting its grace on them (they never finish on their own)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self) -> None:
        """Register the running stream handler (until it finishes)."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        """Daemon shutdown: cancel every tracked stream."""
        for task in list(self._tasks):
            task.cancel()


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


class InflightCalls:
    """Counts the calls shutdown must let finish (everything but long-lived streams)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:
            self._idle = anyio.Event()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no counted call is running."""
        await self._idle.wait()


class KernelInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler with the token check, error mapping and the rpc_finished log."""

    def __init__(self, token: str | None, inflight: InflightCalls) -> None:
        self._token = token
        self._inflight = inflight

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(method, handler.stream_unary, drain_on_error=True),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _check_token(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._token is None or method in OPEN_METHODS:
            return
        if context.peer().startswith("unix"):
            return  # the socket's file mode is the access control
        header = _metadata_value(context, "authorization") or ""
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(presented, self._token):
            raise RpcFailure(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token", "BAD_TOKEN"
            )

    def _wrap(self, method: str, behavior: Any, drain_on_error: bool = False) -> Any:
        counted = method not in LONG_LIVED_METHODS
        interceptor = self

        async def run_with_status(
            call: Callable[[], Awaitable[Any]], context: Any, requests: Any = None
        ) -> Any:
            info = CallInfo(method)
            _current_call.set(info)
            code = grpc.StatusCode.OK
            start = time.perf_counter()
            if counted:
                interceptor._inflight.enter()
            try:
                interceptor._check_token(method, context)
                return await call()
            except KernelError as e:
                status = status_for_kernel_error(e)
                code = status.code
                await _drain(requests)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except RpcFailure as e:
                code = e.status.code
                await context.abort(code, e.status.details, e.status.trailing_metadata)
            except grpc.aio.AbortError:
                code = _context_code(context) or grpc.StatusCode.UNKNOWN
                raise
            except anyio.get_cancelled_exc_class():
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_crashed", method=method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (see daemon log)")
            finally:
                if counted:
                    interceptor._inflight.leave()
                log.info(
                    "rpc_finished",
                    method=method,
                    code=code.name,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    session=info.session,
                    pid=info.pid,
                )

        if inspect.isasyncgenfunction(behavior):
            # A generator servicer is relayed through context.write, so the handler grpc
            # sees is coroutine-style and the status logic above covers it too.
            async def relay(request: Any, context: Any) -> None:
                async def pump() -> None:
                    async for item in behavior(request, context):
                        await context.write(item)

                await run_with_status(pump, context)

            return relay

        async def wrapped(request: Any, context: Any) -> Any:
            return await run_with_status(
                lambda: behavior(request, context),
                context,
                request if drain_on_error else None,
            )

        return wrapped


async def _drain(requests: Any) -> None:
    """Read what a client-streaming caller still sends before answering with an error.

    Ending the call while request data is in flight makes gRPC core report the race as
    INTERNAL to the client instead of our status; a client stops sending once the call is
    done, so draining first delivers the real errno.
    """
    if requests is None:
        return
    with contextlib.suppress(Exception):
        async for _ in requests:
            pass


def _context_code(context: Any) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):  # no code() on this context
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    return None
