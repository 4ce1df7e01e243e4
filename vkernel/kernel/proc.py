"""/proc views of an mm (fs/proc/task_mmu.c, fs/proc/array.c) and a page dump (mm/debug.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import numpy as np

from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MmStruct
from vkernel.kernel.pgtable import (
    U64_PFN_MASK,
    U64_PRESENT,
    U64_SHIFT,
    pmd_slot,
    table_of,
    walk_pmds,
)
from vkernel.kernel.uapi import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PFN_MASK,
    _PAGE_PSE,
    _PAGE_SOFT_DIRTY,
    _PAGE_UFFD_WP,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PAGE_SIZE,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
    PMD_SIZE,
    PTRS_PER_TABLE,
    VM_EXEC,
    VM_FLAG_MNEMONICS,
    VM_LOCKED,
    VM_MAYSHARE,
    VM_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_WRITE,
    PG_anon,
    PG_dirty,
    PG_referenced,
)
from vkernel.kernel.vma import VMA

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.task import Task

PSS_SHIFT = 12
MAX_PAGEMAP_PAGES = 1 << 22


def _mm(task: Task) -> MmStruct:
    """task->mm or ESRCH."""
    mm = task.mm
    if not isinstance(mm, MmStruct):
        raise KernelError(errno.ESRCH, f"process {task.pid} has no address space", pid=task.pid)
    return mm


def _vma_header(vma: VMA) -> str:
    """show_vma_header_prefix() + the name column of show_map_vma()."""
    f = vma.vm_flags
    perms = (
        ("r" if f & VM_READ else "-")
        + ("w" if f & VM_WRITE else "-")
        + ("x" if f & VM_EXEC else "-")
        + ("s" if f & VM_MAYSHARE else "p")
    )
    if vma.vm_file is not None:
        inode = vma.vm_file.inode
        pgoff, dev, ino, name = (
            vma.vm_pgoff << PAGE_SHIFT,
            "00:01" if inode.kind == "shmem" else "08:00",
            inode.ino,
            "/" + inode.name if inode.nlink else f"/{inode.name} (deleted)",
        )
    elif vma.shmem is not None:
        pgoff, dev, ino, name = (
            vma.vm_pgoff << PAGE_SHIFT,
            "00:01",
            vma.shmem.ino,
            "/dev/zero (deleted)",
        )
    else:
        pgoff, dev, ino, name = 0, "00:00", 0, ""
    line = f"{vma.vm_start:08x}-{vma.vm_end:08x} {perms} {pgoff:08x} {dev} {ino} "
    if name:
        line = line.ljust(25 + 8 * 6 - 1) + " " + name
    return line


def proc_maps(task: Task) -> str:
    """/proc/PID/maps."""
    mm = _mm(task)
    return "".join(_vma_header(v) + "\n" for v in mm.vmas)


class _Mss:
    """struct mem_size_stats."""

    def __init__(self) -> None:
        self.resident = 0
        self.pss = 0
        self.pss_dirty = 0
        self.shared_clean = 0
        self.shared_dirty = 0
        self.private_clean = 0
        self.private_dirty = 0
        self.referenced = 0
        self.anonymous = 0
        self.anonymous_thp = 0
        self.pss_locked = 0


def _account(
    mm: MmStruct,
    mss: _Mss,
    pfns: np.ndarray,
    dirty: np.ndarray,
    young: np.ndarray,
    locked: bool,
) -> None:
    """smaps_account() + smaps_page_accumulate() for many pages at once."""
    mem = mm.mem
    if not len(pfns):
        return
    heads = mem.compound_heads(pfns)
    hflags = mem.flags[heads]
    anon = (hflags & PG_anon) != 0
    dirty = dirty | ((hflags & PG_dirty) != 0)
    young = young | ((hflags & PG_referenced) != 0)
    large = mem.order[heads] > 0
    mapc = mem.mapcount[pfns].astype(np.int64)
    mapc = np.where(large, mapc + mem.entire_mapcount[heads >> HPAGE_PMD_ORDER], mapc)
    single = mem.refcount[heads] == 1
    private = single | (mapc < 2)
    full = PAGE_SIZE << PSS_SHIFT
    pss = np.where(private, full, full // np.maximum(mapc, 1))
    n = len(pfns)
    mss.resident += n * PAGE_SIZE
    mss.anonymous += int(np.count_nonzero(anon)) * PAGE_SIZE
    mss.referenced += int(np.count_nonzero(young)) * PAGE_SIZE
    mss.pss += int(pss.sum())
    mss.pss_dirty += int(pss[dirty].sum())
    if locked:
        mss.pss_locked += int(pss.sum())
    mss.private_dirty += int(np.count_nonzero(private & dirty)) * PAGE_SIZE
    mss.private_clean += int(np.count_nonzero(private & ~dirty)) * PAGE_SIZE
    mss.shared_dirty += int(np.count_nonzero(~private & dirty)) * PAGE_SIZE
    mss.shared_clean += int(np.count_nonzero(~private & ~dirty)) * PAGE_SIZE


def _smaps_vma(mm: MmStruct, vma: VMA) -> _Mss:
    """walk_page_vma() with smaps_pte_range()."""
    mss = _Mss()
    mem = mm.mem
    u = mem.u64
    locked = bool(vma.vm_flags & VM_LOCKED)
    for slot, a, b in walk_pmds(mm, vma.vm_start, vma.vm_end):
        e = u.item(slot)
        if not e:
            continue
        if e & _PAGE_PSE:
            head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
            if mem.is_huge_zero(head):
                continue  # vm_normal_page_pmd() is NULL for the huge zero page
            pfns = np.arange(head, head + HPAGE_PMD_NR, dtype=np.int64)
            one = np.ones(HPAGE_PMD_NR, dtype=bool)
            _account(
                mm, mss, pfns, one & bool(e & _PAGE_DIRTY), one & bool(e & _PAGE_ACCESSED), locked
            )
            if mem.flags[head] & PG_anon:
                mss.anonymous_thp += PMD_SIZE
            continue
        base = table_of(e) * PTRS_PER_TABLE
        i0 = (a >> PAGE_SHIFT) & 511
        s = u[base + i0 : base + i0 + ((b - a) >> PAGE_SHIFT)]
        pv = s[(s & U64_PRESENT) != 0]
        pfns = ((pv & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
        keep = pfns != mem.zero_pfn
        pv, pfns = pv[keep], pfns[keep]
        _account(
            mm,
            mss,
            pfns,
            (pv & np.uint64(_PAGE_DIRTY)) != 0,
            (pv & np.uint64(_PAGE_ACCESSED)) != 0,
            locked,
        )
    return mss


def _kb(label: str, nbytes: int) -> str:
    """One smaps line: label padded to 16, value in kB right-aligned to 8."""
    return f"{label:<16}{nbytes >> 10:>8} kB\n"


def proc_smaps(task: Task) -> str:
    """/proc/PID/smaps (show_smap)."""
    mm = _mm(task)
    out = []
    for vma in mm.vmas:
        mss = _smaps_vma(mm, vma)
        out.append(_vma_header(vma) + "\n")
        out.append(_kb("Size:", vma.size))
        out.append(_kb("KernelPageSize:", PAGE_SIZE))
        out.append(_kb("MMUPageSize:", PAGE_SIZE))
        out.append(_kb("Rss:", mss.resident))
        out.append(_kb("Pss:", mss.pss >> PSS_SHIFT))
        out.append(_kb("Pss_Dirty:", mss.pss_dirty >> PSS_SHIFT))
        out.append(_kb("Shared_Clean:", mss.shared_clean))
        out.append(_kb("Shared_Dirty:", mss.shared_dirty))
        out.append(_kb("Private_Clean:", mss.private_clean))
        out.append(_kb("Private_Dirty:", mss.private_dirty))
        out.append(_kb("Referenced:", mss.referenced))
        out.append(_kb("Anonymous:", mss.anonymous))
        out.append(_kb("KSM:", 0))
        out.append(_kb("LazyFree:", 0))
        out.append(_kb("AnonHugePages:", mss.anonymous_thp))
        out.append(_kb("ShmemPmdMapped:", 0))
        out.append(_kb("FilePmdMapped:", 0))
        out.append(_kb("Shared_Hugetlb:", 0))
        out.append(f"{'Private_Hugetlb:':<17}{0:>7} kB\n")
        out.append(_kb("Swap:", 0))
        out.append(_kb("SwapPss:", 0))
        out.append(_kb("Locked:", mss.pss_locked >> PSS_SHIFT))
        eligible = int(
            vma.thp_enabled(mm.kernel.config.thp)
            and ((vma.vm_start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)) + PMD_SIZE <= vma.vm_end
        )
        out.append(f"THPeligible:    {eligible:>8}\n")
        flags = "".join(f"{m} " for bit, m in VM_FLAG_MNEMONICS if vma.vm_flags & bit)
        out.append(f"VmFlags: {flags}\n")
    return "".join(out)


def proc_status_mm(task: Task) -> dict[str, int]:
    """The Vm*/Rss* lines of /proc/PID/status (task_mem()), in kB."""
    mm = _mm(task)
    anon = mm.rss_stat[MM_ANONPAGES]
    file = mm.rss_stat[MM_FILEPAGES]
    shmem = mm.rss_stat[MM_SHMEMPAGES]
    rss = anon + file + shmem
    data = (
        sum(v.size for v in mm.vmas if (v.vm_flags & (VM_WRITE | VM_SHARED)) == VM_WRITE)
        >> PAGE_SHIFT
    )
    k = PAGE_SIZE >> 10
    return {
        "VmPeak": max(mm.hiwater_vm, mm.total_vm) * k,
        "VmSize": mm.total_vm * k,
        "VmLck": mm.locked_vm * k,
        "VmPin": mm.pinned_vm * k,
        "VmHWM": max(mm.hiwater_rss, rss) * k,
        "VmRSS": rss * k,
        "RssAnon": anon * k,
        "RssFile": file * k,
        "RssShmem": shmem * k,
        "VmData": data * k,
        "VmStk": 0,
        "VmExe": 0,
        "VmLib": 0,
        "VmPTE": mm.pgtables_bytes >> 10,
        "VmSwap": 0,
    }


def pagemap(task: Task, addr: int, npages: int) -> bytes:
    """/proc/PID/pagemap entries for ``npages`` pages from ``addr`` (little-endian u64 each)."""
    if addr < 0 or addr % PAGE_SIZE:
        raise einval("address must be page aligned", field="addr")
    if npages < 0 or npages > MAX_PAGEMAP_PAGES:
        raise einval(f"npages must be 0..{MAX_PAGEMAP_PAGES}", field="npages")
    mm = _mm(task)
    mem = mm.mem
    u = mem.u64
    out = np.zeros(npages, dtype=np.uint64)
    end = addr + npages * PAGE_SIZE
    for vma in mm.vmas_in(addr, end):
        vs, ve = max(vma.vm_start, addr), min(vma.vm_end, end)
        base_flags = PM_SOFT_DIRTY if vma.vm_flags & VM_SOFTDIRTY else 0
        out[(vs - addr) >> PAGE_SHIFT : (ve - addr) >> PAGE_SHIFT] = np.uint64(base_flags)
        for slot, a, b in walk_pmds(mm, vs, ve):
            e = u.item(slot)
            if not e:
                continue
            o0 = (a - addr) >> PAGE_SHIFT
            n = (b - a) >> PAGE_SHIFT
            if e & _PAGE_PSE:
                head = (e & _PAGE_PFN_MASK) >> PAGE_SHIFT
                first = head + ((a >> PAGE_SHIFT) & 511)
                pfns = np.arange(first, first + n, dtype=np.int64)
                mc = mem.mapcount[pfns] + mem.entire_mapcount[head >> HPAGE_PMD_ORDER]
                v = np.uint64(base_flags | PM_PRESENT) | pfns.astype(np.uint64)
                v = np.where(mc == 1, v | np.uint64(PM_MMAP_EXCLUSIVE), v)
                if not mem.flags[head] & PG_anon:
                    v |= np.uint64(PM_FILE)
                if e & _PAGE_SOFT_DIRTY:
                    v |= np.uint64(PM_SOFT_DIRTY)
                if e & _PAGE_UFFD_WP:
                    v |= np.uint64(PM_UFFD_WP)
                out[o0 : o0 + n] = v
                continue
            tb = table_of(e) * PTRS_PER_TABLE
            i0 = (a >> PAGE_SHIFT) & 511
            s = u[tb + i0 : tb + i0 + n]
            mk = np.flatnonzero((s != 0) & ((s & U64_PRESENT) == 0))
            if len(mk):
                # pte_to_pagemap_entry() of a swap PTE: PTE markers show as PM_SWAP, a uffd-wp
                # marker also as PM_UFFD_WP (WP_UNPOPULATED, shmem WP; pagemap bit 57).
                wpm = (s[mk] & np.uint64(_PAGE_UFFD_WP)) != 0
                out[o0 + mk] = np.uint64(base_flags | PM_SWAP) | np.where(
                    wpm, np.uint64(PM_UFFD_WP), np.uint64(0)
                )
            pi = np.flatnonzero((s & U64_PRESENT) != 0)
            if not len(pi):
                continue
            pv = s[pi]
            pfns = ((pv & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
            v = np.uint64(base_flags | PM_PRESENT) | pfns.astype(np.uint64)
            v |= np.where(
                (pv & np.uint64(_PAGE_SOFT_DIRTY)) != 0, np.uint64(PM_SOFT_DIRTY), np.uint64(0)
            )
            v |= np.where((pv & np.uint64(_PAGE_UFFD_WP)) != 0, np.uint64(PM_UFFD_WP), np.uint64(0))
            normal = pfns != mem.zero_pfn
            heads = mem.compound_heads(pfns)
            mc = mem.mapcount[pfns].astype(np.int64)
            large = mem.order[heads] > 0
            mc = np.where(large, mc + mem.entire_mapcount[heads >> HPAGE_PMD_ORDER], mc)
            v |= np.where(normal & (mc == 1), np.uint64(PM_MMAP_EXCLUSIVE), np.uint64(0))
            v |= np.where(
                normal & ((mem.flags[heads] & PG_anon) == 0), np.uint64(PM_FILE), np.uint64(0)
            )
            out[o0 + pi] = v
    return out.astype("<u8").tobytes()


def dump_page(kernel: Kernel, pfn: int) -> dict[str, Any]:
    """dump_page(): struct page of ``pfn`` (refcount/pincount are the folio's, as Linux prints)."""
    mem = kernel.mem
    mem.check_pfn(pfn)
    head = mem.compound_head(pfn)
    order = int(mem.order[head])
    mapcount = int(mem.mapcount[pfn])
    entire = int(mem.entire_mapcount[head >> HPAGE_PMD_ORDER]) if order else 0
    mid = int(mem.mapping[pfn])
    obj = mem.mapping_obj(mid)
    return {
        "pfn": pfn,
        "refcount": int(mem.refcount[head]),
        "mapcount": mapcount + entire,
        "page_mapcount": mapcount,
        "entire_mapcount": entire,
        "pincount": mem.folio_pincount(head),
        "flags": mem.page_flag_names(pfn),
        "compound_head": head,
        "order": order,
        "mapping": mid,
        "mapping_kind": type(obj).__name__ if obj is not None else "",
        "index": int(mem.index[pfn]),
        "zone": "Movable" if mem.in_movable(pfn) else "Normal",
        "maybe_dma_pinned": mem.folio_maybe_dma_pinned(pfn),
    }


def mmap_lock_stats(task: Task) -> dict[str, float | int]:
    """Per-mm mmap_lock contention statistics."""
    return _mm(task).mmap_lock.stats()


def lookup_pte(task: Task, addr: int) -> int:
    """The raw PTE (or PMD leaf) value mapping ``addr``, 0 if none (a debugging helper)."""
    mm = _mm(task)
    slot = pmd_slot(mm, addr)
    if slot < 0:
        return 0
    e = mm.mem.u64.item(slot)
    if not e or e & _PAGE_PSE:
        return int(e)
    return int(mm.mem.u64.item(table_of(e) * PTRS_PER_TABLE + ((addr >> PAGE_SHIFT) & 511)))
