"""Linux constants with Linux's values: PROT_*, MAP_*, MREMAP_*, MADV_*, O_*, FALLOC_FL_*.

Also the /proc/PID/pagemap entry bits (fs/proc/task_mmu.c) and helpers to read an entry::

    from vkclient import PM_PRESENT, pagemap_pfn
    entry = (await p.pagemap(addr, 1))[0]
    if entry & PM_PRESENT:
        print(pagemap_pfn(entry))
"""

from __future__ import annotations

from vkernel.kernel.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_DIRECT,
    O_EXCL,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
)
from vkernel.kernel.uapi import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_HWPOISON,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_SOFT_OFFLINE,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_DENYWRITE,
    MAP_EXECUTABLE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_STACK,
    MAP_SYNC,
    MAP_TYPE,
    MAP_UNINITIALIZED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGE_SHIFT,
    PAGE_SIZE,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFRAME_BITS,
    PM_PFRAME_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_NONE,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
)

MAP_ANON = MAP_ANONYMOUS
"""The BSD spelling, as glibc defines it."""
MAP_FAILED = -1
"""What mmap(3) returns on failure; the SDK raises OSError instead, kept for ported code."""


def pagemap_present(entry: int) -> bool:
    """The page is in memory (PM_PRESENT)."""
    return bool(entry & PM_PRESENT)


def pagemap_pfn(entry: int) -> int:
    """The page frame number of a present entry (bits 0-54), or 0 when not present."""
    return entry & PM_PFRAME_MASK if entry & PM_PRESENT else 0


def pagemap_flags(entry: int) -> list[str]:
    """The names of the entry's flag bits: present, swap, file, uffd-wp, exclusive, soft-dirty."""
    names = (
        (PM_PRESENT, "present"),
        (PM_SWAP, "swap"),
        (PM_FILE, "file"),
        (PM_UFFD_WP, "uffd-wp"),
        (PM_MMAP_EXCLUSIVE, "exclusive"),
        (PM_SOFT_DIRTY, "soft-dirty"),
    )
    return [name for bit, name in names if entry & bit]


__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "MADV_COLD",
    "MADV_COLLAPSE",
    "MADV_DODUMP",
    "MADV_DOFORK",
    "MADV_DONTDUMP",
    "MADV_DONTFORK",
    "MADV_DONTNEED",
    "MADV_DONTNEED_LOCKED",
    "MADV_FREE",
    "MADV_HUGEPAGE",
    "MADV_HWPOISON",
    "MADV_KEEPONFORK",
    "MADV_MERGEABLE",
    "MADV_NOHUGEPAGE",
    "MADV_NORMAL",
    "MADV_PAGEOUT",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MADV_RANDOM",
    "MADV_REMOVE",
    "MADV_SEQUENTIAL",
    "MADV_SOFT_OFFLINE",
    "MADV_UNMERGEABLE",
    "MADV_WILLNEED",
    "MADV_WIPEONFORK",
    "MAP_ANON",
    "MAP_ANONYMOUS",
    "MAP_DENYWRITE",
    "MAP_EXECUTABLE",
    "MAP_FAILED",
    "MAP_FIXED",
    "MAP_FIXED_NOREPLACE",
    "MAP_GROWSDOWN",
    "MAP_HUGETLB",
    "MAP_LOCKED",
    "MAP_NONBLOCK",
    "MAP_NORESERVE",
    "MAP_POPULATE",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "MAP_SHARED_VALIDATE",
    "MAP_STACK",
    "MAP_SYNC",
    "MAP_TYPE",
    "MAP_UNINITIALIZED",
    "MREMAP_DONTUNMAP",
    "MREMAP_FIXED",
    "MREMAP_MAYMOVE",
    "MS_ASYNC",
    "MS_INVALIDATE",
    "MS_SYNC",
    "O_ACCMODE",
    "O_APPEND",
    "O_CLOEXEC",
    "O_CREAT",
    "O_DIRECT",
    "O_EXCL",
    "O_RDONLY",
    "O_RDWR",
    "O_TRUNC",
    "O_WRONLY",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PM_FILE",
    "PM_MMAP_EXCLUSIVE",
    "PM_PFRAME_BITS",
    "PM_PFRAME_MASK",
    "PM_PRESENT",
    "PM_SOFT_DIRTY",
    "PM_SWAP",
    "PM_UFFD_WP",
    "PROT_EXEC",
    "PROT_GROWSDOWN",
    "PROT_GROWSUP",
    "PROT_NONE",
    "PROT_READ",
    "PROT_SEM",
    "PROT_WRITE",
    "pagemap_flags",
    "pagemap_pfn",
    "pagemap_present",
]
