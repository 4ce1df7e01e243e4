"""userfaultfd (fs/userfaultfd.c, mm/userfaultfd.c; kernel-semantics.md A.13, B.42-B.66).

A :class:`UserfaultfdCtx` is one userfaultfd: created per process (``sys_userfaultfd``), held
by one or more *holders* (sessions; ``get``/``put``), initialised by the UFFDIO_API handshake,
registered over anonymous VMAs (``vma.uffd_ctx`` + VM_UFFD_* flags).

**Faults.** ``do_anonymous_page`` calls :func:`handle_userfault` for a MISSING-registered VMA.
It follows Linux's decision order and reuses the fault sleep/RETRY protocol of memory.py: the
fault's message is queued and the handler returns VM_FAULT_RETRY with ``vmf.wait`` set to a
:class:`UserfaultWait` and ``vmf.unlock`` True (even with TRIED: handle_userfault always drops
mmap_lock), so every sleepable caller (uaccess, GUP's retry driver, fixup_user_fault,
``handle_mm_fault_sleepable``) releases mmap_lock, sleeps until the fault is woken (COPY,
ZEROPAGE, WAKE, UNREGISTER, release) and faults again with TRIED. A caller without
ALLOW_RETRY (plain get_user_pages, populate under the lock) gets VM_FAULT_SIGBUS → EFAULT.

**Messages.** Unread faults sit in ``fault_pending`` (FIFO); :meth:`UserfaultfdCtx.read` moves
them to ``fault_read``: never reported again, still wakeable (B.55).

**Release.** The last ``put`` runs :func:`userfaultfd_release`: every VMA of the ctx loses its
registration (and merges), every waiter wakes and re-faults as an ordinary fault (B.53).

**Events.** UNMAP (every do_vmi_munmap path with a list), REMOVE (madvise), REMAP (mremap)
and FORK (``dup_userfaultfd``: the child's new ctx travels in ``UffdMsg.fork_ctx``, whose one
reference passes to the reader) block the triggering syscall until read; ``mmap_changing``
makes the resolution ioctls EAGAIN meanwhile.

**WP.** uffd-wp bits on present PTEs and PTE_MARKER_UFFD_WP on none PTEs (shmem always, anon
with WP_UNPOPULATED); memory.handle_pte_marker turns a marker into a protected page.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vkernel.kernel.cred import Capability
from vkernel.kernel.errors import KernelError
from vkernel.kernel.memory import ANON_FLAGS, FaultWait, VmFault
from vkernel.kernel.mm import MM_ANONPAGES, MmStruct
from vkernel.kernel.pgtable import pmd_slot, pte_alloc, pte_none_mostly
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_INTERRUPTIBLE,
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_RETRY_NOWAIT,
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_MARKER_POISONED,
    PTRS_PER_TABLE,
    TASK_SIZE,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_MAYWRITE,
    VM_SHARED,
    VM_SPECIAL,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
)
from vkernel.kernel.vma import VMA

# ---- uapi/linux/userfaultfd.h --------------------------------------------------------------------

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

UFFD_API_FEATURES = (
    UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_SIGBUS
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_MINOR_SHMEM
    | UFFD_FEATURE_EXACT_ADDRESS
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_WP_UNPOPULATED
    | UFFD_FEATURE_POISON
    | UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_MOVE
)
"""What vkernel advertises (no hugetlbfs memory exists): everything the issue lists, each acted
on (see docs/userfaultfd.md), and WP_HUGETLBFS_SHMEM, which 6.12 advertises with uffd-wp PTE
markers (CONFIG_PTE_MARKER_UFFD_WP): WP works on shmem."""

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

UFFD_API_IOCTLS = 1 << _UFFDIO_REGISTER | 1 << _UFFDIO_UNREGISTER | 1 << _UFFDIO_API
UFFD_API_RANGE_IOCTLS = (
    1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_ZEROPAGE
    | 1 << _UFFDIO_MOVE
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON
)

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_REGISTER_MODE_MINOR = 4
_REGISTER_MODES = (
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
)

UFFDIO_COPY_MODE_DONTWAKE = 1
UFFDIO_COPY_MODE_WP = 2
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFDIO_POISON_MODE_DONTWAKE = 1
UFFDIO_MOVE_MODE_DONTWAKE = 1
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 2
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_MSG_SIZE = 32
"""sizeof(struct uffd_msg)."""

_VM_UFFD_ANY = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR


def _err(code: int, msg: str, **kw: object) -> KernelError:
    """A KernelError for an ioctl's errno."""
    return KernelError(code, msg, **kw)


@dataclass
class UffdMsg:
    """struct uffd_msg (the fields of the event's union arm that applies)."""

    event: int
    flags: int = 0
    address: int = 0
    ptid: int = 0
    ufd: int = 0
    start: int = 0
    end: int = 0
    to: int = 0
    length: int = 0
    fork_ctx: UserfaultfdCtx | None = None
    """FORK: the child's new uffd (the reader installs it as a new fd; its number goes in
    ``ufd``)."""
    fork_task: Task | None = None
    """FORK: the child task the new uffd belongs to."""


class UserfaultWaiter:
    """struct userfaultfd_wait_queue: one blocked fault (its message and its wakeup)."""

    __slots__ = ("address", "fut", "msg", "woken")

    def __init__(self, msg: UffdMsg, address: int) -> None:
        self.msg = msg
        self.address = address
        """The page-aligned faulting address (what WAKE ranges are matched against)."""
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.woken = False

    def wake(self) -> None:
        """userfaultfd_wake_function(): the fault may be retried."""
        self.woken = True
        if not self.fut.done():
            self.fut.set_result(None)


class UffdEventWaiter:
    """A non-cooperative event whose triggering syscall waits until a reader takes it."""

    __slots__ = ("fut", "msg", "read")

    def __init__(self, msg: UffdMsg) -> None:
        self.msg = msg
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.read = False
        """A reader took it (else it was abandoned: release or a fatal signal)."""

    def complete(self) -> None:
        """The event was read (or abandoned on release)."""
        if not self.fut.done():
            self.fut.set_result(None)


class UserfaultWait(FaultWait):
    """The sleep of handle_userfault: until the fault is resolved or woken (killable with
    KILLABLE/INTERRUPTIBLE). A killed sleeper leaves the queues (its message with it)."""

    __slots__ = ("ctx", "waiter")

    def __init__(self, ctx: UserfaultfdCtx, waiter: UserfaultWaiter | None, task: Task | None):
        super().__init__(ctx.mm.mem, -1, task, False)
        self.ctx = ctx
        self.waiter = waiter

    async def sleep(self) -> None:
        """schedule() in handle_userfault, then the dequeue after wakeup."""
        w = self.waiter
        if w is None:
            return
        task = self.task

        def hook() -> None:
            if not w.fut.done():
                w.fut.set_result(None)

        if task is not None:
            task.add_kill_hook(hook)
        try:
            if task is None or not task.fatal_signal_pending():
                await w.fut
        finally:
            if task is not None:
                task.remove_kill_hook(hook)
            self.ctx._dequeue(w)


