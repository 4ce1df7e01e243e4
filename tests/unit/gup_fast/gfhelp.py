"""Helpers for the GUP-fast tests (import as tests.unit.gup_fast.gfhelp)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from vkernel.kernel.gup_fast import gup_fast
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm import MmStruct
from vkernel.kernel.pgtable import pmd_slot, table_of
from vkernel.kernel.task import Task
from vkernel.kernel.tlb import tlb_state

PageArray = npt.NDArray[np.int64]
P = 4096


def page_array(n: int) -> PageArray:
    """A pages[] array (NULL-filled) for ``n`` pages."""
    return np.full(n, -1, dtype=np.int64)


def read_locks(task: Task) -> int:
    """mmap_lock read acquisitions of ``task``'s mm so far."""
    return int(task.mm.mmap_lock.stats()["read_acquired"])


def pte_table_of(mm: MmStruct, addr: int) -> int:
    """The PTE table pfn mapping ``addr``."""
    slot = pmd_slot(mm, addr)
    assert slot >= 0
    return table_of(int(mm.mem.u64[slot]))


class ParkedWalker:
    """A GUP-fast walker on another 'CPU' (a worker thread), parked inside the test hook.

    ``start()`` runs ``gup_fast`` in a thread; at the first hook call with ``stage`` the thread
    blocks (IRQs still off) until ``release()``. ``result()`` awaits the walker's return value
    (or its exception).
    """

    def __init__(
        self, kernel: Kernel, mm: MmStruct, start: int, npages: int, flags: int, stage: str = "pmd"
    ) -> None:
        self.kernel = kernel
        self.mm = mm
        self.start_addr = start
        self.npages = npages
        self.flags = flags
        self.stage = stage
        self.pages = page_array(npages)
        self.parked = threading.Event()
        self._release = threading.Event()
        self._done = False
        self._fut: asyncio.Future[int] | None = None

    def _hook(self, stage: str, arg: int) -> None:
        """The park_hook: block the walker thread once, at the chosen stage."""
        if stage == self.stage and not self._done:
            self._done = True
            self.parked.set()
            self._release.wait(10)

    async def start(self) -> None:
        """Start the walker thread and wait until it is parked mid-walk."""
        tlb_state(self.kernel).park_hook = self._hook
        end = self.start_addr + self.npages * P
        self._fut = asyncio.ensure_future(
            asyncio.to_thread(gup_fast, self.mm, self.start_addr, end, self.flags, self.pages)
        )
        assert await asyncio.to_thread(self.parked.wait, 10)

    def release(self) -> None:
        """Let the walker continue (it restores IRQs when its walk ends)."""
        self._release.set()

    async def result(self) -> int:
        """The walker's return value; the hook is removed afterwards."""
        assert self._fut is not None
        try:
            return await self._fut
        finally:
            tlb_state(self.kernel).park_hook = None


def in_hook(kernel: Kernel, stage: str, action: Callable[[], Any]) -> None:
    """Run ``action`` (synchronously, in the walker's own thread) at the first ``stage``."""
    fired: list[bool] = []

    def hook(st: str, arg: int) -> None:
        if st == stage and not fired:
            fired.append(True)
            action()

    tlb_state(kernel).park_hook = hook
