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
import socket
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import grpc

from vkernel.api.process import owned_task
from vkernel.api.rpc import RpcFailure, StreamTasks, require_live, require_session
from vkernel.api.uffd_fd import UffdFile
from vkernel.kernel import mm_api
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PAGE_MASK
from vkernel.sessions import Session, SessionTable
from vkernel.v1 import userfaultfd_service_pb2 as pb
from vkernel.v1 import userfaultfd_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
MAX_RESOLVE_OPS = 65536
"""Operations per UffdResolve call (and per UffdResolveStream message)."""
MAX_SRC_COPY = 64 << 20
"""Bytes one COPY from the monitor's address space may name: the daemon holds them in memory
between the source loads and the fill."""


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

    def install(self, session: Session, m: uf.UffdMsg) -> int:
        """The ``ufd`` a read gives ``m``: UFFD_EVENT_FORK carries the child's new uffd, and as
        resolve_userfault_fork() installs it as a new fd of the reader, the reading session
        becomes its holder (the ctx arrives with that reference); 0 for other messages."""
        if m.event == uf.UFFD_EVENT_FORK and m.fork_ctx is not None and m.fork_task is not None:
            return self.add(session, m.fork_ctx, m.fork_task).id
        return 0

    def open_fd(self, session: Session, hid: int, sock: socket.socket) -> Coroutine[Any, Any, None]:
        """The uffd itself for a co-located holder (:mod:`vkernel.api.uffd_fd`): one more
        reference, as dup(2) makes; returns the coroutine serving it until it is closed."""
        h = self.held(session, hid)
        h.ctx.get()
        return UffdFile(sock, h.ctx, h.task, lambda m: self.install(session, m)).serve()

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