class UserfaultfdCtx:
    """struct userfaultfd_ctx."""

    def __init__(self, mm: MmStruct, flags: int) -> None:
        self.mm = mm
        self.flags = flags
        self.features = 0
        self.initialized = False
        """UFFD_FEATURE_INITIALIZED: UFFDIO_API succeeded."""
        self.released = False
        self.mmap_changing = 0
        """ctx->mmap_changing: non-cooperative events prepared but not yet read (a count)."""
        self.holders = 0
        self.fault_pending: deque[UserfaultWaiter] = deque()
        self.fault_read: list[UserfaultWaiter] = []
        self.events: deque[UffdEventWaiter] = deque()
        self._pollers: list[Callable[[], None]] = []
        """ctx->fd_wqh: wake functions run in the waker's context (see poll_wait); a blocked
        read(2) is one of them."""
        self.total_faults = 0

    # ---- references ---------------------------------------------------------------------------

    def get(self) -> UserfaultfdCtx:
        """get_file() on the uffd: one more holder."""
        self.holders += 1
        return self

    async def put(self) -> None:
        """fput(): the last holder releases the uffd (userfaultfd_release)."""
        self.holders -= 1
        if self.holders == 0:
            await userfaultfd_release(self)

    # ---- UFFDIO_API ---------------------------------------------------------------------------

    def api(self, task: Task, api: int, features: int) -> tuple[int, int]:
        """userfaultfd_api(): the handshake; returns ``(features, ioctls)`` (A.13, B.42)."""
        if self.initialized:
            raise _err(errno.EINVAL, "UFFDIO_API already done", field="api")
        if api != UFFD_API:
            raise _err(errno.EINVAL, "unknown UFFD_API", field="api")
        if features & UFFD_FEATURE_EVENT_FORK and not task.cred.capable(Capability.CAP_SYS_PTRACE):
            raise _err(errno.EPERM, "EVENT_FORK needs CAP_SYS_PTRACE", field="features")
        if features & UFFD_FEATURE_WP_ASYNC:
            features |= UFFD_FEATURE_WP_UNPOPULATED
        if features & ~UFFD_API_FEATURES:
            raise _err(errno.EINVAL, "unsupported features", field="features")
        self.features = features
        self.initialized = True
        return UFFD_API_FEATURES, UFFD_API_IOCTLS

    def _check_initialized(self) -> None:
        if not self.initialized:
            raise _err(errno.EINVAL, "UFFDIO_API not done yet")

    # ---- messages -----------------------------------------------------------------------------

    def _queue_fault(self, w: UserfaultWaiter) -> None:
        self.fault_pending.append(w)
        self.total_faults += 1
        self._wake_readers()

    def _wake_readers(self) -> None:
        """wake_up_poll(&ctx->fd_wqh): readers and pollers, a message or event is there."""
        if self._pollers:
            pollers, self._pollers = self._pollers, []
            for wake in pollers:
                wake()

    def poll_wait(self, wake: Callable[[], None]) -> None:
        """poll_wait() on ctx->fd_wqh with a wake function of one's own, as epoll's
        ep_poll_callback(): ``wake`` runs once, in the waker's context, when a fault or an
        event is queued or the uffd is released (the fd's reader answers without a task
        switch). It must not raise or sleep."""
        self._pollers.append(wake)

    def poll_cancel(self, wake: Callable[[], None]) -> None:
        """Remove a poll_wait() entry that has not run (the waiter gave up)."""
        with contextlib.suppress(ValueError):
            self._pollers.remove(wake)

    def _dequeue(self, w: UserfaultWaiter) -> None:
        """handle_userfault()'s list_del after schedule(): an unwoken (killed) fault leaves."""
        if w.woken:
            return  # wake_range/wake_all take a waiter off its queue before waking it
        try:
            self.fault_pending.remove(w)
        except ValueError:
            pass
        try:
            self.fault_read.remove(w)
        except ValueError:
            pass

    def poll(self) -> int:
        """userfaultfd_poll(): EPOLLERR before API or on a blocking fd, EPOLLHUP after release,
        EPOLLIN with a fault or event pending."""
        if self.released:
            return _EPOLLHUP
        if not self.initialized or not self.flags & O_NONBLOCK:
            return _EPOLLERR
        return _EPOLLIN if self.fault_pending or self.events else 0

    def _take(self, max_msgs: int) -> list[UffdMsg]:
        out: list[UffdMsg] = []
        while len(out) < max_msgs and self.fault_pending:
            w = self.fault_pending.popleft()
            self.fault_read.append(w)
            out.append(w.msg)
        while len(out) < max_msgs and self.events:
            ev = self.events.popleft()
            ev.read = True  # a FORK's new ctx reference passes to the reader (its new fd)
            ev.complete()  # userfaultfd_event_complete(): the triggering syscall may go on
            out.append(ev.msg)
        return out

    def _read_count(self, bufsize: int) -> int:
        """userfaultfd_read()'s checks: API done, room for one struct uffd_msg at least."""
        self._check_initialized()
        if bufsize < UFFD_MSG_SIZE:
            raise _err(errno.EINVAL, "buffer smaller than struct uffd_msg", field="len")
        return bufsize // UFFD_MSG_SIZE

    def read_nowait(self, bufsize: int) -> list[UffdMsg]:
        """userfaultfd_read() with O_NONBLOCK, which never sleeps: what is pending now, [] once
        released, EAGAIN when there is nothing."""
        out = self._take(self._read_count(bufsize))
        if out or self.released:
            return out
        raise _err(errno.EAGAIN, "no userfaultfd message pending")

    async def read(self, bufsize: int, nonblock: bool | None = None) -> list[UffdMsg]:
        """userfaultfd_read(): up to ``bufsize // 32`` messages, faults before events, FIFO;
        blocks only for the first (O_NONBLOCK → EAGAIN). Cancellation is the reader's signal."""
        n = self._read_count(bufsize)
        if nonblock is None:
            nonblock = bool(self.flags & O_NONBLOCK)
        while True:
            out = self._take(n)
            if out:
                return out
            if self.released:
                return []
            if nonblock:
                raise _err(errno.EAGAIN, "no userfaultfd message pending")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            self.poll_wait(wake)
            try:
                await fut
            finally:
                self.poll_cancel(wake)

    # ---- wakeups ------------------------------------------------------------------------------

    def wake_range(self, start: int, length: int) -> int:
        """__wake_userfault(): wake every fault (read or not) whose address is in the range."""
        end = start + length
        n = 0
        for q in (self.fault_pending, self.fault_read):
            if not q:
                continue
            hit = [w for w in q if start <= w.address < end]
            if not hit:
                continue
            # Off the queue first (one rebuild, not a remove per waiter), then woken in queue
            # order; wake() only schedules the sleepers, nobody runs in between.
            keep = [w for w in q if not start <= w.address < end] if len(hit) < len(q) else []
            q.clear()
            q.extend(keep)
            for w in hit:
                w.wake()
            n += len(hit)
        return n

    def wake_all(self) -> None:
        """Wake every fault waiter and reader (release)."""
        for w in list(self.fault_pending) + self.fault_read:
            w.wake()
        self.fault_pending.clear()
        self.fault_read.clear()
        for ev in self.events:
            ev.complete()  # abandoned
        self.events.clear()
        self._wake_readers()


_EPOLLIN = 0x001
_EPOLLERR = 0x008
_EPOLLHUP = 0x010


# ---- creation ------------------------------------------------------------------------------------


def sys_userfaultfd(task: Task, flags: int) -> UserfaultfdCtx:
    """userfaultfd(2): a new uffd on ``task``'s mm, with one holder (the caller)."""
    if flags & ~(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY):
        raise _err(errno.EINVAL, "unknown userfaultfd flags", field="flags")
    mm = task.mm
    if not isinstance(mm, MmStruct):
        raise _err(errno.ESRCH, "task has no mm")
    if (
        not flags & UFFD_USER_MODE_ONLY
        and not mm.kernel.config.unprivileged_userfaultfd
        and not task.cred.capable(Capability.CAP_SYS_PTRACE)
    ):
        raise _err(errno.EPERM, "userfaultfd needs CAP_SYS_PTRACE or UFFD_USER_MODE_ONLY")
    return UserfaultfdCtx(mm, flags).get()


# ---- the fault side ------------------------------------------------------------------------------


