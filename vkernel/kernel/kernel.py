"""The kernel object: owns memory, tasks and counters. The root every subsystem hangs off."""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vkernel import __version__
from vkernel.kernel.cred import Cred, Rlimit
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.task import Task, TaskState, default_rlimits
from vkernel.kernel.vmstat import VmStat

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
TASK_COMM_LEN = 16
PID_MAX = 4_194_304
FIRST_PID = 100

# Signals whose default action does not end the task (signal(7): Ign, Stop, Cont).
_HARMLESS_SIGNALS = frozenset(
    {
        signal.SIGCHLD,
        signal.SIGCONT,
        signal.SIGURG,
        signal.SIGWINCH,
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
    }
)
_SIGRTMAX = 64


@dataclass(frozen=True)
class KernelConfig:
    """Boot parameters (the daemon's --memory, --arch … options)."""

    memory_bytes: int = 1 << 30
    """Size of physical memory."""
    arch: str = "x86_64"
    """x86_64, arm64 or generic: selects the page-table-freeing protection for GUP-fast."""
    movable_bytes: int = 0
    """Size of the ZONE_MOVABLE-like region that FOLL_LONGTERM pins must migrate out of."""
    thp: str = "madvise"
    """transparent_hugepage/enabled: always, madvise or never."""
    readahead: bool = True
    """Page-cache readahead (a 32-page window) on file reads."""
    fault_retry: bool = True
    """FAULT_FLAG_ALLOW_RETRY honoured (--no-fault-retry: every fault sleeps holding mmap_lock)."""
    unprivileged_userfaultfd: bool = False
    """vm.unprivileged_userfaultfd: userfaultfd(0) without CAP_SYS_PTRACE."""
    dio_gup: str = "fast"
    """O_DIRECT/AIO page extraction: "fast" (pin_user_pages_fast) or "slow" (under mmap_lock)."""
    dio_foll: str = "pin"
    """O_DIRECT/AIO references: "pin" (FOLL_PIN) or "get" (FOLL_GET, seed 004's comparison)."""


