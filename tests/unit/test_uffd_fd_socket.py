"""The side socket's uffd fds without a gRPC server (vkernel.dma_socket + vkernel.api.uffd_fd):
a holder session's fd is one more reference to the uffd (dup semantics, A.13's release rule)
and closing it leaves nothing of it behind in its session. The kernel is audited at the end."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio

from vkclient.uffd_fd import receive_uffd
from vkernel.api.userfaultfd import UserfaultfdServicer
from vkernel.dma_socket import DmaSocketServer
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.mm_api import audit
from vkernel.sessions import SessionTable


async def test_closed_fds_leave_no_close_hooks(tmp_path: Path) -> None:
    kernel = Kernel(KernelConfig(memory_bytes=16 << 20))
    sessions = SessionTable(kernel)
    table = UserfaultfdServicer(kernel, sessions).table
    server = DmaSocketServer(str(tmp_path / "vk.sock.dma"), kernel, sessions, table.open_fd)
    assert server.start()
    try:
        session = sessions.open("monitor")
        task = kernel.spawn("faulter", session.id)
        ctx = uf.sys_userfaultfd(task, uf.UFFD_USER_MODE_ONLY)
        ctx.api(task, uf.UFFD_API, 0)
        h = table.add(session, ctx, task)
        hooks = len(session.close_hooks)
        for _ in range(5):
            sock: socket.socket = await anyio.to_thread.run_sync(
                receive_uffd, server.path, session.token, h.id
            )
            assert ctx.holders == 2  # the handle and the fd
            sock.close()
            with anyio.fail_after(5):
                while ctx.holders != 1:
                    await anyio.sleep(0.01)
            with anyio.fail_after(5):
                while len(session.close_hooks) != hooks:
                    await anyio.sleep(0.01)
        sessions.close(session, "test")
        with anyio.fail_after(5):
            while not ctx.released:
                await anyio.sleep(0.01)
    finally:
        await server.stop()
    assert audit(kernel) == []
