"""The vectorised PTE runs of the slow path give exactly the page-by-page result
(kernel-semantics.md A.3; the per-page walk is the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.gup.guphelp import mm_of, page_array
from tests.unit.mm.mmhelp import MakeKernel, MiB, P, mmap_anon
from vkernel.kernel import gup
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import fork, pagemap, read_user_bytes, sys_mprotect, write_user
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    FOLL_FORCE,
    FOLL_LONGTERM,
    FOLL_PIN,
    FOLL_WRITE,
    PROT_READ,
)

N = 1536


async def _mixed(make_kernel: MakeKernel) -> tuple[Kernel, Task, Task, int]:
    """A kernel whose 6 MiB area mixes every PTE state: written, zero page, never touched,
    R/O after fork (shared with a child), mprotect'd R/O exclusive, and a THP."""
    kernel = make_kernel(thp="madvise", memory_bytes=128 << 20)
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, N * P)
    rng = np.random.default_rng(7)
    for i in range(0, N, 8):
        kind = int(rng.integers(0, 4))
        if kind == 0:
            await write_user(task, a + i * P, bytes([i & 255]) * (8 * P))
        elif kind == 1:
            await read_user_bytes(task, a + i * P, 8 * P)
        elif kind == 2:
            await write_user(task, a + i * P, b"\x01" * (4 * P))
    child = await fork(task)
    await write_user(task, a + 64 * P, b"\x02" * (16 * P))
    await sys_mprotect(task, a + 100 * P, 20 * P, PROT_READ)
    return kernel, task, child, a


@pytest.mark.parametrize(
    "flags",
    [0, FOLL_WRITE, FOLL_PIN, FOLL_PIN | FOLL_WRITE, FOLL_PIN | FOLL_LONGTERM, FOLL_FORCE],
)
async def test_batch_equals_page_by_page(make_kernel: MakeKernel, flags: int) -> None:
    """A.3: one GUP of N pages (vectorised runs) and N GUPs of one page (the per-page walk)
    leave identical page tables and struct pages and return the same pages."""
    results = []
    for chunk in (N, 1):
        kernel, task, child, a = await _mixed(make_kernel)
        mm = mm_of(task)
        pages = page_array(N)
        pin = bool(flags & FOLL_PIN)
        gflags = flags & ~FOLL_PIN
        done = 0
        async with mm.mmap_lock.read(task):
            while done < N:
                n = min(chunk, N - done)
                if pin:
                    r = await gup.pin_user_pages(mm, a + done * P, n, gflags, pages[done:])
                else:
                    r = await gup.get_user_pages(mm, a + done * P, n, gflags, pages[done:])
                if r <= 0:
                    break
                done += r
                if r < n:
                    break
        snap = (
            done,
            pages.copy(),
            kernel.mem.refcount.copy(),
            kernel.mem.mapcount.copy(),
            kernel.mem.flags.copy(),
            pagemap(task, a, N),
            kernel.vmstat["nr_foll_pin_acquired"],
            task.min_flt,
        )
        results.append(snap)
        if pin:
            gup.unpin_user_pages(kernel, pages, done)
        else:
            gup.put_pages(kernel, pages, done)
        kernel.do_exit(child)
    big, small = results
    assert big[0] == small[0]
    assert big[0] > 0
    for x, y in zip(big[1:], small[1:], strict=True):
        if isinstance(x, np.ndarray):
            assert (x == y).all()
        else:
            assert x == y


async def test_batch_on_thp_and_small_mix(make_kernel: MakeKernel) -> None:
    """A.12 + A.3: a range mixing PMD THPs and small pages pins in one call, page by page."""
    kernel = make_kernel(thp="always")
    task = kernel.spawn("t", "s")
    a = await mmap_anon(task, 4 * MiB)
    await write_user(task, a, b"\x01" * 4 * MiB)
    from vkernel.kernel.mm_api import sys_madvise
    from vkernel.kernel.uapi import MADV_DONTNEED

    await sys_madvise(task, a + 2 * MiB + 10 * P, P, MADV_DONTNEED)  # splits the 2nd THP's PMD
    pages = page_array(1024)
    mm = mm_of(task)
    async with mm.mmap_lock.read(task):
        assert await gup.pin_user_pages(mm, a, 1024, FOLL_WRITE, pages) == 1024
    assert len(np.unique(pages)) == 1024
    gup.unpin_user_pages(kernel, pages, 1024)
