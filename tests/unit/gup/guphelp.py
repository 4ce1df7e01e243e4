"""Helpers shared by the GUP unit tests (import as tests.unit.gup.guphelp)."""

from __future__ import annotations

import numpy as np

from vkernel.kernel.gup import PageArray
from vkernel.kernel.mm import MmStruct
from vkernel.kernel.task import Task


def mm_of(task: Task) -> MmStruct:
    """task->mm, typed."""
    mm = task.mm
    assert isinstance(mm, MmStruct)
    return mm


def page_array(n: int) -> PageArray:
    """A pages[] array of ``n`` NULL entries."""
    return np.full(n, -1, dtype=np.int64)


def vm(task: Task, name: str) -> int:
    """A /proc/vmstat event counter of the task's kernel."""
    return mm_of(task).kernel.vmstat[name]
