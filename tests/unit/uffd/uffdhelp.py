"""Helpers shared by the userfaultfd unit tests (import as tests.unit.uffd.uffdhelp)."""

from __future__ import annotations

import asyncio

from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.cred import Capability, Cred
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.proc import pagemap
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PM_SWAP, PM_UFFD_WP


def priv(kernel: Kernel) -> Task:
    """A process with CAP_SYS_PTRACE (userfaultfd without USER_MODE_ONLY, EVENT_FORK)."""
    return kernel.spawn("mon", "s", cred=Cred(caps=frozenset({Capability.CAP_SYS_PTRACE})))


async def ready(task: Task, flags: int = uf.O_NONBLOCK, features: int = 0) -> uf.UserfaultfdCtx:
    """userfaultfd(flags) + UFFDIO_API(features) on ``task``."""
    ctx = uf.sys_userfaultfd(task, flags)
    ctx.api(task, uf.UFFD_API, features)
    return ctx


async def settle() -> None:
    """Let every runnable coroutine reach its next sleep."""
    for _ in range(8):
        await asyncio.sleep(0)


def pm(task: Task, addr: int) -> int:
    """The /proc/PID/pagemap entry of one page."""
    return int.from_bytes(pagemap(task, addr, 1), "little")


def pm57(task: Task, addr: int) -> bool:
    """pagemap bit 57 (PM_UFFD_WP) of one page."""
    return bool(pm(task, addr) & PM_UFFD_WP)


def pm_swap(task: Task, addr: int) -> bool:
    """pagemap bit 62 (PM_SWAP): a non-present entry (a PTE marker in vkernel)."""
    return bool(pm(task, addr) & PM_SWAP)
