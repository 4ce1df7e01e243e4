"""Helpers shared by the fs unit tests (import as tests.unit.fs.fshelp)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from typing import Any

import pytest

from vkernel.kernel.errors import KernelError
from vkernel.kernel.fs import O_CREAT, O_RDWR
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task

P = 4096
MiB = 1 << 20


async def raises(err: int, aw: Awaitable[Any]) -> KernelError:
    """Await ``aw`` and expect KernelError with ``err``."""
    with pytest.raises(KernelError) as ei:
        await aw
    assert ei.value.errno == err, f"{errno.errorcode[ei.value.errno]} != {errno.errorcode[err]}"
    return ei.value


def sync_raises(err: int, fn: Any, *args: Any, **kw: Any) -> KernelError:
    """Call ``fn`` and expect KernelError with ``err``."""
    with pytest.raises(KernelError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == err, f"{errno.errorcode[ei.value.errno]} != {errno.errorcode[err]}"
    return ei.value


async def make_file(
    k: Kernel, t: Task, name: str, data: bytes, kind: str = "disk", device: str = ""
) -> int:
    """Create ``name`` with ``data`` and return an O_RDWR descriptor to it."""
    fd, _ = k.vfs.do_sys_open(t, name, O_CREAT | O_RDWR, kind, device)
    assert await k.vfs.write(t, fd, data, 0) == len(data)
    return fd


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ page to page."""
    return bytes((i * 7 + seed + (i >> 12)) & 0xFF for i in range(n))
