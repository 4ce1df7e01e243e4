"""The CPU doing user loads and stores, and populate (arch/x86/mm/fault.c, mm/gup.c populate paths).

``write_user``/``read_user`` walk the page tables like the MMU; a missing or insufficient PTE
is a page fault handled as ``do_user_addr_fault`` does (FAULT_FLAG_DEFAULT|USER[|WRITE], retry
with TRIED). A run of none PTEs in one leaf table is faulted in one vectorised step (the same
result as one fault per page, counted as such), and data moves with numpy/memoryview copies.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.errors import KernelError, UserFault
from vkernel.kernel.memory import (
    FAULT_AROUND_PAGES,
    FaultWait,
    VmFault,
    do_anonymous_pages,
    do_fault_around,
    do_read_fault_run,
    do_wp_pages,
    handle_mm_fault,
    mm_account_fault,
    thp_eligible,
)
from vkernel.kernel.pgtable import U64_PFN_MASK, U64_SHIFT, pmd_slot, pte_alloc, table_of
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    EHWPOISON,
    FAULT_FLAG_DEFAULT,
    FAULT_FLAG_KILLABLE,
    FAULT_FLAG_TRIED,
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
    PMD_SIZE,
    PTRS_PER_TABLE,
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_IO,
    VM_PFNMAP,
    VM_READ,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
)

if TYPE_CHECKING:
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.task import Task
    from vkernel.kernel.vma import VMA

READ_CHUNK = 1 << 20
"""read_user yields chunks of at most this many bytes."""
_U64_P = np.uint64(_PAGE_PRESENT)
_VM_UFFD_ANY = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR
"""A userfaultfd-registered VMA takes the per-page path (handle_userfault per fault)."""
_U64_PRW = np.uint64(_PAGE_PRESENT | _PAGE_RW)
_U64_TOUCH_R = np.uint64(_PAGE_ACCESSED)
_U64_TOUCH_W = np.uint64(_PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY)
_MAX_RETRIES = 64


def fault_in_range(
    vma: VMA, start: int, end: int, flags: int, task: Task | None, vmf: VmFault | None = None
) -> tuple[int, int]:
    """Make [start, end) (inside ``vma``, within one PMD) accessible for the access in ``flags``.

    Returns ``(vm_fault, address)``: ``(0, end)`` on success, else the VM_FAULT error bits and
    the address of the first page that could not be faulted in. ``(VM_FAULT_RETRY, address)``
    with ``vmf.wait`` set: the fault at ``address`` must sleep (see memory.py); nothing was
    released yet, the caller does it.
    """
    mm = vma.mm
    mem = mm.mem
    u = mem.u64
    write = bool(flags & FAULT_FLAG_WRITE)
    need_bits = _U64_PRW if write else _U64_P
    for _ in range(_MAX_RETRIES):
        slot = pmd_slot(mm, start, alloc=True)
        if slot < 0:
            return VM_FAULT_OOM, start
        e = u.item(slot)
        if e & _PAGE_PSE:
            if not write or e & _PAGE_RW:
                touch = _PAGE_ACCESSED | (_PAGE_DIRTY | _PAGE_SOFT_DIRTY if write else 0)
                u[slot] = e | touch
                return 0, end
            ret = handle_mm_fault(vma, start, flags, task)
            if ret & VM_FAULT_ERROR:
                return ret, start
            continue
        if not e and thp_eligible(vma, start & PMD_MASK):
            ret = handle_mm_fault(vma, start, flags, task)
            if ret & VM_FAULT_ERROR:
                return ret, start
            continue
        t = pte_alloc(mm, slot)
        if t < 0:
            return VM_FAULT_OOM, start
        base = t * PTRS_PER_TABLE
        i0 = (start >> PAGE_SHIFT) & 511
        i1 = i0 + ((end - 1) >> PAGE_SHIFT) - (start >> PAGE_SHIFT) + 1
        if i1 == i0 + 1:
            done = _fault_in_page(vma, t, base + i0, start, end, flags, task, vmf)
            if done is None:
                continue
            return done
        s = u[base + i0 : base + i1]
        if vma.is_anonymous() and not vma.vm_flags & _VM_UFFD_ANY:
            none = np.flatnonzero(s == 0)
            if len(none):
                n = do_anonymous_pages(vma, t, start & PMD_MASK, none + i0, write)
                mm_account_fault(mm, task, flags, 0, n)
                if n < len(none):
                    return VM_FAULT_OOM, (start & PMD_MASK) + (int(none[n] + i0) << PAGE_SHIFT)
        need = np.flatnonzero((s & need_bits) != need_bits)
        if write and len(need) > 1 and vma.is_anonymous() and not vma.is_shared():
            wp = need[(s[need] & _U64_P) != 0]
            if len(wp):
                n, oom = do_wp_pages(vma, t, start & PMD_MASK, wp + i0)
                mm_account_fault(mm, task, flags, 0, n)
                if oom >= 0:
                    return VM_FAULT_OOM, (start & PMD_MASK) + (oom << PAGE_SHIFT)
                need = np.flatnonzero((s & need_bits) != need_bits)
        around = vma.mapping is not None and not write
        if around and len(need) > 1:
            none = need[s[need] == 0]
            if len(none) and vmf is not None:
                first = (start & PMD_MASK) + (int(none[0] + i0) << PAGE_SHIFT)
                if vmf.addr == first:
                    # A fault being re-run after a sleep keeps its own path (VM_FAULT_MAJOR);
                    # its fault-around covers the next window.
                    none = none[none >= none[0] + FAULT_AROUND_PAGES]
            n = do_read_fault_run(vma, t, start & PMD_MASK, none + i0)
            if n:
                mm_account_fault(mm, task, flags, 0, n)
                need = np.flatnonzero((s & need_bits) != need_bits)
        for i in need.tolist():
            if (s.item(i) & _PAGE_PRESENT) and (not write or s.item(i) & _PAGE_RW):
                continue  # mapped by fault-around meanwhile
            # The first page faults at the access's own address (vmf->real_address), and that
            # is where a failure or a sleep is reported (never before ``start``).
            addr = max((start & PMD_MASK) + ((i + i0) << PAGE_SHIFT), start)
            got = _handle_fault_retrying(vma, addr, flags, task, vmf)
            if got is None:
                return VM_FAULT_RETRY, addr  # a sleep (COMPLETED: after the fault)
            if got & VM_FAULT_ERROR:
                return got, addr
            if around:
                win = s[i + 1 : i + FAULT_AROUND_PAGES]
                none = np.flatnonzero(win == 0)
                if len(none):
                    do_fault_around(vma, t, start & PMD_MASK, none + (i + 1 + i0))
        present = (s & _U64_P) != 0
        s[present] |= _U64_TOUCH_W if write else _U64_TOUCH_R
        if ((s & need_bits) == need_bits).all():
            return 0, end
    return VM_FAULT_SIGBUS, start


def _handle_fault_retrying(
    vma: VMA, addr: int, flags: int, task: Task | None, vmf: VmFault | None
) -> int | None:
    """handle_mm_fault() again with FAULT_FLAG_TRIED while it asks for a retry without
    sleeping (at most _MAX_RETRIES times); None when it left a sleep in ``vmf.wait``."""
    fl = flags
    ret = 0
    for _retry in range(_MAX_RETRIES):
        ret = handle_mm_fault(vma, addr, fl, task, vmf)
        if vmf is not None and vmf.wait is not None:
            return None
        if not ret & VM_FAULT_RETRY:
            break
        fl |= FAULT_FLAG_TRIED
    return ret


def _fault_in_page(
    vma: VMA,
    table: int,
    slot: int,
    addr: int,
    end: int,
    flags: int,
    task: Task | None,
    vmf: VmFault | None,
) -> tuple[int, int] | None:
    """fault_in_range()'s PTE-table step for a range within one page (PTE ``slot`` of ``table``).

    The steps of the vectorised path for one PTE, with int ops: numpy calls on 1-element
    arrays cost more than the rest of a small access (an 8-byte load). No fault-around: the
    vectorised path's window is the rest of the range, empty here. Returns fault_in_range's
    ``(vm_fault, address)``, or None: not done yet, walk again.
    """
    mm = vma.mm
    u = mm.mem.u64
    write = flags & FAULT_FLAG_WRITE
    need = _PAGE_PRESENT | _PAGE_RW if write else _PAGE_PRESENT
    pte = u.item(slot)
    if not pte and vma.is_anonymous() and not vma.vm_flags & _VM_UFFD_ANY:
        pbase = addr & PMD_MASK
        i = (addr >> PAGE_SHIFT) & 511
        n = do_anonymous_pages(vma, table, pbase, np.array([i], dtype=np.intp), bool(write))
        mm_account_fault(mm, task, flags, 0, n)
        if not n:
            return VM_FAULT_OOM, pbase + (i << PAGE_SHIFT)
        pte = u.item(slot)
    if pte & need != need:
        ret = _handle_fault_retrying(vma, addr, flags, task, vmf)
        if ret is None:
            return VM_FAULT_RETRY, addr  # a sleep (COMPLETED: after the fault)
        if ret & VM_FAULT_ERROR:
            return ret, addr
        pte = u.item(slot)
    if pte & _PAGE_PRESENT:
        u[slot] = pte | (
            _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY if write else _PAGE_ACCESSED
        )
    return (0, end) if pte & need == need else None


def translate(mm: MmStruct, start: int, end: int) -> np.ndarray:
    """The pfns backing the pages of [start, end) (within one PMD, all present)."""
    u = mm.mem.u64
    slot = pmd_slot(mm, start)
    e = u.item(slot)
    first = (start >> PAGE_SHIFT) & 511
    n = ((end - 1) >> PAGE_SHIFT) - (start >> PAGE_SHIFT) + 1
    if e & _PAGE_PSE:
        head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
        return np.arange(head + first, head + first + n, dtype=np.int64)
    base = table_of(e) * PTRS_PER_TABLE + first
    return ((u[base : base + n] & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)


def _fault_error(ret: int, addr: int) -> KernelError:
    """The outcome of a failed user fault: SIGSEGV/SIGBUS as UserFault, OOM as ENOMEM."""
    if ret & VM_FAULT_OOM:
        return KernelError(errno.ENOMEM, f"out of memory faulting {addr:#x}", address=f"{addr:#x}")
    if ret & (VM_FAULT_SIGBUS | VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
        return UserFault(signal.SIGBUS, addr)
    return UserFault(signal.SIGSEGV, addr)


def _user_vma(mm: MmStruct, addr: int, write: bool) -> VMA:
    """find_vma() + access_error() of do_user_addr_fault: SIGSEGV when there is no valid VMA."""
    vma = mm.vma_lookup(addr)
    if vma is None:
        raise UserFault(signal.SIGSEGV, addr)
    if write:
        if not vma.vm_flags & VM_WRITE:
            raise UserFault(signal.SIGSEGV, addr)
    elif not vma.is_accessible():
        raise UserFault(signal.SIGSEGV, addr)
    return vma


def _mm_of(task: Task) -> MmStruct:
    """task->mm or ESRCH."""
    mm = task.mm
    if mm is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has no address space", pid=task.pid)
    return mm  # type: ignore[no-any-return]


def _check_range(addr: int, length: int) -> None:
    """access_ok(): the range must not wrap."""
    if addr < 0 or length < 0 or addr + length > 1 << 64:
        raise UserFault(signal.SIGSEGV, max(addr, 0))


async def write_user(
    task: Task, addr: int, data: bytes | bytearray | memoryview, *, user: bool = True
) -> None:
    """User stores of ``data`` at ``addr`` (a CPU store; ``user=False``: copy_to_user).

    ``user=False`` is a syscall's copy_to_user: its faults are kernel-mode (no
    FAULT_FLAG_USER), which a UFFD_USER_MODE_ONLY uffd refuses. Raises UserFault at the first
    page that cannot be written; the bytes before it are written.
    """
    src = memoryview(data).cast("B")
    total = len(src)
    _check_range(addr, total)
    mm = _mm_of(task)
    mem = mm.mem
    flags = FAULT_FLAG_DEFAULT | FAULT_FLAG_WRITE | (FAULT_FLAG_USER if user else 0)
    vmf = VmFault()
    pos = 0
    tried = -1
    while pos < total:
        wait: FaultWait | None = None
        async with mm.mmap_lock.read(task):
            mm.check_alive()
            # Work through up to 16 MiB per lock hold to let writers in between.
            budget = 16 << 20
            while pos < total and budget > 0:
                a = addr + pos
                vma = _user_vma(mm, a, True)
                cend = min((a & PMD_MASK) + PMD_SIZE, addr + total, vma.vm_end)
                fl = flags
                if a & PAGE_MASK == tried:
                    fl |= FAULT_FLAG_TRIED
                    cend = min(cend, tried + PAGE_SIZE)
                ret, fail = fault_in_range(vma, a, cend, fl, task, vmf)
                upto = fail if ret else cend
                if upto > a:
                    _copy_in(
                        mem, translate(mm, a, upto), a & (PAGE_SIZE - 1), src[pos : pos + upto - a]
                    )
                pos += upto - a
                budget -= upto - a
                if ret & VM_FAULT_RETRY and vmf.wait is not None:
                    wait, vmf.wait = vmf.wait, None
                    if vmf.unlock:
                        tried = fail & PAGE_MASK
                        break
                    await wait.sleep()  # TRIED or no ALLOW_RETRY: sleep holding mmap_lock
                    wait = None
                    continue
                if ret:
                    raise _fault_error(ret, fail)
        if wait is not None:
            await _sleep_unlocked(task, wait)


def _copy_in(mem: object, pfns: np.ndarray, off: int, data: memoryview) -> None:
    """copy_to_user()'s copy: bytes into the frames backing a page run."""
    from vkernel.kernel.physmem import PhysMem

    assert isinstance(mem, PhysMem)
    n = len(data)
    pos = 0
    k = 0
    if off:
        m = min(PAGE_SIZE - off, n)
        b = (int(pfns[0]) << PAGE_SHIFT) + off
        mem.mv[b : b + m] = data[:m]
        pos = m
        k = 1
    nfull = (n - pos) >> PAGE_SHIFT
    if nfull:
        run = pfns[k : k + nfull]
        p0 = int(run[0])
        if int(run[-1]) - p0 == nfull - 1 and (nfull == 1 or bool((np.diff(run) == 1).all())):
            mem.mv[p0 << PAGE_SHIFT : (p0 + nfull) << PAGE_SHIFT] = data[
                pos : pos + (nfull << PAGE_SHIFT)
            ]
        else:
            mem.frames[run] = np.frombuffer(
                data[pos : pos + (nfull << PAGE_SHIFT)], dtype=np.uint8
            ).reshape(nfull, PAGE_SIZE)
        pos += nfull << PAGE_SHIFT
        k += nfull
    if pos < n:
        b = int(pfns[k]) << PAGE_SHIFT
        mem.mv[b : b + n - pos] = data[pos:]


