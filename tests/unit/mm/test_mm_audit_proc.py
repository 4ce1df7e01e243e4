"""The audit and the /proc views (DESIGN.md §5, §8; pagemap bits as fs/proc/task_mmu.c)."""

from __future__ import annotations

import errno

import pytest

from tests.unit.mm.mmhelp import SHARED_ANON, MakeKernel, MiB, P, mmap_anon, pfn_at
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import (
    audit,
    dump_page,
    fork,
    mmap_lock_stats,
    pagemap,
    proc_maps,
    proc_smaps,
    proc_status_mm,
    read_user_bytes,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_SOFT_DIRTY


async def test_audit_catches_a_corrupted_refcount(kernel: Kernel, task: Task) -> None:
    """§5: a refcount that disagrees with the page tables is reported (and fixed back here)."""
    a = await mmap_anon(task, P)
    await write_user(task, a, b"x")
    pfn = pfn_at(task, a)
    assert audit(kernel) == []
    kernel.mem.refcount[pfn] += 1
    problems = audit(kernel)
    assert any(f"pfn {pfn}: refcount 2 != expected 1" in p for p in problems)
    kernel.mem.refcount[pfn] -= 1
    assert audit(kernel) == []


async def test_audit_catches_leaks_and_mapcount_errors(kernel: Kernel, task: Task) -> None:
    """§5: an allocated frame nobody references, or a wrong mapcount, is reported."""
    leak = kernel.mem.alloc_page()
    kernel.mem.refcount[leak] = 0
    assert any("leaked" in p for p in audit(kernel))
    kernel.mem.refcount[leak] = 1
    kernel.mem.put_folio(leak)
    a = await mmap_anon(task, P)
    await write_user(task, a, b"y")
    pfn = pfn_at(task, a)
    kernel.mem.mapcount[pfn] = 5
    assert any(f"pfn {pfn}: mapcount 5" in p for p in audit(kernel))
    kernel.mem.mapcount[pfn] = 1
    kernel.extra_refs[pfn] += 1
    assert any("refcount 1 != expected 2" in p for p in audit(kernel))
    kernel.extra_refs[pfn] -= 1


async def test_audit_catches_pincount_errors(make_kernel: MakeKernel) -> None:
    """§5: a THP's _pincount must equal the pins the GUP ledger holds on it, and a 2 MiB
    block holding no large folio must have none."""
    from tests.unit.gup.guphelp import page_array
    from vkernel.kernel.gup import pin_user_pages_unlocked, unpin_user_pages
    from vkernel.kernel.uapi import FOLL_WRITE, HPAGE_PMD_NR

    kernel = make_kernel(thp="always")
    task = kernel.spawn("thp", "s")
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"t" * P)
    head = pfn_at(task, a)
    pages = page_array(3)
    assert await pin_user_pages_unlocked(task.mm, a, 3, pages, FOLL_WRITE) == 3
    blk = head // HPAGE_PMD_NR
    assert kernel.mem.large_pincount[blk] == kernel.extra_pins[blk] == 3
    assert audit(kernel) == []
    kernel.mem.large_pincount[blk] += 1
    assert any(f"pfn {head}: pincount 4 != expected 3" in p for p in audit(kernel))
    kernel.mem.large_pincount[blk] -= 1
    kernel.extra_pins[blk] -= 1
    assert any(f"pfn {head}: pincount 3 != expected 2" in p for p in audit(kernel))
    kernel.extra_pins[blk] += 1
    small = kernel.mem.alloc_page()
    sblk = small // HPAGE_PMD_NR
    kernel.mem.large_pincount[sblk] += 1
    kernel.extra_pins[sblk] += 1
    assert any("pincount 1 on no large folio" in p for p in audit(kernel))
    kernel.mem.large_pincount[sblk] -= 1
    kernel.extra_pins[sblk] -= 1
    kernel.mem.put_folio(small)
    unpin_user_pages(kernel, pages, 3)
    assert audit(kernel) == []


