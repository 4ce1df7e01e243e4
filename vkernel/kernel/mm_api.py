"""The mm facade the API layer calls: every entry point takes the acting Task.

Thin re-exports of the mm core (mmap.py, uaccess.py, fork.py, proc.py, audit.py); all errors
are ``KernelError`` (or its subclass ``UserFault``) carrying Linux's errno.

Where the model knowingly differs from Linux 6.12:

- Files (shmem, disk, dax) map MAP_SHARED or MAP_PRIVATE; MAP_SHARED|MAP_ANONYMOUS is a small
  shmem object. No swap, KSM, NUMA, mlock syscalls or overcommit accounting (VM_ACCOUNT is only
  set). File faults map single pages (no fault-around, no large folios in the page cache).
- Folios are order 0 or 9 (no mTHP). There is no deferred split: a partly unmapped THP stays
  whole until its last mapping goes, then the whole 2 MiB block is freed. mremap splits THP
  PMDs instead of moving them. The huge zero page is freed as soon as nothing maps it.
- MADV_FREE frees at once (like MADV_DONTNEED); MADV_COLD/PAGEOUT/WILLNEED are no-ops;
  mremap with old_size 0 is EINVAL.
- pgmajfault counts faults that had to read a file page from its device. User accesses are
  loads and stores, not instruction fetches (no exec permission check).
- Physical frames live in a memfd: the first touch of a frame costs the host a page fault.
  ``kernel.mem.prefault(background=True)`` at boot takes that cost out of the first faults.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vkernel.kernel.audit import audit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.mmap import (
    sys_madvise,
    sys_mmap,
    sys_mprotect,
    sys_mremap,
    sys_msync,
    sys_munmap,
)
from vkernel.kernel.proc import (
    dump_page,
    lookup_pte,
    mmap_lock_stats,
    pagemap,
    proc_maps,
    proc_smaps,
    proc_status_mm,
)
from vkernel.kernel.uaccess import access_user, read_user, read_user_bytes, write_user

if TYPE_CHECKING:
    from vkernel.kernel.task import Task

__all__ = [
    "access_user",
    "audit",
    "dump_page",
    "fork",
    "lookup_pte",
    "mmap_lock_stats",
    "pagemap",
    "proc_maps",
    "proc_smaps",
    "proc_status_mm",
    "read_user",
    "read_user_bytes",
    "sys_madvise",
    "sys_mmap",
    "sys_mprotect",
    "sys_mremap",
    "sys_msync",
    "sys_munmap",
    "write_user",
]


async def fork(task: Task) -> Task:
    """fork(2): a child process sharing ``task``'s memory copy-on-write."""
    from vkernel.kernel.fork import dup_task

    mm = task.mm
    kernel = mm.kernel if mm is not None else None
    if kernel is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has no address space", pid=task.pid)
    return await dup_task(kernel, task)
