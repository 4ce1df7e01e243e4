"""Linux constants with Linux's exact values (uapi/asm-generic/mman*.h, mm.h, mm_types.h, x86).

Grouped by header: mmap/mprotect/madvise/mremap arguments, VM_* vma flags, FAULT_FLAG_* and
VM_FAULT_* codes, struct page flag bits (vkernel's own PG_* numbering, named as Linux), and the
x86-64 page-table entry bits.
"""

from __future__ import annotations

# ---- addresses and sizes (arch/x86/include/asm/page_64_types.h, processor.h) -----------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PMD_MASK = ~(PMD_SIZE - 1)
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
PGDIR_SHIFT = 39
PGDIR_SIZE = 1 << PGDIR_SHIFT
PTRS_PER_TABLE = 512
HPAGE_PMD_ORDER = PMD_SHIFT - PAGE_SHIFT
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
TASK_SIZE = 0x7FFFFFFFF000
"""TASK_SIZE_MAX for 4-level paging: (1 << 47) - PAGE_SIZE."""
MMAP_MIN_ADDR = 0x10000
"""vm.mmap_min_addr default (CONFIG_DEFAULT_MMAP_MIN_ADDR=65536)."""
MMAP_BASE = 0x7FFFF7FFF000
"""mmap_base() without ASLR: TASK_SIZE minus the 128 MiB minimum stack gap."""
TASK_UNMAPPED_BASE = (TASK_SIZE // 3) & PAGE_MASK
"""Bottom-up search start (legacy layout fallback)."""
DEFAULT_MAX_MAP_COUNT = 65530
"""vm.max_map_count default (USHRT_MAX - MAPCOUNT_ELF_CORE_MARGIN)."""

EHWPOISON = 133
"""errno EHWPOISON (asm-generic/errno.h), missing from Python's errno typeshed."""

# ---- mmap/mprotect (uapi/asm-generic/mman-common.h, mman.h, linux/mman.h) --------------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x0100
MAP_DENYWRITE = 0x0800
MAP_EXECUTABLE = 0x1000
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000
MAP_STACK = 0x20000
MAP_HUGETLB = 0x40000
MAP_SYNC = 0x80000
MAP_FIXED_NOREPLACE = 0x100000
MAP_UNINITIALIZED = 0x4000000

# ---- mremap (uapi/linux/mman.h) ---------------------------------------------------------------
MS_ASYNC = 1
MS_INVALIDATE = 2
MS_SYNC = 4
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

# ---- madvise (uapi/asm-generic/mman-common.h) -------------------------------------------------
MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_DONTNEED_LOCKED = 24
MADV_COLLAPSE = 25
MADV_HWPOISON = 100
MADV_SOFT_OFFLINE = 101

# ---- vm_flags (include/linux/mm.h) ------------------------------------------------------------
VM_NONE = 0x00000000
VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_MAYSHARE = 0x00000080
VM_GROWSDOWN = 0x00000100
VM_UFFD_MISSING = 0x00000200
VM_PFNMAP = 0x00000400
VM_UFFD_WP = 0x00001000
VM_LOCKED = 0x00002000
VM_IO = 0x00004000
VM_SEQ_READ = 0x00008000
VM_RAND_READ = 0x00010000
VM_DONTCOPY = 0x00020000
VM_DONTEXPAND = 0x00040000
VM_LOCKONFAULT = 0x00080000
VM_ACCOUNT = 0x00100000
VM_NORESERVE = 0x00200000
VM_HUGETLB = 0x00400000
VM_SYNC = 0x00800000
VM_ARCH_1 = 0x01000000
VM_WIPEONFORK = 0x02000000
VM_DONTDUMP = 0x04000000
VM_SOFTDIRTY = 0x08000000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_MERGEABLE = 0x80000000
VM_UFFD_MINOR = 1 << 38

VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP

# /proc/PID/smaps VmFlags mnemonics (fs/proc/task_mmu.c show_smap_vma_flags), in bit order.
VM_FLAG_MNEMONICS: tuple[tuple[int, str], ...] = (
    (VM_READ, "rd"),
    (VM_WRITE, "wr"),
    (VM_EXEC, "ex"),
    (VM_SHARED, "sh"),
    (VM_MAYREAD, "mr"),
    (VM_MAYWRITE, "mw"),
    (VM_MAYEXEC, "me"),
    (VM_MAYSHARE, "ms"),
    (VM_GROWSDOWN, "gd"),
    (VM_UFFD_MISSING, "um"),
    (VM_PFNMAP, "pf"),
    (VM_UFFD_WP, "uw"),
    (VM_LOCKED, "lo"),
    (VM_IO, "io"),
    (VM_SEQ_READ, "sr"),
    (VM_RAND_READ, "rr"),
    (VM_DONTCOPY, "dc"),
    (VM_DONTEXPAND, "de"),
    (VM_LOCKONFAULT, "lf"),
    (VM_ACCOUNT, "ac"),
    (VM_NORESERVE, "nr"),
    (VM_HUGETLB, "ht"),
    (VM_SYNC, "sf"),
    (VM_ARCH_1, "ar"),
    (VM_WIPEONFORK, "wf"),
    (VM_DONTDUMP, "dd"),
    (VM_SOFTDIRTY, "sd"),
    (VM_MIXEDMAP, "mm"),
    (VM_HUGEPAGE, "hg"),
    (VM_NOHUGEPAGE, "nh"),
    (VM_MERGEABLE, "mg"),
    (VM_UFFD_MINOR, "ui"),
)

# ---- mm->flags (include/linux/sched/coredump.h) -----------------------------------------------
MMF_HAS_PINNED = 1 << 27
"""Set on the first FOLL_PIN GUP of an mm; never cleared (A.5)."""

# ---- enum fault_flag (include/linux/mm_types.h) -----------------------------------------------
FAULT_FLAG_WRITE = 1 << 0
FAULT_FLAG_MKWRITE = 1 << 1
FAULT_FLAG_ALLOW_RETRY = 1 << 2
FAULT_FLAG_RETRY_NOWAIT = 1 << 3
FAULT_FLAG_KILLABLE = 1 << 4
FAULT_FLAG_TRIED = 1 << 5
FAULT_FLAG_USER = 1 << 6
FAULT_FLAG_REMOTE = 1 << 7
FAULT_FLAG_INSTRUCTION = 1 << 8
FAULT_FLAG_INTERRUPTIBLE = 1 << 9
FAULT_FLAG_UNSHARE = 1 << 10
FAULT_FLAG_ORIG_PTE_VALID = 1 << 11
FAULT_FLAG_VMA_LOCK = 1 << 12
FAULT_FLAG_DEFAULT = FAULT_FLAG_ALLOW_RETRY | FAULT_FLAG_KILLABLE | FAULT_FLAG_INTERRUPTIBLE

# ---- enum vm_fault_reason (include/linux/mm_types.h) ------------------------------------------
VM_FAULT_OOM = 0x000001
VM_FAULT_SIGBUS = 0x000002
VM_FAULT_MAJOR = 0x000004
VM_FAULT_HWPOISON = 0x000010
VM_FAULT_HWPOISON_LARGE = 0x000020
VM_FAULT_SIGSEGV = 0x000040
VM_FAULT_NOPAGE = 0x000100
VM_FAULT_LOCKED = 0x000200
VM_FAULT_RETRY = 0x000400
VM_FAULT_FALLBACK = 0x000800
VM_FAULT_DONE_COW = 0x001000
VM_FAULT_NEEDDSYNC = 0x002000
VM_FAULT_COMPLETED = 0x004000
VM_FAULT_ERROR = (
    VM_FAULT_OOM
    | VM_FAULT_SIGBUS
    | VM_FAULT_SIGSEGV
    | VM_FAULT_HWPOISON
    | VM_FAULT_HWPOISON_LARGE
    | VM_FAULT_FALLBACK
)

# ---- GUP (A.5) ---------------------------------------------------------------------------------
GUP_PIN_COUNTING_BIAS = 1 << 10

# ---- enum foll_flags (include/linux/mm_types.h) and internal flags (mm/internal.h) ------------
FOLL_WRITE = 1 << 0
FOLL_GET = 1 << 1
FOLL_DUMP = 1 << 2
FOLL_FORCE = 1 << 3
FOLL_NOWAIT = 1 << 4
FOLL_NOFAULT = 1 << 5
FOLL_HWPOISON = 1 << 6
FOLL_ANON = 1 << 7
FOLL_LONGTERM = 1 << 8
FOLL_SPLIT_PMD = 1 << 9
FOLL_PCI_P2PDMA = 1 << 10
FOLL_INTERRUPTIBLE = 1 << 11
FOLL_HONOR_NUMA_FAULT = 1 << 12
FOLL_TOUCH = 1 << 16
"""Internal: mark the page accessed (and dirty for WRITE)."""
FOLL_TRIED = 1 << 17
"""Internal: the single-page retry after mmap_lock was dropped."""
FOLL_REMOTE = 1 << 18
"""Internal: the mm is not current's."""
FOLL_PIN = 1 << 19
"""Internal: set only by the pin_user_pages*() wrappers."""
FOLL_FAST_ONLY = 1 << 20
"""Internal: GUP-fast must not fall back to the slow path."""
FOLL_UNLOCKABLE = 1 << 21
"""Internal: mmap_lock may be dropped (a ``locked`` pointer was given)."""
FOLL_MADV_POPULATE = 1 << 22
"""Internal: MADV_POPULATE_(READ|WRITE) error reporting."""
INTERNAL_GUP_FLAGS = (
    FOLL_TOUCH
    | FOLL_TRIED
    | FOLL_REMOTE
    | FOLL_PIN
    | FOLL_FAST_ONLY
    | FOLL_UNLOCKABLE
    | FOLL_MADV_POPULATE
)
FOLL_FAST_ALLOWED = (
    FOLL_WRITE
    | FOLL_LONGTERM
    | FOLL_FORCE
    | FOLL_PIN
    | FOLL_GET
    | FOLL_FAST_ONLY
    | FOLL_NOFAULT
    | FOLL_PCI_P2PDMA
    | FOLL_HONOR_NUMA_FAULT
)
"""The only flags gup_fast_fallback() accepts; anything else is -EINVAL."""

# ---- struct page flags (vkernel numbering; names as include/linux/page-flags.h) ---------------
PG_locked = 1 << 0
PG_writeback = 1 << 1
PG_referenced = 1 << 2
PG_uptodate = 1 << 3
PG_dirty = 1 << 4
PG_lru = 1 << 5
PG_head = 1 << 6
PG_tail = 1 << 7
PG_reserved = 1 << 8
PG_swapbacked = 1 << 9
PG_anon = 1 << 10
"""PageAnon: Linux encodes it as PAGE_MAPPING_ANON in ->mapping; vkernel keeps a bit."""
PG_anon_exclusive = 1 << 11
PG_zero = 1 << 12
"""The shared zero page (is_zero_pfn)."""
PG_hwpoison = 1 << 13
PG_pgtable = 1 << 14
"""PageTable (page_type PGTY_table)."""
PG_buddy = 1 << 15
"""PageBuddy: the frame is free in the allocator."""
PG_movable_zone = 1 << 16
"""The frame lies in the movable region (page_zonenum == ZONE_MOVABLE)."""
PG_shmem = 1 << 17
"""The frame is in a shmem object's page cache."""

PAGE_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (PG_locked, "locked"),
    (PG_writeback, "writeback"),
    (PG_referenced, "referenced"),
    (PG_uptodate, "uptodate"),
    (PG_dirty, "dirty"),
    (PG_lru, "lru"),
    (PG_head, "head"),
    (PG_tail, "tail"),
    (PG_reserved, "reserved"),
    (PG_swapbacked, "swapbacked"),
    (PG_anon, "anon"),
    (PG_anon_exclusive, "anon_exclusive"),
    (PG_zero, "zero"),
    (PG_hwpoison, "hwpoison"),
    (PG_pgtable, "pgtable"),
    (PG_buddy, "buddy"),
    (PG_movable_zone, "movable"),
    (PG_shmem, "shmem"),
)