async def test_maps_format(task: Task) -> None:
    """§8: /proc/PID/maps lines, anon private and shared (/dev/zero (deleted)), Linux layout."""
    a = await mmap_anon(task, 2 * P)
    s = await mmap_anon(task, P, flags=SHARED_ANON)
    lines = proc_maps(task).splitlines()
    assert lines[1] == f"{a:08x}-{a + 2 * P:08x} rw-p 00000000 00:00 0 "
    shm = lines[0]
    assert shm.startswith(f"{s:08x}-{s + P:08x} rw-s 00000000 00:01 ")
    assert shm.index("/dev/zero (deleted)") == 73


async def test_smaps_counts_shared_and_private(kernel: Kernel, task: Task) -> None:
    """§8, A.10:
    smaps: Rss/Pss/Private/Shared after fork (Pss halves shared pages), VmFlags mnemonics."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"w" * 4 * P)
    text = proc_smaps(task)
    assert "Rss:                  16 kB" in text
    assert "Private_Dirty:        16 kB" in text
    assert "Anonymous:            16 kB" in text
    assert "VmFlags: rd wr mr mw me ac sd \n" in text
    child = await fork(task)
    text = proc_smaps(task)
    assert "Pss:                   8 kB" in text
    assert "Shared_Dirty:         16 kB" in text
    kernel.do_exit(child)


async def test_pagemap_bits(kernel: Kernel, task: Task) -> None:
    """§8, A.10:
    pagemap: present/pfn, exclusive, soft-dirty, file for shmem, zero page not exclusive."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"1")
    await read_user_bytes(task, a + P, 1)
    raw = pagemap(task, a - P, 5)
    ents = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, 40, 8)]
    assert ents[0] == 0  # hole
    pfn = pfn_at(task, a)
    assert ents[1] == PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_SOFT_DIRTY | pfn
    assert ents[2] == PM_PRESENT | PM_SOFT_DIRTY | kernel.mem.zero_pfn
    assert ents[3] == PM_SOFT_DIRTY
    s = await mmap_anon(task, P, flags=SHARED_ANON)
    await write_user(task, s, b"s")
    e = int.from_bytes(pagemap(task, s, 1), "little")
    assert e & PM_FILE
    assert e & PM_PRESENT
    with pytest.raises(KernelError):
        pagemap(task, a + 1, 1)


async def test_dump_page_and_status(kernel: Kernel, task: Task) -> None:
    """§8, A.5: dump_page fields; VmRSS/VmSize/VmPTE in proc_status_mm; EINVAL for a bad pfn."""
    a = await mmap_anon(task, 2 * MiB)
    await write_user(task, a, b"d" * (MiB))
    d = dump_page(kernel, pfn_at(task, a))
    assert d["refcount"] == 1
    assert d["mapcount"] == 1
    assert "anon_exclusive" in d["flags"]
    assert d["mapping_kind"] == "AnonVma"
    st = proc_status_mm(task)
    assert st["VmRSS"] == 1024
    assert st["VmSize"] == 2048
    assert st["VmPTE"] == 16
    assert st["VmPin"] == 0
    with pytest.raises(KernelError) as ei:
        dump_page(kernel, kernel.mem.nframes)
    assert ei.value.errno == errno.EINVAL
    stats = mmap_lock_stats(task)
    assert isinstance(stats, dict)


async def test_audit_catches_a_mapping_outside_any_vma(kernel: Kernel, task: Task) -> None:
    """§5: a PTE left behind where no VMA exists (a missed zap) is reported."""
    a = await mmap_anon(task, 2 * P)
    await write_user(task, a, b"x" * 2 * P)
    vma = task.mm.vma_lookup(a)
    task.mm.resize_vma(vma, a, a + P)  # shrink the VMA without zapping: corrupt on purpose
    assert any("outside any VMA" in p for p in audit(kernel))
    task.mm.resize_vma(vma, a, a + 2 * P)
    assert audit(kernel) == []
