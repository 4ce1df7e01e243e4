"""Tasks: pid, credentials, limits, life and death (kernel/fork.c, kernel/exit.c)."""

from __future__ import annotations

import asyncio
import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vkernel.kernel.cred import DEFAULT_RLIMITS, Cred, Rlimit


class TaskState(enum.Enum):
    """What ps shows in its STAT column, reduced to what vkernel distinguishes."""

    RUNNING = "R"
    ZOMBIE = "Z"


@dataclass
class Task:
    """task_struct: one process (vkernel models single-threaded processes)."""

    pid: int
    comm: str
    cred: Cred
    rlimits: dict[Rlimit, int]
    owner: str
    """The session that spawned the task; only it may act on the task."""
    ppid: int = 0
    state: TaskState = TaskState.RUNNING
    exit_code: int = 0
    """Exit status as wait(2) encodes it: the signal number for a killed task."""
    exit_signal: int = 0
    min_flt: int = 0
    maj_flt: int = 0
    start_time: float = 0.0
    mm: Any = None
    """The task's mm_struct; set by the mm layer (vkernel.kernel.mm)."""
    files: Any = None
    """The task's descriptor table (files_struct, vkernel.kernel.fdtable.FdTable)."""
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    _kill_hooks: set[Callable[[], None]] = field(default_factory=set)
    _fatal_signal: int = 0

    def fatal_signal_pending(self) -> bool:
        """fatal_signal_pending(): the task has been killed and must unwind."""
        return self._fatal_signal != 0

    def add_kill_hook(self, hook: Callable[[], None]) -> None:
        """Register a callback that wakes a killable sleeper (TASK_KILLABLE) on SIGKILL."""
        self._kill_hooks.add(hook)

    def remove_kill_hook(self, hook: Callable[[], None]) -> None:
        """Forget a kill hook once its sleeper has woken."""
        self._kill_hooks.discard(hook)

    def send_fatal_signal(self, signo: int) -> None:
        """Mark the task killed and wake every killable wait (signal_wake_up)."""
        if self._fatal_signal:
            return
        self._fatal_signal = signo
        for hook in list(self._kill_hooks):
            hook()

    @property
    def rlimit_as(self) -> int:
        """rlimit(RLIMIT_AS) in bytes."""
        return self.rlimits[Rlimit.RLIMIT_AS]

    @property
    def rlimit_memlock(self) -> int:
        """rlimit(RLIMIT_MEMLOCK) in bytes."""
        return self.rlimits[Rlimit.RLIMIT_MEMLOCK]

    def wait_status(self) -> int:
        """The wstatus wait(2) reports: signal number if killed, else code << 8."""
        if self.exit_signal:
            return self.exit_signal & 0x7F
        return (self.exit_code & 0xFF) << 8


def default_rlimits(overrides: dict[Rlimit, int] | None = None) -> dict[Rlimit, int]:
    """A fresh rlimit table: Linux's defaults with ``overrides`` applied."""
    limits = dict(DEFAULT_RLIMITS)
    if overrides:
        limits.update(overrides)
    return limits


FATAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
