"""Virtual memory areas (struct vm_area_struct, mm/vma.c) and anonymous shmem objects."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.pagecache import AddressSpace
from vkernel.kernel.pgtable import vm_get_page_prot
from vkernel.kernel.uapi import (
    _PAGE_RW,
    PAGE_SHIFT,
    VM_ACCESS_FLAGS,
    VM_HUGEPAGE,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SPECIAL,
    VM_UFFD_WP,
)

if TYPE_CHECKING:
    from vkernel.kernel.fdtable import File
    from vkernel.kernel.fs import Inode
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.userfaultfd import UserfaultfdCtx

_shmem_ino = itertools.count(1)


def vma_page_prot(vm_flags: int) -> int:
    """vma_set_page_prot(): vm_get_page_prot(), write-protected where vma_wants_writenotify()
    asks for write faults — here a shared mapping registered uffd-wp (userfaultfd_set_vm_flags
    recomputes it whenever VM_UFFD_WP changes), so mprotect never makes a protected PTE
    writable and unprotected pages take wp_page_shared on their first write."""
    prot = vm_get_page_prot(vm_flags)
    if vm_flags & VM_SHARED and vm_flags & VM_UFFD_WP:
        prot &= ~_PAGE_RW
    return prot


class AnonVma:
    """struct anon_vma: identity of the anonymous memory a VMA's private pages belong to."""

    def __init__(self, mem: PhysMem, parent: AnonVma | None = None) -> None:
        self.mem = mem
        self.id = mem.register_mapping(self)
        self.parent = parent
        self.refs = 0


class ShmemObject(AddressSpace):
    """shmem_inode_info of an anonymous shared mapping (mm/shmem.c shmem_zero_setup) or of a
    shmem file (shmem_file_setup, memfd_create): the same object, so both fault the same way.

    Its page cache maps file page index → pfn; each cached page holds one reference.
    """

    shmem = True

    def __init__(self, mem: PhysMem, size_bytes: int) -> None:
        super().__init__(mem, size_bytes)
        self.ino = next(_shmem_ino)
        self.users = 0

    def get(self) -> None:
        """get_file(): one more VMA refers to the object."""
        self.users += 1

    def put(self) -> None:
        """fput(): the last VMA gone truncates the page cache (shmem_evict_inode)."""
        self.users -= 1
        if self.users == 0:
            pfns = np.fromiter(self.pages.values(), dtype=np.int64, count=len(self.pages))
            self.pages.clear()
            if len(pfns):
                self.mem.put_folios(self.mem.compound_heads(pfns))
            self.mem.unregister_mapping(self.id)


@dataclass(eq=False)
class VMA:
    """struct vm_area_struct."""

    mm: MmStruct
    vm_start: int
    vm_end: int
    vm_flags: int
    vm_pgoff: int
    anon_vma: AnonVma | None = None
    shmem: ShmemObject | None = None
    vm_file: File | None = None
    """The mapped file (vma->vm_file); holds a reference on the open file description."""
    mapping: AddressSpace | None = None
    """The page cache of a mapped ``disk`` file (vm_file->f_mapping; shmem files use ``shmem``)."""
    dax: Inode | None = None
    """The inode of a mapped ``dax`` file (no page cache: faults map the device's frames)."""
    vm_page_prot: int = field(init=False)
    uffd_ctx: UserfaultfdCtx | None = None
    """vma->vm_userfaultfd_ctx: the uffd the VM_UFFD_* flags belong to (split keeps it)."""
    detached: bool = field(default=False, init=False)
    """Unlinked from its mm (vma_mark_detached): stale references must skip it."""

    def __post_init__(self) -> None:
        self.vm_page_prot = vma_page_prot(self.vm_flags)

    def set_flags(self, flags: int) -> None:
        """vm_flags_reset(): new flags and the matching vm_page_prot."""
        self.vm_flags = flags
        self.vm_page_prot = vma_page_prot(flags)

    @property
    def size(self) -> int:
        """vma_pages() << PAGE_SHIFT."""
        return self.vm_end - self.vm_start

    def is_anonymous(self) -> bool:
        """vma_is_anonymous(): no backing object (private anonymous memory)."""
        return self.shmem is None and self.mapping is None and self.dax is None

    def f_mapping(self) -> AddressSpace | None:
        """vma->vm_file->f_mapping (the shmem object for shared anonymous and shmem mappings)."""
        return self.shmem if self.shmem is not None else self.mapping

    def file_fields(self) -> dict[str, object]:
        """What a copy of this VMA (split, mremap, fork) maps: the same object and file."""
        return {
            "shmem": self.shmem,
            "vm_file": self.vm_file,
            "mapping": self.mapping,
            "dax": self.dax,
        }

    def is_shared(self) -> bool:
        """VM_SHARED mapping (writes go to the shared object)."""
        return bool(self.vm_flags & VM_SHARED)

    def is_cow_mapping(self) -> bool:
        """is_cow_mapping(): private and may become writable."""
        return (self.vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE

    def is_accessible(self) -> bool:
        """vma_is_accessible()."""
        return bool(self.vm_flags & VM_ACCESS_FLAGS)

    def linear_page_index(self, addr: int) -> int:
        """linear_page_index()."""
        return self.vm_pgoff + ((addr - self.vm_start) >> PAGE_SHIFT)

    def thp_enabled(self, thp_mode: str) -> bool:
        """thp_vma_allowable_order(PMD_ORDER) for anonymous private memory."""
        if not self.is_anonymous() or self.vm_flags & (VM_NOHUGEPAGE | VM_SPECIAL | VM_SHARED):
            return False
        if thp_mode == "always":
            return True
        return thp_mode == "madvise" and bool(self.vm_flags & VM_HUGEPAGE)

    def anon_vma_prepare(self) -> AnonVma:
        """anon_vma_prepare(): the VMA's anon_vma, created on first anonymous fault."""
        if self.anon_vma is None:
            self.anon_vma = AnonVma(self.mm.mem)
        return self.anon_vma

    def __repr__(self) -> str:
        return f"VMA({self.vm_start:#x}-{self.vm_end:#x} flags={self.vm_flags:#x})"


def vma_flags_mergeable(a: int, b: int) -> bool:
    """is_mergeable_vma(): flags equal ignoring VM_SOFTDIRTY."""
    return (a ^ b) & ~VM_SOFTDIRTY == 0


def can_merge(prev: VMA, nxt: VMA) -> bool:
    """can_vma_merge_after(): ``prev`` ends where ``nxt`` starts and both map the same thing."""
    if prev.vm_end != nxt.vm_start or not vma_flags_mergeable(prev.vm_flags, nxt.vm_flags):
        return False
    if prev.vm_flags & VM_SPECIAL:
        return False
    if prev.shmem is not nxt.shmem or prev.mapping is not nxt.mapping or prev.dax is not nxt.dax:
        return False
    if prev.vm_file is not nxt.vm_file or prev.uffd_ctx is not nxt.uffd_ctx:
        return False
    if prev.vm_pgoff + ((prev.vm_end - prev.vm_start) >> PAGE_SHIFT) != nxt.vm_pgoff:
        return False
    if prev.shmem is None and prev.vm_flags & VM_MAYSHARE:
        return False
    a, b = prev.anon_vma, nxt.anon_vma
    return a is None or b is None or a is b
