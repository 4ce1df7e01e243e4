"""Driver handles: the page references a session took through the GUP API (DESIGN §6).

A client acting as a driver calls Linux's GUP entry points on a process's memory; every
reference it takes lands in a :class:`GupHandle` owned by its session, holding exactly the
references taken (one per returned page). The driver releases all of a handle or any subset
(unpin for FOLL_PIN, put_page for FOLL_GET, optionally marking the folios dirty first); when
the session ends, what is left is released with Linux's close semantics (as ib_umem_release
does for an RDMA registration: writable pins are released dirty) and a ``pins_leaked``
structlog event records the counts.

The entry points themselves (``vkernel.kernel.gup``, ``vkernel.kernel.gup_fast``) keep the
kernel's books (``kernel.extra_refs`` / ``extra_pins``, vmstat): this registry only decides who
holds what, takes mmap_lock the way each entry point's lock contract requires, and moves DMA
bytes through held pages. No gRPC here.
"""

from __future__ import annotations

import enum
import errno
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import numpy as np
import numpy.typing as npt
import structlog

from vkernel.grants import GrantTable
from vkernel.kernel import gup
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm import MmStruct
from vkernel.kernel.task import Task, TaskState
from vkernel.kernel.uapi import FOLL_LONGTERM, FOLL_WRITE, PAGE_SHIFT, PAGE_SIZE, PG_dirty
from vkernel.sessions import Session

log = structlog.get_logger("vkernel.gup")

IntArray = npt.NDArray[np.int64]
_T = TypeVar("_T")

MAX_GUP_PAGES = 1 << 22
"""Pages per GUP call through the API (16 GiB; its pfn list is 32 MiB, below message limits)."""
MAX_DMA_BYTES = 32 << 20
"""Bytes per DmaRead/DmaWrite call."""
DMA_THREAD_BYTES = 4 << 20
"""DMA copies above this size run in a worker thread while the pins keep the frames alive."""


class GupApi(enum.IntEnum):
    """The GUP entry points (numbers as the GupApi enum of gup_service.proto)."""

    GET_USER_PAGES = 1
    GET_USER_PAGES_REMOTE = 2
    GET_USER_PAGES_UNLOCKED = 3
    GET_USER_PAGES_FAST = 4
    GET_USER_PAGES_FAST_ONLY = 5
    PIN_USER_PAGES = 6
    PIN_USER_PAGES_REMOTE = 7
    PIN_USER_PAGES_UNLOCKED = 8
    PIN_USER_PAGES_FAST = 9

    @property
    def pins(self) -> bool:
        """FOLL_PIN (pin_user_pages*) rather than FOLL_GET."""
        return self >= GupApi.PIN_USER_PAGES


@dataclass(eq=False)
class GupHandle:
    """The references one GUP call took, owned by one session."""

    id: int
    session_id: str
    pid: int
    api: GupApi
    gup_flags: int
    start: int
    pfns: IntArray
    held: npt.NDArray[np.bool_]
    created: float = field(default_factory=time.monotonic)
    nr_held: int = 0
    mm: MmStruct | None = None
    """The mm whose pinned_vm carries this handle's charge (FOLL_LONGTERM pins)."""
    charged: int = 0
    """Pages still charged to ``mm.pinned_vm``."""
    dma_busy: int = 0
    """DMA copies running in worker threads through this handle's frames."""
    orphaned: bool = False
    """The session ended while a DMA copy ran: the copy's end releases what is left."""

    @property
    def pinned(self) -> bool:
        """FOLL_PIN references (else FOLL_GET)."""
        return self.api.pins

    @property
    def nr_pages(self) -> int:
        """Pages the handle covers."""
        return len(self.pfns)


@dataclass
class GupResult:
    """What one GUP call through the API produced."""

    handle: GupHandle | None
    count: int
    lock_dropped: bool = False


