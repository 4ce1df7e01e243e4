"""poll_wait() wake functions and the non-sleeping read (userfaultfd_read with O_NONBLOCK):
what the uffd fd's reader uses to answer a blocked read(2) in the waker's context, as epoll's
ep_poll_callback runs (A.13, B.55: a read fault is never delivered twice). The kernel is
audited clean at teardown (the ``kernel`` fixture)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.mm.mmhelp import P, errname, mmap_anon
from tests.unit.uffd.uffdhelp import ready, settle
from vkernel.kernel import mm_api
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel


async def test_read_nowait_is_a_nonblocking_read(kernel: Kernel) -> None:
    t = kernel.spawn("p", "s")
    ctx = uf.sys_userfaultfd(t, uf.UFFD_USER_MODE_ONLY)
    with pytest.raises(KernelError) as e:
        ctx.read_nowait(32)
    assert errname(e.value) == "EINVAL"  # before UFFDIO_API
    ctx.api(t, uf.UFFD_API, 0)
    with pytest.raises(KernelError) as e:
        ctx.read_nowait(16)
    assert errname(e.value) == "EINVAL"  # smaller than struct uffd_msg
    with pytest.raises(KernelError) as e:
        ctx.read_nowait(32)
    assert errname(e.value) == "EAGAIN"
    await ctx.put()
    assert ctx.released
    assert ctx.read_nowait(32) == []  # released: EOF


async def test_poll_wait_runs_in_the_wakers_context(kernel: Kernel) -> None:
    t = kernel.spawn("p", "s")
    a = await mmap_anon(t, 2 * P)
    ctx = await ready(t, uf.UFFD_USER_MODE_ONLY)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    taken: list[list[uf.UffdMsg]] = []

    def wake() -> None:
        taken.append(ctx.read_nowait(64 * 32))

    ctx.poll_wait(wake)
    load = asyncio.ensure_future(mm_api.read_user_bytes(t, a + P + 3, 2))
    await asyncio.sleep(0)  # the load runs until it sleeps in handle_userfault
    # The wake function ran inside the fault: the message was read before any reader task ran.
    assert [[m.address for m in batch] for batch in taken] == [[a + P]]
    assert not load.done()
    with pytest.raises(KernelError) as e:
        ctx.read_nowait(32)  # read once: not delivered twice (B.55)
    assert errname(e.value) == "EAGAIN"
    # One-shot: a second fault does not call it again; poll_cancel of a spent entry is a no-op.
    ctx.poll_cancel(wake)
    second = asyncio.ensure_future(mm_api.read_user_bytes(t, a, 1))
    await settle()
    assert len(taken) == 1
    assert [m.address for m in ctx.read_nowait(64 * 32)] == [a]
    await uf.uffdio_copy(ctx, t, a, b"\1" * 2 * P, 0)
    assert await load == b"\1\1"
    assert await second == b"\1"
    # A cancelled entry does not run; release runs the ones still waiting.
    ran: list[str] = []
    ctx.poll_wait(lambda: ran.append("cancelled"))
    ctx.poll_cancel(ctx._pollers[0])
    ctx.poll_wait(lambda: ran.append("release"))
    await ctx.put()
    assert ran == ["release"]
