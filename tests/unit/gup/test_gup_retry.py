"""The GUP retry protocol and lock contracts with a test-only blocking ->fault
(kernel-semantics.md A.3, A.9, B.23-B.27; seed 001)."""

from __future__ import annotations

import asyncio
import errno
import signal

from tests.unit.gup.guphelp import mm_of, page_array, vm
from tests.unit.mm.mmhelp import P, mmap_anon, pfn_at
from vkernel.kernel import gup, memory
from vkernel.kernel.gup import Locked
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.memory import set_test_fault_hook
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    FAULT_FLAG_ALLOW_RETRY,
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_RETRY_NOWAIT,
    FAULT_FLAG_TRIED,
    FOLL_WRITE,
    VM_FAULT_COMPLETED,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
)
from vkernel.kernel.vma import VMA


class Blocker:
    """A ->fault that blocks like a locked folio: the first ``times`` attempts on ``addr``
    (all addresses if None) drop mmap_lock and return VM_FAULT_RETRY; later ones fault."""

    def __init__(self, times: int = 1, addr: int | None = None) -> None:
        self.times = times
        self.addr = addr
        self.calls: list[tuple[int, int]] = []

    def __call__(self, vma: VMA, addr: int, flags: int) -> int | None:
        self.calls.append((addr, flags))
        if self.addr is not None and addr != self.addr:
            return None
        if flags & FAULT_FLAG_ALLOW_RETRY and self.times > 0:
            self.times -= 1
            if not flags & FAULT_FLAG_RETRY_NOWAIT:
                vma.mm.mmap_lock.read_unlock()
            return VM_FAULT_RETRY
        if not flags & FAULT_FLAG_ALLOW_RETRY and self.times > 0:
            return VM_FAULT_SIGBUS  # like a userfault without ALLOW_RETRY
        return None


def hook(task: Task, addr: int, blocker: Blocker) -> None:
    """Install ``blocker`` as the ->fault of the VMA at ``addr``."""
    vma = mm_of(task).vma_lookup(addr)
    assert vma is not None
    set_test_fault_hook(vma, blocker)


async def test_allow_retry_tried_sequence(kernel: Kernel, task: Task) -> None:
    """B.23: the first fault has ALLOW_RETRY|KILLABLE and no TRIED, drops the lock and returns
    RETRY; GUP retakes the lock and refaults with TRIED; 1 page, lock released, maj_flt +1,
    pgfault counts only the completed attempt (B.27)."""
    a = await mmap_anon(task, P)
    b = Blocker()
    hook(task, a, b)
    mm = mm_of(task)
    pgfault, maj = vm(task, "pgfault"), task.maj_flt
    pages = page_array(1)
    assert await gup.get_user_pages_unlocked(mm, a, 1, pages, FOLL_WRITE, current=task) == 1
    assert len(b.calls) == 2
    first, second = b.calls[0][1], b.calls[1][1]
    assert first & (FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE) == (
        FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE
    )
    assert not first & FAULT_FLAG_TRIED
    assert second & (FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE | FAULT_FLAG_TRIED) == (
        FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE | FAULT_FLAG_TRIED
    )
    assert not mm.mmap_lock.is_locked()
    assert pages[0] == pfn_at(task, a)
    assert task.maj_flt == maj + 1
    assert vm(task, "pgfault") == pgfault + 1
    gup.put_page(kernel, int(pages[0]))


async def test_remote_lock_contract(kernel: Kernel, task: Task) -> None:
    """B.24: with ``locked`` and no retry the lock stays held (1); after a retry it was
    released (0) and the caller must not unlock; with locked=None no ALLOW_RETRY is offered,
    so a userfault-like handler answers SIGBUS → -EFAULT and the lock is never dropped."""
    a = await mmap_anon(task, 4 * P)
    mm = mm_of(task)
    pages = page_array(4)
    locked = Locked(1)
    await mm.mmap_lock.read_lock(task)
    assert await gup.get_user_pages_remote(mm, a, 1, 0, pages, locked) == 1
    assert locked.value == 1
    assert mm.mmap_lock.readers == 1
    b = Blocker(addr=a + 2 * P)
    hook(task, a, b)
    assert await gup.pin_user_pages_remote(mm, a + P, 3, FOLL_WRITE, pages[1:], locked) == 3
    assert locked.value == 0
    assert not mm.mmap_lock.is_locked()
    gup.unpin_user_pages(kernel, pages[1:], 3)
    gup.put_page(kernel, int(pages[0]))
    # Case C: no ``locked``: no ALLOW_RETRY, the lock is never dropped.
    c = await mmap_anon(task, P)
    b2 = Blocker()
    hook(task, c, b2)
    async with mm.mmap_lock.read(task):
        ret = await gup.get_user_pages_remote(mm, c, 1, FOLL_WRITE, pages, None)
        assert ret == -errno.EFAULT
        assert mm.mmap_lock.readers == 1
    assert not b2.calls[-1][1] & FAULT_FLAG_ALLOW_RETRY


