"""``vkctl uffd-unit-tests``: a subset of the kernel's uffd-unit-tests selftest over gRPC.

Each test spawns a process, drives its memory through the SDK and a userfaultfd handle, and
prints ``Testing <name> on anon... done`` / ``failed`` as the selftest does. Covered: api,
register-ioctls, missing (read and write faults served by a monitor task), zeropage, wp,
poison, move. Exit status 0 when all pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from vkclient import uffd as u
from vkclient.errors import VkernelError

if TYPE_CHECKING:
    from vkclient._kernel import Kernel, Process

P = 4096
NPAGES = 16
_MINOR = 4


async def _setup(
    k: Kernel, mode: int = u.UFFDIO_REGISTER_MODE_MISSING
) -> tuple[Process, u.Userfaultfd, int]:
    p = await k.spawn("uffd-unit")
    area = await p.mmap(NPAGES * P)
    fd = await u.Userfaultfd.create(k, p.pid, u.UFFD_USER_MODE_ONLY)
    await fd.api()
    await fd.register(area, NPAGES * P, mode)
    return p, fd, area


async def _done(p: Process, fd: u.Userfaultfd) -> None:
    await fd.close()
    await p.kill()
    await p.wait()


async def t_api(k: Kernel) -> bool:
    """UFFDIO_API handshake (B.42)."""
    p = await k.spawn("uffd-unit")
    fd = await u.Userfaultfd.create(k, p.pid, u.UFFD_USER_MODE_ONLY)
    ok = True
    try:
        await fd.api(api=0xAB)
        ok = False
    except OSError as e:
        ok &= e.errno == 22
    features, ioctls = await fd.api()
    ok &= ioctls == (1 << 0x3F | 1 << 1 | 1 << 0) and features != 0
    try:
        await fd.api(features=1)
        ok = False
    except OSError as e:
        ok &= e.errno == 22
    await _done(p, fd)
    return ok


async def t_register_ioctls(k: Kernel) -> bool:
    """Returned ioctls per mode; MINOR on anon refused (B.44)."""
    p, fd, area = await _setup(k)
    ok = True
    for mode in (1, 2, 3):
        ioctls = await fd.register(area, P, mode)
        ok &= bool(ioctls & (1 << 2))  # WAKE
        ok &= bool(ioctls & (1 << 6)) == bool(mode & 2)  # WRITEPROTECT iff wp
        ok &= not ioctls & (1 << 7)  # no CONTINUE without minor
    for mode in (0, _MINOR):
        try:
            await fd.register(area, P, mode)
            ok = False
        except OSError as e:
            ok &= e.errno == 22
    await _done(p, fd)
    return ok


async def _serve(fd: u.Userfaultfd, area: int, seen: list[int]) -> None:
    async for msgs in fd.messages():
        ops = []
        for m in msgs:
            seen.append(m.flags)
            page = (m.address - area) // P
            ops.append(u.copy(m.address, bytes([page & 0xFF]) * P))
        await fd.resolve(ops)


async def t_missing(k: Kernel) -> bool:
    """Every page read once through MISSING faults served by a monitor (B.46)."""
    p, fd, area = await _setup(k)
    seen: list[int] = []
    task = asyncio.ensure_future(_serve(fd, area, seen))
    try:
        data = await asyncio.wait_for(p.read(area, NPAGES * P), 30)
        await asyncio.wait_for(p.write(area + NPAGES * P - 1, b"w"), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok = all(data[i * P] == i for i in range(NPAGES)) and len(seen) == NPAGES
    ok &= all(f == 0 for f in seen)
    await _done(p, fd)
    return ok


async def t_zeropage(k: Kernel) -> bool:
    """ZEROPAGE maps zeroes; again → EEXIST (B.49)."""
    p, fd, area = await _setup(k)
    ok = await fd.resolve([u.zeropage(area, P), u.zeropage(area, P)]) == [(P, 0), (-17, 17)]
    ok &= await p.read(area, 8) == bytes(8)
    await _done(p, fd)
    return ok


async def t_wp(k: Kernel) -> bool:
    """A write to a write-protected page blocks with WP|WRITE until unprotected (B.56)."""
    p, fd, area = await _setup(k, u.UFFDIO_REGISTER_MODE_WP)
    await p.write(area, b"x" * P)
    await fd.resolve([u.writeprotect(area, P, u.UFFDIO_WRITEPROTECT_MODE_WP)])
    flags: list[int] = []

    async def serve() -> None:
        async for msgs in fd.messages():
            flags.extend(m.flags for m in msgs)
            await fd.resolve([u.writeprotect(m.address, P, 0) for m in msgs])

    task = asyncio.ensure_future(serve())
    try:
        await asyncio.wait_for(p.write(area + 1, b"y"), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok = flags == [u.UFFD_PAGEFAULT_FLAG_WP | u.UFFD_PAGEFAULT_FLAG_WRITE]
    ok &= await p.read(area, 3) == b"xyx"
    await _done(p, fd)
    return ok


async def t_poison(k: Kernel) -> bool:
    """POISON: a later read is SIGBUS, on a present page EEXIST (B.63)."""
    p, fd, area = await _setup(k)
    ok = await fd.resolve([u.poison(area, P)]) == [(P, 0)]
    try:
        await p.read(area, 1)
        ok = False
    except OSError:
        pass
    ok &= await fd.resolve([u.poison(area, P)]) == [(-17, 17)]
    await _done(p, fd)
    return ok


async def t_move(k: Kernel) -> bool:
    """MOVE pages from a source area into the registered one, zero copy (B.64)."""
    p, fd, area = await _setup(k)
    src = await p.mmap(2 * P)
    await p.write(src, b"m" * (2 * P))
    ok = await fd.resolve([u.move(area, src, 2 * P)]) == [(2 * P, 0)]
    ok &= await p.read(area + P, 2) == b"mm"
    ok &= await p.read(src, 2) == bytes(2)
    await _done(p, fd)
    return ok


TESTS: list[tuple[str, Callable[[Kernel], Awaitable[bool]]]] = [
    ("api", t_api),
    ("register-ioctls", t_register_ioctls),
    ("missing", t_missing),
    ("zeropage", t_zeropage),
    ("wp", t_wp),
    ("poison", t_poison),
    ("move", t_move),
]


async def run(k: Kernel, emit: Callable[[str], None] = print) -> int:
    """Run every test; 0 when all pass, else the number of failures."""
    failed = 0
    for name, test in TESTS:
        try:
            ok = await test(k)
        except (OSError, TimeoutError, VkernelError) as e:  # an errno or a hang fails it
            emit(f"Testing {name} on anon... failed ({e})")
            failed += 1
            continue
        emit(f"Testing {name} on anon... {'done' if ok else 'failed'}")
        failed += not ok
    emit(f"Userfaults unit tests: pass={len(TESTS) - failed}, fail={failed}")
    return failed
