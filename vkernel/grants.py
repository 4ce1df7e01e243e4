"""Access grants: which other sessions may act on a process as a driver (DESIGN §6).

A session acts only on its own processes. A driver session pinning another session's
process needs an explicit grant from the owner, as Linux needs an fd passed over a socket
(or ptrace permission) before a driver sees a process's memory. A grant names a Task, not a
pid, so a reused pid never inherits one; it ends when revoked, when the task exits, or when
the grantee session ends. Revoking does not undo references already taken (a Linux driver
keeps its pins after the fd is closed too): those live in the grantee's handles.

No gRPC here.
"""

from __future__ import annotations

import errno

from vkernel.kernel.errors import KernelError
from vkernel.kernel.task import Task, TaskState


class GrantTable:
    """pid → (the granted task, the grantee session ids)."""

    def __init__(self) -> None:
        self._grants: dict[int, tuple[Task, set[str]]] = {}

    def grant(self, task: Task, grantee: str) -> None:
        """Let session ``grantee`` act on ``task`` (idempotent)."""
        if not grantee:
            raise KernelError(errno.EINVAL, "empty grantee session id", field="grantee_session_id")
        entry = self._grants.get(task.pid)
        if entry is None or entry[0] is not task:
            entry = (task, set())
            self._grants[task.pid] = entry
        entry[1].add(grantee)

    def revoke(self, task: Task, grantee: str) -> None:
        """Withdraw a grant; ENOENT when there is none."""
        entry = self._grants.get(task.pid)
        if entry is None or entry[0] is not task or grantee not in entry[1]:
            raise KernelError(
                errno.ENOENT, f"session {grantee} holds no grant on process {task.pid}"
            )
        entry[1].discard(grantee)
        if not entry[1]:
            del self._grants[task.pid]

    def allowed(self, task: Task, session_id: str) -> bool:
        """Whether ``session_id`` may act on ``task``: its owner, or a live grant."""
        if task.owner == session_id:
            return True
        entry = self._grants.get(task.pid)
        if entry is None or entry[0] is not task:
            return False
        if task.state is not TaskState.RUNNING:
            del self._grants[task.pid]
            return False
        return session_id in entry[1]

    def grantees(self, task: Task) -> set[str]:
        """The sessions holding a grant on ``task``."""
        entry = self._grants.get(task.pid)
        return set(entry[1]) if entry is not None and entry[0] is task else set()

    def drop_session(self, session_id: str) -> None:
        """The session ended: forget the grants it held and those on its processes."""
        for pid, (task, grantees) in list(self._grants.items()):
            grantees.discard(session_id)
            if not grantees or task.owner == session_id or task.state is not TaskState.RUNNING:
                del self._grants[pid]