async def call_gup(
    mm: MmStruct, api: GupApi, start: int, nr_pages: int, gup_flags: int, locked: bool
) -> tuple[int, IntArray, bool]:
    """Run one entry point with its lock contract (A.2); returns (ret, pages, lock_dropped).

    The caller of get_user_pages()/pin_user_pages() holds mmap_lock for read and it is never
    dropped; the *_remote variants are called with the lock held and, given ``locked``, may
    return with it released; *_unlocked and *_fast take it themselves if they need it. The
    driver is not a task of the target: ``current`` is None (no signals).
    """
    from vkernel.kernel import gup_fast  # the lockless walk is its own module (per-arch tables)

    pages = np.zeros(max(nr_pages, 1), dtype=np.int64)
    lock = mm.mmap_lock
    if api in (GupApi.GET_USER_PAGES, GupApi.PIN_USER_PAGES):
        fn = gup.get_user_pages if api is GupApi.GET_USER_PAGES else gup.pin_user_pages
        async with lock.read(None):
            ret = await fn(mm, start, nr_pages, gup_flags, pages)
        return ret, pages, False
    if api in (GupApi.GET_USER_PAGES_REMOTE, GupApi.PIN_USER_PAGES_REMOTE):
        remote = (
            gup.get_user_pages_remote
            if api is GupApi.GET_USER_PAGES_REMOTE
            else gup.pin_user_pages_remote
        )
        await lock.read_lock(None)
        lk = gup.Locked(1) if locked else None
        try:
            ret = await remote(mm, start, nr_pages, gup_flags, pages, lk)
        finally:
            if lk is None or lk.value:
                lock.read_unlock()
        return ret, pages, lk is not None and lk.value == 0
    if api is GupApi.GET_USER_PAGES_UNLOCKED:
        return (
            await gup.get_user_pages_unlocked(mm, start, nr_pages, pages, gup_flags),
            pages,
            False,
        )
    if api is GupApi.PIN_USER_PAGES_UNLOCKED:
        return (
            await gup.pin_user_pages_unlocked(mm, start, nr_pages, pages, gup_flags),
            pages,
            False,
        )
    if api is GupApi.GET_USER_PAGES_FAST:
        return (
            await gup_fast.get_user_pages_fast(mm, start, nr_pages, gup_flags, pages),
            pages,
            False,
        )
    if api is GupApi.GET_USER_PAGES_FAST_ONLY:
        return (
            gup_fast.get_user_pages_fast_only(mm, start, nr_pages, gup_flags, pages),
            pages,
            False,
        )
    return await gup_fast.pin_user_pages_fast(mm, start, nr_pages, gup_flags, pages), pages, False


def release_refs(kernel: Kernel, pfns: IntArray, pinned: bool, dirty: bool) -> None:
    """Give back references: unpin_user_pages_dirty_lock() for pins; for FOLL_GET references
    set_page_dirty_lock() (when ``dirty``) then put_page(), as a driver does."""
    n = len(pfns)
    if not n:
        return
    if pinned:
        gup.unpin_user_pages_dirty_lock(kernel, pfns, n, dirty)
        return
    if dirty:
        mem = kernel.mem
        heads = mem.compound_heads(pfns)
        heads = heads[heads != mem.zero_pfn]
        mem.flags[heads] |= np.uint32(PG_dirty)
    gup.put_pages(kernel, pfns, n)


