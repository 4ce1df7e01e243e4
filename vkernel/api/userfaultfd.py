"""UserfaultfdService: userfaultfd handles held by sessions, fault messages, resolution.

Thin: decode, call :mod:`vkernel.kernel.userfaultfd`, encode. A handle stands for the uffd's
open file: each holder session is one reference (``UserfaultfdCtx.get``); Grant passes the
"fd" to another session (the monitor); CloseUffd or the holder's session ending drops it, and
the last drop is userfaultfd_release (blocked faults resolve as ordinary faults).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from vkernel.api.process import owned_task
from vkernel.api.rpc import RpcFailure, require_session
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.sessions import Session, SessionTable
from vkernel.v1 import userfaultfd_service_pb2 as pb
from vkernel.v1 import userfaultfd_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
MAX_RESOLVE_OPS = 65536
"""Operations per UffdResolve call."""


class UffdHandle:
    """One uffd as the API sees it: the ctx, the task it was created on, its holder sessions."""

    __slots__ = ("ctx", "holders", "id", "task")

    def __init__(self, hid: int, ctx: uf.UserfaultfdCtx, task: Task) -> None:
        self.id = hid
        self.ctx = ctx
        self.task = task
        self.holders: set[str] = set()


class UffdTable:
    """Handles by id; session close hooks drop their holds."""

    def __init__(self, sessions: SessionTable) -> None:
        self._sessions = sessions
        self._ids = itertools.count(1)
        self._handles: dict[int, UffdHandle] = {}
        self._hooked: set[str] = set()
        self._releases: set[asyncio.Task[None]] = set()

    def add(self, session: Session, ctx: uf.UserfaultfdCtx, task: Task) -> UffdHandle:
        """A new handle whose first holder is ``session`` (ctx already has that reference)."""
        h = UffdHandle(next(self._ids), ctx, task)
        self._handles[h.id] = h
        h.holders.add(session.id)
        self._hook(session)
        return h

    def _hook(self, session: Session) -> None:
        if session.id not in self._hooked:
            self._hooked.add(session.id)
            session.on_close(self._session_closed)

    def held(self, session: Session, hid: int) -> UffdHandle:
        """The handle ``hid`` if ``session`` holds it: EBADF otherwise (as an unknown fd)."""
        h = self._handles.get(hid)
        if h is None or session.id not in h.holders:
            raise KernelError(errno.EBADF, f"no userfaultfd handle {hid}", field="handle")
        return h

    def grant(self, h: UffdHandle, grantee: Session) -> None:
        """Another holder (a passed fd): one more reference."""
        if grantee.id in h.holders:
            return
        h.holders.add(grantee.id)
        h.ctx.get()
        self._hook(grantee)

    async def drop(self, h: UffdHandle, session_id: str) -> None:
        """close(2) by one holder."""
        h.holders.discard(session_id)
        if not h.holders:
            self._handles.pop(h.id, None)
        await h.ctx.put()

    def _session_closed(self, session: Session) -> None:
        self._hooked.discard(session.id)
        for h in [h for h in self._handles.values() if session.id in h.holders]:
            t = asyncio.get_running_loop().create_task(self.drop(h, session.id))
            self._releases.add(t)
            t.add_done_callback(self._releases.discard)


def _msg(m: uf.UffdMsg) -> pb.UffdMessage:
    return pb.UffdMessage(
        event=m.event,
        flags=m.flags,
        address=m.address,
        ptid=m.ptid,
        ufd=m.ufd,
        start=m.start,
        end=m.to if m.event == uf.UFFD_EVENT_REMAP else m.end,
        len=m.length,
    )


class UserfaultfdServicer(pb_grpc.UserfaultfdServiceServicer):
    """Thin servicer over the uffd handle table."""

    def __init__(self, kernel: Kernel, sessions: SessionTable) -> None:
        self._kernel = kernel
        self._sessions = sessions
        self._table = UffdTable(sessions)
        self._streams: set[asyncio.Task[Any]] = set()

    def stop_streams(self) -> None:
        """Daemon shutdown: end every ReadUffdMessages stream."""
        for task in list(self._streams):
            task.cancel()

    async def CreateUffd(
        self, request: pb.CreateUffdRequest, context: Context
    ) -> pb.CreateUffdResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        ctx = uf.sys_userfaultfd(task, request.flags)
        return pb.CreateUffdResponse(handle=self._table.add(session, ctx, task).id)

    async def UffdApi(self, request: pb.UffdApiRequest, context: Context) -> pb.UffdApiResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        features, ioctls = h.ctx.api(h.task, request.api, request.features)
        return pb.UffdApiResponse(features=features, ioctls=ioctls)

    async def UffdRegister(
        self, request: pb.UffdRegisterRequest, context: Context
    ) -> pb.UffdRegisterResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        ioctls = await uf.uffdio_register(h.ctx, None, request.start, request.len, request.mode)
        return pb.UffdRegisterResponse(ioctls=ioctls)

    async def UffdUnregister(
        self, request: pb.UffdUnregisterRequest, context: Context
    ) -> pb.UffdUnregisterResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        await uf.uffdio_unregister(h.ctx, None, request.start, request.len)
        return pb.UffdUnregisterResponse()

    async def ReadUffdMessages(
        self, request: pb.ReadUffdMessagesRequest, context: Context
    ) -> AsyncIterator[pb.ReadUffdMessagesResponse]:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        n = request.max_messages or 64
        if n > 4096:
            raise einval("max_messages above 4096", "max_messages")
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
        while True:
            if session.closed or session.id not in h.holders:
                raise RpcFailure(
                    grpc.StatusCode.CANCELLED, "the userfaultfd handle was closed", "UFFD_CLOSED"
                )
            msgs = await h.ctx.read(n * uf.UFFD_MSG_SIZE, nonblock=False)
            if not msgs:
                return  # released
            yield pb.ReadUffdMessagesResponse(messages=[_msg(m) for m in msgs])

    async def UffdResolve(
        self, request: pb.UffdResolveRequest, context: Context
    ) -> pb.UffdResolveResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        if len(request.ops) > MAX_RESOLVE_OPS:
            raise einval(f"more than {MAX_RESOLVE_OPS} operations", "ops")
        results: list[pb.UffdResolveResult] = []
        for op in request.ops:
            try:
                kind = op.WhichOneof("op")
                if kind == "copy":
                    done = await uf.uffdio_copy(
                        h.ctx, None, op.copy.dst, op.copy.data, op.copy.mode
                    )
                elif kind == "zeropage":
                    z = op.zeropage
                    done = await uf.uffdio_zeropage(h.ctx, None, z.start, z.len, z.mode)
                elif kind == "wake":
                    uf.uffdio_wake(h.ctx, op.wake.start, op.wake.len)
                    done = 0
                elif kind == "writeprotect":
                    w = op.writeprotect
                    await uf.uffdio_writeprotect(h.ctx, None, w.start, w.len, w.mode)
                    done = 0
                elif kind == "poison":
                    z = op.poison
                    done = await uf.uffdio_poison(h.ctx, None, z.start, z.len, z.mode)
                elif kind == "move":
                    mv = op.move
                    done = await uf.uffdio_move(h.ctx, None, mv.dst, mv.src, mv.len, mv.mode)
                elif kind == "continue":
                    c = getattr(op, "continue")
                    done = await uf.uffdio_continue(h.ctx, None, c.start, c.len, c.mode)
                else:
                    raise einval("an operation names no ioctl", "ops")
                results.append(pb.UffdResolveResult(result=done, errno=0))
            except uf.PartialFill as e:
                results.append(pb.UffdResolveResult(result=e.done, errno=errno.EAGAIN))
            except KernelError as e:
                results.append(pb.UffdResolveResult(result=-e.errno, errno=e.errno))
        return pb.UffdResolveResponse(results=results)

    async def GrantUffd(
        self, request: pb.GrantUffdRequest, context: Context
    ) -> pb.GrantUffdResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        grantee = self._sessions.by_id(request.grantee_session_id)
        if grantee is None or grantee.closed:
            raise KernelError(errno.ESRCH, "no such session", field="grantee_session_id")
        self._table.grant(h, grantee)
        return pb.GrantUffdResponse()

    async def CloseUffd(
        self, request: pb.CloseUffdRequest, context: Context
    ) -> pb.CloseUffdResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        await self._table.drop(h, session.id)
        return pb.CloseUffdResponse()
