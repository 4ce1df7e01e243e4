"""Memory syscalls: mmap, munmap, mprotect, mremap, madvise (mm/mmap.c, mm/vma.c, mm/mprotect.c,
mm/mremap.c, mm/madvise.c).

Every syscall is ``async`` because it takes ``mmap_lock`` (killable) the way Linux does; the
work under the lock is synchronous.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.memory import (
    change_protection,
    split_all_huge_pmds,
    split_huge_pmds_in,
    unmap_page_range,
    zap_page_range_single,
)
from vkernel.kernel.pgtable import free_pgtables, pmd_slot, pte_alloc, walk_pmds
from vkernel.kernel.tlb import tlb_finish_mmu
from vkernel.kernel.uapi import (
    _PAGE_PSE,
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
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_SOFT_OFFLINE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_TYPE,
    MMAP_MIN_ADDR,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
    PTRS_PER_TABLE,
    TASK_SIZE,
    TASK_UNMAPPED_BASE,
    VM_ACCOUNT,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_RAND_READ,
    VM_READ,
    VM_SEQ_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SPECIAL,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    VM_WRITE,
)
from vkernel.kernel.vma import VMA, ShmemObject, can_merge

if TYPE_CHECKING:
    from vkernel.kernel.fdtable import File
    from vkernel.kernel.mm import MmStruct
    from vkernel.kernel.task import Task
    from vkernel.kernel.userfaultfd import UserfaultfdUnmapCtx

RLIM_INFINITY = (1 << 64) - 1
_U64 = (1 << 64) - 1


def _mm_of(task: Task) -> MmStruct:
    """task->mm or ESRCH."""
    mm = task.mm
    if mm is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has no address space", pid=task.pid)
    return mm  # type: ignore[no-any-return]


def page_align(x: int) -> int:
    """PAGE_ALIGN() on an unsigned long: wraps to 0 past 2**64, as the syscalls rely on."""
    return (x + PAGE_SIZE - 1) & PAGE_MASK & _U64


def calc_vm_prot_bits(prot: int) -> int:
    """calc_vm_prot_bits()."""
    return (
        (VM_READ if prot & PROT_READ else 0)
        | (VM_WRITE if prot & PROT_WRITE else 0)
        | (VM_EXEC if prot & PROT_EXEC else 0)
    )


def may_expand_vm(mm: MmStruct, task: Task, npages: int) -> bool:
    """may_expand_vm(): RLIMIT_AS check."""
    limit = task.rlimit_as
    if limit >= RLIM_INFINITY:
        return True
    return mm.total_vm + npages <= limit >> PAGE_SHIFT


# ---- get_unmapped_area ---------------------------------------------------------------------------


def _gaps_topdown(mm: MmStruct, low: int, high: int) -> list[tuple[int, int]]:
    """The free gaps between VMAs inside [low, high), ascending."""
    gaps = []
    prev_end = low
    for v in mm.vmas:
        if v.vm_start > prev_end:
            gaps.append((prev_end, min(v.vm_start, high)))
        prev_end = max(prev_end, v.vm_end)
        if prev_end >= high:
            break
    if prev_end < high:
        gaps.append((prev_end, high))
    return gaps


def vm_unmapped_area(mm: MmStruct, length: int, topdown: bool) -> int:
    """vm_unmapped_area(): top-down below mmap_base, else bottom-up from TASK_UNMAPPED_BASE."""
    low = max(PAGE_SIZE, MMAP_MIN_ADDR)
    if topdown:
        for gs, ge in reversed(_gaps_topdown(mm, low, mm.mmap_base)):
            if ge - gs >= length:
                return (ge - length) & PAGE_MASK
        return -errno.ENOMEM
    for gs, ge in _gaps_topdown(mm, TASK_UNMAPPED_BASE, TASK_SIZE):
        if ge - gs >= length:
            return gs
    return -errno.ENOMEM


def arch_get_unmapped_area_topdown(mm: MmStruct, addr: int, length: int, flags: int) -> int:
    """arch_get_unmapped_area_topdown(): fixed, hint, top-down search, bottom-up fallback."""
    if length > TASK_SIZE - MMAP_MIN_ADDR:
        return -errno.ENOMEM
    if flags & MAP_FIXED:
        return addr
    if addr:
        addr = page_align(addr)
        if (
            TASK_SIZE - length >= addr >= MMAP_MIN_ADDR
            and mm.find_vma_intersection(addr, addr + length) is None
        ):
            return addr
    ret = vm_unmapped_area(mm, length, topdown=True)
    if ret < 0:
        ret = vm_unmapped_area(mm, length, topdown=False)
    return ret


def get_unmapped_area(
    mm: MmStruct, addr: int, length: int, pgoff: int, flags: int, anon_private: bool
) -> int:
    """__get_unmapped_area(): includes THP alignment of PMD-multiple anonymous mappings."""
    if length > TASK_SIZE:
        return -errno.ENOMEM
    if anon_private and not addr and not flags & MAP_FIXED and length % PMD_SIZE == 0:
        # thp_get_unmapped_area_vmflags() / __thp_get_unmapped_area()
        off = pgoff << PAGE_SHIFT
        ret = arch_get_unmapped_area_topdown(mm, 0, length + PMD_SIZE, flags)
        if ret >= 0:
            off_sub = (off - ret) & (PMD_SIZE - 1)
            addr = ret + PMD_SIZE if not off_sub else ret + off_sub
        else:
            addr = arch_get_unmapped_area_topdown(mm, 0, length, flags)
    else:
        addr = arch_get_unmapped_area_topdown(mm, addr, length, flags)
    if addr < 0:
        return addr
    if addr > TASK_SIZE - length:
        return -errno.ENOMEM
    if addr & ~PAGE_MASK:
        return -errno.EINVAL
    if addr < MMAP_MIN_ADDR:
        return -errno.EPERM  # security_mmap_addr(): cap_mmap_addr()
    return addr


# ---- VMA split / merge ---------------------------------------------------------------------------


def split_vma(mm: MmStruct, vma: VMA, addr: int) -> VMA:
    """__split_vma(): cut ``vma`` at ``addr``; returns the new upper part (already linked)."""
    split_huge_pmds_in(mm, addr, addr)
    upper = VMA(
        mm=mm,
        vm_start=addr,
        vm_end=vma.vm_end,
        vm_flags=vma.vm_flags,
        vm_pgoff=vma.linear_page_index(addr),
        anon_vma=vma.anon_vma,
        uffd_ctx=vma.uffd_ctx,
        **vma.file_fields(),  # type: ignore[arg-type]
    )
    mm.resize_vma(vma, vma.vm_start, addr)
    mm.insert_vma(upper)
    return upper


def vma_try_merge_around(mm: MmStruct, vma: VMA) -> VMA:
    """vma_merge_existing_range()/vma_merge_new_range(): fold ``vma`` into compatible neighbours."""
    prev = mm.prev_vma(vma)
    if prev is not None and can_merge(prev, vma):
        end = vma.vm_end
        anon = prev.anon_vma or vma.anon_vma
        mm.remove_vma(vma)
        mm.resize_vma(prev, prev.vm_start, end)
        prev.anon_vma = anon
        vma = prev
    nxt = mm.next_vma(vma)
    if nxt is not None and can_merge(vma, nxt):
        end = nxt.vm_end
        anon = vma.anon_vma or nxt.anon_vma
        mm.remove_vma(nxt)
        mm.resize_vma(vma, vma.vm_start, end)
        vma.anon_vma = anon
    return vma


def vma_modify_flags(mm: MmStruct, vma: VMA, start: int, end: int, newflags: int) -> VMA:
    """vma_modify_flags(): isolate [start, end) of ``vma`` (splitting) and give it ``newflags``."""
    if start > vma.vm_start:
        vma = split_vma(mm, vma, start)
    if end < vma.vm_end:
        split_vma(mm, vma, end)
    vma.set_flags(newflags)
    return vma


def _count_splits(mm: MmStruct, start: int, end: int) -> int:
    """How many extra VMAs unmapping [start, end) would create by splitting."""
    extra = 0
    for v in mm.vmas_in(start, end):
        if v.vm_start < start:
            extra += 1
        if v.vm_end > end:
            extra += 1
    return extra


# ---- munmap --------------------------------------------------------------------------------------


def do_vmi_munmap(
    mm: MmStruct, start: int, length: int, uf: list[UserfaultfdUnmapCtx] | None = None
) -> None:
    """do_vmi_munmap(): remove [start, start+len) (holes are fine), zap pages, free tables.
    ``uf`` collects the UNMAP events of EVENT_UNMAP uffds (userfaultfd_unmap_prep); the
    caller sends them once mmap_lock is dropped (userfaultfd_unmap_complete)."""
    end = start + length
    vmas = mm.vmas_in(start, end)
    if not vmas:
        return
    if uf is not None:
        from vkernel.kernel.userfaultfd import userfaultfd_unmap_prep

        userfaultfd_unmap_prep(mm, start, end, uf)
    first, last = vmas[0], vmas[-1]
    if (
        first.vm_start < start
        and last.vm_end > end
        and first is last
        and mm.map_count >= mm.kernel.sysctl_max_map_count
    ):
        raise KernelError(errno.ENOMEM, "too many mappings to split", field="length")
    if first.vm_start < start:
        upper = split_vma(mm, first, start)
        if first is last:
            last = upper
        vmas[0] = upper
    if last.vm_end > end:
        split_vma(mm, last, end)
    vmas = mm.vmas_in(start, end)
    for v in vmas:
        unmap_page_range(mm, v.vm_start, v.vm_end)
    for v in vmas:
        mm.remove_vma(v)
    free_pgtables(mm, start, end)


def _check_munmap_args(start: int, length: int) -> int:
    """__vm_munmap() argument checks; returns the page-aligned length."""
    if start & ~PAGE_MASK:
        raise einval("address is not page aligned", field="addr")
    if start < 0 or length < 0 or start > TASK_SIZE or length > TASK_SIZE - start:
        raise einval("range exceeds the user address space", field="length")
    length = page_align(length)
    if length == 0:
        raise einval("length is zero", field="length")
    return length


async def sys_munmap(task: Task, addr: int, length: int) -> None:
    """munmap(2)."""
    length = _check_munmap_args(addr, length)
    mm = _mm_of(task)
    from vkernel.kernel import userfaultfd

    uf: list[userfaultfd.UserfaultfdUnmapCtx] = []
    try:
        async with mm.mmap_lock.write(task):
            mm.check_alive()
            do_vmi_munmap(mm, addr, length, uf)
            await tlb_finish_mmu(mm)  # x86: the table free waits for the shootdown IPI
    finally:
        # __vm_munmap(): the UNMAP events go out after the unlock, even if the unmap failed.
        if uf:
            await userfaultfd.userfaultfd_unmap_complete(task, uf)


# ---- mmap ----------------------------------------------------------------------------------------


def _mmap_region(
    mm: MmStruct,
    task: Task,
    addr: int,
    length: int,
    vm_flags: int,
    pgoff: int,
    file: File | None = None,
    uf: list[UserfaultfdUnmapCtx] | None = None,
) -> VMA:
    """mmap_region(): RLIMIT_AS, unmap what MAP_FIXED covers (UNMAP events into ``uf``),
    create/merge the VMA."""
    end = addr + length
    overlap = (
        sum(min(v.vm_end, end) - max(v.vm_start, addr) for v in mm.vmas_in(addr, end)) >> PAGE_SHIFT
    )
    if not may_expand_vm(mm, task, (length >> PAGE_SHIFT) - overlap):
        raise KernelError(errno.ENOMEM, "RLIMIT_AS exceeded", field="length")
    if overlap:
        if mm.map_count + _count_splits(mm, addr, end) > mm.kernel.sysctl_max_map_count:
            raise KernelError(errno.ENOMEM, "too many mappings", field="addr")
        do_vmi_munmap(mm, addr, length, uf)
    shmem: ShmemObject | None = None
    vma = VMA(mm=mm, vm_start=addr, vm_end=end, vm_flags=vm_flags, vm_pgoff=pgoff)
    if file is not None:
        # call_mmap(): the file's ->mmap sets what the faults use.
        ino = file.inode
        vma.vm_file = file
        if isinstance(ino.mapping, ShmemObject):
            vma.shmem = ino.mapping
        elif ino.kind == "dax":
            vma.dax = ino
        else:
            vma.mapping = ino.mapping
    elif vm_flags & VM_SHARED:
        shmem = ShmemObject(mm.mem, length)
        vma.shmem = shmem
    if not vm_flags & VM_SHARED and vm_flags & VM_WRITE and not vm_flags & VM_NORESERVE:
        vma.set_flags(vm_flags | VM_ACCOUNT)
    mm.insert_vma(vma)
    if shmem is None:
        vma = vma_try_merge_around(mm, vma)
    vma.set_flags(vma.vm_flags | VM_SOFTDIRTY)
    return vma


async def sys_mmap(
    task: Task, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
) -> int:
    """mmap(2) (ksys_mmap_pgoff → do_mmap → mmap_region): anonymous memory or a file."""
    if offset & ~PAGE_MASK:
        raise einval("offset is not page aligned", field="offset")
    file: File | None = None
    if not flags & MAP_ANONYMOUS:
        file = _mm_of(task).kernel.vfs.fget(task, fd)  # EBADF
    if not length:
        raise einval("length is zero", field="length")
    if addr < 0 or length < 0 or offset < 0:
        raise einval("negative argument", field="addr" if addr < 0 else "length")
    if not flags & MAP_FIXED and not flags & MAP_FIXED_NOREPLACE:
        addr &= PAGE_MASK
        if addr and addr < MMAP_MIN_ADDR:
            addr = page_align(MMAP_MIN_ADDR)
    length = page_align(length)
    if not length:
        raise KernelError(errno.ENOMEM, "length overflows", field="length")
    pgoff = offset >> PAGE_SHIFT
    mm = _mm_of(task)
    typ = flags & MAP_TYPE
    if typ not in (MAP_SHARED, MAP_PRIVATE):
        raise einval("mapping type must be MAP_SHARED or MAP_PRIVATE", field="flags")
    if flags & MAP_FIXED_NOREPLACE:
        flags |= MAP_FIXED
    vm_flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if flags & MAP_GROWSDOWN:
        vm_flags |= VM_GROWSDOWN
    if flags & MAP_LOCKED:
        vm_flags |= VM_LOCKED
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE
    if file is not None:
        if typ == MAP_SHARED:
            if prot & PROT_WRITE and not file.writable:
                raise KernelError(errno.EACCES, "PROT_WRITE|MAP_SHARED of a read-only fd", fd=fd)
            vm_flags |= VM_SHARED | VM_MAYSHARE
            if not file.writable:
                vm_flags &= ~(VM_MAYWRITE | VM_SHARED)
        if not file.readable:
            raise KernelError(errno.EACCES, "mapping a file not open for reading", fd=fd)
        if vm_flags & VM_GROWSDOWN:
            raise einval("MAP_GROWSDOWN of a file", field="flags")
    elif typ == MAP_SHARED:
        if vm_flags & VM_GROWSDOWN:
            raise einval("MAP_GROWSDOWN with MAP_SHARED", field="flags")
        vm_flags |= VM_SHARED | VM_MAYSHARE
    uf: list[UserfaultfdUnmapCtx] = []
    try:
        return await _do_mmap(task, mm, addr, length, vm_flags, flags, pgoff, typ, file, uf)
    finally:
        # vm_mmap_pgoff(): MAP_FIXED's UNMAP events go out after mmap_lock is dropped.
        if uf:
            from vkernel.kernel.userfaultfd import userfaultfd_unmap_complete

            await userfaultfd_unmap_complete(task, uf)


async def _do_mmap(
    task: Task,
    mm: MmStruct,
    addr: int,
    length: int,
    vm_flags: int,
    flags: int,
    pgoff: int,
    typ: int,
    file: File | None,
    uf: list[UserfaultfdUnmapCtx],
) -> int:
    """do_mmap() under mmap_lock for write (+ MAP_POPULATE)."""
    async with mm.mmap_lock.write(task):
        mm.check_alive()
        if mm.map_count > mm.kernel.sysctl_max_map_count:
            raise KernelError(errno.ENOMEM, "too many mappings", field="addr")
        got = get_unmapped_area(mm, addr, length, pgoff, flags, typ == MAP_PRIVATE and file is None)
        if got < 0:
            raise KernelError(-got, "no room for the mapping", field="addr")
        addr = got
        if flags & MAP_FIXED_NOREPLACE and mm.find_vma_intersection(addr, addr + length):
            raise KernelError(errno.EEXIST, "range already mapped", field="addr")
        if flags & MAP_LOCKED:
            lim = task.rlimit_memlock
            if lim < RLIM_INFINITY and (mm.locked_vm << PAGE_SHIFT) + length > lim:
                from vkernel.kernel.cred import Capability

                if not task.cred.capable(Capability.CAP_IPC_LOCK):
                    raise KernelError(errno.EAGAIN, "RLIMIT_MEMLOCK exceeded", field="length")
        if file is None:
            pgoff = addr >> PAGE_SHIFT if typ == MAP_PRIVATE else 0
        vma = _mmap_region(mm, task, addr, length, vm_flags, pgoff, file, uf)
        await tlb_finish_mmu(mm)  # a MAP_FIXED replacement freed page tables
        populate = (flags & (MAP_POPULATE | MAP_NONBLOCK)) == MAP_POPULATE or vm_flags & VM_LOCKED
        if populate:
            from vkernel.kernel.uaccess import populate_range

            write = (vma.vm_flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
            try:
                await populate_range(mm, task, addr, addr + length, write, madvise=False)
            except KernelError:
                pass  # mm_populate() errors are ignored by mmap
    return addr


# ---- mprotect ------------------------------------------------------------------------------------


def mprotect_fixup(mm: MmStruct, vma: VMA, start: int, end: int, newflags: int) -> None:
    """mprotect_fixup(): split/merge and rewrite the page tables of [start, end)."""
    if newflags == vma.vm_flags:
        return
    if newflags & VM_WRITE and not vma.vm_flags & (
        VM_ACCOUNT | VM_WRITE | VM_HUGETLB | VM_SHARED | VM_NORESERVE
    ):
        newflags |= VM_ACCOUNT
    vma = vma_modify_flags(mm, vma, start, end, newflags)
    change_protection(vma, vma.vm_start, vma.vm_end)
    vma_try_merge_around(mm, vma)


async def sys_mprotect(task: Task, addr: int, length: int, prot: int) -> None:
    """mprotect(2) (do_mprotect_pkey)."""
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~(PROT_GROWSDOWN | PROT_GROWSUP)
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        raise einval("PROT_GROWSDOWN and PROT_GROWSUP together", field="prot")
    if addr & ~PAGE_MASK or addr < 0:
        raise einval("address is not page aligned", field="addr")
    if not length:
        return
    if length < 0:
        raise KernelError(errno.ENOMEM, "negative length", field="length")
    length = page_align(length)
    end = (addr + length) & _U64
    if end <= addr:
        raise KernelError(errno.ENOMEM, "range wraps", field="length")
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        raise einval(f"unknown protection bits {prot:#x}", field="prot")
    if grows:
        raise einval("PROT_GROWSDOWN/UP on a non-stack mapping", field="prot")
    mm = _mm_of(task)
    async with mm.mmap_lock.write(task):
        mm.check_alive()
        vma = mm.find_vma(addr)
        if vma is None or vma.vm_start > addr:
            raise KernelError(errno.ENOMEM, "range not fully mapped", field="addr")
        newbits = calc_vm_prot_bits(prot)
        nstart = addr
        while True:
            newflags = newbits | (vma.vm_flags & ~(VM_READ | VM_WRITE | VM_EXEC))
            if (newflags & ~(newflags >> 4)) & (VM_READ | VM_WRITE | VM_EXEC):
                raise KernelError(errno.EACCES, "protection exceeds VM_MAY*", field="prot")
            tmp = min(vma.vm_end, end)
            mprotect_fixup(mm, vma, nstart, tmp, newflags)
            nstart = tmp
            if nstart >= end:
                break
            # Look up afresh: the fixup may have split or merged VMAs around nstart.
            nxt = mm.find_vma(nstart)
            if nxt is None or nxt.vm_start > nstart:
                raise KernelError(errno.ENOMEM, "range has a hole", field="length")
            vma = nxt


# ---- mremap --------------------------------------------------------------------------------------


def move_page_tables(mm: MmStruct, old: int, new: int, length: int) -> int:
    """move_page_tables(): move every PTE of [old, old+len) to [new, new+len); bytes moved."""
    mem = mm.mem
    u = mem.u64
    split_all_huge_pmds(mm, old, old + length)
    moved = 0
    for slot, a, b in walk_pmds(mm, old, old + length):
        e = u.item(slot)
        if not e:
            continue
        assert not e & _PAGE_PSE
        base = (e >> PAGE_SHIFT & ((1 << 40) - 1)) * PTRS_PER_TABLE
        i0 = (a >> PAGE_SHIFT) & 511
        src = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
        nz = np.flatnonzero(src)
        if not len(nz):
            continue
        vals = src[nz].copy()
        src[nz] = 0
        dst_addrs = new + (a - old) + (nz.astype(np.int64) << PAGE_SHIFT)
        # Destination may straddle two leaf tables: place entries per destination PMD.
        dpmd = dst_addrs >> 21
        for d in np.unique(dpmd).tolist():
            sel = dpmd == d
            daddr = d << 21
            dslot = pmd_slot(mm, daddr, alloc=True)
            if dslot < 0:
                raise KernelError(errno.ENOMEM, "out of memory for page tables")
            t = pte_alloc(mm, dslot)
            if t < 0:
                raise KernelError(errno.ENOMEM, "out of memory for page tables")
            idx = (dst_addrs[sel] >> PAGE_SHIFT) & 511
            u[t * PTRS_PER_TABLE + idx] = vals[sel]
        moved += b - a
    return moved


def move_vma(
    mm: MmStruct,
    task: Task,
    vma: VMA,
    old_addr: int,
    old_len: int,
    new_len: int,
    new_addr: int,
    dontunmap: bool = False,
    uf_unmap: list[UserfaultfdUnmapCtx] | None = None,
) -> int:
    """move_vma(): new VMA at ``new_addr``, page tables moved over, old range unmapped (its
    UNMAP events into ``uf_unmap``: the old VMA is still registered with EVENT_REMAP).

    With MREMAP_DONTUNMAP the old range stays mapped but empty (its next faults are fresh).
    """
    if mm.map_count >= mm.kernel.sysctl_max_map_count - 3:
        raise KernelError(errno.ENOMEM, "too many mappings", field="new_address")
    from vkernel.kernel import userfaultfd

    # mremap_userfaultfd_prep(): the new VMA keeps the registration only with EVENT_REMAP.
    uctx = userfaultfd.mremap_userfaultfd_prep(vma)
    vm_flags = vma.vm_flags
    if uctx is None:
        vm_flags &= ~(VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR)
    new_vma = VMA(
        mm=mm,
        vm_start=new_addr,
        vm_end=new_addr + new_len,
        vm_flags=vm_flags,
        vm_pgoff=vma.linear_page_index(old_addr),
        anon_vma=vma.anon_vma,
        uffd_ctx=uctx,
        **vma.file_fields(),  # type: ignore[arg-type]
    )
    if uctx is not None:
        userfaultfd.mremap_userfaultfd_note(mm, uctx, old_addr, new_addr, old_len)
    mm.insert_vma(new_vma)
    move_page_tables(mm, old_addr, new_addr, old_len)
    if uctx is None and vma.vm_flags & VM_UFFD_WP:
        userfaultfd.uffd_wp_clear_moved(mm, new_addr, new_addr + old_len)
    if dontunmap:
        if vma.vm_start == old_addr and vma.vm_end == old_addr + old_len:
            vma.anon_vma = None  # unlink_anon_vmas(): the emptied VMA starts afresh
    else:
        # The old range's pages are now mapped at the new place; unmap the (now empty) range.
        do_vmi_munmap(mm, old_addr, old_len, uf_unmap)
    vma_try_merge_around(mm, new_vma)
    return new_addr


def vma_to_resize(mm: MmStruct, task: Task, addr: int, old_len: int, new_len: int) -> VMA:
    """vma_to_resize()."""
    vma = mm.vma_lookup(addr)
    if vma is None:
        raise KernelError(errno.EFAULT, "no mapping at old_address", field="old_address")
    if old_len > vma.vm_end - addr:
        raise KernelError(errno.EFAULT, "old range crosses mappings", field="old_size")
    if new_len == old_len:
        return vma
    if vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise KernelError(errno.EFAULT, "mapping cannot be expanded", field="new_size")
    if new_len > old_len and not may_expand_vm(mm, task, (new_len - old_len) >> PAGE_SHIFT):
        raise KernelError(errno.ENOMEM, "RLIMIT_AS exceeded", field="new_size")
    return vma


async def sys_mremap(
    task: Task, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0
) -> int:
    """mremap(2); the uffd events go out after mmap_lock is released, in Linux's order: UNMAP
    of the MREMAP_FIXED target, REMAP (EVENT_REMAP), UNMAP of a shrunk or moved-from range."""
    from vkernel.kernel.userfaultfd import mremap_userfaultfd_complete, userfaultfd_unmap_complete

    uf_unmap_early: list[UserfaultfdUnmapCtx] = []
    uf_unmap: list[UserfaultfdUnmapCtx] = []
    try:
        return await _sys_mremap(
            task, old_addr, old_len, new_len, flags, new_addr, uf_unmap_early, uf_unmap
        )
    finally:
        await userfaultfd_unmap_complete(task, uf_unmap_early)
        mm = task.mm
        if mm is not None:
            await mremap_userfaultfd_complete(mm, task)
        await userfaultfd_unmap_complete(task, uf_unmap)


async def _sys_mremap(
    task: Task,
    old_addr: int,
    old_len: int,
    new_len: int,
    flags: int,
    new_addr: int,
    uf_unmap_early: list[UserfaultfdUnmapCtx],
    uf_unmap: list[UserfaultfdUnmapCtx],
) -> int:
    """mremap(2) under mmap_lock."""
    if flags & ~(MREMAP_FIXED | MREMAP_MAYMOVE | MREMAP_DONTUNMAP):
        raise einval(f"unknown flags {flags:#x}", field="flags")
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        raise einval("MREMAP_FIXED without MREMAP_MAYMOVE", field="flags")
    if flags & MREMAP_DONTUNMAP and (not flags & MREMAP_MAYMOVE or old_len != new_len):
        raise einval("MREMAP_DONTUNMAP needs MREMAP_MAYMOVE and equal sizes", field="flags")
    if old_addr & ~PAGE_MASK or old_addr < 0:
        raise einval("old_address is not page aligned", field="old_address")
    if old_len < 0 or new_len < 0:
        raise einval("negative size", field="new_size")
    old_len = page_align(old_len)
    new_len = page_align(new_len)
    if not new_len:
        raise einval("new_size is zero", field="new_size")
    mm = _mm_of(task)
    async with mm.mmap_lock.write(task):
        mm.check_alive()
        vma = mm.vma_lookup(old_addr)
        if vma is None:
            raise KernelError(errno.EFAULT, "no mapping at old_address", field="old_address")
        if not old_len:
            raise einval("old_size 0 (duplicating a mapping) is not supported", field="old_size")
        if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
            return _mremap_to(
                mm, task, old_addr, old_len, new_addr, new_len, flags, uf_unmap_early, uf_unmap
            )
        if old_len >= new_len:
            do_vmi_munmap(mm, old_addr + new_len, old_len - new_len, uf_unmap)
            return old_addr
        vma = vma_to_resize(mm, task, old_addr, old_len, new_len)
        if old_len == vma.vm_end - old_addr:
            end = old_addr + new_len
            nxt = mm.next_vma(vma)
            if (
                end <= TASK_SIZE
                and (nxt is None or nxt.vm_start >= end)
                and (not vma.vm_flags & VM_SPECIAL)
            ):
                if (
                    vma.shmem is not None
                    and vma.vm_file is None
                    and (vma.linear_page_index(end) << PAGE_SHIFT) > vma.shmem.size
                ):
                    vma.shmem.size = vma.linear_page_index(end) << PAGE_SHIFT
                mm.resize_vma(vma, vma.vm_start, end)
                vma_try_merge_around(mm, vma)
                return old_addr
        if not flags & MREMAP_MAYMOVE:
            raise KernelError(errno.ENOMEM, "cannot grow in place", field="new_size")
        got = get_unmapped_area(
            mm, 0, new_len, vma.linear_page_index(old_addr), 0, vma.is_anonymous()
        )
        if got < 0:
            raise KernelError(-got, "no room for the moved mapping", field="new_size")
        _grow_shmem(vma, old_addr, new_len)
        return move_vma(mm, task, vma, old_addr, old_len, new_len, got, uf_unmap=uf_unmap)


def _grow_shmem(vma: VMA, old_addr: int, new_len: int) -> None:
    """shmem_setattr() size growth when a shared anonymous mapping is remapped larger (a
    file's size never changes by mremap: past EOF is SIGBUS)."""
    if vma.shmem is not None and vma.vm_file is None:
        need = (vma.linear_page_index(old_addr) << PAGE_SHIFT) + new_len
        vma.shmem.size = max(vma.shmem.size, need)


def _mremap_to(
    mm: MmStruct,
    task: Task,
    addr: int,
    old_len: int,
    new_addr: int,
    new_len: int,
    flags: int,
    uf_unmap_early: list[UserfaultfdUnmapCtx],
    uf_unmap: list[UserfaultfdUnmapCtx],
) -> int:
    """mremap_to(): MREMAP_FIXED and/or MREMAP_DONTUNMAP (``new_addr`` is then a hint)."""
    fixed = bool(flags & MREMAP_FIXED)
    dontunmap = bool(flags & MREMAP_DONTUNMAP)
    if new_addr & ~PAGE_MASK or new_addr < 0:
        raise einval("new_address is not page aligned", field="new_address")
    if new_len > TASK_SIZE or new_addr > TASK_SIZE - new_len:
        raise einval("new range outside the address space", field="new_address")
    if addr + old_len > new_addr and new_addr + new_len > addr:
        raise einval("old and new ranges overlap", field="new_address")
    if mm.map_count + 2 >= mm.kernel.sysctl_max_map_count - 3:
        raise KernelError(errno.ENOMEM, "too many mappings", field="new_address")
    if fixed:
        if new_addr < MMAP_MIN_ADDR:
            raise KernelError(errno.EPERM, "below mmap_min_addr", field="new_address")
        do_vmi_munmap(mm, new_addr, new_len, uf_unmap_early)
    if old_len > new_len:
        do_vmi_munmap(mm, addr + new_len, old_len - new_len, uf_unmap)
        old_len = new_len
    vma = vma_to_resize(mm, task, addr, old_len, new_len)
    if dontunmap:
        if vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
            raise einval("MREMAP_DONTUNMAP on a special mapping", field="flags")
        if not may_expand_vm(mm, task, old_len >> PAGE_SHIFT):
            raise KernelError(errno.ENOMEM, "RLIMIT_AS exceeded", field="new_size")
    if not fixed:
        got = get_unmapped_area(
            mm, new_addr, new_len, vma.linear_page_index(addr), 0, vma.is_anonymous()
        )
        if got < 0:
            raise KernelError(-got, "no room for the moved mapping", field="new_size")
        new_addr = got
    _grow_shmem(vma, addr, new_len)
    return move_vma(mm, task, vma, addr, old_len, new_len, new_addr, dontunmap, uf_unmap)


# ---- madvise -------------------------------------------------------------------------------------

_VALID_ADVICE = frozenset(
    {
        MADV_NORMAL,
        MADV_RANDOM,
        MADV_SEQUENTIAL,
        MADV_WILLNEED,
        MADV_DONTNEED,
        MADV_DONTNEED_LOCKED,
        MADV_FREE,
        MADV_REMOVE,
        MADV_DONTFORK,
        MADV_DOFORK,
        MADV_DONTDUMP,
        MADV_DODUMP,
        MADV_WIPEONFORK,
        MADV_KEEPONFORK,
        MADV_COLD,
        MADV_PAGEOUT,
        MADV_POPULATE_READ,
        MADV_POPULATE_WRITE,
        MADV_HUGEPAGE,
        MADV_NOHUGEPAGE,
        MADV_COLLAPSE,
        MADV_HWPOISON,
        MADV_SOFT_OFFLINE,
    }
)
_WRITE_LOCK_ADVICE = frozenset(
    {
        MADV_NORMAL,
        MADV_RANDOM,
        MADV_SEQUENTIAL,
        MADV_DONTFORK,
        MADV_DOFORK,
        MADV_DONTDUMP,
        MADV_DODUMP,
        MADV_WIPEONFORK,
        MADV_KEEPONFORK,
        MADV_HUGEPAGE,
        MADV_NOHUGEPAGE,
        MADV_REMOVE,
    }
)


def _madvise_vma(mm: MmStruct, vma: VMA, start: int, end: int, advice: int) -> None:
    """madvise_vma_behavior()."""
    flags = vma.vm_flags
    new = flags
    if advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE):
        forbidden = VM_PFNMAP | (0 if advice == MADV_DONTNEED_LOCKED else VM_LOCKED)
        if flags & forbidden or flags & VM_HUGETLB:
            raise einval("MADV_DONTNEED on a locked or PFN mapping", field="advice")
        if advice == MADV_FREE and not vma.is_anonymous():
            raise einval("MADV_FREE needs private anonymous memory", field="advice")
        zap_page_range_single(vma, start, end)
        return
    if advice == MADV_REMOVE:
        if vma.vm_file is not None:
            raise AssertionError("file MADV_REMOVE is done by sys_madvise")
        if not flags & VM_SHARED:
            raise einval("MADV_REMOVE needs a shared mapping", field="advice")
        zap_page_range_single(vma, start, end)
        if vma.shmem is not None:
            first = vma.linear_page_index(start)
            last = vma.linear_page_index(end)
            drop = [i for i in vma.shmem.pages if first <= i < last]
            pfns = np.array([vma.shmem.pages.pop(i) for i in drop], dtype=np.int64)
            if len(pfns):
                mm.mem.put_folios(mm.mem.compound_heads(pfns))
        return
    if advice in (MADV_WILLNEED, MADV_COLD, MADV_PAGEOUT):
        return
    if advice == MADV_COLLAPSE:
        from vkernel.kernel.thp import madvise_collapse

        err = madvise_collapse(vma, start, end)
        if err:
            raise KernelError(-err, "MADV_COLLAPSE failed", field="advice")
        return
    if advice == MADV_NORMAL:
        new &= ~(VM_RAND_READ | VM_SEQ_READ)
    elif advice == MADV_RANDOM:
        new = (new & ~VM_SEQ_READ) | VM_RAND_READ
    elif advice == MADV_SEQUENTIAL:
        new = (new & ~VM_RAND_READ) | VM_SEQ_READ
    elif advice == MADV_DONTFORK:
        new |= VM_DONTCOPY
    elif advice == MADV_DOFORK:
        if flags & VM_IO:
            raise einval("MADV_DOFORK on an I/O mapping", field="advice")
        new &= ~VM_DONTCOPY
    elif advice == MADV_WIPEONFORK:
        if not vma.is_anonymous() or flags & VM_SHARED:
            raise einval("MADV_WIPEONFORK needs private anonymous memory", field="advice")
        new |= VM_WIPEONFORK
    elif advice == MADV_KEEPONFORK:
        new &= ~VM_WIPEONFORK
    elif advice == MADV_DONTDUMP:
        new |= VM_DONTDUMP
    elif advice == MADV_DODUMP:
        if flags & VM_SPECIAL:
            raise einval("MADV_DODUMP on a special mapping", field="advice")
        new &= ~VM_DONTDUMP
    elif advice == MADV_HUGEPAGE:
        new = (new & ~VM_NOHUGEPAGE) | VM_HUGEPAGE
    elif advice == MADV_NOHUGEPAGE:
        new = (new & ~VM_HUGEPAGE) | VM_NOHUGEPAGE
    if new != flags:
        vma = vma_modify_flags(mm, vma, start, end, new)
        vma_try_merge_around(mm, vma)


