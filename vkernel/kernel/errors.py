"""Kernel errors: every failure carries a Linux errno (include/uapi/asm-generic/errno*.h)."""

from __future__ import annotations

import errno as _errno
import signal as _signal


class KernelError(Exception):
    """A syscall-level failure: the errno Linux would return, plus context for the caller.

    Kept apart from :class:`OSError` on purpose: a host OSError inside the daemon is a bug,
    a KernelError is an answer.
    """

    def __init__(self, errno: int, message: str = "", **metadata: object) -> None:
        self.errno = errno
        self.message = message or _errno.errorcode.get(errno, str(errno))
        self.metadata = {k: str(v) for k, v in metadata.items()}
        super().__init__(f"[{self.name}] {self.message}")

    @property
    def name(self) -> str:
        """The errno's symbolic name, such as ``EFAULT``."""
        return _errno.errorcode.get(self.errno, f"E{self.errno}")


class UserFault(KernelError):
    """A user access that the CPU could not complete: SIGSEGV or SIGBUS at an address.

    The process survives (as if it had a signal handler); the caller learns the signal and
    the faulting address, as ``si_signo`` and ``si_addr`` would say.
    """

    def __init__(self, signo: int, address: int, message: str = "") -> None:
        self.signo = signo
        self.address = address
        name = _signal.Signals(signo).name
        super().__init__(
            _errno.EFAULT,
            message or f"{name} at {address:#x}",
            signal=name,
            address=f"{address:#x}",
        )


def einval(message: str, field: str | None = None) -> KernelError:
    """EINVAL naming the offending field, the most common answer to bad input."""
    if field is None:
        return KernelError(_errno.EINVAL, message)
    return KernelError(_errno.EINVAL, message, field=field)
