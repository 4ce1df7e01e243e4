"""A userfaultfd as a real file descriptor, for monitors on the daemon's host.

``fd = await uffd.open_fd()`` (a holder session, the daemon on a UNIX socket) receives the
uffd over the daemon's side socket, as a monitor receives one over a UNIX socket in Linux.
Each call is one datagram each way with Linux's struct layouts (the daemon's
``vkernel.api.uffd_fd`` describes the protocol; ``vkernel.api.uffd_wire``, shared with this
module, holds its numbers and structs); no gRPC message is on a fault's monitor path::

    fd = await uffd.open_fd()
    while msgs := await fd.read():                       # read(2): [] once released
        for m in msgs:
            if m.event == UFFD_EVENT_PAGEFAULT:
                await fd.copy(m.address & ~4095, page_for(m))   # UFFDIO_COPY

Every ioctl returns ``(result, errno)`` as the kernel leaves them: ``result`` is the struct's
count field (bytes done, or -errno), ``errno`` 0 on success and EAGAIN when partial, as
ioctl(2) fails with it. Closing the fd is close(2): one reference less on the uffd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, Self

from vkclient._gup import side_socket_fd
from vkclient.constants import (
    UFFD_API,
    UFFD_EVENT_FORK,
    UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMAP,
)
from vkernel.api.uffd_wire import (
    ANSWER,
    COPY,
    MAX_COPY_BYTES,
    MSG_SIZE,
    RANGE2,
    RANGE3,
    RANGE_MODE_RESULT,
    READ_ARGS,
    REQUEST,
    SOCKET_BUFFER,
    UFFD_FD_READ,
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
from vkernel.v1 import userfaultfd_service_pb2 as pb

_UFFD_MSG = struct.Struct("<BBHIQQI4x")
"""struct uffd_msg read as its pagefault arm: the other arms are re-read from the offsets."""

_EAGAIN = 11
_EBADF = 9
_EINVAL = 22


def _result(st: struct.Struct, out: bytes, err: int) -> int:
    """The count field (the struct's last) as the kernel left it; -errno when the call was
    refused before the struct was read (unknown ioctl, wrong size)."""
    if len(out) < st.size:
        return -err
    return int(st.unpack(out)[-1])


def receive_uffd(path: str, token: str, handle: int, timeout: float = 5.0) -> socket.socket:
    """Fetch uffd ``handle`` from the daemon's side socket (blocking): the fd as a socket."""
    request = json.dumps({"token": token, "uffd": handle}).encode()
    fd, _ = side_socket_fd(path, request, "the uffd", timeout)
    return socket.socket(fileno=fd)


def decode_msg(raw: bytes | memoryview, off: int = 0) -> pb.UffdMessage:
    """One struct uffd_msg as the SDK's :class:`UffdMessage` (the gRPC API's message)."""
    event, _, _, _, a, b, ptid = _UFFD_MSG.unpack_from(raw, off)
    if event == UFFD_EVENT_PAGEFAULT:
        return pb.UffdMessage(event=event, flags=a, address=b, ptid=ptid)
    if event == UFFD_EVENT_FORK:
        return pb.UffdMessage(event=event, ufd=a & 0xFFFFFFFF)
    if event == UFFD_EVENT_REMAP:
        start, end, length = RANGE3.unpack_from(raw, off + 8)
        return pb.UffdMessage(event=event, start=start, end=end, len=length)
    return pb.UffdMessage(event=event, start=a, end=b)  # REMOVE, UNMAP


class UffdFd:
    """The monitor's end: read(2) and the uffd ioctls as coroutines, answers matched by tag."""

    def __init__(self, sock: socket.socket, max_copy_bytes: int = MAX_COPY_BYTES) -> None:
        self.sock = sock
        self.max_copy_bytes = max_copy_bytes
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self._loop = asyncio.get_running_loop()
        self._tag = 0
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def fileno(self) -> int:
        """The uffd's file descriptor."""
        return self.sock.fileno()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """close(2): the daemon drops this reference (the last one releases the uffd)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._fail(OSError(9, "the uffd fd is closed"))  # EBADF for calls still waiting

    def _fail(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: an abandoned copy_nowait must not log at GC

    def _on_readable(self) -> None:
        while True:
            err: OSError | None = None
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as e:
                data, err = b"", e
            if not data:  # the daemon closed it: its session or the daemon ended
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.sock.fileno())
                self._fail(err or ConnectionResetError(104, "the daemon closed the uffd"))
                return
            _cmd, tag, errno_, _ = ANSWER.unpack_from(data)
            fut = self._pending.pop(tag, None)
            if fut is not None and not fut.done():
                fut.set_result((errno_, data[ANSWER.size :]))

    def _send(
        self, cmd: int, arg: bytes, data: bytes | memoryview = b""
    ) -> asyncio.Future[tuple[int, bytes]]:
        """Send one call (``data``: COPY's source bytes, gathered by sendmsg rather than
        copied into the datagram); its answer ``(errno, struct)`` lands in the future."""
        if self._closed:
            raise OSError(9, "the uffd fd is closed")
        self._tag = (self._tag + 1) & 0xFFFFFFFF
        tag = self._tag
        fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        head = REQUEST.pack(cmd, tag) + arg
        try:
            self.sock.sendmsg((head, data) if data else (head,))
        except BlockingIOError:  # the daemon is not reading: send when there is room
            msg = head + bytes(data)
            self._loop.create_task(self._loop.sock_sendall(self.sock, msg))
        self._pending[tag] = fut
        return fut

    async def _call(self, cmd: int, arg: bytes) -> tuple[int, bytes]:
        return await self._send(cmd, arg)

    # ---- read(2) ----------------------------------------------------------------------------

    async def read(self, max_messages: int = 64, nonblock: bool = False) -> list[pb.UffdMessage]:
        """poll + read(2): waits for the first message (``nonblock``: BlockingIOError if none);
        [] once the uffd is released."""
        err, out = await self._call(
            UFFD_FD_READ, READ_ARGS.pack(max_messages * MSG_SIZE, 0o4000 if nonblock else 0)
        )
        if err:
            raise OSError(err, os.strerror(err))
        return [decode_msg(out, off) for off in range(0, len(out), MSG_SIZE)]

    # ---- ioctls -----------------------------------------------------------------------------

    async def api(self, features: int = 0, api: int = UFFD_API) -> tuple[int, int]:
        """UFFDIO_API: ``(features, ioctls)``; OSError as ioctl(2) fails."""
        err, out = await self._call(UFFDIO_API, RANGE3.pack(api, features, 0))
        if err:
            raise OSError(err, os.strerror(err))
        _, got, ioctls = RANGE3.unpack(out)
        return got, ioctls

    async def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER: the range's ioctls bitmask; OSError as ioctl(2) fails."""
        err, out = await self._call(UFFDIO_REGISTER, RANGE_MODE_RESULT.pack(start, length, mode, 0))
        if err:
            raise OSError(err, os.strerror(err))
        return int(RANGE_MODE_RESULT.unpack(out)[3])

    async def unregister(self, start: int, length: int) -> int:
        """UFFDIO_UNREGISTER: errno (0 on success)."""
        return (await self._call(UFFDIO_UNREGISTER, RANGE2.pack(start, length)))[0]

    async def wake(self, start: int, length: int) -> int:
        """UFFDIO_WAKE: errno (0 on success)."""
        return (await self.wake_nowait(start, length))[1]

    async def writeprotect(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_WRITEPROTECT: errno (0 on success)."""
        return (await self.writeprotect_nowait(start, length, mode))[1]

    async def copy(
        self, dst: int, data: bytes | bytearray | memoryview, mode: int = 0
    ) -> tuple[int, int]:
        """UFFDIO_COPY of ``data`` to ``dst``: ``(copy, errno)`` (see :meth:`copy_nowait`)."""
        return await self.copy_nowait(dst, data, mode)

    async def zeropage(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_ZEROPAGE: ``(zeropage, errno)``."""
        return await self.fill_nowait(UFFDIO_ZEROPAGE, start, length, mode)

    async def continue_(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_CONTINUE: ``(mapped, errno)``."""
        return await self.fill_nowait(UFFDIO_CONTINUE, start, length, mode)

    async def poison(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_POISON: ``(updated, errno)``."""
        return await self.fill_nowait(UFFDIO_POISON, start, length, mode)

    async def move(self, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_MOVE: ``(move, errno)``."""
        return await self.move_nowait(dst, src, length, mode)

    # ---- the same ioctls sent at once: the future gets ``(result, errno)`` -----------------

    def copy_nowait(
        self, dst: int, data: bytes | bytearray | memoryview, mode: int = 0
    ) -> asyncio.Future[tuple[int, int]]:
        """Send UFFDIO_COPY and return at once: a monitor goes back to read(2) while the
        answer, ``(copy, errno)``, comes into the future. Longer than ``max_copy_bytes``: one
        ioctl per piece, each sent once the one before it succeeded, stopping at the first
        that fails with the bytes done so far (EAGAIN), as one long UFFDIO_COPY reports it."""
        view = memoryview(data)
        step = self.max_copy_bytes
        out: asyncio.Future[tuple[int, int]] = self._loop.create_future()

        def send(off: int) -> None:
            piece = view[off : off + step]
            sent = self._ioctl(
                UFFDIO_COPY, COPY.pack(dst + off, 0, len(piece), mode, 0), COPY, piece
            )
            sent.add_done_callback(lambda f: answered(off, f))

        def answered(off: int, f: asyncio.Future[tuple[int, int]]) -> None:
            if out.done() or _passed_on_failure(f, out):
                return
            result, err = f.result()
            if err:  # the first failure ends it: partial (EAGAIN) once some landed
                out.set_result((off + max(result, 0), _EAGAIN) if off else (result, err))
            elif off + step < len(view):
                send(off + step)
            else:
                out.set_result((off + result, 0))

        send(0)
        return out

    def fill_nowait(
        self, cmd: int, start: int, length: int, mode: int
    ) -> asyncio.Future[tuple[int, int]]:
        """UFFDIO_ZEROPAGE, CONTINUE or POISON ({range, mode, count}) sent at once."""
        return self._ioctl(cmd, RANGE_MODE_RESULT.pack(start, length, mode, 0), RANGE_MODE_RESULT)

    def move_nowait(
        self, dst: int, src: int, length: int, mode: int = 0
    ) -> asyncio.Future[tuple[int, int]]:
        """UFFDIO_MOVE sent at once."""
        return self._ioctl(UFFDIO_MOVE, COPY.pack(dst, src, length, mode, 0), COPY)

    def wake_nowait(self, start: int, length: int) -> asyncio.Future[tuple[int, int]]:
        """UFFDIO_WAKE sent at once: ``(0 or -errno, errno)``."""
        return self._ioctl(UFFDIO_WAKE, RANGE2.pack(start, length), None)

    def writeprotect_nowait(
        self, start: int, length: int, mode: int
    ) -> asyncio.Future[tuple[int, int]]:
        """UFFDIO_WRITEPROTECT sent at once: ``(0 or -errno, errno)``."""
        return self._ioctl(UFFDIO_WRITEPROTECT, RANGE3.pack(start, length, mode), None)

    def _ioctl(
        self, cmd: int, arg: bytes, st: struct.Struct | None, data: bytes | memoryview = b""
    ) -> asyncio.Future[tuple[int, int]]:
        """One ioctl; its answer as ``(result, errno)``: the struct ``st``'s count field (its
        last) as the kernel left it, or -errno for an ioctl without one (``st`` None)."""
        sent = self._send(cmd, arg, data)
        out: asyncio.Future[tuple[int, int]] = self._loop.create_future()

        def done(f: asyncio.Future[tuple[int, bytes]]) -> None:
            if not out.done() and not _passed_on_failure(f, out):
                err, struct_out = f.result()
                out.set_result((_result(st, struct_out, err) if st else -err, err))

        sent.add_done_callback(done)
        return out


class FdReader:
    """:class:`vkclient.uffd.UffdReader`'s interface on the fd: read(2) batches, None once
    released (what :class:`vkclient.uffd.UffdMonitor` reads with ``fd=``)."""

    def __init__(self, fd: UffdFd) -> None:
        self.fd = fd

    async def read(
        self, max_messages: int = 64, *, nonblock: bool = False
    ) -> list[pb.UffdMessage] | None:
        """One read(2): the messages, or None once the uffd is released or the fd closed (by
        its owner, or by the daemon when the session ended): the monitor's loop is over."""
        try:
            return await self.fd.read(max_messages, nonblock) or None
        except (ConnectionResetError, OSError) as e:
            if isinstance(e, ConnectionResetError) or e.errno == _EBADF:
                return None
            raise

    async def close(self) -> None:
        """Nothing to end: the fd stays open (its owner closes it)."""


class FdResolver:
    """:class:`vkclient.uffd.ResolveStream`'s interface on the fd: a batch of
    :class:`UffdResolveOp` goes out as one ioctl datagram per operation, all sent at once and
    answered into one future. A COPY longer than ``max_copy_bytes`` is several ioctls, each
    sent once the one before it succeeded, as one long UFFDIO_COPY stops at its first failure.
    A COPY from the monitor's process (``src_pid``) is EINVAL here: the fd carries the bytes."""

    def __init__(self, fd: UffdFd) -> None:
        self.fd = fd

    async def submit(
        self, ops: Sequence[pb.UffdResolveOp]
    ) -> asyncio.Future[list[tuple[int, int]]]:
        """Send one batch; the future gets ``(result, errno)`` per operation, as the
        ``UffdResolve`` call would give them."""
        futs = [self._op(op) for op in ops]
        out: asyncio.Future[list[tuple[int, int]]] = asyncio.get_running_loop().create_future()
        left = len(futs)

        def one_done(_: object) -> None:
            nonlocal left
            left -= 1
            if left or out.done():
                return
            if not any(_passed_on_failure(f, out) for f in futs):  # the fd closed meanwhile
                out.set_result([f.result() for f in futs])

        if not futs:
            out.set_result([])
        for f in futs:
            f.add_done_callback(one_done)
        return out

    async def resolve(self, ops: Sequence[pb.UffdResolveOp]) -> list[tuple[int, int]]:
        """Send one batch and wait for its results."""
        return await (await self.submit(ops))

    async def close(self) -> None:
        """Nothing to end: the fd stays open (its owner closes it)."""

    def _op(self, op: pb.UffdResolveOp) -> asyncio.Future[tuple[int, int]]:
        """One operation's ``(result, errno)``."""
        fd = self.fd
        kind = op.WhichOneof("op")
        if kind == "copy":
            c = op.copy
            if c.src_pid or c.len:
                return _done((-_EINVAL, _EINVAL))
            return fd.copy_nowait(c.dst, c.data, c.mode)
        if kind in _FILLS:
            r = getattr(op, kind)
            return fd.fill_nowait(_FILLS[kind], r.start, r.len, r.mode)
        if kind == "move":
            m = op.move
            return fd.move_nowait(m.dst, m.src, m.len, m.mode)
        if kind == "wake":
            return fd.wake_nowait(op.wake.start, op.wake.len)
        if kind == "writeprotect":
            w = op.writeprotect
            return fd.writeprotect_nowait(w.start, w.len, w.mode)
        return _done((-_EINVAL, _EINVAL))  # names no ioctl


_FILLS = {"zeropage": UFFDIO_ZEROPAGE, "continue": UFFDIO_CONTINUE, "poison": UFFDIO_POISON}


def _done(value: tuple[int, int]) -> asyncio.Future[tuple[int, int]]:
    fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def _passed_on_failure(f: asyncio.Future[Any], out: asyncio.Future[Any]) -> bool:
    """Hand ``f``'s cancellation or error (the fd closed) on to ``out``: True if it had one.
    The error is marked retrieved, as in UffdFd._fail: awaiting ``out`` still raises it."""
    if f.cancelled():
        out.cancel()
        return True
    exc = f.exception()
    if exc is None:
        return False
    out.set_exception(exc)
    out.exception()
    return True