class Kernel:
    """The whole virtual machine's kernel state, driven from one asyncio event loop."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()
        if self.config.arch not in ("x86_64", "arm64", "generic"):
            raise einval(f"unknown arch {self.config.arch!r}", field="arch")
        self.boot_time = time.monotonic()
        self.vmstat = VmStat()
        self.tasks: dict[int, Task] = {}
        self._last_pid = FIRST_PID - 1
        self._init_memory()
        self._init_files()

    def _init_memory(self) -> None:
        """mm_init(): bring up physical memory, the zero page and the mm registries."""
        from vkernel.kernel.physmem import PhysMem
        from vkernel.kernel.uapi import DEFAULT_MAX_MAP_COUNT, HPAGE_PMD_ORDER

        if self.config.thp not in ("always", "madvise", "never"):
            raise einval(f"unknown THP mode {self.config.thp!r}", field="thp")
        self.mem = PhysMem(self.config.memory_bytes, self.config.movable_bytes, self.vmstat)
        self.sysctl_max_map_count = DEFAULT_MAX_MAP_COUNT
        """vm.max_map_count."""
        nframes = self.mem.nframes
        self.extra_refs = np.zeros(nframes, dtype=np.int32)
        """Per frame (folio head): references held outside page tables and caches (GUP gets and
        pins, DMA, GUP refs on the zero pages); the audit adds them to the expected refcount."""
        self.extra_pins = np.zeros((nframes >> HPAGE_PMD_ORDER) + 1, dtype=np.int32)
        """Per 2 MiB block (head >> 9): pins on the large folio there, the audit's expected
        _pincount (small folios count pins in ``extra_refs``, GUP_PIN_COUNTING_BIAS each)."""
        self.pgtable_free_hooks: list[Callable[[int], None]] = []
        """Called with the pfn of each page-table page just before tlb_remove_table frees it."""

    def _init_files(self) -> None:
        """vfs_caches_init(): the file namespace (block devices are added by the daemon)."""
        from vkernel.kernel.fs import Vfs

        self.vfs = Vfs(self, readahead=self.config.readahead)

    @property
    def version(self) -> str:
        """uname -r for this kernel."""
        return __version__

    def uptime(self) -> float:
        """Seconds since boot, as /proc/uptime's first field."""
        return time.monotonic() - self.boot_time

    # ---- pids ---------------------------------------------------------------------------

    def _alloc_pid(self) -> int:
        """alloc_pid(): the next free pid, cycling below pid_max as Linux does."""
        pid = self._last_pid
        for _ in range(PID_MAX):
            pid = pid + 1 if pid + 1 < PID_MAX else FIRST_PID
            if pid not in self.tasks:
                self._last_pid = pid
                return pid
        raise KernelError(errno.EAGAIN, "no free pid")

    def find_task(self, pid: int) -> Task:
        """find_task_by_vpid(): the task or ESRCH."""
        task = self.tasks.get(pid)
        if task is None:
            raise KernelError(errno.ESRCH, f"no process {pid}", pid=pid)
        return task

    def iter_tasks(self) -> Iterator[Task]:
        """for_each_process(), in pid order."""
        return iter(sorted(self.tasks.values(), key=lambda t: t.pid))

    # ---- life cycle ---------------------------------------------------------------------

    def spawn(
        self,
        comm: str,
        owner: str,
        cred: Cred | None = None,
        rlimits: dict[Rlimit, int] | None = None,
    ) -> Task:
        """kernel_clone() + exec of a fresh process with an empty address space."""
        if not comm:
            raise einval("process name is empty", field="name")
        task = Task(
            pid=self._alloc_pid(),
            comm=comm[: TASK_COMM_LEN - 1],
            cred=cred or Cred(),
            rlimits=default_rlimits(rlimits),
            owner=owner,
            start_time=time.monotonic(),
        )
        task.mm = self._mm_alloc(task)
        task.files = self._files_alloc()
        self.tasks[task.pid] = task
        return task

    @staticmethod
    def _files_alloc() -> object:
        """A fresh, empty descriptor table (RLIMIT_NOFILE 1024)."""
        from vkernel.kernel.fdtable import FdTable

        return FdTable()

    def _mm_alloc(self, task: Task) -> object:
        """mm_alloc(): a new empty address space for ``task``."""
        from vkernel.kernel.mm import MmStruct

        return MmStruct(self)

    async def fork(self, task: Task) -> Task:
        """kernel_clone(): a child with a COW copy of ``task``'s address space (dup_mmap)."""
        from vkernel.kernel.fork import dup_task

        child = await dup_task(self, task)
        files = task.files
        child.files = files.dup() if files is not None else self._files_alloc()  # dup_fd()
        return child

    def kill(self, task: Task, signo: int) -> None:
        """kill(2) on a task without handlers: the default action of ``signo``."""
        if signo < 0 or signo > _SIGRTMAX:
            raise einval(f"invalid signal {signo}", field="signal")
        if signo == 0 or task.state is TaskState.ZOMBIE or signo in _HARMLESS_SIGNALS:
            return
        task.send_fatal_signal(signo)
        self.do_exit(task, exit_signal=signo)

    def do_exit(self, task: Task, exit_code: int = 0, exit_signal: int = 0) -> None:
        """do_exit(): release the address space and become a zombie until reaped."""
        if task.state is TaskState.ZOMBIE:
            return
        task.exit_code = exit_code
        task.exit_signal = exit_signal
        mm, task.mm = task.mm, None
        if mm is not None:
            exit_mmap = getattr(mm, "exit_mmap", None)
            if exit_mmap is not None:
                exit_mmap()
        files, task.files = task.files, None
        if files is not None:
            files.close_all()  # exit_files()
        task.state = TaskState.ZOMBIE
        task.exited.set()

    def reap(self, task: Task) -> int:
        """release_task(): drop a zombie from the task table; returns its wait status."""
        if task.state is not TaskState.ZOMBIE:
            raise KernelError(errno.ECHILD, f"process {task.pid} has not exited", pid=task.pid)
        self.tasks.pop(task.pid, None)
        return task.wait_status()

    async def wait(self, task: Task) -> int:
        """wait4() for one task: sleep until it exits, reap it, return its status."""
        await task.exited.wait()
        return self.reap(task)