def handle_userfault(vma: VMA, address: int, flags: int, vmf: VmFault | None, reason: int) -> int:
    """handle_userfault(): Linux's decision order (A.13); RETRY with a UserfaultWait to sleep."""
    ctx = vma.uffd_ctx
    task = vmf.task if vmf is not None else None
    if task is not None and task.fatal_signal_pending():
        return VM_FAULT_SIGBUS  # PF_EXITING
    if ctx is None:
        return VM_FAULT_SIGBUS
    if ctx.features & UFFD_FEATURE_SIGBUS:
        return VM_FAULT_SIGBUS
    if not flags & FAULT_FLAG_USER and ctx.flags & UFFD_USER_MODE_ONLY:
        return VM_FAULT_SIGBUS
    if not flags & FAULT_FLAG_ALLOW_RETRY:
        return VM_FAULT_SIGBUS
    if flags & FAULT_FLAG_RETRY_NOWAIT or vmf is None:
        return VM_FAULT_RETRY
    killable = flags & (FAULT_FLAG_KILLABLE | FAULT_FLAG_INTERRUPTIBLE)
    if ctx.released:
        vmf.wait = UserfaultWait(ctx, None, task)
        vmf.unlock = True
        return VM_FAULT_RETRY
    page = address & ~(PAGE_SIZE - 1)
    mflags = 0
    if flags & FAULT_FLAG_WRITE:
        mflags |= UFFD_PAGEFAULT_FLAG_WRITE
    if reason & VM_UFFD_WP:
        mflags |= UFFD_PAGEFAULT_FLAG_WP
    if reason & VM_UFFD_MINOR:
        mflags |= UFFD_PAGEFAULT_FLAG_MINOR
    real = vmf.real_address if vmf.real_address >= 0 else address
    msg = UffdMsg(
        event=UFFD_EVENT_PAGEFAULT,
        flags=mflags,
        address=real if ctx.features & UFFD_FEATURE_EXACT_ADDRESS else page,
        ptid=task.pid if task is not None and ctx.features & UFFD_FEATURE_THREAD_ID else 0,
    )
    w = UserfaultWaiter(msg, page)
    ctx._queue_fault(w)
    vmf.wait = UserfaultWait(ctx, w, task if killable else None)
    vmf.unlock = True
    return VM_FAULT_RETRY


# ---- register / unregister ---------------------------------------------------------------------


def _validate_range(start: int, length: int) -> int:
    """validate_range(): page-aligned, non-empty, below TASK_SIZE; returns the end."""
    if start & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or not length:
        raise _err(errno.EINVAL, "range not page aligned or empty", field="range")
    if start >= TASK_SIZE or length > TASK_SIZE - start:
        raise _err(errno.EINVAL, "range beyond the address space", field="range")
    return start + length


def vma_can_userfault(vma: VMA, mode: int, ctx: UserfaultfdCtx) -> bool:
    """vma_can_userfault(): anonymous or shmem memory; MINOR on shmem only; WP alone with
    WP_ASYNC on any memory (file and dax mappings too: dirty tracking via pagemap bit 57)."""
    if vma.vm_flags & VM_SPECIAL:
        return False
    if mode & UFFDIO_REGISTER_MODE_MINOR and not _is_shmem(vma):
        return False  # shmem/hugetlb only
    if ctx.features & UFFD_FEATURE_WP_ASYNC and mode == UFFDIO_REGISTER_MODE_WP:
        return True
    return _is_shmem(vma) or vma.is_anonymous()


def _is_shmem(vma: VMA) -> bool:
    """vma_is_shmem(): shared anonymous memory or a shmem file."""
    return vma.shmem is not None and vma.mapping is None and vma.dax is None


def _mode_to_vm(mode: int) -> int:
    vm = 0
    if mode & UFFDIO_REGISTER_MODE_MISSING:
        vm |= VM_UFFD_MISSING
    if mode & UFFDIO_REGISTER_MODE_WP:
        vm |= VM_UFFD_WP
    if mode & UFFDIO_REGISTER_MODE_MINOR:
        vm |= VM_UFFD_MINOR
    return vm


async def uffdio_register(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int, mode: int
) -> int:
    """userfaultfd_register(): returns the ioctls bitmask valid on the range (A.13, B.44/45)."""
    from vkernel.kernel.mmap import vma_try_merge_around

    ctx._check_initialized()
    if not mode or mode & ~_REGISTER_MODES:
        raise _err(errno.EINVAL, "bad register mode", field="mode")
    end = _validate_range(start, length)
    mm = ctx.mm
    async with mm.mmap_lock.write(task):
        if mm.dead:
            raise _err(errno.ENOMEM, "mm is gone")
        vmas = mm.vmas_in(start, end)
        if not vmas:
            raise _err(errno.EINVAL, "no mapping in range", field="range")
        for v in vmas:
            if not vma_can_userfault(v, mode, ctx):
                raise _err(errno.EINVAL, "mapping cannot userfault", field="range")
            if not v.vm_flags & VM_MAYWRITE:
                raise _err(errno.EPERM, "mapping is not writable")
            if v.uffd_ctx is not None and v.uffd_ctx is not ctx:
                raise _err(errno.EBUSY, "range registered with another userfaultfd")
        vm = _mode_to_vm(mode)
        for v in vmas:
            v = _isolate_vma(mm, v, start, end)
            v.set_flags((v.vm_flags & ~_VM_UFFD_ANY) | vm)
            v.uffd_ctx = ctx
            vma_try_merge_around(mm, v)
    ioctls = UFFD_API_RANGE_IOCTLS
    if not mode & UFFDIO_REGISTER_MODE_WP:
        ioctls &= ~(1 << _UFFDIO_WRITEPROTECT)
    if not mode & UFFDIO_REGISTER_MODE_MINOR:
        ioctls &= ~(1 << _UFFDIO_CONTINUE)
    return ioctls


def _isolate_vma(mm: MmStruct, v: VMA, start: int, end: int) -> VMA:
    """vma_modify(): split ``v`` so that the returned VMA covers only [start, end)."""
    from vkernel.kernel.mmap import split_vma

    if v.vm_start < start:
        v = split_vma(mm, v, start)
    if v.vm_end > end:
        split_vma(mm, v, end)
    return v


def _unregister_vma(mm: MmStruct, v: VMA, start: int, end: int) -> None:
    from vkernel.kernel.mmap import vma_try_merge_around

    v = _isolate_vma(mm, v, start, end)
    if v.vm_flags & VM_UFFD_WP:
        uffd_wp_range(v, v.vm_start, v.vm_end, False)  # userfaultfd_clear_vma()
    v.set_flags(v.vm_flags & ~_VM_UFFD_ANY)
    v.uffd_ctx = None
    vma_try_merge_around(mm, v)


async def uffdio_unregister(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int
) -> None:
    """userfaultfd_unregister(): clear this ctx's registration and wake faults in the range
    (B.54). VMAs registered with another uffd → EINVAL (vma_can_userfault fails in Linux)."""
    ctx._check_initialized()
    end = _validate_range(start, length)
    mm = ctx.mm
    async with mm.mmap_lock.write(task):
        if mm.dead:
            raise _err(errno.ENOMEM, "mm is gone")
        vmas = mm.vmas_in(start, end)
        if not vmas:
            raise _err(errno.EINVAL, "no mapping in range", field="range")
        for v in vmas:
            if v.uffd_ctx is not None and v.uffd_ctx is not ctx:
                raise _err(errno.EINVAL, "range registered with another userfaultfd")
        for v in vmas:
            if v.uffd_ctx is ctx:
                _unregister_vma(mm, v, max(start, v.vm_start), min(end, v.vm_end))
    ctx.wake_range(start, length)