def _copy_out(mem: object, pfns: np.ndarray, off: int, n: int) -> memoryview:
    """copy_from_user()'s copy: bytes out of the frames backing a page run."""
    from vkernel.kernel.physmem import PhysMem

    assert isinstance(mem, PhysMem)
    p0 = int(pfns[0])
    if len(pfns) == 1 or (int(pfns[-1]) - p0 == len(pfns) - 1 and bool((np.diff(pfns) == 1).all())):
        b = (p0 << PAGE_SHIFT) + off
        return memoryview(bytes(mem.mv[b : b + n]))
    # One copy into one bytes object: join the runs of physically contiguous pages.
    cuts = (np.flatnonzero(np.diff(pfns) != 1) + 1).tolist()
    starts = [0, *cuts]
    ends = [*cuts, len(pfns)]
    mv = mem.mv
    pieces = []
    left = n
    for i, j in zip(starts, ends, strict=True):
        lo = (int(pfns[i]) << PAGE_SHIFT) + (off if i == 0 else 0)
        hi = min((int(pfns[j - 1]) + 1) << PAGE_SHIFT, lo + left)
        pieces.append(mv[lo:hi])
        left -= hi - lo
    return memoryview(b"".join(pieces))


def _copy_out_page(mm: MmStruct, addr: int, n: int) -> memoryview:
    """translate() + _copy_out() for ``n`` bytes at ``addr`` within one present page, with int
    ops (the numpy calls of the run path cost more than a small load itself)."""
    u = mm.mem.u64
    e = u.item(pmd_slot(mm, addr))
    idx = (addr >> PAGE_SHIFT) & 511
    if e & _PAGE_PSE:
        pfn = ((e & _PAGE_PFN_MASK) >> PAGE_SHIFT) + idx
    else:
        pfn = (u.item(table_of(e) * PTRS_PER_TABLE + idx) & _PAGE_PFN_MASK) >> PAGE_SHIFT
    b = (pfn << PAGE_SHIFT) + (addr & (PAGE_SIZE - 1))
    return memoryview(bytes(mm.mem.mv[b : b + n]))


