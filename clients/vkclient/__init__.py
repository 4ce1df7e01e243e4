"""vkclient: the vkernel SDK.

    async with vkclient.connect() as k:
        async with await k.spawn("worker") as p:
            ...

Errors come back as the OSError subclass Python's os module would raise for the errno
(ProcessLookupError for ESRCH, PermissionError for EPERM …). ``vkclient.sync`` offers the
same calls without async; ``proc.pin()``/``proc.get()`` take GUP references as a driver
does (``vkclient._gup``). Linux's memory constants (PROT_READ, MAP_PRIVATE, MADV_DONTNEED,
the pagemap bits PM_PRESENT …) are importable from here too, and so are userfaultfd's
(UFFD_FEATURE_*, UFFDIO_*_MODE_*, UFFD_EVENT_* …): ``await k.userfaultfd(proc)`` creates one,
``vkclient.uffd`` has the operations and the :class:`UffdMonitor` loop.
"""

from vkclient import _gup, constants
from vkclient._files import DeviceInfo, FileStat
from vkclient._gup import *  # FOLL_*, Pages, DmaMemory, GupStream, HandleInfo
from vkclient._kernel import (
    CAP_IPC_LOCK,
    CAP_SYS_PTRACE,
    Kernel,
    Process,
    ProcessInfo,
    SystemInfo,
    WaitResult,
    connect,
)
from vkclient._memory import AccessStream
from vkclient.constants import *  # PROT_*, MAP_*, MADV_*, MREMAP_*, PM_*, O_*, FALLOC_FL_* …
from vkclient.errors import SessionError, UserFaultError, VkernelError
from vkclient.uffd import ResolveStream, UffdMonitor, Userfaultfd

__all__ = [
    "CAP_IPC_LOCK",
    "CAP_SYS_PTRACE",
    "AccessStream",
    "DeviceInfo",
    "FileStat",
    "Kernel",
    "Process",
    "ProcessInfo",
    "ResolveStream",
    "SessionError",
    "SystemInfo",
    "UffdMonitor",
    "UserFaultError",
    "Userfaultfd",
    "VkernelError",
    "WaitResult",
    "connect",
    "constants",
]
__all__ += constants.__all__
__all__ += _gup.__all__
