"""Sessions: a client's identity and the owner of its processes and driver handles.

When a session ends, everything it owns is closed with Linux's close semantics: its
processes are killed and reaped, and every handle registered with ``on_close`` is released.
No gRPC here: the API layer ties a session's life to its keepalive stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task, TaskState

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Session:
    """One client connection's worth of ownership."""

    id: str
    token: str
    client_name: str
    opened_at: float = field(default_factory=time.monotonic)
    closed: bool = False
    keepalive_task: asyncio.Task[None] | None = None
    """The handler task serving this session's keepalive stream, if attached."""
    expiry: asyncio.TimerHandle | None = None
    close_hooks: list[Callable[[Session], None]] = field(default_factory=list)

    def on_close(self, hook: Callable[[Session], None]) -> None:
        """Run ``hook`` when the session ends (driver handles, pins, uffds …)."""
        self.close_hooks.append(hook)

    def off_close(self, hook: Callable[[Session], None]) -> None:
        """Forget an ``on_close`` hook whose handle went away first (closed on its own)."""
        with contextlib.suppress(ValueError):
            self.close_hooks.remove(hook)


class SessionTable:
    """All open sessions, by token."""

    def __init__(self, kernel: Kernel, attach_timeout: float = 10.0) -> None:
        self.kernel = kernel
        self.attach_timeout = attach_timeout
        self._by_token: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_token)

    def open(self, client_name: str) -> Session:
        """Create a session; it ends unless a keepalive stream attaches within the timeout."""
        session = Session(
            id=secrets.token_hex(4), token=secrets.token_urlsafe(24), client_name=client_name
        )
        self._by_token[session.token] = session
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(self.attach_timeout, self._expire_unattached, session)
        log.info("session_opened", session=session.id, client=client_name)
        return session

    def _expire_unattached(self, session: Session) -> None:
        if session.keepalive_task is None and not session.closed:
            self.close(session, reason="keepalive never attached")

    def lookup(self, token: str) -> Session | None:
        """The live session holding ``token``."""
        return self._by_token.get(token)

    def by_id(self, session_id: str) -> Session | None:
        """The live session with the public id ``session_id`` (handing it a uffd handle)."""
        return next((s for s in self._by_token.values() if s.id == session_id), None)

    def attach(self, session: Session, task: asyncio.Task[None]) -> bool:
        """Bind the keepalive stream's handler; False if one is attached already."""
        if session.keepalive_task is not None:
            return False
        session.keepalive_task = task
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        return True

    def owned_tasks(self, session: Session) -> list[Task]:
        """The session's processes, in pid order."""
        return [t for t in self.kernel.iter_tasks() if t.owner == session.id]

    def close(self, session: Session, reason: str) -> int:
        """End a session: kill and reap its processes, release its handles. Idempotent."""
        if session.closed:
            return 0
        session.closed = True
        self._by_token.pop(session.token, None)
        if session.expiry is not None:
            session.expiry.cancel()
        exited = 0
        for hook in reversed(session.close_hooks):
            hook(session)
        for task in self.owned_tasks(session):
            if task.state is TaskState.RUNNING:
                self.kernel.kill(task, signal.SIGKILL)
                exited += 1
            self.kernel.reap(task)
        ka = session.keepalive_task
        if ka is not None and ka is not asyncio.current_task() and not ka.done():
            ka.cancel()
        log.info("session_closed", session=session.id, reason=reason, processes_exited=exited)
        return exited

    def close_all(self, reason: str) -> None:
        """End every session (daemon shutdown)."""
        for session in list(self._by_token.values()):
            self.close(session, reason)