async def sys_madvise(task: Task, addr: int, length: int, advice: int) -> None:
    """madvise(2) (do_madvise)."""
    if advice not in _VALID_ADVICE:
        raise einval(f"unknown advice {advice}", field="advice")
    if addr & ~PAGE_MASK or addr < 0:
        raise einval("address is not page aligned", field="addr")
    if length < 0:
        raise einval("negative length", field="length")
    plen = page_align(length)
    if length and not plen:
        raise einval("length overflows", field="length")
    end = (addr + plen) & _U64
    if end < addr:
        raise einval("range wraps", field="length")
    if end == addr:
        return
    if advice in (MADV_HWPOISON, MADV_SOFT_OFFLINE):
        raise KernelError(errno.EPERM, "memory failure injection needs CAP_SYS_ADMIN")
    mm = _mm_of(task)
    if advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE, MADV_REMOVE):
        from vkernel.kernel.userfaultfd import userfaultfd_remove

        await userfaultfd_remove(mm, task, addr, end)
    if advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        from vkernel.kernel.uaccess import populate_range

        async with mm.mmap_lock.read(task):
            mm.check_alive()
            await populate_range(mm, task, addr, end, advice == MADV_POPULATE_WRITE, madvise=True)
        return
    guard = mm.mmap_lock.write(task) if advice in _WRITE_LOCK_ADVICE else mm.mmap_lock.read(task)
    punch: list[tuple[File, int, int]] = []
    async with guard:
        mm.check_alive()
        unmapped = False
        start = addr
        while start < end:
            vma = mm.find_vma(start)
            if vma is None or vma.vm_start >= end:
                raise KernelError(errno.ENOMEM, "range not fully mapped", field="addr")
            if start < vma.vm_start:
                unmapped = True
                start = vma.vm_start
            tmp = min(vma.vm_end, end)
            if advice == MADV_REMOVE and vma.vm_file is not None:
                # madvise_remove(): a hole punched in the file, after mmap_lock is released.
                if vma.vm_flags & VM_LOCKED:
                    raise einval("MADV_REMOVE on a locked mapping", field="advice")
                if vma.vm_flags & (VM_SHARED | VM_WRITE) != VM_SHARED | VM_WRITE:
                    raise KernelError(errno.EACCES, "MADV_REMOVE needs a shared writable map")
                off = vma.linear_page_index(start) << PAGE_SHIFT
                punch.append((vma.vm_file.get(), off, tmp - start))
            else:
                _madvise_vma(mm, vma, start, tmp, advice)
            start = tmp
        await tlb_finish_mmu(mm)  # THP collapse/split IPIs wait out lockless walkers
    for file, off, n in punch:
        try:
            await mm.kernel.vfs.punch_hole(file.inode, off, n, task)
        finally:
            file.put()
    if unmapped:
        raise KernelError(errno.ENOMEM, "range has unmapped parts", field="addr")


