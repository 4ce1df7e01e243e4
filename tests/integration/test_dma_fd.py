"""A co-located driver receives physical memory's memfd over the daemon's side socket.

DESIGN §5: gRPC cannot pass fds, so ``<socket>.dma`` (mode 0600) hands the memfd to a client
presenting its session token (SCM_RIGHTS). The driver maps it and DMAs into the frames of its
pins itself; the process sees the bytes, and the process's writes are what the driver reads.
"""

from __future__ import annotations

import os
import stat

import anyio
import pytest

import vkclient
from tests.integration.conftest import DaemonProcess
from vkclient import PAGE_SIZE
from vkclient._gup import receive_memfd

pytestmark = pytest.mark.integration


async def test_driver_writes_pinned_frames_through_the_memfd(daemon: DaemonProcess) -> None:
    """Pin, map the memfd, write into the pinned frames: the process reads the bytes."""
    assert daemon.socket_path is not None
    side = f"{daemon.socket_path}.dma"
    assert stat.S_IMODE(os.stat(side).st_mode) == 0o600
    async with vkclient.connect(daemon.addr, client_name="rdma") as k:
        p = await k.spawn("app")
        addr = await p.mmap(4 * PAGE_SIZE)
        await p.write(addr, b"\0" * (4 * PAGE_SIZE))
        with await k.open_dma() as mem:
            assert mem.size == 128 << 20
            async with p.pin(addr, 4, write=True, longterm=True) as pages:
                payload = b"written by the device " * 300  # 6.6 KiB: two frames
                assert mem.write(pages, 100, payload) == len(payload)
                assert await p.read(addr + 100, len(payload)) == payload
                await p.write(addr + 3 * PAGE_SIZE, b"written by the CPU")
                assert mem.read(pages, 3 * PAGE_SIZE, 18) == b"written by the CPU"
                frame = mem.frame(int(pages.pfns[3]))
                assert bytes(frame[:18]) == b"written by the CPU"
                del frame
        assert await k.audit() == []
    assert len(daemon.events("dma_fd_passed")) == 1


async def test_a_bad_token_gets_no_fd(daemon: DaemonProcess) -> None:
    """The side socket refuses an unknown token: no fd, a JSON error line."""
    assert daemon.socket_path is not None
    side = f"{daemon.socket_path}.dma"
    with pytest.raises(PermissionError):
        await anyio.to_thread.run_sync(lambda: receive_memfd(side, "not-a-token"))
    with anyio.fail_after(5):
        while not daemon.events("dma_fd_refused"):  # logged just after the answer
            await anyio.sleep(0.02)