async def test_multiple_retries_then_success(kernel: Kernel, task: Task) -> None:
    """B.25: the handler returns RETRY three times in a row; GUP keeps retaking the lock and
    retrying that page with TRIED until it succeeds; the rest of the range follows."""
    a = await mmap_anon(task, 4 * P)
    b = Blocker(times=3, addr=a + P)
    hook(task, a, b)
    mm = mm_of(task)
    pages = page_array(4)
    assert await gup.pin_user_pages_unlocked(mm, a, 4, pages, FOLL_WRITE, current=task) == 4
    retried = [f for addr, f in b.calls if addr == a + P]
    assert len(retried) == 4
    assert not retried[0] & FAULT_FLAG_TRIED
    assert all(f & FAULT_FLAG_TRIED for f in retried[1:])
    assert [int(p) for p in pages] == [pfn_at(task, a + i * P) for i in range(4)]
    assert not mm.mmap_lock.is_locked()
    gup.unpin_user_pages(kernel, pages, 4)


async def test_fatal_signal_between_retries(kernel: Kernel, task: Task) -> None:
    """B.25: a fatal signal between retries ends the loop: -EINTR if no page was done, else
    the partial count (the caller owns exactly those pins)."""
    a = await mmap_anon(task, 4 * P)
    mm = mm_of(task)

    class KillingBlocker(Blocker):
        victim = task

        def __call__(self, vma: VMA, addr: int, flags: int) -> int | None:
            ret = super().__call__(vma, addr, flags)
            if ret == VM_FAULT_RETRY:
                self.victim.send_fatal_signal(signal.SIGKILL)
            return ret

    hook(task, a, KillingBlocker(times=5, addr=a + 2 * P))
    pages = page_array(4)
    assert await gup.pin_user_pages_unlocked(mm, a, 4, pages, FOLL_WRITE, current=task) == 2
    assert not mm.mmap_lock.is_locked()
    gup.unpin_user_pages(kernel, pages, 2)
    other = kernel.spawn("o", "s")
    b = await mmap_anon(other, P)
    kb = KillingBlocker(times=5)
    kb.victim = other
    hook(other, b, kb)
    assert await gup.get_user_pages_unlocked(mm_of(other), b, 1, pages, 0, current=other) == (
        -errno.EINTR
    )
    assert not mm_of(other).mmap_lock.is_locked()


async def test_kill_while_retaking_the_lock(kernel: Kernel, task: Task) -> None:
    """A.3: the retake after a dropped lock is killable: a SIGKILL while waiting behind a
    writer gives -EINTR (nothing done) and leaves no hold behind."""
    a = await mmap_anon(task, P)
    mm = mm_of(task)

    def block_and_let_a_writer_in(vma: VMA, addr: int, flags: int) -> int | None:
        lock = vma.mm.mmap_lock
        lock.read_unlock()
        assert lock.write_trylock()  # a writer slips in while the fault waits
        asyncio.get_running_loop().call_soon(task.send_fatal_signal, signal.SIGKILL)
        return VM_FAULT_RETRY

    vma = mm.vma_lookup(a)
    assert vma is not None
    set_test_fault_hook(vma, block_and_let_a_writer_in)
    pages = page_array(1)
    ret = await gup.get_user_pages_unlocked(mm, a, 1, pages, 0, current=task)
    assert ret == -errno.EINTR
    assert mm.mmap_lock.writer
    assert mm.mmap_lock.readers == 0
    mm.mmap_lock.write_unlock()


async def test_vm_fault_completed(kernel: Kernel, task: Task) -> None:
    """B.26: COMPLETED (fault done, lock dropped) is "redo this page": the retry finds the PTE
    present and returns the page."""
    a = await mmap_anon(task, 2 * P)
    mm = mm_of(task)
    calls: list[int] = []

    def completes(vma: VMA, addr: int, flags: int) -> int | None:
        calls.append(flags)
        if flags & FAULT_FLAG_TRIED:
            return None
        assert memory.__dict__["__handle_mm_fault"](vma, addr, flags) == 0
        vma.mm.mmap_lock.read_unlock()
        return VM_FAULT_COMPLETED

    vma = mm.vma_lookup(a)
    assert vma is not None
    set_test_fault_hook(vma, completes)
    pages = page_array(2)
    assert await gup.get_user_pages_unlocked(mm, a, 2, pages, FOLL_WRITE, current=task) == 2
    assert [int(p) for p in pages] == [pfn_at(task, a), pfn_at(task, a + P)]
    assert not any(f & FAULT_FLAG_TRIED for f in calls)  # the redo needed no second fault
    assert not mm.mmap_lock.is_locked()
    gup.put_pages(kernel, pages, 2)


