"""Helpers shared by the mm unit tests (import as tests.unit.mm.mmhelp)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import lookup_pte, sys_mmap
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_PFN_MASK,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
)

MakeKernel = Callable[..., Kernel]
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHARED_ANON = MAP_SHARED | MAP_ANONYMOUS
P = 4096
MiB = 1 << 20


async def mmap_anon(
    task: Task, length: int, prot: int = RW, flags: int = ANON, addr: int = 0
) -> int:
    """mmap(2) of anonymous memory."""
    return await sys_mmap(task, addr, length, prot, flags)


def errname(exc: BaseException) -> str:
    """The errno name of a raised KernelError."""
    assert isinstance(exc, KernelError)
    return errno.errorcode[exc.errno]


def pfn_at(task: Task, addr: int) -> int:
    """The pfn mapped at ``addr`` (for a PMD leaf, the subpage's pfn), -1 if none."""
    e = lookup_pte(task, addr)
    if not e:
        return -1
    pfn = (e & _PAGE_PFN_MASK) >> 12
    if e & 0x80:
        pfn += (addr >> 12) & 511
    return pfn
