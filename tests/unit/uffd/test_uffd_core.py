"""userfaultfd core: API handshake, registration, MISSING faults, COPY/ZEROPAGE/WAKE, release
(kernel-semantics.md A.13, B.42-B.55)."""

from __future__ import annotations

import asyncio
import errno
import signal

import pytest

from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import SHARED_ANON, MakeKernel, P, errname, mmap_anon, pfn_at
from vkernel.kernel import gup, gup_fast
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.cred import Capability, Cred
from vkernel.kernel.errors import KernelError, UserFault
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import fork
from vkernel.kernel.mmap import sys_madvise, sys_mremap, sys_munmap
from vkernel.kernel.proc import pagemap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    EHWPOISON,
    FOLL_HWPOISON,
    FOLL_NOWAIT,
    FOLL_WRITE,
    MADV_DONTNEED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PM_UFFD_WP,
    VM_UFFD_MISSING,
)


def _priv(kernel: Kernel) -> Task:
    return kernel.spawn("mon", "s", cred=Cred(caps=frozenset({Capability.CAP_SYS_PTRACE})))


async def _ready(task: Task, flags: int = uf.O_NONBLOCK, features: int = 0) -> uf.UserfaultfdCtx:
    ctx = uf.sys_userfaultfd(task, flags)
    ctx.api(task, uf.UFFD_API, features)
    return ctx


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_api_handshake(kernel: Kernel) -> None:
    t = _priv(kernel)
    ctx = uf.sys_userfaultfd(t, 0)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(ctx, t, 0x10000, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert errname(e.value) == "EINVAL"
    with pytest.raises(KernelError) as e:
        await ctx.read(64)
    assert errname(e.value) == "EINVAL"
    assert ctx.poll() & uf._EPOLLERR
    with pytest.raises(KernelError):
        ctx.api(t, 0xAB, 0)
    with pytest.raises(KernelError):
        ctx.api(t, uf.UFFD_API, 1 << 63)
    features, ioctls = ctx.api(t, uf.UFFD_API, 0)
    assert features == uf.UFFD_API_FEATURES
    assert ioctls == uf.UFFD_API_IOCTLS
    with pytest.raises(KernelError) as e:
        ctx.api(t, uf.UFFD_API, 1)
    assert errname(e.value) == "EINVAL"
    await ctx.put()


async def test_create_permissions(make_kernel: MakeKernel) -> None:
    kernel = make_kernel()
    t = kernel.spawn("p", "s")
    with pytest.raises(KernelError) as e:
        uf.sys_userfaultfd(t, 0)
    assert errname(e.value) == "EPERM"
    with pytest.raises(KernelError) as e:
        uf.sys_userfaultfd(t, 0x40)
    assert errname(e.value) == "EINVAL"
    ctx = uf.sys_userfaultfd(t, uf.UFFD_USER_MODE_ONLY)
    with pytest.raises(KernelError) as e:
        ctx.api(t, uf.UFFD_API, uf.UFFD_FEATURE_EVENT_FORK)
    assert errname(e.value) == "EPERM"
    await ctx.put()
    k2 = make_kernel(unprivileged_userfaultfd=True)
    ctx2 = uf.sys_userfaultfd(k2.spawn("p", "s"), 0)
    await ctx2.put()


async def test_register_rules(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t)
    other = await _ready(t)
    for mode in (0, 8):
        with pytest.raises(KernelError) as e:
            await uf.uffdio_register(ctx, t, a, P, mode)
        assert errname(e.value) == "EINVAL"
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(ctx, t, a, P, uf.UFFDIO_REGISTER_MODE_MINOR)
    assert errname(e.value) == "EINVAL"
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(ctx, t, a + 1, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert errname(e.value) == "EINVAL"
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(ctx, t, 0x1000, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert errname(e.value) == "EINVAL"
    ioctls = await uf.uffdio_register(ctx, t, a + P, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & (1 << uf._UFFDIO_COPY | 1 << uf._UFFDIO_WAKE | 1 << uf._UFFDIO_ZEROPAGE)
    assert not ioctls & (1 << uf._UFFDIO_WRITEPROTECT | 1 << uf._UFFDIO_CONTINUE)
    mm = mm_of(t)
    assert mm.map_count == 3
    # re-registering with the same ctx is fine, another ctx is EBUSY
    await uf.uffdio_register(ctx, t, a + P, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(other, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert errname(e.value) == "EBUSY"
    await uf.uffdio_unregister(ctx, t, a, 4 * P)
    assert mm.map_count == 1
    await ctx.put()
    await other.put()


async def test_missing_fault_copy_wakes(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    reader = asyncio.ensure_future(read_user_bytes(t, a + 2 * P + 5, 3))
    await _settle()
    assert not reader.done()
    assert mm_of(t).mmap_lock.readers == 0  # slept after dropping mmap_lock
    msgs = await ctx.read(64)
    assert [(m.event, m.flags, m.address) for m in msgs] == [
        (uf.UFFD_EVENT_PAGEFAULT, 0, a + 2 * P)
    ]
    with pytest.raises(KernelError) as e:
        await ctx.read(64)
    assert errname(e.value) == "EAGAIN"  # a read fault is not delivered twice
    page = bytes(range(256)) * 16
    assert await uf.uffdio_copy(ctx, t, a + 2 * P, page) == P
    assert await reader == page[5:8]
    with pytest.raises(KernelError) as e:
        await uf.uffdio_copy(ctx, t, a + 2 * P, page)
    assert errname(e.value) == "EEXIST"
    # a write fault carries WRITE
    writer = asyncio.ensure_future(write_user(t, a, b"xy"))
    await _settle()
    (m,) = await ctx.read(64)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WRITE
    assert m.address == a
    assert await uf.uffdio_zeropage(ctx, t, a, P) == P
    await writer  # COW from the zero page
    assert await read_user_bytes(t, a, 3) == b"xy\0"
    await ctx.put()


async def test_exact_address_thread_id_fifo(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t, features=uf.UFFD_FEATURE_EXACT_ADDRESS | uf.UFFD_FEATURE_THREAD_ID)
    await uf.uffdio_register(ctx, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    r1 = asyncio.ensure_future(read_user_bytes(t, a + 3 * P + 7, 1))
    await _settle()
    r2 = asyncio.ensure_future(read_user_bytes(t, a + 9, 1))
    await _settle()
    with pytest.raises(KernelError):
        await ctx.read(16)
    msgs = await ctx.read(64)
    assert [m.address for m in msgs] == [a + 3 * P + 7, a + 9]
    assert all(m.ptid == t.pid for m in msgs)
    await uf.uffdio_zeropage(ctx, t, a, 4 * P)
    assert await r1 == b"\0"
    assert await r2 == b"\0"
    await ctx.put()


async def test_dontwake_wake_and_partial_copy(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, a, 1))
    await _settle()
    await uf.uffdio_copy(ctx, t, a, b"\x07" * P, uf.UFFDIO_COPY_MODE_DONTWAKE)
    await _settle()
    assert not r.done()
    assert uf.uffdio_wake(ctx, a + P, P) == 0
    await _settle()
    assert not r.done()
    assert uf.uffdio_wake(ctx, a, P) == 1
    assert await r == b"\x07"
    # partial: page 2 present
    await uf.uffdio_zeropage(ctx, t, a + 2 * P, P)
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_copy(ctx, t, a + P, b"\x01" * (3 * P))
    assert errname(e2.value) == "EAGAIN"
    assert isinstance(e2.value, uf.PartialFill)
    assert e2.value.done == P
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_copy(ctx, t, a + 2 * P, b"\x01" * P)
    assert errname(e2.value) == "EEXIST"
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_copy(ctx, t, a - P, b"\x01" * P)
    assert errname(e2.value) == "ENOENT"
    await ctx.put()


async def test_gup_into_missing_range(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    mm = mm_of(t)
    pages = page_array(1)
    # (b) plain get_user_pages: lock held, no ALLOW_RETRY → EFAULT, no message
    async with mm.mmap_lock.read(t):
        assert await gup.get_user_pages(mm, a, 1, FOLL_WRITE, pages, current=t) == -errno.EFAULT
        # (c) FOLL_NOWAIT: RETRY without a message, lock still held
        assert await gup.get_user_pages(mm, a, 1, FOLL_NOWAIT, pages, current=t) == 0
        assert mm.mmap_lock.readers == 1
    assert not ctx.fault_pending
    # (a) unlocked GUP blocks, then completes after COPY
    g = asyncio.ensure_future(gup.get_user_pages_unlocked(mm, a, 1, pages, FOLL_WRITE, current=t))
    await _settle()
    assert not g.done()
    (m,) = await ctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WRITE
    await uf.uffdio_copy(ctx, t, a, b"\x05" * P)
    assert await g == 1
    gup.put_pages(kernel, pages, 1)
    # GUP-fast falls back to the slow path and blocks too
    pages2 = page_array(1)
    g = asyncio.ensure_future(gup_fast.get_user_pages_fast(mm, a + P, 1, 0, pages2, current=t))
    await _settle()
    assert not g.done()
    (m,) = await ctx.read(32)
    await uf.uffdio_zeropage(ctx, t, a + P, P)
    assert await g == 1
    gup.put_pages(kernel, pages2, 1)
    await ctx.put()


async def test_user_mode_only_refuses_gup(kernel: Kernel) -> None:
    t = kernel.spawn("p", "s")
    a = await mmap_anon(t, P)
    ctx = uf.sys_userfaultfd(t, uf.UFFD_USER_MODE_ONLY | uf.O_NONBLOCK)
    ctx.api(t, uf.UFFD_API, 0)
    await uf.uffdio_register(ctx, t, a, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    mm = mm_of(t)
    pages = page_array(1)
    assert await gup.get_user_pages_unlocked(mm, a, 1, pages, 0, current=t) == -errno.EFAULT
    assert not ctx.fault_pending
    r = asyncio.ensure_future(read_user_bytes(t, a, 1))
    await _settle()
    assert len(await ctx.read(32)) == 1
    await uf.uffdio_zeropage(ctx, t, a, P)
    assert await r == b"\0"
    await ctx.put()


async def test_sigbus_feature(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await _ready(t, features=uf.UFFD_FEATURE_SIGBUS)
    await uf.uffdio_register(ctx, t, a, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(KernelError):
        await read_user_bytes(t, a, 1)
    assert not ctx.fault_pending
    await uf.uffdio_copy(ctx, t, a, b"\x09" * P)
    assert await read_user_bytes(t, a, 1) == b"\x09"
    await ctx.put()


async def test_release_wakes_blocked_faults_as_ordinary(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    rs = [asyncio.ensure_future(read_user_bytes(t, a + i * P, 1)) for i in range(2)]
    w = asyncio.ensure_future(write_user(t, a + 3 * P, b"z"))
    await _settle()
    assert len(await ctx.read(32)) == 1  # one read, two still pending
    await ctx.put()
    assert [await r for r in rs] == [b"\0", b"\0"]
    await w
    assert await read_user_bytes(t, a + 3 * P, 1) == b"z"
    mm = mm_of(t)
    assert mm.map_count == 1
    assert not mm.vmas[0].vm_flags & VM_UFFD_MISSING
    assert ctx.poll() & uf._EPOLLHUP


async def test_unregister_wakes(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, a + P, 1))
    await _settle()
    await uf.uffdio_unregister(ctx, t, a + P, P)
    assert await r == b"\0"
    assert mm_of(t).map_count == 2
    await ctx.put()
    assert mm_of(t).map_count == 1


async def test_kill_blocked_fault_and_blocking_read(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, P)
    ctx = await _ready(t, flags=0)
    await uf.uffdio_register(ctx, t, a, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    assert ctx.poll() & uf._EPOLLERR  # blocking fd
    rd = asyncio.ensure_future(ctx.read(32))
    await _settle()
    assert not rd.done()
    r = asyncio.ensure_future(read_user_bytes(t, a, 1))
    msgs = await rd
    assert msgs[0].address == a
    kernel.kill(t, 9)
    with pytest.raises(KernelError):
        await r
    assert not ctx.fault_read
    await ctx.put()


def _pm57(t: Task, addr: int) -> bool:
    return bool(int.from_bytes(pagemap(t, addr, 1), "little") & PM_UFFD_WP)


async def test_wp_fault_and_resolution(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\1" * (2 * P))
    ctx = await _ready(t)
    ioctls = await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_WP)
    assert ioctls & (1 << uf._UFFDIO_WRITEPROTECT)
    assert not ioctls & (1 << uf._UFFDIO_CONTINUE)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    assert _pm57(t, a)
    assert _pm57(t, a + P)
    assert await read_user_bytes(t, a, 1) == b"\1"  # reads do not fault
    w = asyncio.ensure_future(write_user(t, a + 5, b"x"))
    await _settle()
    assert not w.done()
    (m,) = await ctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WP | uf.UFFD_PAGEFAULT_FLAG_WRITE
    assert m.address == a
    mode = uf.UFFDIO_WRITEPROTECT_MODE_WP | uf.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    with pytest.raises(KernelError) as e:
        await uf.uffdio_writeprotect(ctx, t, a, P, mode)
    assert errname(e.value) == "EINVAL"
    await uf.uffdio_writeprotect(ctx, t, a, P, 0)
    await w
    assert not _pm57(t, a)
    assert _pm57(t, a + P)
    assert await read_user_bytes(t, a + 4, 3) == b"\1x\1"
    # GUP for write blocks on the protected page too, then completes
    mm = mm_of(t)
    pages = page_array(1)
    g = asyncio.ensure_future(
        gup.get_user_pages_unlocked(mm, a + P, 1, pages, FOLL_WRITE, current=t)
    )
    await _settle()
    assert not g.done()
    (m,) = await ctx.read(32)
    assert m.flags & uf.UFFD_PAGEFAULT_FLAG_WP
    await uf.uffdio_writeprotect(ctx, t, a + P, P, 0)
    assert await g == 1
    gup.put_pages(kernel, pages, 1)
    await ctx.put()


async def test_wp_enoent_and_copy_mode_wp(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    mode = uf.UFFDIO_REGISTER_MODE_MISSING | uf.UFFDIO_REGISTER_MODE_WP
    await uf.uffdio_register(ctx, t, a + P, P, mode)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_writeprotect(ctx, t, a, P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    assert errname(e.value) == "ENOENT"
    with pytest.raises(KernelError) as e:
        await uf.uffdio_copy(ctx, t, a, b"\2" * P, uf.UFFDIO_COPY_MODE_WP)
    assert errname(e.value) == "EINVAL"
    await uf.uffdio_copy(ctx, t, a + P, b"\2" * P, uf.UFFDIO_COPY_MODE_WP)
    assert _pm57(t, a + P)
    w = asyncio.ensure_future(write_user(t, a + P, b"y"))
    await _settle()
    (m,) = await ctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WP | uf.UFFD_PAGEFAULT_FLAG_WRITE
    # release: registrations go, the protection is dropped, the write completes
    await ctx.put()
    await w
    assert not _pm57(t, a + P)
    assert await read_user_bytes(t, a + P, 2) == b"y\2"


async def test_wp_async_and_fork_without_event_fork(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    await write_user(t, a, b"\3" * (2 * P))
    ctx = await _ready(t, features=uf.UFFD_FEATURE_WP_ASYNC)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_WP)
    await uf.uffdio_writeprotect(ctx, t, a, 2 * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    child = await fork(t)
    assert not _pm57(child, a)  # no EVENT_FORK: the child's bits are cleared
    assert _pm57(t, a)
    await write_user(t, a, b"z")  # WP_ASYNC: no message, no block
    assert not ctx.fault_pending
    assert not _pm57(t, a)
    assert _pm57(t, a + P)
    kernel.kill(child, 9)
    kernel.reap(child)
    await ctx.put()


async def test_unmap_event_blocks_until_read(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 4 * P)
    ctx = await _ready(t, features=uf.UFFD_FEATURE_EVENT_UNMAP)
    await uf.uffdio_register(ctx, t, a, 4 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    un = asyncio.ensure_future(sys_munmap(t, a, 2 * P))
    await _settle()
    assert not un.done()
    with pytest.raises(KernelError) as e:
        await uf.uffdio_zeropage(ctx, t, a + 2 * P, P)
    assert errname(e.value) == "EAGAIN"  # mmap_changing
    (m,) = await ctx.read(64)
    assert (m.event, m.start, m.end) == (uf.UFFD_EVENT_UNMAP, a, a + 2 * P)
    await un
    assert not ctx.mmap_changing
    with pytest.raises(KernelError) as e:
        await uf.uffdio_copy(ctx, t, a, b"\0" * P)
    assert errname(e.value) == "ENOENT"
    assert await uf.uffdio_zeropage(ctx, t, a + 2 * P, P) == P
    # closing with an event pending: the munmap goes on, the event is dropped
    un = asyncio.ensure_future(sys_munmap(t, a + 2 * P, 2 * P))
    await _settle()
    assert not un.done()
    await ctx.put()
    await un


async def test_remove_and_remap_events(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    feats = uf.UFFD_FEATURE_EVENT_REMOVE | uf.UFFD_FEATURE_EVENT_REMAP
    ctx = await _ready(t, features=feats)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    await uf.uffdio_copy(ctx, t, a, b"\4" * (2 * P))
    md = asyncio.ensure_future(sys_madvise(t, a, 2 * P, MADV_DONTNEED))
    await _settle()
    assert not md.done()
    (m,) = await ctx.read(64)
    assert (m.event, m.start, m.end) == (uf.UFFD_EVENT_REMOVE, a, a + 2 * P)
    await md
    assert mm_of(t).vmas[0].uffd_ctx is ctx  # still registered
    # mremap moves the registration along, REMAP {from, to, len} is read before it returns
    target = await mmap_anon(t, 4 * P)
    fl = MREMAP_MAYMOVE | MREMAP_FIXED
    mr = asyncio.ensure_future(sys_mremap(t, a, 2 * P, 4 * P, fl, target))
    await _settle()
    assert not mr.done()
    (m,) = await ctx.read(64)
    new = await mr
    assert new == target
    assert (m.event, m.start, m.to, m.length) == (uf.UFFD_EVENT_REMAP, a, new, 2 * P)
    r = asyncio.ensure_future(read_user_bytes(t, new + P, 1))
    await _settle()
    (m,) = await ctx.read(64)
    assert m.address == new + P
    await uf.uffdio_zeropage(ctx, t, new + P, P)
    assert await r == b"\0"
    await ctx.put()


async def test_remap_without_feature_unregisters(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 2 * P)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 2 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    target = await mmap_anon(t, 4 * P)
    new = await sys_mremap(t, a, 2 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    assert await read_user_bytes(t, new, 1) == b"\0"
    assert not ctx.fault_pending
    await ctx.put()


async def test_poison(kernel: Kernel) -> None:
    t = _priv(kernel)
    n = 6
    a = await mmap_anon(t, n * P)
    ctx = await _ready(t, features=uf.UFFD_FEATURE_POISON)
    await uf.uffdio_register(ctx, t, a, n * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    sigbus = 0
    for i in range(n):
        r = asyncio.ensure_future(read_user_bytes(t, a + i * P, 1))
        await _settle()
        (m,) = await ctx.read(32)
        assert m.address == a + i * P
        if i % 2:
            await uf.uffdio_copy(ctx, t, m.address, b"\0" * P)
        else:
            assert await uf.uffdio_poison(ctx, t, m.address, P) == P
        exc = await asyncio.gather(r, return_exceptions=True)
        if isinstance(exc[0], UserFault):
            sigbus += 1
            assert exc[0].signo == signal.SIGBUS
        else:
            assert exc[0] == b"\0"
    assert sigbus == n // 2
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_poison(ctx, t, a + P, P)  # present
    assert errname(e2.value) == "EEXIST"
    with pytest.raises(KernelError) as e2:
        await uf.uffdio_poison(ctx, t, a, P)  # a marker already
    assert errname(e2.value) == "EEXIST"
    mm = mm_of(t)
    pages = page_array(1)
    assert await gup.get_user_pages_unlocked(mm, a, 1, pages, 0, current=t) == -errno.EFAULT
    got = await gup.get_user_pages_unlocked(mm, a, 1, pages, FOLL_HWPOISON, current=t)
    assert got == -EHWPOISON
    await ctx.put()
    with pytest.raises(UserFault):  # still poisoned after the uffd is gone
        await read_user_bytes(t, a, 1)


async def test_move(kernel: Kernel) -> None:
    t = _priv(kernel)
    n = 4
    src = await mmap_anon(t, n * P)
    dst = await mmap_anon(t, n * P)
    for i in range(n - 1):  # the last source page is a hole
        await write_user(t, src + i * P, bytes([i + 1]) * P)
    ctx = await _ready(t, features=uf.UFFD_FEATURE_MOVE)
    await uf.uffdio_register(ctx, t, dst, n * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, dst + P, 1))
    await _settle()
    (m,) = await ctx.read(32)
    assert m.flags == 0
    pfn = pfn_at(t, src + P)
    assert await uf.uffdio_move(ctx, t, dst + P, src + P, P) == P
    assert await r == b"\2"
    assert pfn_at(t, dst + P) == pfn  # zero copy
    assert pfn_at(t, src + P) == -1
    # hole without ALLOW_SRC_HOLES → ENOENT; with it, it counts as moved
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst + 3 * P, src + 3 * P, P)
    assert errname(e.value) == "ENOENT"
    mode = uf.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
    assert await uf.uffdio_move(ctx, t, dst + 3 * P, src + 3 * P, P, mode) == P
    # dst populated → EEXIST; partial: 1 page moved then EEXIST
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst + P, src, P)
    assert errname(e.value) == "EEXIST"
    with pytest.raises(uf.PartialFill) as pe:
        await uf.uffdio_move(ctx, t, dst, src, 2 * P)
    assert pe.value.done == P
    assert await read_user_bytes(t, dst, 1) == b"\1"
    # a source page shared with a child → EBUSY
    child = await fork(t)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, t, dst + 2 * P, src + 2 * P, P)
    assert errname(e.value) == "EBUSY"
    with pytest.raises(KernelError) as e:
        await uf.uffdio_move(ctx, child, dst + 2 * P, src + 2 * P, P)
    assert errname(e.value) == "EINVAL"  # another mm
    kernel.kill(child, 9)
    kernel.reap(child)
    await ctx.put()


async def test_shmem_missing_copy_zeropage(kernel: Kernel) -> None:
    t = _priv(kernel)
    a = await mmap_anon(t, 3 * P, flags=SHARED_ANON)
    ctx = await _ready(t)
    await uf.uffdio_register(ctx, t, a, 3 * P, uf.UFFDIO_REGISTER_MODE_MISSING)
    r = asyncio.ensure_future(read_user_bytes(t, a + P, 2))
    await _settle()
    (m,) = await ctx.read(32)
    assert m.address == a + P
    assert await uf.uffdio_copy(ctx, t, a + P, b"\7" * P) == P
    assert await r == b"\7\7"
    w = asyncio.ensure_future(write_user(t, a, b"q"))
    await _settle()
    (m,) = await ctx.read(32)
    assert m.flags == uf.UFFD_PAGEFAULT_FLAG_WRITE
    assert await uf.uffdio_zeropage(ctx, t, a, P) == P
    await w
    assert await read_user_bytes(t, a, 2) == b"q\0"
    vma = mm_of(t).vmas[0]
    assert vma.shmem is not None
    assert set(vma.shmem.pages) == {0, 1}
    await ctx.put()


async def test_shmem_minor_continue(kernel: Kernel) -> None:
    t = _priv(kernel)
    n = 3
    a = await mmap_anon(t, n * P, flags=SHARED_ANON)
    await write_user(t, a, b"".join(bytes([i + 1]) * P for i in range(n - 1)))
    await sys_madvise(t, a, n * P, MADV_DONTNEED)  # PTEs gone, the page cache stays
    ctx = await _ready(t, features=uf.UFFD_FEATURE_MINOR_SHMEM)
    mode = uf.UFFDIO_REGISTER_MODE_MINOR | uf.UFFDIO_REGISTER_MODE_MISSING
    ioctls = await uf.uffdio_register(ctx, t, a, n * P, mode)
    assert ioctls & (1 << uf._UFFDIO_CONTINUE)
    for i in range(n - 1):
        r = asyncio.ensure_future(read_user_bytes(t, a + i * P, 1))
        await _settle()
        (m,) = await ctx.read(32)
        assert m.flags == uf.UFFD_PAGEFAULT_FLAG_MINOR
        assert await uf.uffdio_continue(ctx, t, a + i * P, P) == P
        assert await r == bytes([i + 1])
    with pytest.raises(KernelError) as e:
        await uf.uffdio_continue(ctx, t, a, P)
    assert errname(e.value) == "EEXIST"
    # the last page is not cached: a MISSING fault, and CONTINUE there → EFAULT
    r = asyncio.ensure_future(read_user_bytes(t, a + (n - 1) * P, 1))
    await _settle()
    (m,) = await ctx.read(32)
    assert m.flags == 0
    with pytest.raises(KernelError) as e:
        await uf.uffdio_continue(ctx, t, a + (n - 1) * P, P)
    assert errname(e.value) == "EFAULT"
    await uf.uffdio_zeropage(ctx, t, a + (n - 1) * P, P)
    assert await r == b"\0"
    # anon: MINOR registration and CONTINUE → EINVAL
    b = await mmap_anon(t, P)
    await uf.uffdio_register(ctx, t, b, P, uf.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_continue(ctx, t, b, P)
    assert errname(e.value) == "EINVAL"
    await ctx.put()