async def sys_msync(task: Task, addr: int, length: int, flags: int) -> None:
    """msync(2): MS_SYNC writes back (and syncs) the files of shared mappings in the range;
    MS_ASYNC is a no-op (dirty pages are already tracked); MS_INVALIDATE only checks locks."""
    if flags & ~(MS_ASYNC | MS_INVALIDATE | MS_SYNC):
        raise einval(f"unknown msync flags {flags:#x}", field="flags")
    if addr & ~PAGE_MASK or addr < 0:
        raise einval("address is not page aligned", field="addr")
    if flags & MS_ASYNC and flags & MS_SYNC:
        raise einval("MS_ASYNC and MS_SYNC together", field="flags")
    if length < 0:
        raise KernelError(errno.ENOMEM, "negative length", field="length")
    end = addr + page_align(length)
    if end > TASK_SIZE:
        raise KernelError(errno.ENOMEM, "range outside the address space", field="length")
    if end == addr:
        return
    mm = _mm_of(task)
    unmapped = False
    start = addr
    while start < end:
        sync: File | None = None
        async with mm.mmap_lock.read(task):
            mm.check_alive()
            vma = mm.find_vma(start)
            if vma is None:
                raise KernelError(errno.ENOMEM, "range not fully mapped", field="addr")
            if start < vma.vm_start:
                if end <= vma.vm_start:
                    raise KernelError(errno.ENOMEM, "range not fully mapped", field="addr")
                unmapped = True
                start = vma.vm_start
            if flags & MS_INVALIDATE and vma.vm_flags & VM_LOCKED:
                raise KernelError(errno.EBUSY, "MS_INVALIDATE of a locked mapping")
            if flags & MS_SYNC and vma.vm_file is not None and vma.vm_flags & VM_SHARED:
                sync = vma.vm_file.get()
            start = vma.vm_end
        if sync is not None:
            try:  # vfs_fsync_range() without mmap_lock
                await mm.kernel.vfs.fsync_inode(sync.inode, task)
            finally:
                sync.put()
    if unmapped:
        raise KernelError(errno.ENOMEM, "range has unmapped parts", field="addr")
