"""The consistency audit: recompute every frame's refcount/mapcount/pincount from first principles.

Like CONFIG_DEBUG_VM plus page_owner, in one vectorised pass: expected values come from every
mm's page tables (PTE and PMD leaves, the table frames themselves and deposited tables), every
shmem page cache, and the references other subsystems declare in the ledgers
``kernel.extra_refs`` (per frame) and ``kernel.extra_pins`` (per 2 MiB block: the _pincount of
the large folio there). Any difference, any leaked or doubly-freed frame, is reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MmStruct
from vkernel.kernel.pagecache import AddressSpace
from vkernel.kernel.pgtable import U64_PFN_MASK, U64_PRESENT, U64_SHIFT, iter_tables
from vkernel.kernel.uapi import (
    _PAGE_PSE,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PTE_MARKER_MASK,
    PTRS_PER_TABLE,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    PG_anon,
    PG_buddy,
    PG_head,
    PG_pgtable,
    PG_reserved,
    PG_shmem,
    PG_tail,
)

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel

MAX_REPORTS = 64
_PSE = np.uint64(_PAGE_PSE)
_VM_UFFD_ANY = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR
_NOT_MARKER = np.uint64(~PTE_MARKER_MASK & 0xFFFFFFFFFFFFFFFF)


def _live_mms(kernel: Kernel) -> list[MmStruct]:
    """Every live mm_struct (one per process; plus kernel.extra_mms if a subsystem adds one)."""
    seen: dict[int, MmStruct] = {}
    for task in kernel.tasks.values():
        mm = task.mm
        if isinstance(mm, MmStruct) and not mm.dead:
            seen[id(mm)] = mm
    for mm in getattr(kernel, "extra_mms", ()):
        if isinstance(mm, MmStruct) and not mm.dead:
            seen[id(mm)] = mm
    return list(seen.values())


def audit(kernel: Kernel) -> list[str]:
    """Return every inconsistency between struct page and what maps or holds each frame."""
    mem = kernel.mem
    n = mem.nframes
    u = mem.u64
    problems: list[str] = []
    leaves: list[np.ndarray] = []
    pmd_heads: list[int] = []
    tables: list[int] = []
    zero_maps = 0
    huge_zero_maps = 0
    shmem_objs: dict[int, AddressSpace] = {}
    for mm in _live_mms(kernel):
        mm_anon = 0
        mm_shmem = 0
        mm_file = 0
        ntables = 0
        starts = np.array([v.vm_start for v in mm.vmas], dtype=np.int64)
        ends = np.array([v.vm_end for v in mm.vmas], dtype=np.int64)
        for level, t, base in iter_tables(mm):
            tables.append(t)
            ntables += 1
            ents = u[t * PTRS_PER_TABLE : (t + 1) * PTRS_PER_TABLE]
            if level in (1, 2):
                # Every mapping must lie inside a VMA (nothing left behind by munmap/mremap).
                if level == 1:
                    live = np.flatnonzero(ents)
                    addrs = base + (live.astype(np.int64) << PAGE_SHIFT)
                else:
                    live = np.flatnonzero((ents & _PSE) != 0)
                    addrs = base + (live.astype(np.int64) << PMD_SHIFT)
                if len(addrs):
                    i = np.searchsorted(ends, addrs, side="right")
                    if len(starts):
                        j = np.minimum(i, len(starts) - 1)
                        inside = (i < len(starts)) & (starts[j] <= addrs)
                    else:
                        inside = np.zeros(len(addrs), dtype=bool)
                    for addr in addrs[~inside][:MAX_REPORTS].tolist():
                        problems.append(f"mm {id(mm):#x}: mapping at {addr:#x} outside any VMA")
            if level == 1:
                # A non-present PTE must be a PTE marker (poison and/or uffd-wp bits only).
                mk = ents[(ents != 0) & ((ents & U64_PRESENT) == 0)]
                odd = mk[(mk & _NOT_MARKER) != 0]
                if len(odd):
                    problems.append(
                        f"mm {id(mm):#x}: non-present PTE {int(odd[0]):#x} is not a PTE marker"
                    )
                pv = ents[(ents & U64_PRESENT) != 0]
                pfns = ((pv & U64_PFN_MASK) >> U64_SHIFT).astype(np.int64)
                bad = pfns >= n
                if bad.any():
                    problems.append(
                        f"mm {id(mm):#x}: PTE maps pfn {int(pfns[bad][0])} out of range"
                    )
                    pfns = pfns[~bad]
                z = pfns == mem.zero_pfn
                zero_maps += int(np.count_nonzero(z))
                pfns = pfns[~z]
                leaves.append(pfns)
                heads = mem.compound_heads(pfns)
                hf = mem.flags[heads]
                a = int(np.count_nonzero(hf & PG_anon))
                sh = int(np.count_nonzero(hf & PG_shmem))
                mm_anon += a
                mm_shmem += sh
                mm_file += len(pfns) - a - sh
            elif level == 2:
                hp = ents[((ents & U64_PRESENT) != 0) & ((ents & _PSE) != 0)]
                for h in ((hp & U64_PFN_MASK) >> U64_SHIFT).tolist():
                    if h == mem.huge_zero_pfn:
                        huge_zero_maps += 1
                        continue
                    pmd_heads.append(h)
                    mm_anon += HPAGE_PMD_NR
        tables.extend(mm.deposited.values())
        ntables += len(mm.deposited)
        if mm.pgtables_bytes != ntables * PAGE_SIZE:
            problems.append(
                f"mm {id(mm):#x}: pgtables_bytes {mm.pgtables_bytes} != {ntables} tables"
            )
        rss = (mm.rss_stat[MM_ANONPAGES], mm.rss_stat[MM_SHMEMPAGES], mm.rss_stat[MM_FILEPAGES])
        if rss != (mm_anon, mm_shmem, mm_file):
            problems.append(
                f"mm {id(mm):#x}: rss anon/shmem/file {rss[0]}/{rss[1]}/{rss[2]} "
                f"!= mapped {mm_anon}/{mm_shmem}/{mm_file}"
            )
        for vma in mm.vmas:
            if vma.shmem is not None:
                shmem_objs[id(vma.shmem)] = vma.shmem
            # vm_userfaultfd_ctx: set iff a VM_UFFD_* flag is, a live uffd of this very mm
            # (fork gives a child VMA the child's new uffd or none, release clears them all).
            uctx = vma.uffd_ctx
            if (uctx is None) != (not vma.vm_flags & _VM_UFFD_ANY):
                problems.append(f"mm {id(mm):#x}: VMA {vma.vm_start:#x} uffd ctx/flags mismatch")
            elif uctx is not None and (uctx.mm is not mm or uctx.released):
                problems.append(
                    f"mm {id(mm):#x}: VMA {vma.vm_start:#x} registered with a uffd of another "
                    "mm or a released one"
                )

    vfs = getattr(kernel, "vfs", None)
    if vfs is not None:  # file page caches (shmem, disk) and dax device frames
        for obj in vfs.address_spaces():
            shmem_objs[id(obj)] = obj

    exp_ref = np.zeros(n, dtype=np.int64)
    exp_map = np.zeros(n, dtype=np.int64)
    exp_entire = np.zeros(len(mem.entire_mapcount), dtype=np.int64)
    all_leaves = np.concatenate(leaves) if leaves else np.zeros(0, dtype=np.int64)
    if len(all_leaves):
        exp_map += np.bincount(all_leaves, minlength=n)
        exp_ref += np.bincount(mem.compound_heads(all_leaves), minlength=n)
    if pmd_heads:
        ph = np.array(pmd_heads, dtype=np.int64)
        exp_ref += np.bincount(ph, minlength=n)
        exp_entire += np.bincount(ph >> HPAGE_PMD_ORDER, minlength=len(exp_entire))
    tab = np.array(tables, dtype=np.int64)
    if len(tab):
        exp_ref += np.bincount(tab, minlength=n)
        if len(np.unique(tab)) != len(tab):
            problems.append("a page-table frame is used twice")
        notpt = tab[(mem.flags[tab] & PG_pgtable) == 0]
        for p in notpt[:MAX_REPORTS].tolist():
            problems.append(f"pfn {p}: used as a page table but not flagged pgtable")
    for obj in shmem_objs.values():
        if obj.pages:
            sp = np.fromiter(obj.pages.values(), dtype=np.int64, count=len(obj.pages))
            exp_ref += np.bincount(mem.compound_heads(sp), minlength=n)
    if vfs is not None:
        res = vfs.reserved_frames()
        if len(res):
            exp_ref += np.bincount(res, minlength=n)
    exp_ref += kernel.extra_refs
    exp_pin = kernel.extra_pins.astype(np.int64)

    flags = mem.flags
    free = (flags & PG_buddy) != 0
    zero = mem.zero_pfn
    zero_refs = 1 + int(kernel.extra_refs[zero])  # FOLL_GET references the zero page
    if mem.refcount[zero] != zero_refs:
        problems.append(f"zero page refcount {int(mem.refcount[zero])} != {zero_refs}")
    if zero_maps != mem.zero_maps:
        problems.append(f"zero page mapped {zero_maps} times, bookkeeping says {mem.zero_maps}")
    hz = mem.huge_zero_pfn
    if huge_zero_maps != mem.huge_zero_maps:
        problems.append(
            f"huge zero page mapped {huge_zero_maps} times, bookkeeping says {mem.huge_zero_maps}"
        )
    if hz >= 0:
        hz_refs = 1 + int(kernel.extra_refs[hz])  # GUP references/pins on the huge zero folio
        if mem.refcount[hz] != hz_refs:
            problems.append(f"huge zero page refcount {int(mem.refcount[hz])} != {hz_refs}")
        if mem.frames[hz : hz + HPAGE_PMD_NR].any():
            problems.append("the huge zero page has been written to")
        exp_ref[hz] = hz_refs
    if mem.frames[zero].any():
        problems.append("the shared zero page has been written to")
    exp_ref[zero] = mem.refcount[zero]
    exp_map[zero] = mem.mapcount[zero]

    def report(kind: str, idx: np.ndarray, actual: np.ndarray, expected: np.ndarray) -> None:
        """Append one line per mismatching pfn (bounded)."""
        for p in idx[:MAX_REPORTS].tolist():
            desc = ",".join(mem.page_flag_names(p)) or "-"
            problems.append(
                f"pfn {p}: {kind} {int(actual[p])} != expected {int(expected[p])} [{desc}]"
            )
        if len(idx) > MAX_REPORTS:
            problems.append(f"… and {len(idx) - MAX_REPORTS} more {kind} mismatches")

    rc = mem.refcount.astype(np.int64)
    report("refcount", np.flatnonzero(rc != exp_ref), rc, exp_ref)
    mc = mem.mapcount.astype(np.int64)
    report("mapcount", np.flatnonzero(mc != exp_map), mc, exp_map)
    pc = mem.large_pincount.astype(np.int64)
    for b in np.flatnonzero(pc != exp_pin)[:MAX_REPORTS].tolist():
        p = b << HPAGE_PMD_ORDER
        problems.append(
            f"pfn {p}: pincount {int(pc[b])} != expected {int(exp_pin[b])}"
            f" [{','.join(mem.page_flag_names(p)) or '-'}]"
        )
    large_heads = (flags[::HPAGE_PMD_NR] & PG_head) != 0
    stray = np.flatnonzero((pc[: len(large_heads)] != 0) & ~large_heads)
    for b in stray[:MAX_REPORTS].tolist():
        problems.append(f"pfn {b << HPAGE_PMD_ORDER}: pincount {int(pc[b])} on no large folio")
    ec = mem.entire_mapcount.astype(np.int64)
    for b in np.flatnonzero(ec != exp_entire)[:MAX_REPORTS].tolist():
        problems.append(
            f"pfn {b << HPAGE_PMD_ORDER}: entire_mapcount {int(ec[b])}"
            f" != expected {int(exp_entire[b])}"
        )
    # Leaks: allocated heads nobody accounts for (tails are covered by their head).
    alloc_heads = ~free & ((flags & (PG_tail | PG_reserved)) == 0)
    leaked = np.flatnonzero(alloc_heads & (exp_ref == 0) & (rc == 0))
    for p in leaked[:MAX_REPORTS].tolist():
        problems.append(
            f"pfn {p}: leaked (allocated, refcount 0, not referenced)"
            f" [{','.join(mem.page_flag_names(p))}]"
        )
    used_free = np.flatnonzero(free & ((exp_ref != 0) | (exp_map != 0)))
    for p in used_free[:MAX_REPORTS].tolist():
        problems.append(f"pfn {p}: free but still mapped or referenced (use after free)")
    nfree = int(np.count_nonzero(free))
    if nfree != mem.nr_free_pages:
        problems.append(f"free frames {nfree} != allocator free count {mem.nr_free_pages}")
    return problems
