"""Running out of physical memory is an answer (ENOMEM), never a daemon failure."""

from __future__ import annotations

import errno

import pytest

import vkclient
from tests.service.conftest import Daemon
from vkernel.kernel.mm_api import audit


async def test_oom_leaves_the_daemon_healthy(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A fault with no free frame → VM_FAULT_OOM → ENOMEM for the access (A.9: OOM 0x1).

    The faulting process keeps what it had, everything stays accounted, and once it exits
    the memory is usable again by others.
    """
    hog = await k.spawn("hog")
    size = daemon.kernel.config.memory_bytes * 2
    addr = await hog.mmap(size)
    with pytest.raises(OSError) as ei:
        await hog.write(addr, b"\xaa" * size)
    assert ei.value.errno == errno.ENOMEM
    assert audit(daemon.kernel) == []
    assert await k.health() == "SERVING"
    assert (await hog.read(addr, 4)) == b"\xaa" * 4  # what was written before the OOM stays
    await hog.kill()
    await hog.wait()
    other = await k.spawn("other")
    buf = await other.mmap(8 << 20)
    await other.write(buf, b"\x55" * (8 << 20))
    assert await other.read(buf + (4 << 20), 2) == b"\x55\x55"
    assert audit(daemon.kernel) == []