async def userfaultfd_release(ctx: UserfaultfdCtx) -> None:
    """userfaultfd_release(): released, registrations cleared (VMAs merged), every waiter woken
    to re-fault as an ordinary fault (never SIGBUS, B.53), readers see EPOLLHUP."""
    ctx.released = True
    mm = ctx.mm
    if not mm.dead:
        async with mm.mmap_lock.write(None, killable=False):
            for v in [v for v in mm.vmas if v.uffd_ctx is ctx]:
                if v.detached or v.uffd_ctx is not ctx:
                    continue
                _unregister_vma(mm, v, v.vm_start, v.vm_end)
    ctx.wake_all()


# ---- resolution ----------------------------------------------------------------------------------


def _fill_vma(ctx: UserfaultfdCtx, dst: int, end: int) -> VMA:
    """The destination checks of mfill_atomic(): one VMA of this ctx, anonymous."""
    vma = ctx.mm.vma_lookup(dst)
    if vma is None or end > vma.vm_end or vma.uffd_ctx is not ctx:
        raise _err(errno.ENOENT, "destination not registered with this userfaultfd")
    if not (vma.is_anonymous() or _is_shmem(vma)) or vma.vm_flags & VM_SPECIAL:
        raise _err(errno.EINVAL, "destination is neither anonymous memory nor shmem")
    return vma


def _shmem_fill(vma: VMA, addr: int, slot: int, data: memoryview | None, wp: bool) -> int:
    """shmem_mfill_atomic_pte(): a new page-cache page (copied or zeroed) mapped at ``addr``
    of a shared shmem VMA. Offset past i_size → EFAULT; index already cached → EEXIST."""
    from vkernel.kernel.memory import finish_fault
    from vkernel.kernel.uapi import PG_dirty, PG_lru, PG_shmem, PG_swapbacked, PG_uptodate

    obj = vma.shmem
    assert obj is not None
    idx = vma.linear_page_index(addr)
    if idx << PAGE_SHIFT >= obj.size:
        return errno.EFAULT
    if idx in obj.pages:
        return errno.EEXIST
    mem = vma.mm.mem
    pfn = mem.alloc_page(movable=True)
    if pfn < 0:
        return errno.ENOMEM
    if data is not None:
        mem.mv[pfn << PAGE_SHIFT : (pfn + 1) << PAGE_SHIFT] = data
    mem.flags[pfn] |= PG_shmem | PG_uptodate | PG_swapbacked | PG_lru | PG_dirty
    mem.mapping[pfn] = obj.id
    mem.index[pfn] = idx
    obj.pages[idx] = pfn
    finish_fault(vma, slot, pfn, True)
    if wp:
        mem.u64[slot] = (mem.u64.item(slot) | _PAGE_UFFD_WP) & ~_PAGE_RW
    return 0


def _dst_slot(vma: VMA, addr: int) -> int:
    """mm_alloc_pmd()+pte_alloc(): the PTE slot for ``addr``; -EEXIST on a huge PMD, -ENOMEM."""
    mm = vma.mm
    slot = pmd_slot(mm, addr, alloc=True)
    if slot < 0:
        return -errno.ENOMEM
    if mm.mem.u64.item(slot) & _PAGE_PSE:
        return -errno.EEXIST
    t = pte_alloc(mm, slot)
    if t < 0:
        return -errno.ENOMEM
    return t * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1))


async def _mfill(
    ctx: UserfaultfdCtx,
    task: Task | None,
    dst: int,
    length: int,
    dontwake: bool,
    fill: object,
    overwrite_wp_marker: bool = True,
) -> int:
    """mfill_atomic(): the common part of COPY/ZEROPAGE. Returns the bytes done; raises the
    errno when none were done; EAGAIN (``partial``) when some but not all were."""
    if dst & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1) or not length:
        raise _err(errno.EINVAL, "range not page aligned or empty", field="range")
    _validate_range(dst, length)
    if ctx.mmap_changing:
        raise _err(errno.EAGAIN, "address space changing (event pending)")
    mm = ctx.mm
    if mm.dead:
        raise _err(errno.ESRCH, "mm is gone")
    done = 0
    err = 0
    async with mm.mmap_lock.read(task):
        if mm.dead:
            raise _err(errno.ESRCH, "mm is gone")
        vma = _fill_vma(ctx, dst, dst + length)
        if not vma.vm_flags & VM_SHARED:
            # mfill_atomic(): a private destination gets its anon_vma first (markers too: fork
            # copies a VMA's page tables only when it has one, vma_needs_copy()).
            vma.anon_vma_prepare()
        mem = mm.mem
        assert callable(fill)
        while done < length:
            slot = _dst_slot(vma, dst + done)
            if slot < 0:
                err = -slot
                break
            pte = mem.u64.item(slot)
            if not (pte_none_mostly(pte) if overwrite_wp_marker else not pte):
                err = errno.EEXIST
                break
            r = fill(vma, dst + done, slot, done)
            if r:
                err = r
                break
            done += PAGE_SIZE
            if task is not None and task.fatal_signal_pending():
                if done < length:
                    err = errno.EINTR
                break
    if done and not dontwake:
        ctx.wake_range(dst, done)
    if err and not done:
        raise _err(err, errno.errorcode.get(err, str(err)))
    if done < length:
        raise PartialFill(done, err)
    return done


class PartialFill(KernelError):
    """A fill ioctl that did some but not all pages: -EAGAIN with the byte count done."""

    def __init__(self, done: int, cause: int) -> None:
        super().__init__(errno.EAGAIN, f"partial: {done} bytes done ({errno.errorcode[cause]})")
        self.done = done
        self.cause = cause


def _install_anon(vma: VMA, addr: int, slot: int, pfn: int, wp: bool) -> None:
    """mfill_atomic_install_pte() for a new anon-exclusive page: dirty, writable if VM_WRITE."""
    mm = vma.mm
    mem = mm.mem
    anon = vma.anon_vma_prepare()
    mem.flags[pfn] |= ANON_FLAGS
    mem.mapping[pfn] = anon.id
    mem.index[pfn] = vma.linear_page_index(addr)
    mem.mapcount[pfn] = 1
    bits = vma.vm_page_prot | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_WRITE and not wp:
        bits |= _PAGE_RW
    else:
        bits &= ~_PAGE_RW
    if wp:
        bits |= _PAGE_UFFD_WP
    mem.u64[slot] = (pfn << PAGE_SHIFT) | bits
    mm.add_rss(MM_ANONPAGES, 1)


async def uffdio_copy(
    ctx: UserfaultfdCtx,
    task: Task | None,
    dst: int,
    data: bytes | bytearray | memoryview,
    mode: int = 0,
) -> int:
    """UFFDIO_COPY with the source bytes given (page multiple): returns bytes copied; raises
    EEXIST/ENOENT/EINVAL/ESRCH/EAGAIN (mmap_changing) or :class:`PartialFill`."""
    ctx._check_initialized()
    if mode & ~(UFFDIO_COPY_MODE_DONTWAKE | UFFDIO_COPY_MODE_WP):
        raise _err(errno.EINVAL, "bad copy mode", field="mode")
    wp = bool(mode & UFFDIO_COPY_MODE_WP)
    src = memoryview(data).cast("B")

    def fill(vma: VMA, addr: int, slot: int, off: int) -> int:
        if wp and not vma.vm_flags & VM_UFFD_WP:
            return errno.EINVAL
        if vma.vm_flags & VM_SHARED:
            return _shmem_fill(vma, addr, slot, src[off : off + PAGE_SIZE], wp)
        mem = vma.mm.mem
        pfn = mem.alloc_page(movable=True)
        if pfn < 0:
            return errno.ENOMEM
        b = pfn << PAGE_SHIFT
        mem.mv[b : b + PAGE_SIZE] = src[off : off + PAGE_SIZE]
        _install_anon(vma, addr, slot, pfn, wp)
        return 0

    return await _mfill(ctx, task, dst, len(src), bool(mode & UFFDIO_COPY_MODE_DONTWAKE), fill)


