"""The gup_test debugfs ioctl (mm/gup_test.c, CONFIG_GUP_TEST): GUP benchmarks and tests.

``tools/testing/selftests/mm/gup_test`` opens ``/sys/kernel/debug/gup_test`` and issues one
ioctl per repeat; the kernel walks ``[addr, addr + size)`` in ``nr_pages_per_call`` chunks with
the command's entry point, timing the loop (``get_delta_usec``), checks the pins
(``verify_dma_pinned``), dumps the chosen pages, then releases everything, timed
(``put_delta_usec``). :func:`gup_test_ioctl` is that ioctl; ``vkctl gup-test`` is the port of
the selftest that drives it.
"""

from __future__ import annotations

import enum
import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vkernel.kernel import gup
from vkernel.kernel.errors import KernelError
from vkernel.kernel.proc import dump_page
from vkernel.kernel.uapi import FOLL_LONGTERM, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from vkernel.kernel.task import Task

GUP_TEST_MAX_PAGES_TO_DUMP = 8
GUP_TEST_FLAG_DUMP_PAGES_USE_PIN = 0x1
_ULONG_MAX = (1 << 64) - 1


class GupTestCmd(enum.IntEnum):
    """The ioctl commands (numbers as the GupTestCommand enum of gup_service.proto)."""

    GUP_FAST_BENCHMARK = 1
    PIN_FAST_BENCHMARK = 2
    PIN_LONGTERM_BENCHMARK = 3
    GUP_BASIC_TEST = 4
    PIN_BASIC_TEST = 5
    DUMP_USER_PAGES_TEST = 6


@dataclass
class GupTestResult:
    """struct gup_test after the ioctl, plus what the kernel log would have shown."""

    get_delta_usec: int
    put_delta_usec: int
    size: int
    dumped: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """(0-based index, dump_page()) for each page DUMP_USER_PAGES_TEST dumped."""
    not_pinned: int = 0
    """Pages verify_dma_pinned() warned about."""


def _pins(cmd: GupTestCmd, test_flags: int) -> bool:
    """Whether ``cmd`` takes FOLL_PIN references (else FOLL_GET)."""
    if cmd is GupTestCmd.DUMP_USER_PAGES_TEST:
        return bool(test_flags & GUP_TEST_FLAG_DUMP_PAGES_USE_PIN)
    return cmd in (
        GupTestCmd.PIN_FAST_BENCHMARK,
        GupTestCmd.PIN_LONGTERM_BENCHMARK,
        GupTestCmd.PIN_BASIC_TEST,
    )


async def _one_call(
    task: Task, cmd: GupTestCmd, pin: bool, addr: int, nr: int, flags: int, pages: Any
) -> int:
    """The switch of __gup_test_ioctl(): one entry point call on ``pages``."""
    from vkernel.kernel import gup_fast

    mm = task.mm
    if cmd is GupTestCmd.GUP_FAST_BENCHMARK:
        return await gup_fast.get_user_pages_fast(mm, addr, nr, flags, pages, current=task)
    if cmd is GupTestCmd.PIN_FAST_BENCHMARK:
        return await gup_fast.pin_user_pages_fast(mm, addr, nr, flags, pages, current=task)
    if cmd is GupTestCmd.PIN_LONGTERM_BENCHMARK:
        return await gup.pin_user_pages(mm, addr, nr, flags | FOLL_LONGTERM, pages, current=task)
    if pin:
        return await gup.pin_user_pages(mm, addr, nr, flags, pages, current=task)
    return await gup.get_user_pages(mm, addr, nr, flags, pages, current=task)


def _verify_dma_pinned(task: Task, cmd: GupTestCmd, pages: Any) -> int:
    """verify_dma_pinned(): every pinned folio must look DMA-pinned (and, for LONGTERM, sit
    in pinnable memory). Returns the number of pages that do not (Linux WARNs per page).
    The shared zero page is skipped: pinning it takes no reference at all (A.5)."""
    if cmd not in (GupTestCmd.PIN_FAST_BENCHMARK, GupTestCmd.PIN_LONGTERM_BENCHMARK):
        return 0
    mem = task.mm.mem
    pages = pages[pages != mem.zero_pfn]
    heads = mem.compound_heads(pages)
    large = mem.order[heads] > 0
    pinned = np.where(
        large, mem.pincount_of(heads) > 0, mem.refcount[heads].view(np.uint32) >= 1024
    )
    bad = int(np.count_nonzero(~pinned))
    if cmd is GupTestCmd.PIN_LONGTERM_BENCHMARK:
        bad += int(np.count_nonzero(pinned & (heads >= mem.movable_start)))
    return bad


async def gup_test_ioctl(
    task: Task,
    cmd: int,
    addr: int,
    size: int,
    nr_pages_per_call: int,
    gup_flags: int,
    test_flags: int = 0,
    which_pages: tuple[int, ...] | list[int] = (),
) -> GupTestResult:
    """__gup_test_ioctl(): the command over [addr, addr + size) as ``task`` (current)."""
    try:
        which = GupTestCmd(cmd)
    except ValueError:
        raise KernelError(errno.EINVAL, f"unknown gup_test command {cmd}") from None
    mm = task.mm
    if mm is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has no address space")
    if size > _ULONG_MAX:
        raise KernelError(errno.EINVAL, "size does not fit an unsigned long")
    if len(which_pages) > GUP_TEST_MAX_PAGES_TO_DUMP:
        raise KernelError(errno.EINVAL, f"at most {GUP_TEST_MAX_PAGES_TO_DUMP} pages to dump")
    nr_pages = size // PAGE_SIZE
    if nr_pages > task.mm.mem.nframes * 4:
        # kvcalloc() of the pages array would fail long before this in Linux.
        raise KernelError(errno.ENOMEM, "the pages array would not fit")
    pages = np.zeros(nr_pages + 1, dtype=np.int64)
    pin = _pins(which, test_flags)
    needs_lock = which not in (GupTestCmd.GUP_FAST_BENCHMARK, GupTestCmd.PIN_FAST_BENCHMARK)
    if needs_lock:
        await mm.mmap_lock.read_lock(task)
    try:
        i = 0
        nr = nr_pages_per_call
        end = addr + size
        start_ns = time.perf_counter_ns()
        a = addr
        while a < end:
            if nr != nr_pages_per_call:
                break
            nxt = a + nr * PAGE_SIZE
            if nxt > end:
                nxt = end
                nr = (nxt - a) >> PAGE_SHIFT
            nr = await _one_call(task, which, pin, a, nr, gup_flags, pages[i:])
            if nr <= 0:
                break
            i += nr
            a = nxt
        get_ns = time.perf_counter_ns() - start_ns
        got = pages[:i]
        result = GupTestResult(get_ns // 1000, 0, a - addr)
        result.not_pinned = _verify_dma_pinned(task, which, got)
        if which is GupTestCmd.DUMP_USER_PAGES_TEST:
            for index in which_pages:
                if index and index - 1 < i:  # which_pages is 1-based; 0 means unused
                    result.dumped.append((index - 1, dump_page(mm.kernel, int(got[index - 1]))))
        start_ns = time.perf_counter_ns()
        if i:
            if pin:
                gup.unpin_user_pages(mm.kernel, got, i)
            else:
                gup.put_pages(mm.kernel, got, i)
        result.put_delta_usec = (time.perf_counter_ns() - start_ns) // 1000
        return result
    finally:
        if needs_lock:
            mm.mmap_lock.read_unlock()
