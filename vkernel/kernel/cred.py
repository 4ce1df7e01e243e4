"""Credentials and resource limits (include/linux/cred.h, include/uapi/linux/resource.h)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

RLIM_INFINITY = (1 << 64) - 1


class Capability(enum.IntEnum):
    """The capabilities vkernel checks, with Linux's bit numbers (uapi/linux/capability.h)."""

    CAP_IPC_LOCK = 14
    CAP_SYS_PTRACE = 19


class Rlimit(enum.IntEnum):
    """Resource limits vkernel enforces, with Linux's numbers."""

    RLIMIT_AS = 9
    RLIMIT_MEMLOCK = 8


# Linux's defaults for an unprivileged process: RLIMIT_MEMLOCK is 8 MiB since 5.16.
DEFAULT_RLIMITS: dict[Rlimit, int] = {
    Rlimit.RLIMIT_AS: RLIM_INFINITY,
    Rlimit.RLIMIT_MEMLOCK: 8 << 20,
}


@dataclass(frozen=True)
class Cred:
    """struct cred: who the task is and what it may do."""

    uid: int = 1000
    caps: frozenset[Capability] = field(default_factory=frozenset)

    def capable(self, cap: Capability) -> bool:
        """capable(): whether the task holds ``cap``."""
        return cap in self.caps