async def uffdio_zeropage(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int, mode: int = 0
) -> int:
    """UFFDIO_ZEROPAGE: map the shared zero page (read-only; a write COWs); bytes mapped."""
    ctx._check_initialized()
    if mode & ~UFFDIO_ZEROPAGE_MODE_DONTWAKE:
        raise _err(errno.EINVAL, "bad zeropage mode", field="mode")

    def fill(vma: VMA, addr: int, slot: int, off: int) -> int:
        if vma.vm_flags & VM_SHARED:
            return _shmem_fill(vma, addr, slot, None, False)
        mem = vma.mm.mem
        if mem.u64.item(slot):
            return errno.EEXIST  # mfill_atomic_pte_zeropage(): pte_none(), not _mostly
        mem.u64[slot] = (
            (mem.zero_pfn << PAGE_SHIFT) | (vma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
        )
        mem.zero_maps += 1
        return 0

    return await _mfill(ctx, task, start, length, bool(mode & UFFDIO_ZEROPAGE_MODE_DONTWAKE), fill)


UFFDIO_CONTINUE_MODE_DONTWAKE = 1
UFFDIO_CONTINUE_MODE_WP = 2


async def uffdio_continue(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int, mode: int = 0
) -> int:
    """UFFDIO_CONTINUE (B.62): map the page already in the shmem page cache at a none PTE of a
    MINOR fault. anon → EINVAL; page not cached → EFAULT; PTE present → EEXIST; MODE_WP
    without VM_UFFD_WP → EINVAL. A private mapping maps it read-only. Bytes mapped."""
    from vkernel.kernel.memory import finish_fault

    ctx._check_initialized()
    if mode & ~(UFFDIO_CONTINUE_MODE_DONTWAKE | UFFDIO_CONTINUE_MODE_WP):
        raise _err(errno.EINVAL, "bad continue mode", field="mode")
    wp = bool(mode & UFFDIO_CONTINUE_MODE_WP)

    def fill(vma: VMA, addr: int, slot: int, off: int) -> int:
        if not _is_shmem(vma) or (wp and not vma.vm_flags & VM_UFFD_WP):
            return errno.EINVAL
        obj = vma.shmem
        assert obj is not None
        pfn = obj.pages.get(vma.linear_page_index(addr), -1)
        if pfn < 0:
            return errno.EFAULT
        finish_fault(vma, slot, pfn, False)
        if wp or not vma.vm_flags & VM_SHARED:
            mem = vma.mm.mem
            e = mem.u64.item(slot) & ~_PAGE_RW
            mem.u64[slot] = e | (_PAGE_UFFD_WP if wp else 0)
        return 0

    dontwake = bool(mode & UFFDIO_CONTINUE_MODE_DONTWAKE)
    # mfill_atomic_install_pte() overwrites a uffd-wp marker (pte_none_mostly), e.g. a MINOR
    # fault on a write-protected hole of a MINOR|WP range.
    return await _mfill(ctx, task, start, length, dontwake, fill)


async def uffdio_poison(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int, mode: int = 0
) -> int:
    """UFFDIO_POISON: PTE_MARKER_POISONED on none PTEs (a later access: SIGBUS for the CPU,
    EFAULT/EHWPOISON for GUP); any existing PTE or marker → EEXIST. Bytes marked."""
    ctx._check_initialized()
    if mode & ~UFFDIO_POISON_MODE_DONTWAKE:
        raise _err(errno.EINVAL, "bad poison mode", field="mode")

    def fill(vma: VMA, addr: int, slot: int, off: int) -> int:
        vma.mm.mem.u64[slot] = PTE_MARKER_POISONED
        return 0

    dontwake = bool(mode & UFFDIO_POISON_MODE_DONTWAKE)
    return await _mfill(ctx, task, start, length, dontwake, fill, overwrite_wp_marker=False)


def uffdio_wake(ctx: UserfaultfdCtx, start: int, length: int) -> int:
    """UFFDIO_WAKE: wake the faults in the range; returns how many woke (vkernel extra)."""
    ctx._check_initialized()
    _validate_range(start, length)
    return ctx.wake_range(start, length)


# ---- write protection ----------------------------------------------------------------------------


def wp_async(vma: VMA) -> bool:
    """userfaultfd_wp_async(): the VMA's uffd has WP_ASYNC (writes just clear uffd-wp)."""
    ctx = vma.uffd_ctx
    return ctx is not None and bool(ctx.features & UFFD_FEATURE_WP_ASYNC)


def userfaultfd_wp_unpopulated(vma: VMA) -> bool:
    """userfaultfd_wp_unpopulated(): the VMA's uffd has WP_UNPOPULATED (or WP_ASYNC)."""
    ctx = vma.uffd_ctx
    return ctx is not None and bool(ctx.features & UFFD_FEATURE_WP_UNPOPULATED)


def userfaultfd_wp_use_markers(vma: VMA) -> bool:
    """userfaultfd_wp_use_markers(): write-protecting a none PTE installs PTE_MARKER_UFFD_WP —
    always on shmem (the page cache may hold the page), on anon only with WP_UNPOPULATED."""
    if not vma.vm_flags & VM_UFFD_WP:
        return False
    if not vma.is_anonymous():
        return True
    return userfaultfd_wp_unpopulated(vma)


def _wp_chunks(mm: MmStruct, start: int, end: int, alloc: bool) -> Iterator[tuple[int, int, int]]:
    """walk_pmds(), or with ``alloc`` every PMD slot of the range allocated (markers need
    page tables where there were none: change_pmd_prepare())."""
    from vkernel.kernel.pgtable import walk_pmds
    from vkernel.kernel.uapi import PMD_SIZE

    if not alloc:
        yield from walk_pmds(mm, start, end)
        return
    addr = start
    while addr < end:
        nxt = min((addr & ~(PMD_SIZE - 1)) + PMD_SIZE, end)
        slot = pmd_slot(mm, addr, alloc=True)
        if slot < 0:
            raise _err(errno.ENOMEM, "out of memory for a page table")
        yield slot, addr, nxt
        addr = nxt


def uffd_wp_range(vma: VMA, start: int, end: int, enable: bool) -> None:
    """uffd_wp_range() → change_protection(MM_CP_UFFD_WP[_RESOLVE]).

    Protect: present PTEs become read-only plus the uffd-wp bit; none PTEs get
    PTE_MARKER_UFFD_WP when userfaultfd_wp_use_markers() (page tables allocated for them,
    change_pmd_prepare); existing markers stay. Resolve: drop the bit; an exclusive anon page
    of a writable private VMA, or a dirty page of a writable shared VMA, gets RW back
    (MM_CP_TRY_CHANGE_WRITABLE, can_change_pte_writable), others keep RO and take a normal
    write fault; uffd-wp markers are cleared (the next fault is an ordinary one), poison
    markers are left alone. Huge PMDs are split first (no uffd-wp PMDs in vkernel).
    """
    import numpy as np

    from vkernel.kernel.memory import split_all_huge_pmds
    from vkernel.kernel.pgtable import U64_PFN_MASK, U64_PRESENT, U64_SHIFT, table_of
    from vkernel.kernel.uapi import PTE_MARKER_UFFD_WP, PG_anon_exclusive

    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    split_all_huge_pmds(mm, start, end)
    wpbit = np.uint64(_PAGE_UFFD_WP)
    rw = np.uint64(_PAGE_RW)
    markers = enable and userfaultfd_wp_use_markers(vma)
    for slot, a, b in _wp_chunks(mm, start, end, markers):
        e = u.item(slot)
        if not e:
            if not markers:
                continue
            if pte_alloc(mm, slot) < 0:
                raise _err(errno.ENOMEM, "out of memory for a page table")
            e = u.item(slot)
        base = table_of(e) * PTRS_PER_TABLE
        i0 = (a >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1)
        ptes = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
        present = (ptes & U64_PRESENT) != 0
        if markers:
            ptes[ptes == 0] = np.uint64(PTE_MARKER_UFFD_WP)
        elif not enable:
            ptes[ptes == np.uint64(PTE_MARKER_UFFD_WP)] = 0
        pm = np.flatnonzero(present)
        if not len(pm):
            continue
        old = ptes[pm]
        if enable:
            ptes[pm] = (old | wpbit) & ~rw
            continue
        new = old & ~wpbit
        if vma.vm_flags & VM_WRITE and not vma.vm_flags & VM_SHARED:
            pfns = ((old & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
            ok = (mem.flags[pfns] & PG_anon_exclusive) != 0
            ok &= (old & np.uint64(_PAGE_SPECIAL)) == 0
            ok &= (old & wpbit) != 0
            new[ok] |= rw
        elif vma.vm_flags & VM_WRITE:
            # A shared mapping: a dirty PTE was already through writenotify, so it may be
            # writable again; a clean one keeps its write fault (can_change_pte_writable).
            ok = (old & wpbit) != 0
            ok &= (old & np.uint64(_PAGE_DIRTY)) != 0
            new[ok] |= rw
        ptes[pm] = new


def uffd_wp_clear_moved(mm: MmStruct, start: int, end: int) -> None:
    """move_ptes() for a VMA that lost its uffd-wp registration on mremap (no EVENT_REMAP,
    vma_has_uffd_without_event_remap): the moved PTEs drop the uffd-wp bit (staying read-only:
    the next write is an ordinary write fault) and uffd-wp markers go (Linux "mm: clear uffd-wp
    PTE/PMD state on mremap()", in the 6.12 stable series)."""
    import numpy as np

    from vkernel.kernel.pgtable import table_of, walk_pmds

    u = mm.mem.u64
    wpbit = np.uint64(_PAGE_UFFD_WP)
    for slot, a, b in walk_pmds(mm, start, end):
        e = u.item(slot)
        if not e or e & _PAGE_PSE:
            continue
        base = table_of(e) * PTRS_PER_TABLE + ((a >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1))
        ptes = u[base : base + ((b - a) >> PAGE_SHIFT)]
        wp = (ptes & wpbit) != 0
        if wp.any():
            # A present PTE stays read-only; a bare uffd-wp marker becomes none; a poison
            # marker keeps its poison bit.
            ptes[wp] &= ~wpbit


async def uffdio_writeprotect(
    ctx: UserfaultfdCtx, task: Task | None, start: int, length: int, mode: int
) -> None:
    """UFFDIO_WRITEPROTECT: mode WP protects, 0 resolves (and wakes unless DONTWAKE)."""
    ctx._check_initialized()
    if mode & ~(UFFDIO_WRITEPROTECT_MODE_WP | UFFDIO_WRITEPROTECT_MODE_DONTWAKE):
        raise _err(errno.EINVAL, "bad writeprotect mode", field="mode")
    enable = bool(mode & UFFDIO_WRITEPROTECT_MODE_WP)
    if enable and mode & UFFDIO_WRITEPROTECT_MODE_DONTWAKE:
        raise _err(errno.EINVAL, "WP together with DONTWAKE", field="mode")
    end = _validate_range(start, length)
    if ctx.mmap_changing:
        raise _err(errno.EAGAIN, "address space changing (event pending)")
    mm = ctx.mm
    if mm.dead:
        raise _err(errno.ESRCH, "mm is gone")
    async with mm.mmap_lock.read(task):
        vmas = mm.vmas_in(start, end)
        if not vmas:
            raise _err(errno.ENOENT, "no mapping in range")
        for v in vmas:
            if not v.vm_flags & VM_UFFD_WP or v.uffd_ctx is not ctx:
                raise _err(errno.ENOENT, "range not registered for WP with this userfaultfd")
        for v in vmas:
            uffd_wp_range(v, max(start, v.vm_start), min(end, v.vm_end), enable)
    if not enable and not mode & UFFDIO_WRITEPROTECT_MODE_DONTWAKE:
        ctx.wake_range(start, length)


# ---- non-cooperative events (UNMAP, REMOVE, REMAP) -----------------------------------------------


async def userfaultfd_event_wait_completion(
    ctx: UserfaultfdCtx, msg: UffdMsg, task: Task | None, ev: UffdEventWaiter | None = None
) -> bool:
    """userfaultfd_event_wait_completion(): queue the event, sleep (killable) until a reader
    takes it; then mmap_changing drops. A released ctx or a killed task abandons it. Returns
    whether a reader took it (the FORK path releases the new ctx otherwise); ``ev`` lets the
    caller see that even when the sleep is cancelled."""
    try:
        if ctx.released or (task is not None and task.fatal_signal_pending()):
            return False
        if ev is None:
            ev = UffdEventWaiter(msg)
        ctx.events.append(ev)
        ctx._wake_readers()

        def hook() -> None:
            ev.complete()

        if task is not None:
            task.add_kill_hook(hook)
        try:
            await ev.fut
        finally:
            if task is not None:
                task.remove_kill_hook(hook)
            if ev in ctx.events:
                ctx.events.remove(ev)
        return ev.read
    finally:
        ctx.mmap_changing -= 1


def _event_ctx(vma: VMA, feature: int) -> UserfaultfdCtx | None:
    ctx = vma.uffd_ctx
    if ctx is None or not ctx.features & feature or ctx.released:
        return None
    return ctx


class UserfaultfdUnmapCtx:
    """struct userfaultfd_unmap_ctx: an UNMAP {start, end} to send to one uffd."""

    __slots__ = ("ctx", "end", "start")

    def __init__(self, ctx: UserfaultfdCtx, start: int, end: int) -> None:
        self.ctx = ctx
        self.start = start
        self.end = end


def userfaultfd_unmap_prep(
    mm: MmStruct, start: int, end: int, unmaps: list[UserfaultfdUnmapCtx]
) -> None:
    """userfaultfd_unmap_prep(): an UNMAP {start, end} for each EVENT_UNMAP ctx of the VMAs in
    [start, end) (once per ctx and range, has_unmap_ctx), with mmap_changing raised. Called
    under mmap_lock for write by every do_vmi_munmap path that passes a list: munmap, mmap
    MAP_FIXED over a mapping, mremap shrinking, mremap's MREMAP_FIXED target and moved-from
    range."""
    for v in mm.vmas_in(start, end):
        ctx = _event_ctx(v, UFFD_FEATURE_EVENT_UNMAP)
        if ctx is None or any(u.ctx is ctx and u.start == start and u.end == end for u in unmaps):
            continue
        ctx.mmap_changing += 1
        unmaps.append(UserfaultfdUnmapCtx(ctx, start, end))


async def userfaultfd_unmap_complete(task: Task | None, unmaps: list[UserfaultfdUnmapCtx]) -> None:
    """userfaultfd_unmap_complete(): after mmap_lock is gone, each UNMAP, waited for until read
    (B.66). The list is emptied."""
    pending = list(unmaps)
    unmaps.clear()
    for i, u in enumerate(pending):
        try:
            msg = UffdMsg(event=UFFD_EVENT_UNMAP, start=u.start, end=u.end)
            await userfaultfd_event_wait_completion(u.ctx, msg, task)
        except BaseException:
            for later in pending[i + 1 :]:
                later.ctx.mmap_changing -= 1
            raise


async def userfaultfd_remove(mm: MmStruct, task: Task | None, start: int, end: int) -> None:
    """userfaultfd_remove() for MADV_DONTNEED/DONTNEED_LOCKED/FREE/REMOVE: a REMOVE
    {start, end} (clipped to each EVENT_REMOVE VMA) is read before the range is zapped.
    vkernel sends them all before the madvise takes its lock (Linux drops the lock per VMA)."""
    if not any(_event_ctx(v, UFFD_FEATURE_EVENT_REMOVE) for v in mm.vmas_in(start, end)):
        return  # the common case: no lock round trip
    pending: list[tuple[UserfaultfdCtx, int, int]] = []
    async with mm.mmap_lock.read(task):
        for v in mm.vmas_in(start, end):
            ctx = _event_ctx(v, UFFD_FEATURE_EVENT_REMOVE)
            if ctx is not None:
                ctx.mmap_changing += 1
                pending.append((ctx, max(start, v.vm_start), min(end, v.vm_end)))
    for i, (ctx, a, b) in enumerate(pending):
        try:
            msg = UffdMsg(event=UFFD_EVENT_REMOVE, start=a, end=b)
            await userfaultfd_event_wait_completion(ctx, msg, task)
        except BaseException:
            for later, _a, _b in pending[i + 1 :]:
                later.mmap_changing -= 1
            raise


def mremap_userfaultfd_prep(vma: VMA) -> UserfaultfdCtx | None:
    """mremap_userfaultfd_prep(): with EVENT_REMAP the moved VMA stays registered and
    mmap_changing rises until the REMAP is read; without it the new VMA is unregistered."""
    ctx = _event_ctx(vma, UFFD_FEATURE_EVENT_REMAP)
    if ctx is not None:
        ctx.mmap_changing += 1
    return ctx


_REMAPS: dict[int, list[tuple[UserfaultfdCtx, UffdMsg]]] = {}
"""REMAP events prepared under mmap_lock, by id(mm), sent by mremap_userfaultfd_complete."""


def mremap_userfaultfd_note(mm: MmStruct, ctx: UserfaultfdCtx, old: int, new: int, n: int) -> None:
    """Remember a REMAP {from, to, len} to send once mremap has dropped mmap_lock."""
    msg = UffdMsg(event=UFFD_EVENT_REMAP, start=old, to=new, length=n)
    _REMAPS.setdefault(id(mm), []).append((ctx, msg))


async def mremap_userfaultfd_complete(mm: MmStruct, task: Task | None) -> None:
    """mremap_userfaultfd_complete(): the REMAP events, each waited for until read."""
    pending = _REMAPS.pop(id(mm), [])
    for i, (ctx, msg) in enumerate(pending):
        try:
            await userfaultfd_event_wait_completion(ctx, msg, task)
        except BaseException:
            for later, _m in pending[i + 1 :]:
                later.mmap_changing -= 1
            raise


# ---- UFFD_EVENT_FORK -----------------------------------------------------------------------------


class UserfaultfdForkCtx:
    """struct userfaultfd_fork_ctx: a parent uffd with EVENT_FORK and the child's new uffd."""

    __slots__ = ("new", "orig")

    def __init__(self, orig: UserfaultfdCtx, new: UserfaultfdCtx) -> None:
        self.orig = orig
        self.new = new


def userfaultfd_reset_ctx(vma: VMA) -> None:
    """userfaultfd_reset_ctx(): the VMA forgets its uffd (no VM_UFFD_* flags, no ctx)."""
    vma.uffd_ctx = None
    vma.set_flags(vma.vm_flags & ~_VM_UFFD_ANY)


def dup_userfaultfd(vma: VMA, fcs: list[UserfaultfdForkCtx]) -> None:
    """dup_userfaultfd(): the child's copy ``vma`` of a registered VMA. Without EVENT_FORK it
    loses the registration; with it, it is registered with the child's new ctx (one per
    parent ctx, same flags and features), and the parent ctx's mmap_changing rises until the
    FORK event is read. Called by dup_mmap under the parent's mmap_lock, before the page
    tables are copied (copy_pte_range keeps uffd-wp bits only for a VM_UFFD_WP child VMA)."""
    octx = vma.uffd_ctx
    if octx is None:
        return
    if not octx.features & UFFD_FEATURE_EVENT_FORK:
        userfaultfd_reset_ctx(vma)
        return
    for f in fcs:
        if f.orig is octx:
            vma.uffd_ctx = f.new
            return
    ctx = UserfaultfdCtx(vma.mm, octx.flags)
    ctx.features = octx.features
    ctx.initialized = True
    # The one reference of the new ctx: held by the pending FORK event, then by the reader's
    # new fd (the gRPC layer makes it a handle of the reading session).
    ctx.holders = 1
    octx.mmap_changing += 1
    fcs.append(UserfaultfdForkCtx(octx, ctx))
    vma.uffd_ctx = ctx


async def dup_userfaultfd_complete(
    fcs: list[UserfaultfdForkCtx], child: Task, task: Task | None
) -> None:
    """dup_userfaultfd_complete(): one FORK {new ctx} per parent ctx, each waited for until
    read (after dup_mmap dropped mmap_lock). An event not read (the parent uffd was closed or
    the forking task killed) releases the new ctx: the child's VMAs lose the registration."""
    for i, f in enumerate(fcs):
        msg = UffdMsg(event=UFFD_EVENT_FORK, fork_ctx=f.new, fork_task=child)
        ev = UffdEventWaiter(msg)
        try:
            read = await userfaultfd_event_wait_completion(f.orig, msg, task, ev)
        except BaseException:
            dup_userfaultfd_fail(fcs[i + 1 :])
            if not ev.read:  # else the reader owns it (its mm is torn down with the child)
                f.new.released = True
                f.new.holders = 0
            raise
        if not read:
            await f.new.put()


def dup_userfaultfd_fail(fcs: list[UserfaultfdForkCtx]) -> None:
    """dup_userfaultfd_fail(): the fork failed before its FORK events went out: drop the
    parents' mmap_changing and the new ctxs (their mm is torn down by the caller)."""
    for f in fcs:
        f.orig.mmap_changing -= 1
        f.new.released = True
        f.new.holders = 0


# ---- UFFDIO_MOVE ---------------------------------------------------------------------------------


def _move_vmas_ok(src: VMA, dst: VMA, ctx: UserfaultfdCtx) -> bool:
    """validate_move_areas(): private anon, same access flags, prot and VM_LOCKED, writable,
    not special; dst registered on this ctx."""
    from vkernel.kernel.uapi import VM_ACCESS_FLAGS, VM_LOCKED

    for v in (src, dst):
        if not v.is_anonymous() or v.vm_flags & (VM_SHARED | VM_SPECIAL):
            return False
        if not v.vm_flags & VM_WRITE:
            return False
    if (src.vm_flags ^ dst.vm_flags) & (VM_ACCESS_FLAGS | VM_LOCKED):
        return False
    if src.vm_page_prot != dst.vm_page_prot:
        return False
    return dst.uffd_ctx is ctx


def move_pages_huge_pmd(
    svma: VMA, dvma: VMA, sslot: int, src: int, dst: int, remaining: int
) -> int:
    """The huge-PMD step of move_pages(): move the whole PMD (move_pages_huge_pmd) when src and
    dst are PMD aligned, ``remaining`` covers it and dst's PMD is none; otherwise split it
    (return 0: the caller moves its PTEs). A THP that is not AnonExclusive → -EBUSY (not split:
    its PTEs could not move either), pinned or GUP-referenced → -EBUSY. Returns bytes moved."""
    import numpy as np

    from vkernel.kernel import thp
    from vkernel.kernel.memory import thp_suitable
    from vkernel.kernel.uapi import PMD_SIZE, PG_anon_exclusive

    mm = svma.mm
    mem = mm.mem
    u = mem.u64
    e = u.item(sslot)
    head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
    huge_zero = mem.is_huge_zero(head)
    if not huge_zero and not mem.flags[head] & PG_anon_exclusive:
        return -errno.EBUSY
    dslot = pmd_slot(mm, dst, alloc=True)  # mm_alloc_pmd()
    if dslot < 0:
        return -errno.ENOMEM
    aligned = not (src | dst) & (PMD_SIZE - 1) and remaining >= PMD_SIZE
    de = u.item(dslot)
    if aligned and de and not de & _PAGE_PSE and thp_suitable(dvma, dst):
        from vkernel.kernel.pgtable import table_of, tlb_remove_table

        t = table_of(de)
        if not u[t * PTRS_PER_TABLE : (t + 1) * PTRS_PER_TABLE].any():
            # vkernel's uaccess/GUP fault loops allocate the PTE table before the MISSING
            # userfault that Linux raises from do_huge_pmd_anonymous_page with the PMD still
            # none (a THP-suitable dst; a NOHUGEPAGE one really has its table, and the PMD is
            # split): an empty table stands for that none PMD (freed the lockless-safe way).
            u[dslot] = 0
            tlb_remove_table(mm, t)
            de = 0
    if not aligned or de:
        thp.split_huge_pmd(mm, sslot)  # move_splits_huge_pmd() or dst populated
        return 0
    if huge_zero:
        new = e & ~_PAGE_RW
    else:
        if mem.folio_pincount(head) or mem.refcount[head] != 1:
            return -errno.EBUSY  # pinned or referenced (folio_maybe_dma_pinned, GUP)
        # folio_move_anon_rmap() + the index of the dst VMA; mremap-like: dirty, writable.
        from vkernel.kernel.uapi import HPAGE_PMD_NR

        anon = dvma.anon_vma_prepare()
        mem.mapping[head : head + HPAGE_PMD_NR] = anon.id
        mem.index[head : head + HPAGE_PMD_NR] = dvma.linear_page_index(dst) + np.arange(
            HPAGE_PMD_NR
        )
        new = (head << PAGE_SHIFT) | dvma.vm_page_prot | _PAGE_PSE | _PAGE_ACCESSED
        new |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_RW
    u[sslot] = 0
    u[dslot] = new
    # pgtable_trans_huge_withdraw() + _deposit(): the deposited table follows the PMD.
    mm.deposited[dslot] = mm.deposited.pop(sslot)
    return PMD_SIZE


async def uffdio_move(
    ctx: UserfaultfdCtx,
    task: Task | None,
    dst: int,
    src: int,
    length: int,
    mode: int = 0,
) -> int:
    """UFFDIO_MOVE (B.64): remap exclusive anon pages from src to dst (zero copy; the zero page
    too); bytes moved. A PMD-mapped THP moves whole when both addresses are PMD aligned, the
    request covers it and dst has no page table there (move_pages_huge_pmd); else the PMD and
    then the folio are split and its pages moved by PTEs. src hole → ENOENT unless ALLOW_SRC_HOLES (then it counts as moved); dst
    populated → EEXIST; a page not exclusive (shared after fork, pinned, GUP-referenced) →
    EBUSY; incompatible VMAs → EINVAL. ``task`` given: it must be of ctx's mm (else EINVAL);
    the gRPC layer passes None and acts as the process itself. Huge PMDs in dst are split.
    (B.64: AnonExclusive pages only; a large folio that cannot be split → EBUSY.)"""
    from vkernel.kernel.memory import split_all_huge_pmds
    from vkernel.kernel.tlb import tlb_finish_mmu
    from vkernel.kernel.uapi import PG_anon, PG_anon_exclusive

    ctx._check_initialized()
    if mode & ~(UFFDIO_MOVE_MODE_DONTWAKE | UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES):
        raise _err(errno.EINVAL, "bad move mode", field="mode")
    mm = ctx.mm
    if task is not None and task.mm is not mm:
        raise _err(errno.EINVAL, "UFFDIO_MOVE across address spaces")
    if src & (PAGE_SIZE - 1):
        raise _err(errno.EINVAL, "src not page aligned", field="src")
    _validate_range(dst, length)
    _validate_range(src, length)
    if src < dst + length and dst < src + length:
        raise _err(errno.EINVAL, "overlapping ranges")
    if ctx.mmap_changing:
        raise _err(errno.EAGAIN, "address space changing (event pending)")
    if mm.dead:
        raise _err(errno.ESRCH, "mm is gone")
    holes = bool(mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
    done = 0
    err = 0
    async with mm.mmap_lock.read(task):
        if mm.dead:
            raise _err(errno.ESRCH, "mm is gone")
        dvma = mm.vma_lookup(dst)
        svma = mm.vma_lookup(src)
        if dvma is None or svma is None or dst + length > dvma.vm_end or src + length > svma.vm_end:
            raise _err(errno.ENOENT, "no single mapping covers src or dst")
        if not _move_vmas_ok(svma, dvma, ctx):
            raise _err(errno.EINVAL, "src and dst cannot move pages")
        split_all_huge_pmds(mm, dst, dst + length)
        mem = mm.mem
        u = mem.u64
        while done < length:
            sslot = pmd_slot(mm, src + done, alloc=False)
            if sslot >= 0 and u.item(sslot) & _PAGE_PSE:
                r = move_pages_huge_pmd(svma, dvma, sslot, src + done, dst + done, length - done)
                if r < 0:
                    err = -r
                    break
                if r:
                    done += r
                    if task is not None and task.fatal_signal_pending() and done < length:
                        err = errno.EINTR
                        break
                    continue
                # split: the PTEs of the THP are moved one by one below
            spte = 0
            if sslot >= 0 and u.item(sslot):
                sslot = _dst_slot(svma, src + done)
                spte = u.item(sslot) if sslot >= 0 else 0
            dslot = _dst_slot(dvma, dst + done)
            if dslot < 0:
                err = -dslot
                break
            if u.item(dslot):
                err = errno.EEXIST
                break
            if not spte:
                if not holes:
                    err = errno.ENOENT
                    break
                done += PAGE_SIZE
                continue
            if not spte & _PAGE_PRESENT:
                err = errno.EBUSY  # markers are not moved (Linux moves swap entries)
                break
            pfn = (spte & _PAGE_PFN_MASK) >> PAGE_SHIFT
            if pfn == mem.zero_pfn:
                u[dslot] = (pfn << PAGE_SHIFT) | (dvma.vm_page_prot & ~_PAGE_RW) | _PAGE_SPECIAL
                u[sslot] = 0
                done += PAGE_SIZE
                continue
            fl = int(mem.flags[pfn])
            if fl & PG_anon and fl & PG_anon_exclusive and mem.order[mem.compound_head(pfn)]:
                # move_pages_pte(): a large folio is split first (split_folio), then the page
                # is moved as a small one; a THP that cannot be split (pinned, referenced)
                # stays EBUSY.
                from vkernel.kernel.thp import split_folio

                split_folio(mem, mem.compound_head(pfn))
            if (
                not fl & PG_anon
                or not fl & PG_anon_exclusive
                or mem.order[mem.compound_head(pfn)]
                or mem.mapcount[pfn] != 1
                or mem.refcount[pfn] != 1
            ):
                err = errno.EBUSY
                break
            anon = dvma.anon_vma_prepare()
            mem.mapping[pfn] = anon.id
            mem.index[pfn] = dvma.linear_page_index(dst + done)
            bits = dvma.vm_page_prot | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_RW
            u[dslot] = (pfn << PAGE_SHIFT) | bits
            u[sslot] = 0
            done += PAGE_SIZE
            if task is not None and task.fatal_signal_pending() and done < length:
                err = errno.EINTR
                break
        await tlb_finish_mmu(mm)  # a page table freed by a whole-PMD move waits out walkers
    if done and not mode & UFFDIO_MOVE_MODE_DONTWAKE:
        ctx.wake_range(dst, done)
    if err and not done:
        raise _err(err, errno.errorcode.get(err, str(err)))
    if done < length:
        raise PartialFill(done, err)
    return done