# ---- x86-64 page-table entry bits (arch/x86/include/asm/pgtable_types.h) ----------------------
_PAGE_BIT_PRESENT = 0
_PAGE_BIT_RW = 1
_PAGE_BIT_USER = 2
_PAGE_BIT_PWT = 3
_PAGE_BIT_PCD = 4
_PAGE_BIT_ACCESSED = 5
_PAGE_BIT_DIRTY = 6
_PAGE_BIT_PSE = 7
_PAGE_BIT_GLOBAL = 8
_PAGE_BIT_SOFTW1 = 9
_PAGE_BIT_SOFTW2 = 10
_PAGE_BIT_SOFTW3 = 11
_PAGE_BIT_SPECIAL = _PAGE_BIT_SOFTW1
_PAGE_BIT_UFFD_WP = _PAGE_BIT_SOFTW2
_PAGE_BIT_SOFT_DIRTY = _PAGE_BIT_SOFTW3
_PAGE_BIT_PROTNONE = _PAGE_BIT_GLOBAL
_PAGE_BIT_NX = 63

_PAGE_PRESENT = 1 << _PAGE_BIT_PRESENT
_PAGE_RW = 1 << _PAGE_BIT_RW
_PAGE_USER = 1 << _PAGE_BIT_USER
_PAGE_ACCESSED = 1 << _PAGE_BIT_ACCESSED
_PAGE_DIRTY = 1 << _PAGE_BIT_DIRTY
_PAGE_PSE = 1 << _PAGE_BIT_PSE
_PAGE_GLOBAL = 1 << _PAGE_BIT_GLOBAL
_PAGE_SPECIAL = 1 << _PAGE_BIT_SPECIAL
_PAGE_UFFD_WP = 1 << _PAGE_BIT_UFFD_WP
_PAGE_SOFT_DIRTY = 1 << _PAGE_BIT_SOFT_DIRTY
_PAGE_PROTNONE = 1 << _PAGE_BIT_PROTNONE
_PAGE_NX = 1 << _PAGE_BIT_NX
PTE_MARKER_POISONED = 1 << 58
"""A non-present PTE holding only this bit is PTE_MARKER_POISONED (UFFDIO_POISON): any access is
VM_FAULT_HWPOISON (vkernel's stand-in for the swap-entry PTE marker)."""
PTE_MARKER_UFFD_WP = _PAGE_UFFD_WP
"""A non-present PTE holding this bit is PTE_MARKER_UFFD_WP: a none PTE that is uffd write-
protected (WP_UNPOPULATED on anon, always on shmem); faults on it take the missing path and map
the page write-protected. A marker may hold both bits (copy_pte_marker)."""
PTE_MARKER_MASK = PTE_MARKER_POISONED | PTE_MARKER_UFFD_WP
"""Every bit a PTE marker may hold."""
_PAGE_PFN_MASK = ((1 << 52) - 1) & PAGE_MASK
"""Physical address bits 12..51 (__PHYSICAL_MASK_SHIFT = 52)."""
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
"""What an upper-level entry pointing to a table holds (_PAGE_TABLE)."""

# ---- /proc/PID/pagemap (fs/proc/task_mmu.c) ---------------------------------------------------
PM_PFRAME_BITS = 55
PM_PFRAME_MASK = (1 << PM_PFRAME_BITS) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63