def _msg(m: uf.UffdMsg, ufd: int = 0) -> pb.UffdMessage:
    return pb.UffdMessage(
        event=m.event,
        flags=m.flags,
        address=m.address,
        ptid=m.ptid,
        ufd=ufd or m.ufd,
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
        self._streams = StreamTasks()

    def stop_streams(self) -> None:
        """Daemon shutdown: end every ReadUffdMessages stream."""
        self._streams.stop()

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
        self._streams.track()
        while True:
            if session.closed or session.id not in h.holders:
                raise RpcFailure(
                    grpc.StatusCode.CANCELLED, "the userfaultfd handle was closed", "UFFD_CLOSED"
                )
            msgs = await h.ctx.read(n * uf.UFFD_MSG_SIZE, nonblock=False)
            if not msgs:
                return  # released
            yield pb.ReadUffdMessagesResponse(messages=[self._install(session, m) for m in msgs])

    async def UffdRead(
        self, request_iterator: AsyncIterator[pb.UffdReadRequest], context: Context
    ) -> AsyncIterator[pb.UffdReadResponse]:
        # A plain linear generator, relayed by the interceptor with context.write. Unlike
        # ReadUffdMessages it takes nothing from the uffd until a request asks for it.
        session = require_session(context, self._sessions)
        self._streams.track()
        async for request in request_iterator:
            require_live(session)
            h = self._table.held(session, request.handle)
            n = request.max_messages or 64
            if n > 4096:
                raise einval("max_messages above 4096", "max_messages")
            try:
                msgs = await h.ctx.read(n * uf.UFFD_MSG_SIZE, nonblock=request.nonblock)
            except KernelError as e:
                yield pb.UffdReadResponse(tag=request.tag, errno=e.errno)
                continue
            if not msgs:
                yield pb.UffdReadResponse(tag=request.tag, released=True)
                return
            yield pb.UffdReadResponse(
                tag=request.tag, messages=[self._install(session, m) for m in msgs]
            )

    def _install(self, session: Session, m: uf.UffdMsg) -> pb.UffdMessage:
        """A message as the reader sees it (a FORK's new uffd installed: UffdTable.install)."""
        return _msg(m, self._table.install(session, m))

    @property
    def table(self) -> UffdTable:
        """The handle table (the side channel opens uffd fds from it)."""
        return self._table

    async def UffdResolve(
        self, request: pb.UffdResolveRequest, context: Context
    ) -> pb.UffdResolveResponse:
        session = require_session(context, self._sessions)
        h = self._table.held(session, request.handle)
        return pb.UffdResolveResponse(results=await self._resolve(session, h, request.ops))

    async def UffdResolveStream(
        self, request_iterator: AsyncIterator[pb.UffdResolveStreamRequest], context: Context
    ) -> AsyncIterator[pb.UffdResolveStreamResponse]:
        # A plain linear generator (no task group, no cancel scope), relayed by the
        # interceptor with context.write, whose await is the backpressure.
        session = require_session(context, self._sessions)
        self._streams.track()
        async for request in request_iterator:
            require_live(session)  # the monitor's session ended under its stream
            h = self._table.held(session, request.handle)
            results = await self._resolve(session, h, request.ops)
            # The faults this request resolved were woken into the ready queue; one trip
            # through the loop lets them finish (and start their own answers) before this
            # answer is serialised and sent: the monitor does not wait for it, the faulting
            # accesses do.
            await asyncio.sleep(0)
            yield pb.UffdResolveStreamResponse(tag=request.tag, results=results)

    async def _resolve(
        self, session: Session, h: UffdHandle, ops: Sequence[pb.UffdResolveOp]
    ) -> list[pb.UffdResolveResult]:
        """Run the ioctls in order: one ``(result, errno)`` each (result = bytes done or
        -errno; errno EAGAIN = partial, the result then being the bytes done)."""
        if len(ops) > MAX_RESOLVE_OPS:
            raise einval(f"more than {MAX_RESOLVE_OPS} operations", "ops")
        results: list[pb.UffdResolveResult] = []
        for op in ops:
            try:
                kind = op.WhichOneof("op")
                if kind == "copy":
                    done = await self._copy(session, h, op.copy)
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
        return results

    async def _copy(self, session: Session, h: UffdHandle, c: pb.UffdCopyOp) -> int:
        """UFFDIO_COPY from inline bytes or, as Linux's ``src``, from the monitor's process."""
        if not c.src_pid:
            if c.src or c.len:
                raise einval("src and len need src_pid (the process src lies in)", "src_pid")
            return await uf.uffdio_copy(h.ctx, None, c.dst, c.data, c.mode)
        if c.data:
            raise einval("a COPY names both inline data and a src", "data")
        if c.dst & ~PAGE_MASK:
            raise einval("dst not page aligned", "dst")
        if not c.len or c.len & ~PAGE_MASK:
            raise einval("len must be a non-zero multiple of the page size", "len")
        if c.len > MAX_SRC_COPY:
            raise einval(f"len above {MAX_SRC_COPY} bytes in one COPY", "len")
        if c.src + c.len > 1 << 64:
            raise einval("src + len wraps around the address space", "src")
        src_task = owned_task(self._kernel, session, c.src_pid)
        # copy_from_user() of the source as the monitor's own loads: pages it has not touched
        # fault in, an unmapped one stops the copy there (EFAULT; EAGAIN + the bytes before
        # it when some whole pages were readable, as mfill_atomic's partial result).
        parts: list[memoryview] = []
        fault: KernelError | None = None
        try:
            async for chunk in mm_api.read_user(src_task, c.src, c.len):
                parts.append(chunk)
        except KernelError as e:
            fault = e
        data: bytes | memoryview = parts[0] if len(parts) == 1 else b"".join(parts)
        whole = len(data) & PAGE_MASK
        if fault is not None and not whole:
            raise KernelError(errno.EFAULT, f"src {c.src:#x} is not readable", field="src")
        done = await uf.uffdio_copy(h.ctx, None, c.dst, memoryview(data)[:whole], c.mode)
        if whole < c.len:
            raise uf.PartialFill(done, errno.EFAULT)
        return done

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