async def read_user(
    task: Task, addr: int, length: int, *, user: bool = True
) -> AsyncIterator[memoryview]:
    """User loads of [addr, addr+length) (``user=False``: copy_from_user, kernel-mode faults):
    yields chunks of at most 1 MiB, in order.

    Raises UserFault at the first byte that cannot be read (after yielding what came before).
    """
    _check_range(addr, length)
    mm = _mm_of(task)
    mem = mm.mem
    flags = FAULT_FLAG_DEFAULT | (FAULT_FLAG_USER if user else 0)
    end = addr + length
    pos = addr
    vmf = VmFault()
    tried = -1
    while pos < end:
        err: KernelError | None = None
        chunk: memoryview | None = None
        wait: FaultWait | None = None
        async with mm.mmap_lock.read(task):
            mm.check_alive()
            vma = _user_vma(mm, pos, False)
            cend = min((pos // READ_CHUNK + 1) * READ_CHUNK, end, vma.vm_end)
            fl = flags
            if pos & PAGE_MASK == tried:
                fl |= FAULT_FLAG_TRIED
                cend = min(cend, tried + PAGE_SIZE)
            while True:
                ret, fail = fault_in_range(vma, pos, cend, fl, task, vmf)
                if not ret & VM_FAULT_RETRY or vmf.wait is None or vmf.unlock:
                    break
                wait, vmf.wait = vmf.wait, None
                await wait.sleep()  # TRIED or no ALLOW_RETRY: sleep holding mmap_lock
                wait = None
            upto = fail if ret else cend
            if upto > pos and (upto - 1) >> PAGE_SHIFT == pos >> PAGE_SHIFT:
                chunk = _copy_out_page(mm, pos, upto - pos)
            elif upto > pos:
                chunk = _copy_out(mem, translate(mm, pos, upto), pos & (PAGE_SIZE - 1), upto - pos)
            if ret & VM_FAULT_RETRY and vmf.wait is not None:
                wait, vmf.wait = vmf.wait, None
                tried = fail & PAGE_MASK
            elif ret:
                err = _fault_error(ret, fail)
        if chunk is not None:
            yield chunk
            pos += len(chunk)
        if wait is not None:
            await _sleep_unlocked(task, wait)
        if err is not None:
            raise err


async def read_user_bytes(task: Task, addr: int, length: int, *, user: bool = True) -> bytes:
    """read_user() gathered into one bytes object (for tests and small reads)."""
    out = bytearray()
    async for chunk in read_user(task, addr, length, user=user):
        out += chunk
    return bytes(out)


async def access_user(
    task: Task, addr: int, length: int, write_data: bytes | bytearray | memoryview | None = None
) -> bytes | None:
    """One user access: a store of ``write_data`` or a load of ``length`` bytes."""
    if write_data is not None:
        await write_user(task, addr, write_data)
        return None
    return await read_user_bytes(task, addr, length)


# ---- populate ------------------------------------------------------------------------------------


async def _sleep_unlocked(task: Task, wait: FaultWait) -> None:
    """The sleep of a fault that returned VM_FAULT_RETRY, after mmap_lock was released; a
    fatal signal ends it and the access (fault_signal_pending → EINTR here)."""
    try:
        await wait.sleep()
    except KernelError:
        pass
    if task.fatal_signal_pending():
        raise KernelError(errno.EINTR, "killed while a page fault slept")


async def populate_range(
    mm: MmStruct, task: Task | None, start: int, end: int, write: bool, madvise: bool
) -> None:
    """faultin_page_range() (MADV_POPULATE_*, B.13) or __mm_populate() (MAP_POPULATE).

    MADV_POPULATE: a hole → ENOMEM; incompatible protection → EINVAL; SIGBUS/SIGSEGV → EFAULT;
    poison → EHWPOISON; OOM → ENOMEM. mm_populate skips inaccessible VMAs and stops at holes.
    The caller holds mmap_lock through the call, so faults sleep with it held (KILLABLE, no
    ALLOW_RETRY; a kill → EINTR).
    """
    flags = FAULT_FLAG_KILLABLE | (FAULT_FLAG_WRITE if write else 0)
    vmf = VmFault()
    addr = start
    while addr < end:
        vma = mm.vma_lookup(addr)
        if vma is None:
            if madvise:
                raise KernelError(errno.ENOMEM, "range not fully mapped", address=f"{addr:#x}")
            return
        vend = min(end, vma.vm_end)
        bad = bool(vma.vm_flags & (VM_IO | VM_PFNMAP))
        bad |= not vma.vm_flags & (VM_WRITE if write else VM_READ)
        if bad:
            if madvise:
                raise KernelError(errno.EINVAL, "incompatible mapping for populate", field="advice")
            addr = vend
            continue
        if task is not None and task.fatal_signal_pending():
            raise KernelError(errno.EINTR, "killed while populating")
        while addr < vend:
            cend = min((addr & PMD_MASK) + PMD_SIZE, vend)
            ret, fail = fault_in_range(vma, addr, cend, flags, task, vmf)
            if ret & VM_FAULT_RETRY and vmf.wait is not None:
                wait, vmf.wait = vmf.wait, None
                await wait.sleep()
                continue
            if ret:
                if ret & VM_FAULT_OOM:
                    raise KernelError(errno.ENOMEM, "out of memory", address=f"{fail:#x}")
                if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
                    raise KernelError(EHWPOISON, "poisoned page", address=f"{fail:#x}")
                raise KernelError(errno.EFAULT, "fault failed", address=f"{fail:#x}")
            addr = cend
