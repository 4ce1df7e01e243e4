"""Open files and per-process descriptor tables (fs/file.c, fs/file_table.c, include/linux/fdtable.h).

A :class:`File` is an open file description (struct file): the inode, the open flags and
the shared offset. An :class:`FdTable` (struct files_struct) maps descriptors to files; fork
duplicates it (dup_fd: same descriptions, shared offsets), exit closes it (exit_files).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vkernel.kernel.errors import KernelError

if TYPE_CHECKING:
    from vkernel.kernel.fs import Inode

RLIMIT_NOFILE_DEFAULT = 1024
"""Linux's default soft RLIMIT_NOFILE: descriptors 0..1023."""

O_ACCMODE = 0o3
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2


@dataclass(eq=False)
class File:
    """struct file: one open file description."""

    inode: Inode
    f_flags: int
    f_pos: int = 0
    f_count: int = 1
    release: Callable[[File], None] | None = None
    """Called when the last reference goes (__fput → the inode's release)."""

    @property
    def readable(self) -> bool:
        """FMODE_READ."""
        return (self.f_flags & O_ACCMODE) in (O_RDONLY, O_RDWR)

    @property
    def writable(self) -> bool:
        """FMODE_WRITE."""
        return (self.f_flags & O_ACCMODE) in (O_WRONLY, O_RDWR)

    def get(self) -> File:
        """get_file()."""
        self.f_count += 1
        return self

    def put(self) -> None:
        """fput(): the last reference releases the file."""
        self.f_count -= 1
        if self.f_count == 0 and self.release is not None:
            self.release(self)


class FdTable:
    """struct files_struct: descriptor → open file, lowest free descriptor first."""

    def __init__(self, max_fds: int = RLIMIT_NOFILE_DEFAULT) -> None:
        self.max_fds = max_fds
        self.fds: dict[int, File] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self.fds)

    def alloc_fd(self) -> int:
        """alloc_fd(): the lowest unused descriptor, or EMFILE at RLIMIT_NOFILE."""
        for fd in range(self.max_fds):
            if fd not in self.fds:
                return fd
        raise KernelError(errno.EMFILE, "too many open files", limit=self.max_fds)

    def install(self, file: File) -> int:
        """fd_install() of a new file at the lowest free descriptor (consumes the reference)."""
        if self.closed:
            raise KernelError(errno.ESRCH, "process is exiting")
        fd = self.alloc_fd()
        self.fds[fd] = file
        return fd

    def fget(self, fd: int) -> File:
        """fdget(): the open file or EBADF."""
        f = self.fds.get(fd)
        if f is None:
            raise KernelError(errno.EBADF, f"bad file descriptor {fd}", fd=fd)
        return f

    def close_fd(self, fd: int) -> None:
        """close_fd(): EBADF if not open."""
        f = self.fds.pop(fd, None)
        if f is None:
            raise KernelError(errno.EBADF, f"bad file descriptor {fd}", fd=fd)
        f.put()

    def dup(self) -> FdTable:
        """dup_fd(): the child's table shares every open file description."""
        t = FdTable(self.max_fds)
        t.fds = {fd: f.get() for fd, f in self.fds.items()}
        return t

    def close_all(self) -> None:
        """exit_files()/put_files_struct(): close every descriptor."""
        self.closed = True
        fds, self.fds = self.fds, {}
        for f in fds.values():
            f.put()
