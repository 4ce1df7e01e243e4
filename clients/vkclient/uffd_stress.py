"""``vkctl uffd-stress anon|shmem|shmem-private MiB BOUNCES``: the bounce test of the kernel's
``tools/testing/selftests/mm/uffd-stress.c`` as a client program (kernel-semantics.md B.67).

One vkernel process holds two areas of ``MiB`` each, ``src`` and ``dst``. Every page starts
with a 40-byte pthread_mutex_t (the first u64 is the lock word), then the page's counter at
offset 40 and a placeholder u64 (always 1) at 48. Per bounce, for each "cpu" (``nr_cpus``:
the client machine's CPU count, as ``sysconf(_SC_NPROCESSORS_ONLN)``) the client runs, as
asyncio tasks acting as threads of the vkernel process:

- a **locker**: picks pages (random with BOUNCE_RANDOM; sequential otherwise, every cpu on the
  same page with BOUNCE_RACINGFAULTS), takes the page's lock, checks the counter against
  ``count_verify`` ("memory corruption" otherwise), increments both and unlocks. Its first
  access to a page is a read through the memory API, so a missing page is a MISSING *read*
  fault, as pthread_mutex_lock's first load is in C;
- a **uffd reader** (the monitor): a ReadUffdMessages stream; MISSING faults are served with
  UFFDIO_COPY from the src area (a WRITE flag is an error, as in uffd-common.c), WP faults by
  unprotecting the page. With BOUNCE_POLL the reader ends on its "pipe" (an event) like
  ``uffd_poll_thread``; otherwise it is cancelled like ``pthread_cancel`` of
  ``uffd_read_thread``;
- a **background copier**: COPYs the first half of its cpu's pages, write-protects its whole
  slice (when uffd-wp is in use), then COPYs the second half.

After the copiers finish, src is released (MADV_DONTNEED; MADV_REMOVE for shared shmem), the
lockers stop, then the readers; WP is cleared, dst unregistered, dst verified against
``count_verify`` with BOUNCE_VERIFY, and src/dst swap. The low four bits of the remaining
bounce count select the modes, exactly as uffd-stress cycles them. Output: uffd-stress's
``nr_pages:`` line, then per bounce ``bounces: N, mode: …, userfaults: …``; any corruption
prints ``ERROR: …`` and the run exits 1.

Differences from the C test, and why:

- The lock: no compare-and-swap travels over the memory API, so mutual exclusion among the
  lockers is an asyncio lock per page in this client (all lockers are tasks of this one
  program, so it plays the futex), while the lock word itself lives in the page: a locker
  reads the page header (faulting it in), checks the 40 mutex bytes are all zero (unlocked),
  writes its owner id and the new counter (the write that takes a WP fault), then writes the
  lock word back to zero. A header read made before the asyncio lock was won is re-read when
  another locker changed the page meanwhile, so racing faults on one page still happen.
- Fewer locker operations: C lockers spin for as long as the copiers run (millions of
  operations); here a locker also runs while the copiers run, but each operation is three
  round trips on the locker's own ``MemoryService.Access`` stream (one stream per thread, so
  accesses stay in program order), so a bounce does on the order of ``locker_ops`` (default
  LOCKER_OPS) operations per locker: a locker stops once the copiers are done *and* it has
  done that many.
- Batching: COPY takes its source from area_src in the process itself (``copy_from``: the
  daemon reads it as the ioctl's copy_from_user does, no bytes travel through the client).
  A copier sends one request per BATCH_PAGES pages with multi-page COPY operations of
  OP_PAGES on its own resolve stream; a partial COPY (a page a fault already filled: -EAGAIN
  with the bytes done) is redone page by page, and every page that answers -EEXIST is woken
  with UFFDIO_WAKE, as ``copy_page_retry``/``wake_range`` do. A reader resolves each read's
  batch of messages in one request on its own resolve stream.
- SIGALRM every ALARM_INTERVAL_SECS re-arms the deliberate "COPY twice, expect -EEXIST" check
  of ``retry_copy_page``; here a timer task does that (the first copier batch checks at once).
- uffd-wp is used when the kernel takes MODE_WP on the memory type (a kernel refusing it on
  shmem makes the run say so and use MISSING only, as uffd-stress does without the feature).
- ``shmem-private`` maps the shmem file MAP_PRIVATE (COPY then installs anon pages; release is
  MADV_DONTNEED plus a hole punched in the file, see ``release_pages``), where uffd-common.c
  maps shmem shared for both types; ``shmem`` maps it MAP_SHARED with an alias mapping of
  each area that is registered too, like uffd-common.c.
- After the last bounce the final src (the last bounce's dst) is verified whatever the mode,
  so every run ends with a full counter check.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vkclient import uffd as u
from vkclient._selftest import FaulterRefs
from vkclient.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_PRIVATE,
    MAP_SHARED,
    O_CREAT,
    O_RDWR,
    PAGE_SIZE,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFDIO_COPY_MODE_WP,
)

if TYPE_CHECKING:
    from vkclient._kernel import Kernel, Process
    from vkclient._memory import AccessStream
    from vkernel.v1.userfaultfd_service_pb2 import UffdResolveOp

P = PAGE_SIZE
BOUNCE_RANDOM = 1 << 0
BOUNCE_RACINGFAULTS = 1 << 1
BOUNCE_VERIFY = 1 << 2
BOUNCE_POLL = 1 << 3
ALARM_INTERVAL_SECS = 10.0
TYPES = ("anon", "shmem", "shmem-private")

MUTEX_SIZE = 40
"""sizeof(pthread_mutex_t) on x86_64: the counter follows it (``area_count``)."""
COUNT_OFF = MUTEX_SIZE
PLACEHOLDER_OFF = COUNT_OFF + 8
HEADER = PLACEHOLDER_OFF + 8
BATCH_PAGES = 64
"""Pages per copier request: small enough that lockers meet pages no copier reached yet."""
OP_PAGES = 16
"""Pages per COPY operation inside a copier's request (a partial one is redone per page)."""
LOCKER_OPS = 192
"""Operations each locker does at least per bounce (see the module docstring)."""
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_FLAGS = O_CLOEXEC | O_NONBLOCK | u.UFFD_USER_MODE_ONLY
"""uffd-common.h's UFFD_FLAGS (the gRPC message stream is a blocking read either way)."""
_EEXIST = -errno.EEXIST


