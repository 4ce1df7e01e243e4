"""An in-process daemon on a temporary UNIX socket, and SDK sessions against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import vkclient
from vkernel.config import Listen, ServeConfig
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mm_api import audit
from vkernel.server import serve


@dataclass
class Daemon:
    """A running in-process daemon."""

    addr: str
    kernel: Kernel
    socket_path: Path


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """Serve on tmp_path/vk.sock for one test; stops cleanly and checks the kernel after."""
    sock = tmp_path / "vk.sock"
    kernel = Kernel(KernelConfig(memory_bytes=64 << 20))
    cfg = ServeConfig(listen=(Listen("unix", str(sock)),), token=None, grace=1.0)
    stop = anyio.Event()
    ready = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            status = await serve(
                cfg,
                on_ready=lambda _: ready.set(),
                shutdown=stop,
                handle_signals=False,
                kernel=kernel,
            )
            assert status == 0

        tg.start_soon(run)
        with anyio.fail_after(10):
            await ready.wait()
        yield Daemon(addr=f"unix://{sock}", kernel=kernel, socket_path=sock)
        stop.set()
    assert not kernel.tasks, "every process must be gone once the daemon has stopped"
    assert audit(kernel) == [], "every frame's counts must match once everything has exited"


@pytest.fixture
async def k(daemon: Daemon) -> AsyncIterator[vkclient.Kernel]:
    """One SDK session on the daemon."""
    async with vkclient.connect(daemon.addr, client_name="test") as kernel:
        yield kernel
