"""The DMA side channel: physical memory's memfd for co-located driver clients (DESIGN §5).

gRPC cannot carry file descriptors, so next to the daemon's UNIX socket ``<socket>`` there is
a second one, ``<socket>.dma`` (mode 0600, like the first). A driver client on the same host
connects, sends its session token on one line, and receives one JSON line
(``{"ok": true, "memory_bytes": …, "page_size": 4096, "session": …}``) carrying the memfd of
physical memory as SCM_RIGHTS ancillary data. It maps the fd and reads and writes the frames
of its pinned pages itself (frame ``n`` is bytes ``[n*4096, (n+1)*4096)``), with the pfn list
a Gup call returned. A bad token gets ``{"ok": false, "error": …}`` and no fd.

The same socket hands out userfaultfds (:mod:`vkernel.api.uffd_fd`): a first line
``{"token": …, "uffd": HANDLE}`` (JSON) from a session that holds the handle is answered with
``{"ok": true, "uffd": HANDLE, "max_copy_bytes": …}`` and one end of a ``SOCK_SEQPACKET``
socketpair, the uffd's fd; an unknown handle gets ``{"ok": false, "errno": 9, …}`` (EBADF).

The fd gives the whole of physical memory to a client that can already open the daemon's
0600 socket, i.e. the same user: it is the co-located trust model of a device with DMA
access. Remote drivers use GupService.DmaRead/DmaWrite instead, which check the handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from vkernel.api.uffd_wire import MAX_COPY_BYTES
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.uapi import PAGE_SIZE
from vkernel.sessions import Session, SessionTable

UffdOpener = Callable[[Session, int, socket.socket], Coroutine[Any, Any, None]]
"""Checks that the session holds handle ``hid`` (KernelError if not) and returns the
coroutine that serves its fd on the daemon's end of the pair."""

log = structlog.get_logger("vkernel.dma")

MAX_TOKEN_LINE = 512
AUTH_TIMEOUT = 5.0


def dma_socket_path(grpc_socket: str) -> str:
    """The side channel's path for a daemon listening on ``grpc_socket``."""
    return f"{grpc_socket}.dma"


class DmaSocketServer:
    """Accepts driver clients on the side channel and hands them the memfd."""

    def __init__(
        self,
        path: str,
        kernel: Kernel,
        sessions: SessionTable,
        uffd_opener: UffdOpener | None = None,
    ) -> None:
        self.path = path
        self._kernel = kernel
        self._sessions = sessions
        self._uffd_opener = uffd_opener
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def start(self) -> bool:
        """Bind (mode 0600) and start accepting; False (logged) if the path cannot be bound."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        Path(self.path).unlink(missing_ok=True)  # the main socket's bind proved it stale
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            log.warning("dma_socket_unavailable", path=self.path, error=str(e))
            return False
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accept = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("dma_socket_listening", path=self.path)
        return True

    async def stop(self) -> None:
        """Stop accepting, drop pending clients, remove the socket file."""
        tasks = [t for t in (self._accept, *self._clients) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """One client: read the token line, answer with the fd or an error."""
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            line = b""
            try:
                async with asyncio.timeout(AUTH_TIMEOUT):
                    while b"\n" not in line and len(line) < MAX_TOKEN_LINE:
                        chunk = await loop.sock_recv(conn, MAX_TOKEN_LINE)
                        if not chunk:
                            break
                        line += chunk
            except (TimeoutError, OSError):
                return
            first = line.split(b"\n", 1)[0].decode(errors="replace").strip()
            request: dict[str, Any] = {}
            if first.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed = json.loads(first)
                    request = parsed if isinstance(parsed, dict) else {}
                token = str(request.get("token", ""))
            else:
                token = first
            session = self._sessions.lookup(token) if token else None
            if session is None or session.closed:
                await _refuse(conn, {"ok": False, "error": "unknown or expired session"})
                log.warning("dma_fd_refused", reason="bad token")
                return
            if "uffd" in request:
                await self._pass_uffd(conn, session, request["uffd"])
                return
            mem = self._kernel.mem
            reply = {
                "ok": True,
                "memory_bytes": mem.nframes * PAGE_SIZE,
                "page_size": PAGE_SIZE,
                "session": session.id,
            }
            payload = json.dumps(reply).encode() + b"\n"
            try:
                # A short first message on a fresh connection: the send buffer has room.
                socket.send_fds(conn, [payload], [mem.fd])
            except OSError as e:
                log.warning("dma_fd_send_failed", session=session.id, error=str(e))
                return
            log.info("dma_fd_passed", session=session.id, client=session.client_name)

    async def _pass_uffd(self, conn: socket.socket, session: Session, hid: object) -> None:
        """Hand the client a uffd it holds: one end of a socketpair, the other served here."""
        loop = asyncio.get_running_loop()
        if self._uffd_opener is None or not isinstance(hid, int):
            await _refuse(conn, {"ok": False, "errno": 22, "error": "uffd must be a handle number"})
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            try:
                serving = self._uffd_opener(session, hid, ours)
            except KernelError as e:
                ours.close()
                await _refuse(conn, {"ok": False, "errno": e.errno, "error": str(e)})
                return
            task = loop.create_task(serving)
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

            def close_with_session(_: Session) -> None:
                task.cancel()  # a process's fds close with it

            session.on_close(close_with_session)
            task.add_done_callback(lambda _: session.off_close(close_with_session))
            payload = {"ok": True, "uffd": hid, "max_copy_bytes": MAX_COPY_BYTES}
            try:
                socket.send_fds(conn, [json.dumps(payload).encode() + b"\n"], [theirs.fileno()])
            except OSError as e:
                task.cancel()  # the client is gone: the fd was never passed
                log.warning("uffd_fd_send_failed", session=session.id, error=str(e))
                return
        log.info("uffd_fd_passed", session=session.id, handle=hid)


async def _refuse(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Answer a request with its refusal line and no fd (a client already gone is fine)."""
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(conn, json.dumps(reply).encode() + b"\n")