class StressError(Exception):
    """What uffd-stress's err() reports: the run stops and exits 1."""


@dataclass
class CpuStats:
    """struct uffd_args' counters for one cpu's reader."""

    missing_faults: int = 0
    wp_faults: int = 0
    minor_faults: int = 0


def report_line(stats: list[CpuStats]) -> str:
    """uffd_stats_report()'s text (its ``\\b`` erases the last ``+``)."""
    parts = []
    for name in ("missing", "wp", "minor"):
        counts = [getattr(s, f"{name}_faults") for s in stats]
        if sum(counts):
            parts.append(f"{sum(counts)} {name} ({'+'.join(map(str, counts))})")
    return "userfaults: " + " ".join(parts)


def mode_text(bounces: int) -> str:
    """The ``mode:`` words uffd-stress prints for this bounce."""
    words = [
        w
        for bit, w in (
            (BOUNCE_RANDOM, "rnd"),
            (BOUNCE_RACINGFAULTS, "racing"),
            (BOUNCE_VERIFY, "ver"),
        )
        if bounces & bit
    ]
    words.append("poll" if bounces & BOUNCE_POLL else "read")
    return " ".join(words)


@dataclass
class StressTest(FaulterRefs):
    """One ``uffd-stress TYPE MiB BOUNCES`` run in one process of ``kernel``."""

    kernel: Kernel
    test_type: str
    nr_pages_per_cpu: int
    bounces: int
    nr_cpus: int
    emit: Callable[[str], None] = print
    locker_ops: int = LOCKER_OPS
    before_stress: Callable[[StressTest], Awaitable[None]] | None = None
    """A hook run each bounce just before the threads start (tests inject corruption here)."""
    seed: int | None = None

    proc: Process | None = None
    uffd: u.Userfaultfd | None = None
    area_src: int = 0
    area_dst: int = 0
    area_src_alias: int = 0
    area_dst_alias: int = 0
    test_uffdio_wp: bool = False
    count_verify: list[int] = field(default_factory=list)
    _copy_eexist_due: bool = True
    _finished: bool = False
    _rng: random.Random = field(default_factory=random.Random)
    _mem_fd: int = -1
    races: int = 0
    """COPYs that met a page already filled (-EEXIST, then woken): fault/copier races."""
    _file_offset: dict[int, int] = field(default_factory=dict)

    @property
    def nr_pages(self) -> int:
        return self.nr_pages_per_cpu * self.nr_cpus

    @property
    def area_bytes(self) -> int:
        return self.nr_pages * P

    # ---- set-up (uffd_test_ctx_init) ----------------------------------------------------------

    async def _allocate(self) -> None:
        p = self.p
        n = self.area_bytes
        if self.test_type == "anon":
            self.area_src = await p.mmap(n)
            self.area_dst = await p.mmap(n)
            return
        # uffd_mem_fd_create(): one shmem file of twice the area, src at 0 and dst at n.
        name = f"uffd-stress.{p.pid}"
        mem_fd = await p.open(name, O_RDWR | O_CREAT, kind="shmem")
        await p.ftruncate(mem_fd, 2 * n)
        await p.unlink(name)  # nameless from now on, like a memfd
        shared = self.test_type == "shmem"
        flags = MAP_SHARED if shared else MAP_PRIVATE
        self.area_src = await p.mmap(n, flags=flags, fd=mem_fd, offset=0)
        if shared:
            self.area_src_alias = await p.mmap(n, flags=MAP_SHARED, fd=mem_fd, offset=0)
        self.area_dst = await p.mmap(n, flags=flags, fd=mem_fd, offset=n)
        if shared:
            self.area_dst_alias = await p.mmap(n, flags=MAP_SHARED, fd=mem_fd, offset=n)
            await p.close(mem_fd)  # the mappings keep the file, as with a closed memfd
        else:
            self._mem_fd = mem_fd
            self._file_offset = {self.area_src: 0, self.area_dst: n}

    async def release_pages(self, area: int) -> None:
        """uffd_test_ops->release_pages: MADV_REMOVE for shared shmem, else MADV_DONTNEED.

        shmem mapped private also punches the area's range of the file: a fault of a private
        mapping (the initial writes to src COW through it) fills the page cache, and a cached
        page is no MISSING fault any more, so only a hole makes the next bounce's faults."""
        advice = MADV_REMOVE if self.test_type == "shmem" else MADV_DONTNEED
        await self.p.madvise(area, self.area_bytes, advice)
        if self._mem_fd >= 0:
            await self.p.fallocate(
                self._mem_fd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                self._file_offset[area],
                self.area_bytes,
            )

    async def setup(self) -> None:
        """Areas, the uffd with WP_UNPOPULATED, src counters = 1, dst released."""
        self.proc = await self.kernel.spawn("uffd-stress")
        await self._allocate()
        self.uffd = await u.Userfaultfd.create(self.kernel, self.p.pid, UFFD_FLAGS)
        features, _ = await self.fd.api(UFFD_FEATURE_WP_UNPOPULATED)
        self.test_uffdio_wp = bool(features & UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        if self.test_uffdio_wp and self.test_type != "anon":
            # Probe MODE_WP on this memory type: a kernel without shmem uffd-wp says EINVAL.
            try:
                await self.fd.register(self.area_dst, self.area_bytes, self._register_mode(True))
                await self.fd.unregister(self.area_dst, self.area_bytes)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.test_uffdio_wp = False
                self.emit(f"# uffd-wp unsupported on {self.test_type}: missing faults only")
        self.count_verify = [1] * self.nr_pages
        page = bytearray(P)
        struct.pack_into("<QQ", page, COUNT_OFF, 1, 1)
        await self.p.write(self.area_src, bytes(page) * self.nr_pages)
        await self.release_pages(self.area_dst)

    def _register_mode(self, wp: bool) -> int:
        return u.UFFDIO_REGISTER_MODE_MISSING | (u.UFFDIO_REGISTER_MODE_WP if wp else 0)

    async def teardown(self) -> None:
        if self.uffd is not None:
            await self.uffd.close()
        if self.proc is not None:
            await self.proc.kill()
            await self.proc.wait()

    # ---- the threads --------------------------------------------------------------------------

    async def _lock_and_increment(
        self,
        cpu: int,
        mem: AccessStream,
        page_nr: int,
        locks: list[asyncio.Lock],
        versions: list[int],
    ) -> None:
        addr = self.area_dst + page_nr * P
        seen = versions[page_nr]
        head = await mem.load(addr, HEADER)  # pthread_mutex_lock's first load: a read fault
        async with locks[page_nr]:
            if versions[page_nr] != seen:
                head = await mem.load(addr, HEADER)  # another locker changed it meanwhile
            count, placeholder = struct.unpack_from("<QQ", head, COUNT_OFF)
            if any(head[:MUTEX_SIZE]) or placeholder != 1:
                raise StressError(
                    f"page_nr {page_nr} memory corruption: mutex/placeholder bytes "
                    f"{head[:MUTEX_SIZE].hex()} {placeholder}"
                )
            if count != self.count_verify[page_nr]:
                raise StressError(
                    f"page_nr {page_nr} memory corruption {count} {self.count_verify[page_nr]}"
                )
            count += 1
            owned = bytearray(PLACEHOLDER_OFF)
            struct.pack_into("<Q", owned, 0, self.p.pid << 8 | cpu + 1)  # the owner's tid
            struct.pack_into("<Q", owned, COUNT_OFF, count)
            await mem.store(addr, owned)
            self.count_verify[page_nr] = count
            await mem.store(addr, bytes(8))  # pthread_mutex_unlock
            versions[page_nr] += 1

    async def locking_thread(
        self, cpu: int, bounces: int, locks: list[asyncio.Lock], versions: list[int]
    ) -> None:
        nr_pages = self.nr_pages
        page_nr = 0
        if not bounces & BOUNCE_RANDOM:
            page_nr = -bounces
            if not bounces & BOUNCE_RACINGFAULTS:
                page_nr += cpu * self.nr_pages_per_cpu
        ops = 0
        mem = self.p.access_stream()  # this thread's loads and stores, in order
        try:
            while not (self._finished and ops >= self.locker_ops):
                if bounces & BOUNCE_RANDOM:
                    page_nr = self._rng.getrandbits(64)
                else:
                    page_nr = (page_nr + 1) % (1 << 64)  # unsigned long arithmetic, as in C
                page_nr %= nr_pages
                await self._lock_and_increment(cpu, mem, page_nr, locks, versions)
                ops += 1
        finally:
            await mem.close()

    def _copy_op(self, page_nr: int, npages: int, dst_base: int = 0) -> UffdResolveOp:
        """UFFDIO_COPY of ``npages`` from area_src to area_dst (or ``dst_base``) at page_nr:
        the daemon reads src as the process's own memory, like the ioctl's copy_from_user."""
        off = page_nr * P
        mode = UFFDIO_COPY_MODE_WP if self.test_uffdio_wp else 0
        dst = (dst_base or self.area_dst) + off
        return u.copy_from(dst, self.p.pid, self.area_src + off, npages * P, mode)

    async def _wake(self, rs: u.ResolveStream, addrs: list[int]) -> None:
        """wake_range() for every page whose COPY said -EEXIST."""
        if not addrs:
            return
        self.races += len(addrs)
        res = await rs.resolve([u.wake(a, P) for a in addrs])
        for a, (r, e) in zip(addrs, res, strict=True):
            if e:
                raise StressError(f"error waking {a}: {r}")

    async def handle_faults(
        self, rs: u.ResolveStream, msgs: list[u.UffdMessage], stats: CpuStats
    ) -> None:
        """uffd_handle_page_fault() for one read(2)'s batch, resolved in one request."""
        ops = []
        kinds: list[tuple[str, int]] = []
        for m in msgs:
            if m.event != u.UFFD_EVENT_PAGEFAULT:
                raise StressError(f"unexpected msg event {m.event}")
            addr = m.address & ~(P - 1)
            if m.flags & u.UFFD_PAGEFAULT_FLAG_WP:
                ops.append(u.writeprotect(addr, P, 0))
                kinds.append(("wp", addr))
            elif m.flags & UFFD_PAGEFAULT_FLAG_MINOR:
                raise StressError("unexpected minor fault (MINOR is not registered)")
            else:
                if m.flags & u.UFFD_PAGEFAULT_FLAG_WRITE:
                    raise StressError("unexpected write fault")
                offset = addr - self.area_dst
                if not 0 <= offset < self.area_bytes:
                    raise StressError(f"unexpected offset {offset}")
                ops.append(self._copy_op(offset // P, 1))
                kinds.append(("copy", addr))
        res = await rs.resolve(ops)
        eexist: list[int] = []
        for (kind, addr), (r, e) in zip(kinds, res, strict=True):
            if kind == "wp":
                if e:
                    raise StressError(f"clear WP failed: address={addr:#x} ({r})")
                stats.wp_faults += 1
            elif r == P and not e:
                stats.missing_faults += 1
            elif r == _EEXIST:
                eexist.append(addr)
            else:
                raise StressError(f"UFFDIO_COPY error: {r}")
        await self._wake(rs, eexist)

    async def uffd_reader(self, cpu: int, stats: CpuStats, pipe: asyncio.Event | None) -> None:
        """uffd_read_thread (``pipe`` None: blocking reads until cancelled, as pthread_cancel)
        or uffd_poll_thread (ends when its pipe is written)."""
        stream = self.fd.messages()
        stop = asyncio.ensure_future(pipe.wait()) if pipe is not None else None
        nxt: asyncio.Future[list[u.UffdMessage]] | None = None
        try:
            async with self.fd.resolver() as rs:
                if stop is None:
                    async for msgs in stream:
                        await self.handle_faults(rs, msgs, stats)
                    return
                while True:
                    nxt = asyncio.ensure_future(anext(stream))
                    done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:  # the pipe was written
                        return
                    try:
                        msgs = nxt.result()
                    except StopAsyncIteration:
                        return
                    await self.handle_faults(rs, msgs, stats)
        finally:
            if stop is not None:
                stop.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()  # ends the ReadUffdMessages call

    async def _copy_pages(self, rs: u.ResolveStream, first: int, n: int) -> None:
        """copy_page_retry() for pages [first, first+n), batched: multi-page COPYs in one
        request; a partial or refused one is redone page by page; -EEXIST pages are woken."""
        runs = [(s, min(OP_PAGES, first + n - s)) for s in range(first, first + n, OP_PAGES)]
        res = await rs.resolve([self._copy_op(s, m) for s, m in runs])
        redo: list[int] = []
        copied: list[int] = []
        for (s, m), (r, e) in zip(runs, res, strict=True):
            if not e and r == m * P:
                copied.append(s)
            elif e == errno.EAGAIN and r > 0 and r % P == 0:  # stopped at a filled page
                copied.append(s)
                redo.extend(range(s + r // P, s + m))
            elif r == _EEXIST:
                redo.extend(range(s, s + m))
            else:
                raise StressError(f"UFFDIO_COPY error: {r}")
        eexist: list[int] = []
        if redo:
            res = await rs.resolve([self._copy_op(pg, 1) for pg in redo])
            for pg, (r, e) in zip(redo, res, strict=True):
                if r == _EEXIST:
                    eexist.append(self.area_dst + pg * P)
                elif e or r != P:
                    raise StressError(f"UFFDIO_COPY error: {r}")
                else:
                    copied.append(pg)
        await self._wake(rs, eexist)
        if copied and self._copy_eexist_due:
            self._copy_eexist_due = False
            await self._retry_copy_page(rs, copied[0])

    async def _retry_copy_page(self, rs: u.ResolveStream, page_nr: int) -> None:
        """retry_copy_page(): COPY a page just copied again (through the alias for shmem):
        it must fail with -EEXIST."""
        [(r, _)] = await rs.resolve([self._copy_op(page_nr, 1, self.area_dst_alias)])
        if r != _EEXIST:
            raise StressError(f"UFFDIO_COPY retry {'unexpected' if r >= 0 else 'error'}: {r}")

    async def background_thread(self, cpu: int) -> None:
        start_nr = cpu * self.nr_pages_per_cpu
        end_nr = (cpu + 1) * self.nr_pages_per_cpu
        mid_nr = (start_nr + end_nr) // 2
        async with self.fd.resolver() as rs:
            for s in range(start_nr, mid_nr, BATCH_PAGES):
                await self._copy_pages(rs, s, min(BATCH_PAGES, mid_nr - s))
            if self.test_uffdio_wp:
                start = self.area_dst + start_nr * P
                wp = u.writeprotect(start, self.nr_pages_per_cpu * P, u.UFFDIO_WRITEPROTECT_MODE_WP)
                [(r, _)] = await rs.resolve([wp])
                if r:
                    raise StressError(f"clear WP failed: address={start:#x}")
            for s in range(mid_nr, end_nr, BATCH_PAGES):
                await self._copy_pages(rs, s, min(BATCH_PAGES, end_nr - s))

    async def _alarm(self) -> None:
        """SIGALRM every ALARM_INTERVAL_SECS: the next copier batch re-checks -EEXIST."""
        while True:
            await asyncio.sleep(ALARM_INTERVAL_SECS)
            self._copy_eexist_due = True

    # ---- one bounce ---------------------------------------------------------------------------

    async def stress(self, bounces: int, stats: list[CpuStats]) -> None:
        """stress(): lockers, readers and copiers for one bounce."""
        self._finished = False
        locks = [asyncio.Lock() for _ in range(self.nr_pages)]
        versions = [0] * self.nr_pages
        poll = bool(bounces & BOUNCE_POLL)
        pipes = [asyncio.Event() for _ in range(self.nr_cpus)]
        try:
            async with asyncio.TaskGroup() as tg:
                lockers = []
                readers = []
                background = []
                for cpu in range(self.nr_cpus):
                    lockers.append(
                        tg.create_task(self.locking_thread(cpu, bounces, locks, versions))
                    )
                    readers.append(
                        tg.create_task(
                            self.uffd_reader(cpu, stats[cpu], pipes[cpu] if poll else None)
                        )
                    )
                    background.append(tg.create_task(self.background_thread(cpu)))
                for t in background:
                    await t
                # Every page of dst is now present: src can go (uffd_test_ops->release_pages).
                await self.release_pages(self.area_src)
                self._finished = True
                for t in lockers:
                    await t
                for cpu, t in enumerate(readers):
                    if poll:
                        pipes[cpu].set()
                        await t
                    else:
                        t.cancel()
        except BaseExceptionGroup as eg:
            # The first real failure is the report (the others are its consequences).
            errors = [e for e in eg.exceptions if not isinstance(e, asyncio.CancelledError)]
            raise errors[0] if errors else eg from None

    async def verify(self, area: int, what: str) -> None:
        """Every counter equals count_verify; mutex bytes zero; placeholder 1."""
        data = memoryview(await self.p.read(area, self.area_bytes))
        for nr in range(self.nr_pages):
            b = nr * P
            count, placeholder = struct.unpack_from("<QQ", data, b + COUNT_OFF)
            if count != self.count_verify[nr]:
                raise StressError(f"error area_count {count} {self.count_verify[nr]} {nr} ({what})")
            if placeholder != 1 or any(data[b : b + MUTEX_SIZE]):
                raise StressError(
                    f"page_nr {nr} memory corruption: mutex/placeholder bytes "
                    f"{data[b : b + MUTEX_SIZE].hex()} {placeholder} ({what})"
                )

    async def run_bounces(self) -> None:
        fd = self.fd
        mode = self._register_mode(self.test_uffdio_wp)
        bounces = self.bounces
        while bounces:
            bounces -= 1
            head = f"bounces: {bounces}, mode: {mode_text(bounces)}, "
            await fd.register(self.area_dst, self.area_bytes, mode)
            if self.area_dst_alias:
                await fd.register(self.area_dst_alias, self.area_bytes, mode)
            await self.release_pages(self.area_dst)
            stats = [CpuStats() for _ in range(self.nr_cpus)]
            if self.before_stress is not None:
                await self.before_stress(self)
            try:
                await self.stress(bounces, stats)
            except StressError:
                self.emit(head.rstrip(", ") + ",")
                raise
            if self.test_uffdio_wp:
                [(r, _)] = await fd.resolve([u.writeprotect(self.area_dst, self.area_bytes, 0)])
                if r:
                    raise StressError(f"clear WP failed: address={self.area_dst:#x}")
            await fd.unregister(self.area_dst, self.area_bytes)
            if self.area_dst_alias:
                await fd.unregister(self.area_dst_alias, self.area_bytes)
            if bounces & BOUNCE_VERIFY:
                await self.verify(self.area_dst, f"bounce {bounces}")
            self.area_src, self.area_dst = self.area_dst, self.area_src
            self.area_src_alias, self.area_dst_alias = self.area_dst_alias, self.area_src_alias
            self.emit(head + report_line(stats))
        await self.verify(self.area_src, "final")

    async def run(self) -> int:
        """The whole test: 0 when every counter checked out, 1 on any error."""
        self._rng = random.Random(self.seed)
        self.emit(f"nr_pages: {self.nr_pages}, nr_pages_per_cpu: {self.nr_pages_per_cpu}")
        alarm = asyncio.ensure_future(self._alarm())
        try:
            await self.setup()
            await self.run_bounces()
        except StressError as e:
            self.emit(f"ERROR: {e}")
            return 1
        finally:
            alarm.cancel()
            await self.teardown()
        return 0


def parse_runs(words: list[str]) -> list[tuple[str, int, int]]:
    """``TYPE MiB BOUNCES`` triples (ValueError with uffd-stress's complaint if malformed)."""
    if not words or len(words) % 3:
        raise ValueError("usage: uffd-stress <test type> <MiB> <bounces> [...]")
    runs = []
    for i in range(0, len(words), 3):
        kind, mib, bounces = words[i], int(words[i + 1]), int(words[i + 2])
        if kind not in TYPES:
            raise ValueError(f"failed to parse test type argument: '{kind}'")
        if mib <= 0:
            raise ValueError("invalid MiB")
        if bounces <= 0:
            raise ValueError("invalid bounces")
        runs.append((kind, mib, bounces))
    return runs


async def run(
    k: Kernel,
    test_type: str,
    mib: int,
    bounces: int,
    emit: Callable[[str], None] = print,
    *,
    nr_cpus: int | None = None,
    locker_ops: int = LOCKER_OPS,
    before_stress: Callable[[StressTest], Awaitable[None]] | None = None,
    seed: int | None = None,
) -> int:
    """``uffd-stress TYPE MiB BOUNCES``: exit status 0 when every counter checked out."""
    cpus = nr_cpus or os.cpu_count() or 1
    per_cpu = (mib << 20) // P // cpus
    if not per_cpu:
        emit("ERROR: invalid MiB")
        return 1
    t = StressTest(
        k,
        test_type,
        per_cpu,
        bounces,
        cpus,
        emit,
        locker_ops=locker_ops,
        before_stress=before_stress,
        seed=seed,
    )
    start = time.monotonic()
    status = await t.run()
    emit(
        f"# {test_type} {mib} MiB, {bounces} bounces: {time.monotonic() - start:.1f} s, "
        f"{t.races} COPY -EEXIST races woken"
    )
    return status
