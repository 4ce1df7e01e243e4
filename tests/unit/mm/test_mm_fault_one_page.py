"""The one-page fast path of fault_in_range/read_user matches the run path (A.9, A.10).

A load or store within one page takes int ops on its one PTE (uaccess._fault_in_page,
_copy_out_page); the same access split over two pages takes the vectorised path. Both must
leave the same PTE bits, the same counters and the same bytes.
"""

from __future__ import annotations

import pytest

from tests.unit.mm.mmhelp import MakeKernel, P, errname, mmap_anon
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import audit, lookup_pte, read_user_bytes, write_user
from vkernel.kernel.task import Task

_PFN_MASK = (1 << 52) - 1 & ~(P - 1)


async def _bits_and_counts(
    kernel: Kernel, task: Task, addr: int, two_pages: bool, write: bool
) -> tuple[int, int, int]:
    """The low PTE bits at ``addr`` and the fault counters after one access there."""
    # Two pages: the access straddles the boundary at addr + P (same first page).
    off = P - 4 if two_pages else 8
    if write:
        await write_user(task, addr + off, b"abcdefgh")
        data = await read_user_bytes(task, addr + off, 8)
        assert data == b"abcdefgh"
    else:
        assert await read_user_bytes(task, addr + off, 8) == bytes(8)
    e = lookup_pte(task, addr)
    return e & ~_PFN_MASK, task.min_flt, kernel.vmstat["pgfault"]


@pytest.mark.parametrize("write", [False, True])
async def test_one_page_access_matches_the_run_path(make_kernel: MakeKernel, write: bool) -> None:
    """A.10: zero page for a load, an anon page for a store; same bits and counts either way
    (per page: the two-page access faults two pages, the one-page access one)."""
    results = []
    for two in (False, True):
        k = make_kernel()
        t = k.spawn("t", "s")
        a = await mmap_anon(t, 4 * P)
        bits, minflt, pgfault = await _bits_and_counts(k, t, a, two, write)
        pages = 2 if two else 1
        # A store is one fault per page, plus the load back (present: no fault).
        results.append((bits, minflt // pages, pgfault // pages))
        assert audit(k) == []
    assert results[0] == results[1]


async def test_one_page_oom_reports_enomem(make_kernel: MakeKernel) -> None:
    """A.9 VM_FAULT_OOM: a one-page store with no free page left fails with ENOMEM."""
    k = make_kernel(memory_bytes=4 << 20)
    t = k.spawn("oom", "s")
    a = await mmap_anon(t, 8 << 20)

    async def store_until_oom() -> None:
        pos = 0
        while True:
            await write_user(t, a + pos + 100, b"z")
            pos += P

    with pytest.raises(KernelError) as ei:
        await store_until_oom()
    assert errname(ei.value) == "ENOMEM"
    assert k.mem.nr_free_pages == 0
    assert await read_user_bytes(t, a + 100, 1) == b"z"
    assert audit(k) == []