class HandleTable:
    """Every session's GUP handles, and the grants that let a session act on a process."""

    def __init__(self, kernel: Kernel, grants: GrantTable | None = None) -> None:
        self.kernel = kernel
        self.grants = grants or GrantTable()
        self._by_session: dict[str, dict[int, GupHandle]] = {}
        self._next_id = 1

    # ---- access ---------------------------------------------------------------------------

    def target(self, session: Session, pid: int) -> Task:
        """The process ``pid`` if ``session`` may act on it: ESRCH if none, EPERM if it is
        another session's and no grant lets this one in."""
        task = self.kernel.find_task(pid)
        if not self.grants.allowed(task, session.id):
            raise KernelError(
                errno.EPERM,
                f"process {pid} belongs to another session and no grant lets this one act on it",
                pid=pid,
            )
        if task.state is not TaskState.RUNNING or task.mm is None:
            raise KernelError(errno.ESRCH, f"process {pid} has exited", pid=pid)
        return task

    def _handles(self, session: Session) -> dict[int, GupHandle]:
        """The session's handle dict, registering the close hook on first use."""
        if session.closed:
            raise KernelError(errno.ESRCH, f"session {session.id} has ended")
        handles = self._by_session.get(session.id)
        if handles is None:
            handles = self._by_session[session.id] = {}
            session.on_close(self.close_session)
        return handles

    def get(self, session: Session, handle_id: int) -> GupHandle:
        """One of the session's handles, or EBADF (a handle is the driver's fd-like name)."""
        handle = self._by_session.get(session.id, {}).get(handle_id)
        if handle is None:
            raise KernelError(errno.EBADF, f"no GUP handle {handle_id} in this session")
        return handle

    def handles(self, session: Session) -> list[GupHandle]:
        """The session's handles, oldest first."""
        return list(self._by_session.get(session.id, {}).values())

    def __iter__(self) -> Iterator[GupHandle]:
        for handles in self._by_session.values():
            yield from handles.values()

    # ---- taking references -----------------------------------------------------------------

    async def gup(
        self,
        session: Session,
        pid: int,
        api: int,
        start: int,
        nr_pages: int,
        gup_flags: int,
        locked: bool = False,
    ) -> GupResult:
        """Run one entry point on ``pid``'s memory for ``session``; a handle holds the result.

        A negative return becomes the KernelError of its errno; 0 (FOLL_NOWAIT, or the pin_*
        answer to invalid arguments) is a success without a handle.
        """
        try:
            which = GupApi(api)
        except ValueError:
            raise einval(f"unknown GUP entry point {api}", field="api") from None
        if nr_pages > MAX_GUP_PAGES:
            raise einval(f"nr_pages {nr_pages} is more than {MAX_GUP_PAGES} per call", "nr_pages")
        if not 0 <= start < 1 << 64 or not 0 <= gup_flags < 1 << 32:
            raise einval("start or gup_flags out of range")
        task = self.target(session, pid)
        handles = self._handles(session)
        mm: MmStruct = task.mm
        ret, pages, dropped = await call_gup(mm, which, start, nr_pages, gup_flags, locked)
        if ret < 0:
            raise KernelError(-ret, f"{which.name.lower()}() failed", pid=pid)
        if ret == 0:
            return GupResult(None, 0, dropped)
        if session.closed:
            # The driver went away while GUP slept on mmap_lock or a fault: nobody will
            # ever release these, so close semantics apply at once.
            release_refs(self.kernel, pages[:ret], which.pins, False)
            raise KernelError(errno.ESRCH, "the session ended during the GUP call")
        charged = 0
        if which.pins and gup_flags & FOLL_LONGTERM:
            # A long-term pin is locked memory: charged to the process's pinned_vm (VmPin)
            # against its RLIMIT_MEMLOCK unless it holds CAP_IPC_LOCK, as ib_umem_get() does.
            if gup.account_pinned_vm(mm, ret, task) < 0:
                release_refs(self.kernel, pages[:ret], True, False)
                raise KernelError(
                    errno.ENOMEM,
                    f"pinning {ret} more pages passes process {pid}'s RLIMIT_MEMLOCK",
                    pid=pid,
                )
            charged = ret
        handle = GupHandle(
            id=self._next_id,
            session_id=session.id,
            pid=pid,
            api=which,
            gup_flags=gup_flags,
            start=start & ~(PAGE_SIZE - 1),
            pfns=pages[:ret].copy(),
            held=np.ones(ret, dtype=np.bool_),
            nr_held=ret,
            mm=mm,
            charged=charged,
        )
        self._next_id += 1
        handles[handle.id] = handle
        return GupResult(handle, ret, dropped)

    # ---- giving them back ------------------------------------------------------------------

    def release(
        self,
        session: Session,
        handle_id: int,
        *,
        dirty: bool = False,
        first: int = 0,
        count: int = 0,
        indices: npt.NDArray[np.int64] | None = None,
    ) -> tuple[int, int]:
        """Release pages of a handle: ``indices``, else [first, first+count) (count 0: every
        page still held from ``first`` on). Returns (released, remaining). EINVAL for an index out of range, repeated, or
        already released (nothing is released then); EBUSY while DMA runs through it."""
        handle = self.get(session, handle_id)
        n = handle.nr_pages
        if indices is None:
            if first > n or count > n - first:
                raise einval(f"range [{first}, +{count}) outside the handle's {n} pages", "first")
            if count == 0:  # whatever is still held from ``first`` to the end
                idx = first + np.flatnonzero(handle.held[first:])
            else:
                idx = np.arange(first, first + count, dtype=np.int64)
        else:
            idx = indices.astype(np.int64, copy=False)
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise einval(f"an index is outside the handle's {n} pages", "indices")
            if len(np.unique(idx)) != len(idx):
                raise einval("an index is repeated", "indices")
        if not handle.held[idx].all():
            raise einval("a page in the range was released already", "indices")
        if handle.dma_busy:
            raise KernelError(errno.EBUSY, f"DMA is running through handle {handle_id}")
        self._release(handle, idx, dirty)
        return len(idx), handle.nr_held

    def _release(self, handle: GupHandle, idx: IntArray, dirty: bool) -> None:
        """Drop the references at ``idx`` (all held) and forget the handle once empty."""
        release_refs(self.kernel, handle.pfns[idx], handle.pinned, dirty)
        handle.held[idx] = False
        handle.nr_held -= len(idx)
        if handle.charged and handle.mm is not None:
            n = min(handle.charged, len(idx))
            gup.unaccount_pinned_vm(handle.mm, n)
            handle.charged -= n
        if handle.nr_held == 0:
            self._by_session.get(handle.session_id, {}).pop(handle.id, None)

    def close_session(self, session: Session) -> None:
        """Session end (a Session.on_close hook): release every held reference, log the leak."""
        self.grants.drop_session(session.id)
        handles = self._by_session.pop(session.id, {})
        nhandles = pins = refs = 0
        for handle in handles.values():
            if not handle.nr_held:
                continue
            nhandles += 1
            if handle.pinned:
                pins += handle.nr_held
            else:
                refs += handle.nr_held
            if handle.dma_busy:
                handle.orphaned = True  # the running copy releases it when it is done
                continue
            # Close semantics of a driver (ib_umem_release): writable pins go back dirty,
            # since the device may have written through them.
            writable = bool(handle.gup_flags & FOLL_WRITE)
            self._release(handle, np.flatnonzero(handle.held), writable and handle.pinned)
        if nhandles:
            log.warning(
                "pins_leaked",
                session=session.id,
                client=session.client_name,
                handles=nhandles,
                pins=pins,
                refs=refs,
            )

    # ---- DMA -------------------------------------------------------------------------------

    def _dma_span(self, handle: GupHandle, offset: int, length: int) -> tuple[IntArray, int]:
        """The frames a DMA of ``length`` bytes at ``offset`` touches, and the offset in the
        first one. EINVAL beyond the handle or the size limit; EFAULT through a released page
        (an IOMMU fault: the mapping is gone)."""
        if length > MAX_DMA_BYTES:
            raise einval(f"{length} bytes is more than {MAX_DMA_BYTES} per DMA call", "length")
        end = offset + length
        if end > handle.nr_pages << PAGE_SHIFT:
            raise einval(
                f"DMA [{offset:#x}, {end:#x}) beyond the handle's {handle.nr_pages} pages",
                "offset",
            )
        i0 = offset >> PAGE_SHIFT
        i1 = (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        if not handle.held[i0:i1].all():
            raise KernelError(errno.EFAULT, "DMA through a page the handle no longer holds")
        return handle.pfns[i0:i1], offset - (i0 << PAGE_SHIFT)

    async def dma_read(self, session: Session, handle_id: int, offset: int, length: int) -> bytes:
        """A device read of ``length`` bytes at ``offset`` through a handle's pages."""
        handle = self.get(session, handle_id)
        if length == 0:
            return b""
        pfns, off = self._dma_span(handle, offset, length)
        frames = self.kernel.mem.frames

        def copy() -> bytes:
            return bytes(frames[pfns].reshape(-1)[off : off + length].data)

        if length <= DMA_THREAD_BYTES:
            return copy()
        return await self._in_thread(handle, copy)

    async def dma_write(
        self, session: Session, handle_id: int, offset: int, data: bytes | memoryview
    ) -> int:
        """A device write of ``data`` at ``offset`` through a handle's pages. Needs a handle
        taken with FOLL_WRITE (EACCES otherwise: the IOMMU mapping is read-only). PTE dirty
        bits are untouched: release with ``dirty`` to mark the folios dirty."""
        handle = self.get(session, handle_id)
        if not handle.gup_flags & FOLL_WRITE:
            raise KernelError(
                errno.EACCES, f"handle {handle_id} was taken without FOLL_WRITE: DMA is read-only"
            )
        length = len(data)
        if length == 0:
            return 0
        pfns, off = self._dma_span(handle, offset, length)
        frames = self.kernel.mem.frames
        src = np.frombuffer(data, dtype=np.uint8)

        def copy() -> None:
            if off == 0 and length == len(pfns) << PAGE_SHIFT:
                frames[pfns] = src.reshape(-1, PAGE_SIZE)
                return
            block = frames[pfns]
            block.reshape(-1)[off : off + length] = src
            frames[pfns] = block

        if length <= DMA_THREAD_BYTES:
            copy()
        else:
            await self._in_thread(handle, copy)
        return length

    async def _in_thread(self, handle: GupHandle, fn: Callable[[], _T]) -> _T:
        """Run a long copy in a worker thread (DESIGN §4) with the handle marked busy."""
        handle.dma_busy += 1
        try:
            return await anyio.to_thread.run_sync(fn)
        finally:
            handle.dma_busy -= 1
            if handle.orphaned and not handle.dma_busy and handle.nr_held:
                self._release(handle, np.flatnonzero(handle.held), False)
