"""SessionService: open, keep alive, close."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import grpc

from vkernel.api.rpc import RpcFailure, require_session
from vkernel.sessions import SessionTable
from vkernel.v1 import session_service_pb2 as pb
from vkernel.v1 import session_service_pb2_grpc as pb_grpc

_MAX_CLIENT_NAME = 256


class SessionServicer(pb_grpc.SessionServiceServicer):
    """Thin servicer over the session table."""

    def __init__(self, sessions: SessionTable, idle_timeout: float) -> None:
        self._sessions = sessions
        self._idle_timeout = idle_timeout

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OpenSessionResponse:
        name = request.client_name[:_MAX_CLIENT_NAME] or "anonymous"
        session = self._sessions.open(name)
        return pb.OpenSessionResponse(
            session_id=session.id,
            token=session.token,
            attach_timeout_ms=int(self._sessions.attach_timeout * 1000),
        )

    async def Keepalive(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        session = require_session(context, self._sessions)
        task = asyncio.current_task()
        assert task is not None
        if not self._sessions.attach(session, task):
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                "a keepalive stream is already attached to this session",
                "KEEPALIVE_ATTACHED",
            )
        reason = "keepalive stream ended"
        try:
            while True:
                with anyio.move_on_after(self._idle_timeout) as scope:
                    request = await context.read()
                if scope.cancelled_caught:
                    reason = f"no keepalive for {self._idle_timeout:g}s"
                    return
                if request is grpc.aio.EOF:
                    return
                await context.write(
                    pb.KeepaliveResponse(sequence=request.sequence, uptime_ns=time.monotonic_ns())
                )
        except anyio.get_cancelled_exc_class():
            reason = "keepalive stream cancelled"
            raise
        finally:
            self._sessions.close(session, reason)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        session = require_session(context, self._sessions)
        exited = self._sessions.close(session, "closed by client")
        return pb.CloseSessionResponse(processes_exited=exited)
