"""The userfaultfd as a file descriptor, for monitors on the daemon's host.

Linux's monitors hold the uffd as an fd: they read(2) ``struct uffd_msg`` records from it and
call ioctl(2) on it, and a process hands it to its monitor over a UNIX socket (Firecracker's
page-fault handler and CRIU's lazy-pages daemon get theirs that way). gRPC cannot carry an
fd, and its per-message cost (two stream messages ≈ one bidi round trip) is most of a fault's
round trip, so a co-located holder of a uffd handle can ask the daemon's side channel
(:mod:`vkernel.dma_socket`) for the uffd itself and gets one end of a ``SOCK_SEQPACKET``
socketpair as SCM_RIGHTS: a real fd that the monitor polls, reads and writes.

Each datagram the monitor writes is one call; each datagram it reads is that call's answer,
both little-endian with Linux's own struct layouts:

- request: ``u32 cmd, u32 tag`` then the argument.

  - ``cmd == UFFD_FD_READ`` (0): read(2) + poll: ``u32 count, u32 flags``; waits for the
    first message unless ``flags`` has O_NONBLOCK. Answer: ``count // 32`` messages at most,
    each a 32-byte ``struct uffd_msg`` (no messages: the uffd was released).
  - any other ``cmd`` is an ioctl number (``UFFDIO_COPY`` = 0xc028aa03 …) followed by its
    struct; UFFDIO_COPY's source bytes follow ``struct uffdio_copy`` (its ``src`` is not
    used: the bytes are the source), at most :data:`MAX_COPY_BYTES` per datagram.

- answer: ``u32 cmd, u32 tag, i32 errno, u32 0`` then, for an ioctl, its struct as the kernel
  writes it back (``copy`` / ``zeropage`` / ``mapped`` / ``updated`` / ``move`` = bytes done
  or -errno; errno EAGAIN = partial, as ioctl(2) returns it; UFFDIO_API's features and
  ioctls; UFFDIO_REGISTER's ioctls). Answers carry the request's tag: a READ that waits does
  not hold up the ioctls sent after it.

The fd is one more reference to the uffd, as a dup(2) is: closing it is close(2) (the last
reference is userfaultfd_release), and it closes with its session, as a process's fds close
with the process. Only a session that holds the handle may open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from vkernel.api.uffd_wire import (
    ANSWER,
    COPY,
    FORK,
    MAX_COPY_BYTES,
    MAX_DATAGRAM,
    PAGEFAULT,
    RANGE2,
    RANGE3,
    RANGE_MODE,
    RANGE_MODE_RESULT,
    READ_ARGS,
    REQUEST,
    SOCKET_BUFFER,
    UFFD_FD_READ,
    UFFD_MSG,
    UFFDIO_API,
    UFFDIO_CONTINUE,
    UFFDIO_COPY,
    UFFDIO_MOVE,
    UFFDIO_POISON,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_WRITEPROTECT,
    UFFDIO_ZEROPAGE,
)
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.eager import start_eager
from vkernel.kernel.errors import KernelError
from vkernel.kernel.task import Task

log = structlog.get_logger("vkernel.uffd_fd")

MAX_READ_COUNT = 4096 * uf.UFFD_MSG_SIZE
MAX_INFLIGHT = 64
"""Calls that slept and are still running: beyond it the daemon stops reading the fd."""


def pack_uffd_msg(m: uf.UffdMsg, ufd: int) -> bytes:
    """struct uffd_msg as read(2) returns it (``ufd``: FORK's new fd, here its handle)."""
    ev = m.event
    if ev == uf.UFFD_EVENT_PAGEFAULT:
        arg = PAGEFAULT.pack(m.flags, m.address, m.ptid)
    elif ev == uf.UFFD_EVENT_FORK:
        arg = FORK.pack(ufd)
    elif ev == uf.UFFD_EVENT_REMAP:
        arg = RANGE3.pack(m.start, m.to, m.length)
    else:  # REMOVE, UNMAP: {start, end}
        arg = RANGE2.pack(m.start, m.end) + bytes(8)
    return UFFD_MSG.pack(ev, 0, 0, 0, arg)


Install = Callable[[uf.UffdMsg], int]
"""How a read installs a FORK message's new uffd for the reader: returns its handle."""


class UffdFile:
    """The daemon's end of one uffd fd: reads and ioctls in, answers out."""

    def __init__(
        self, sock: socket.socket, ctx: uf.UserfaultfdCtx, task: Task, install: Install
    ) -> None:
        self.sock = sock
        self.ctx = ctx
        self.task = task
        """The task the uffd was created on (UFFDIO_API's capability check, as the servicer)."""
        self._install = install
        self._reads: deque[tuple[int, int, int]] = deque()
        """read(2)s not yet answered, in order: (tag, count, flags). The first may be waiting
        on the uffd's wait queue (``_pump_reads`` is then its wake function)."""
        self._outq: deque[bytes] = deque()
        """Answers waiting for room in the socket (the monitor is not reading)."""
        self._writer: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[None]] = set()
        """Calls that slept (a lock, the answer's turn) and go on in a task."""
        self._watched = True
        self._closed: asyncio.Future[None]

    async def serve(self) -> None:
        """Until the monitor closes its end (or the task is cancelled: its session ended)."""
        loop = asyncio.get_running_loop()
        sock = self.sock
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self._closed = loop.create_future()
        loop.add_reader(sock.fileno(), self._on_readable)
        try:
            await self._closed
        finally:
            self._watching(False)
            self.ctx.poll_cancel(self._pump_reads)
            self._reads.clear()
            for task in [*self._inflight, *([self._writer] if self._writer else [])]:
                task.cancel()
            sock.close()
            await self.ctx.put()

    def _on_readable(self) -> None:
        """One datagram. Its call starts here, in the reader callback, and runs until it
        first sleeps (the rest goes on in a task): a COPY fills and wakes its fault without a
        trip through the loop to a serving task first. One per callback: the fault a COPY
        woke runs before the next datagram (often the monitor's next read) is taken; the
        socket stays readable, so the loop calls back for it."""
        if self._closed.done():
            return
        try:
            data = self.sock.recv(MAX_DATAGRAM + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the monitor closed the fd
            self._closed.set_result(None)
            return
        rest = start_eager(self._request(memoryview(data)))
        if rest is not None:
            self._inflight.add(rest)
            rest.add_done_callback(self._finished)
            if len(self._inflight) >= MAX_INFLIGHT:
                self._watching(False)  # backpressure: the monitor's sends block

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("uffd_fd_call_failed", error=repr(task.exception()))
        self._resume_reading()

    def _watching(self, on: bool) -> None:
        if on == self._watched:
            return
        self._watched = on
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(self.sock.fileno(), self._on_readable)
        else:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.sock.fileno())

    async def _request(self, data: memoryview) -> None:
        if len(data) < REQUEST.size:
            self._answer(0, 0, errno.EINVAL, b"")
            return
        if len(data) > MAX_DATAGRAM:
            cmd, tag = REQUEST.unpack_from(data)
            self._answer(cmd, tag, errno.E2BIG, b"")
            return
        cmd, tag = REQUEST.unpack_from(data)
        arg = data[REQUEST.size :]
        if cmd == UFFD_FD_READ:
            if len(arg) != READ_ARGS.size:
                self._answer(cmd, tag, errno.EINVAL, b"")
                return
            count, flags = READ_ARGS.unpack(arg)
            self._reads.append((tag, count, flags))
            if len(self._reads) == 1:  # else the first one is waiting and pumps the rest
                self._pump_reads()
            return
        handler = _IOCTLS.get(cmd)
        if handler is None:
            self._answer(cmd, tag, errno.ENOTTY, b"")  # no such ioctl on a uffd
            return
        size, run = handler
        if len(arg) < size or (cmd != UFFDIO_COPY and len(arg) != size):
            self._answer(cmd, tag, errno.EINVAL, b"")
            return
        try:
            err, out = await run(self.ctx, self.task, arg)
        except Exception:  # a bug, not an errno: logged, answered EIO, the fd goes on
            log.exception("uffd_fd_ioctl_crashed", cmd=hex(cmd))
            err, out = errno.EIO, b""
        if cmd in _WAKING:
            # The faults this call woke are in the ready queue: the answer queues behind them,
            # so they finish (and start their own answers) before it goes out. The monitor has
            # nothing to wait for; the faulting accesses do.
            asyncio.get_running_loop().call_soon(self._answer, cmd, tag, err, out)
            return
        self._answer(cmd, tag, err, out)

    def _pump_reads(self) -> None:
        """Answer the read(2)s in order, as far as they need not sleep; when the first must,
        wait for the uffd's wakeup with this as the wake function (poll_wait): the answer
        then leaves inside the fault that queued the message, with no task switch."""
        while self._reads:
            tag, count, flags = self._reads[0]
            if not self._read_now(tag, count, flags):
                self.ctx.poll_wait(self._pump_reads)
                return
            self._reads.popleft()

    def _read_now(self, tag: int, count: int, flags: int) -> bool:
        """Answer one read(2) if it need not sleep: messages, EOF, or an error (EAGAIN too
        under O_NONBLOCK). False: it must wait. Never raises (it runs inside wakeups)."""
        if count > MAX_READ_COUNT:
            self._answer(UFFD_FD_READ, tag, errno.EINVAL, b"")
            return True
        try:
            msgs = self.ctx.read_nowait(count)
        except KernelError as e:
            if e.errno == errno.EAGAIN and not flags & uf.O_NONBLOCK:
                return False
            self._answer(UFFD_FD_READ, tag, e.errno, b"")
            return True
        try:
            out = b"".join(pack_uffd_msg(m, self._install(m)) for m in msgs)
        except Exception:  # the messages are taken: a reader that fails here loses them,
            log.exception("uffd_fd_read_failed")  # as a read(2) into a bad buffer does
            out = b""
        self._answer(UFFD_FD_READ, tag, 0, out)
        return True

    def _answer(self, cmd: int, tag: int, err: int, out: bytes) -> None:
        """Send one answer now or, when the monitor is not reading its answers, queue it
        for one writer and stop taking requests until the queue has drained."""
        msg = ANSWER.pack(cmd, tag, err, 0) + out
        if not self._outq:
            try:
                self.sock.send(msg)
                return
            except BlockingIOError:
                pass
            except OSError:
                return  # the monitor went away; serve() sees the EOF
        self._outq.append(msg)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain_answers())
            self._watching(False)

    async def _drain_answers(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._outq:
                await loop.sock_sendall(self.sock, self._outq[0])
                self._outq.popleft()
        except OSError:
            self._outq.clear()  # the monitor went away; serve() sees the EOF
        finally:
            self._writer = None
            self._resume_reading()

    def _resume_reading(self) -> None:
        """Take requests again once the answers are out and the sleeping calls few."""
        idle = self._writer is None and len(self._inflight) < MAX_INFLIGHT // 2
        if idle and not self._closed.done():
            self._watching(True)


IoctlRun = Callable[[uf.UserfaultfdCtx, Task, memoryview], Awaitable[tuple[int, bytes]]]


async def _filled(call: Awaitable[int]) -> tuple[int, int]:
    """A fill ioctl's (errno, result): result = bytes done or -errno; EAGAIN = partial."""
    try:
        return 0, await call
    except uf.PartialFill as e:
        return errno.EAGAIN, e.done
    except KernelError as e:
        return e.errno, -e.errno


async def _plain(call: Awaitable[object]) -> int:
    try:
        await call
    except KernelError as e:
        return e.errno
    return 0


async def _api(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_api(): the handshake on an fd its creator already set up, or not."""
    api, features, _ = RANGE3.unpack(arg)
    try:
        got, ioctls = ctx.api(task, api, features)
    except KernelError as e:
        return e.errno, RANGE3.pack(api, 0, 0)
    return 0, RANGE3.pack(api, got, ioctls)


async def _register(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_register()."""
    start, length, mode, _ = RANGE_MODE_RESULT.unpack(arg)
    try:
        ioctls = await uf.uffdio_register(ctx, None, start, length, mode)
    except KernelError as e:
        return e.errno, bytes(arg)
    return 0, RANGE_MODE_RESULT.pack(start, length, mode, ioctls)


async def _unregister(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_unregister()."""
    start, length = RANGE2.unpack(arg)
    return await _plain(uf.uffdio_unregister(ctx, None, start, length)), bytes(arg)


async def _wake(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_wake()."""
    start, length = RANGE2.unpack(arg)
    try:
        uf.uffdio_wake(ctx, start, length)
    except KernelError as e:
        return e.errno, bytes(arg)
    return 0, bytes(arg)


async def _copy(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_copy(): the source bytes follow the struct."""
    dst, src, length, mode, _ = COPY.unpack_from(arg)
    data = arg[COPY.size :]
    if len(data) != length or length > MAX_COPY_BYTES:
        return errno.EINVAL, COPY.pack(dst, src, length, mode, -errno.EINVAL)
    err, done = await _filled(uf.uffdio_copy(ctx, None, dst, data, mode))
    return err, COPY.pack(dst, src, length, mode, done)


async def _move(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_move()."""
    dst, src, length, mode, _ = COPY.unpack(arg)
    err, done = await _filled(uf.uffdio_move(ctx, None, dst, src, length, mode))
    return err, COPY.pack(dst, src, length, mode, done)


def _range_fill(
    fill: Callable[[uf.UserfaultfdCtx, None, int, int, int], Awaitable[int]],
) -> IoctlRun:
    """ZEROPAGE, CONTINUE and POISON: {range, mode, result}."""

    async def run(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
        start, length, mode, _ = RANGE_MODE_RESULT.unpack(arg)
        err, done = await _filled(fill(ctx, None, start, length, mode))
        return err, RANGE_MODE_RESULT.pack(start, length, mode, done)

    return run


async def _writeprotect(ctx: uf.UserfaultfdCtx, task: Task, arg: memoryview) -> tuple[int, bytes]:
    """userfaultfd_writeprotect()."""
    start, length, mode = RANGE_MODE.unpack(arg)
    return await _plain(uf.uffdio_writeprotect(ctx, None, start, length, mode)), bytes(arg)


_IOCTLS: dict[int, tuple[int, IoctlRun]] = {
    UFFDIO_API: (RANGE3.size, _api),
    UFFDIO_REGISTER: (RANGE_MODE_RESULT.size, _register),
    UFFDIO_UNREGISTER: (RANGE2.size, _unregister),
    UFFDIO_WAKE: (RANGE2.size, _wake),
    UFFDIO_COPY: (COPY.size, _copy),
    UFFDIO_ZEROPAGE: (RANGE_MODE_RESULT.size, _range_fill(uf.uffdio_zeropage)),
    UFFDIO_MOVE: (COPY.size, _move),
    UFFDIO_WRITEPROTECT: (RANGE_MODE.size, _writeprotect),
    UFFDIO_CONTINUE: (RANGE_MODE_RESULT.size, _range_fill(uf.uffdio_continue)),
    UFFDIO_POISON: (RANGE_MODE_RESULT.size, _range_fill(uf.uffdio_poison)),
}
"""ioctl number → (the struct's size, the call)."""
_WAKING = frozenset(
    {UFFDIO_WAKE, UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_MOVE, UFFDIO_CONTINUE, UFFDIO_POISON}
)
"""The ioctls that wake blocked faults (WRITEPROTECT's un-protect does too, through its own
wake; it is rare on a fault's path)."""