async def test_retry_with_caller_held_lock_and_no_unlockable_is_impossible(
    kernel: Kernel, task: Task
) -> None:
    """A.2: get_user_pages()/pin_user_pages() never offer ALLOW_RETRY: the lock held by the
    caller is never dropped, even over a handler that would block."""
    a = await mmap_anon(task, P)
    b = Blocker()
    hook(task, a, b)
    mm = mm_of(task)
    pages = page_array(1)
    async with mm.mmap_lock.read(task):
        assert await gup.pin_user_pages(mm, a, 1, FOLL_WRITE, pages) == -errno.EFAULT
        assert mm.mmap_lock.readers == 1
    assert not b.calls[0][1] & FAULT_FLAG_ALLOW_RETRY


async def test_retry_pgfault_accounting(kernel: Kernel, task: Task) -> None:
    """B.27: RETRY results are not counted in pgfault; each completing attempt is, once; GUP
    faults bump the caller's min_flt (first attempt) or maj_flt (TRIED)."""
    a = await mmap_anon(task, 3 * P)
    hook(task, a, Blocker(times=2, addr=a + P))
    mm = mm_of(task)
    pgfault, minf, maj = vm(task, "pgfault"), task.min_flt, task.maj_flt
    pages = page_array(3)
    assert await gup.get_user_pages_unlocked(mm, a, 3, pages, FOLL_WRITE, current=task) == 3
    assert vm(task, "pgfault") == pgfault + 3
    assert task.min_flt == minf + 2
    assert task.maj_flt == maj + 1
    gup.put_pages(kernel, pages, 3)


async def test_foll_interruptible_and_remote_fault_flags(kernel: Kernel, task: Task) -> None:
    """A.1/A.3 faultin_page: FOLL_INTERRUPTIBLE adds FAULT_FLAG_INTERRUPTIBLE only with
    FOLL_UNLOCKABLE; the remote variants add FAULT_FLAG_REMOTE."""
    from vkernel.kernel.uapi import FAULT_FLAG_INTERRUPTIBLE, FAULT_FLAG_REMOTE, FOLL_INTERRUPTIBLE

    a = await mmap_anon(task, 4 * P)
    seen: list[int] = []

    def record(vma: VMA, addr: int, flags: int) -> int | None:
        seen.append(flags)
        return None

    vma = mm_of(task).vma_lookup(a)
    assert vma is not None
    set_test_fault_hook(vma, record)
    mm = mm_of(task)
    pages = page_array(4)
    assert await gup.get_user_pages_unlocked(mm, a, 1, pages, FOLL_INTERRUPTIBLE) == 1
    assert seen[-1] & FAULT_FLAG_INTERRUPTIBLE
    assert not seen[-1] & FAULT_FLAG_REMOTE
    async with mm.mmap_lock.read(task):
        assert await gup.get_user_pages(mm, a + P, 1, FOLL_INTERRUPTIBLE, pages[1:]) == 1
        assert not seen[-1] & FAULT_FLAG_INTERRUPTIBLE
        assert await gup.get_user_pages_remote(mm, a + 2 * P, 1, 0, pages[2:], None) == 1
        assert seen[-1] & FAULT_FLAG_REMOTE
    gup.put_pages(kernel, pages, 3)


async def test_fixup_user_fault(kernel: Kernel, task: Task) -> None:
    """A.2 fixup_user_fault(): resolves a fault under the caller's lock; -EFAULT without a
    VMA or permission; after a RETRY the lock is retaken (never returned unlocked) and
    ``unlocked`` reports it; KILLABLE with a fatal signal → -EINTR."""
    from vkernel.kernel.mm_api import lookup_pte
    from vkernel.kernel.uapi import FAULT_FLAG_WRITE, PROT_READ

    a = await mmap_anon(task, 2 * P)
    ro = await mmap_anon(task, P, PROT_READ)
    mm = mm_of(task)
    unlocked = [False]
    hook(task, a, Blocker(addr=a + P))
    async with mm.mmap_lock.read(task):
        assert await gup.fixup_user_fault(mm, a, FAULT_FLAG_WRITE, None) == 0
        assert lookup_pte(task, a)
        assert await gup.fixup_user_fault(mm, ro, FAULT_FLAG_WRITE, None) == -errno.EFAULT
        assert await gup.fixup_user_fault(mm, 0x1000, 0, None) == -errno.EFAULT
        assert await gup.fixup_user_fault(mm, a + P, FAULT_FLAG_WRITE, unlocked) == 0
        assert unlocked == [True]
        assert mm.mmap_lock.readers == 1
        task.send_fatal_signal(signal.SIGKILL)
        assert await gup.fixup_user_fault(mm, a, 0, unlocked, current=task) == -errno.EINTR
