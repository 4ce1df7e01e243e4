"""fork's batched leaf-table copy (copy_pte_tables) against the table-by-table copy_pte_range():
two kernels build the same mixed address space, one forks through the batch, the other through
the one-by-one loop, and every frame, PTE and struct page field must come out identical
(kernel-semantics.md A.11, B.28-B.37, B.56-B.61)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import numpy as np
import pytest

from tests.unit.fs.fshelp import make_file
from tests.unit.mm.mmhelp import MakeKernel, MiB, P, pfn_at
from tests.unit.uffd.uffdhelp import priv, ready, settle
from vkernel.kernel import fork as fork_mod
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import fork, sys_madvise, sys_mmap
from vkernel.kernel.pgtable import pte_slot
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import (
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_UFFD_WP,
    GUP_PIN_COUNTING_BIAS,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MMF_HAS_PINNED,
    PROT_READ,
    PROT_WRITE,
    PTE_MARKER_POISONED,
    VM_UFFD_WP,
)
from vkernel.kernel.vma import VMA

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED
BASE = 0x40000000


def copy_page_range_one_by_one(dst_vma: VMA, src_vma: VMA) -> None:
    """The reference: copy_page_range() as it was before batching, one leaf table at a time."""
    from vkernel.kernel.pgtable import pmd_slot, pte_alloc, table_of, walk_pmds

    src_mm = src_vma.mm
    dst_mm = dst_vma.mm
    u = src_mm.mem.u64
    if not fork_mod.vma_needs_copy(dst_vma, src_vma):
        return
    is_cow = src_vma.is_cow_mapping()
    if is_cow:
        src_mm.write_protect_seq += 1
    try:
        for slot, a, b in walk_pmds(src_mm, src_vma.vm_start, src_vma.vm_end):
            e = u.item(slot)
            if not e:
                continue
            if e & _PAGE_PSE:
                if fork_mod.copy_huge_pmd(dst_vma, src_vma, slot, a):
                    continue
                e = u.item(slot)
            dslot = pmd_slot(dst_mm, a, alloc=True)
            if dslot < 0:
                raise KernelError(errno.ENOMEM, "out of memory for page tables at fork")
            dt = pte_alloc(dst_mm, dslot)
            if dt < 0:
                raise KernelError(errno.ENOMEM, "out of memory for page tables at fork")
            fork_mod.copy_pte_range(dst_vma, src_vma, table_of(e), dt, a, b)
    finally:
        if is_cow:
            src_mm.write_protect_seq += 1


class Space:
    """What one kernel built: the parent, its uffd and the pins to drop at the end."""

    def __init__(self, kernel: Kernel, task: Task, ctx: uf.UserfaultfdCtx) -> None:
        self.kernel = kernel
        self.task = task
        self.ctx = ctx
        self.pinned: list[int] = []


async def build(kernel: Kernel, pin: bool, event_fork: bool) -> Space:
    """A mixed address space: anon (with DONTNEED holes and zero pages, starting and ending
    inside leaf tables), a 16 MiB anon region (8 tables in one batch), a PMD THP, a split THP,
    a private file mapping (file pages + COWed anon pages), a
    shared file mapping, uffd-wp protected pages with markers and a poison marker, and with
    ``pin`` two maybe-DMA-pinned exclusive anon pages (one small, one inside a PTE-mapped THP);
    with ``event_fork`` the uffd asks for UFFD_EVENT_FORK (the child keeps VM_UFFD_WP)."""
    t = priv(kernel)
    feats = uf.UFFD_FEATURE_POISON | (uf.UFFD_FEATURE_EVENT_FORK if event_fork else 0)
    ctx = await ready(t, features=feats)
    sp = Space(kernel, t, ctx)
    # Anon over 5 leaf tables, starting 3 pages into the first one and ending inside the last.
    a = BASE + 3 * P
    n = 4 * MiB + 2 * MiB // 2 + 5 * P
    assert await sys_mmap(t, a, n, RW, ANON) == a
    await write_user(t, a, bytes(range(256)) * (n // 256))
    await sys_madvise(t, a + MiB, 64 * P, MADV_DONTNEED)  # holes
    await sys_madvise(t, a + 3 * MiB, 16 * P, MADV_DONTNEED)
    await read_user_bytes(t, a + 3 * MiB, 8 * P)  # zero pages in the holes
    # A never-written anon region read back: zero page only, a whole table.
    z = BASE + 16 * MiB
    assert await sys_mmap(t, z, 2 * MiB, RW, ANON) == z
    await read_user_bytes(t, z, 2 * MiB)
    await write_user(t, z + 5 * P, b"w")  # one anon page makes an anon_vma
    # THP: one PMD-mapped, one split into PTEs by a partial DONTNEED.
    h = BASE + 32 * MiB
    assert await sys_mmap(t, h, 4 * MiB, RW, ANON) == h
    await sys_madvise(t, h, 4 * MiB, MADV_HUGEPAGE)
    await write_user(t, h, b"\x5a" * (4 * MiB))
    await sys_madvise(t, h + 2 * MiB + 7 * P, P, MADV_DONTNEED)
    # A large plain anon region: one batch of 8 tables.
    big = BASE + 80 * MiB
    assert await sys_mmap(t, big, 16 * MiB, RW, ANON) == big
    await write_user(t, big, b"\xb1" * (16 * MiB))
    # Private and shared file mappings.
    fd = await make_file(kernel, t, "batch", bytes(range(256)) * (8 * MiB // 256), "shmem")
    fp = BASE + 48 * MiB
    assert await sys_mmap(t, fp, 4 * MiB, RW, MAP_PRIVATE | MAP_FIXED, fd, 0) == fp
    await read_user_bytes(t, fp, 4 * MiB)
    await write_user(t, fp + MiB, b"c" * (64 * P))  # COWed anon pages among the file pages
    fs = BASE + 56 * MiB
    assert await sys_mmap(t, fs, 2 * MiB, RW, MAP_SHARED | MAP_FIXED, fd, 0) == fs
    await write_user(t, fs, b"s" * (2 * MiB))
    # uffd: wp-protected populated pages, wp markers on holes, a poison marker.
    w = BASE + 64 * MiB
    assert await sys_mmap(t, w, 2 * MiB, RW, ANON) == w
    await write_user(t, w, b"u" * (2 * MiB - 8 * P))
    await uf.uffdio_register(
        ctx, t, w, 2 * MiB, uf.UFFDIO_REGISTER_MODE_WP | uf.UFFDIO_REGISTER_MODE_MISSING
    )
    await uf.uffdio_writeprotect(ctx, t, w + 16 * P, 32 * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    await sys_madvise(t, w + 20 * P, 4 * P, MADV_DONTNEED)
    # An anon zap leaves no uffd-wp marker without WP_UNPOPULATED: put one in a hole by hand.
    kernel.mem.u64[pte_slot(t.mm, w + 21 * P)] = _PAGE_UFFD_WP
    assert await uf.uffdio_poison(ctx, t, w + 2 * MiB - 4 * P, P) == P
    if pin:
        mem = kernel.mem
        for addr in (a + 2 * MiB + 9 * P, h + 2 * MiB + 3 * P):
            pfn = pfn_at(t, addr)
            head = mem.compound_head(pfn)
            if mem.order[head]:
                mem.large_pincount[head >> 9] += 1
                mem.refcount[head] += 1
                kernel.extra_refs[head] += 1
                kernel.extra_pins[head >> 9] += 1
            else:
                mem.refcount[pfn] += GUP_PIN_COUNTING_BIAS
                kernel.extra_refs[pfn] += GUP_PIN_COUNTING_BIAS
            sp.pinned.append(pfn)
            assert mem.folio_maybe_dma_pinned(pfn)
        t.mm.flags |= MMF_HAS_PINNED
    return sp


def unpin(sp: Space) -> None:
    """Drop the pins build() took by hand."""
    mem = sp.kernel.mem
    for pfn in sp.pinned:
        head = mem.compound_head(pfn)
        if mem.order[head]:
            mem.large_pincount[head >> 9] -= 1
            mem.refcount[head] -= 1
            sp.kernel.extra_refs[head] -= 1
            sp.kernel.extra_pins[head >> 9] -= 1
        else:
            mem.refcount[pfn] -= GUP_PIN_COUNTING_BIAS
            sp.kernel.extra_refs[pfn] -= GUP_PIN_COUNTING_BIAS


async def fork_with_event(sp: Space) -> tuple[Task, uf.UserfaultfdCtx]:
    """fork() with UFFD_EVENT_FORK: the child keeps VM_UFFD_WP; reads the FORK message."""
    f = asyncio.ensure_future(fork(sp.task))
    await settle()
    (m,) = await sp.ctx.read(64)
    assert m.event == uf.UFFD_EVENT_FORK
    child = await f
    assert m.fork_ctx is not None
    return child, m.fork_ctx


def state(k: Kernel, *tasks: Task) -> dict[str, Any]:
    """Everything fork may touch: all of RAM (frames hold the page tables), struct page, the
    folio counters and the mm counters."""
    mem = k.mem
    out: dict[str, Any] = {
        name: getattr(mem, name).copy()
        for name in (
            "u64",
            "refcount",
            "mapcount",
            "flags",
            "order",
            "mapping",
            "index",
            "entire_mapcount",
            "large_pincount",
        )
    }
    out["zero_maps"] = mem.zero_maps
    out["huge_zero_maps"] = mem.huge_zero_maps
    out["nr_free"] = mem.nr_free_pages
    for i, t in enumerate(tasks):
        assert t.mm is not None
        out[f"rss{i}"] = list(t.mm.rss_stat)
        out[f"pgtables{i}"] = t.mm.pgtables_bytes
        out[f"seq{i}"] = t.mm.write_protect_seq
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Field by field; for arrays, the first differing index in the message."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, np.ndarray):
            diff = np.flatnonzero(g != w)
            assert not len(diff), (
                f"{key}: {len(diff)} differ, first at {int(diff[0])}: "
                f"batched {g[diff[0]]:#x} one-by-one {w[diff[0]]:#x}"
            )
        else:
            assert g == w, key


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("event_fork", [False, True])
async def test_batched_fork_matches_table_by_table(
    make_kernel: MakeKernel, monkeypatch: pytest.MonkeyPatch, pin: bool, event_fork: bool
) -> None:
    """Fork twice (the second finds the parent write-protected) in each kernel: batched and
    one-by-one end in identical RAM, PTEs, refcounts, mapcounts, PG_anon_exclusive and rss."""
    spaces = []
    for _ in range(2):
        k = make_kernel(memory_bytes=192 << 20, thp="madvise")
        spaces.append(await build(k, pin, event_fork))
    batched, ref = spaces
    assert_same(state(batched.kernel, batched.task), state(ref.kernel, ref.task))
    calls = {"tables": 0, "one_by_one": 0}
    real_tables = fork_mod.copy_pte_tables
    real_range = fork_mod.copy_pte_range
    real_cpr = fork_mod.copy_page_range

    def count_tables(dst: VMA, src: VMA, st: np.ndarray, dt: np.ndarray) -> None:
        calls["tables"] += len(st)
        real_tables(dst, src, st, dt)

    def count_range(dst: VMA, src: VMA, st: int, dt: int, a: int, b: int) -> None:
        calls["one_by_one"] += src.mm.mem is batched.kernel.mem
        real_range(dst, src, st, dt, a, b)

    monkeypatch.setattr(fork_mod, "copy_pte_tables", count_tables)
    monkeypatch.setattr(fork_mod, "copy_pte_range", count_range)
    children: list[list[Task]] = [[], []]
    ctxs: list[uf.UserfaultfdCtx] = []
    for _round in range(2):
        for i, sp in enumerate(spaces):
            cpr = copy_page_range_one_by_one if sp is ref else real_cpr
            monkeypatch.setattr(fork_mod, "copy_page_range", cpr)
            if event_fork:
                child, nctx = await fork_with_event(sp)
                ctxs.append(nctx)
            else:
                child = await fork(sp.task)
            children[i].append(child)
        assert_same(
            state(batched.kernel, batched.task, *children[0]),
            state(ref.kernel, ref.task, *children[1]),
        )
    monkeypatch.undo()
    # Per fork: 14 whole leaf tables are copied (anon, zero page, split THP, 2 private file,
    # uffd, 8 large anon); the anon VMA's first and last are partial and go one by one, and so do, with
    # ``pin``, the tables of the two maybe-pinned pages.
    assert calls["tables"] == 2 * (14 - 2 * pin)
    assert calls["one_by_one"] == 2 * (2 + 2 * pin)
    for sp, kids in zip(spaces, children, strict=True):
        child = kids[0]
        w = BASE + 64 * MiB
        v = child.mm.vma_lookup(w) if child.mm is not None else None
        assert v is not None
        assert bool(v.vm_flags & VM_UFFD_WP) == event_fork
        # A uffd-wp protected page keeps its bit only in a VM_UFFD_WP child.
        pslot = pte_slot(sp.task.mm, w + 16 * P)
        cslot = pte_slot(child.mm, w + 16 * P)
        assert int(sp.kernel.mem.u64[pslot]) & _PAGE_UFFD_WP
        assert bool(int(sp.kernel.mem.u64[cslot]) & _PAGE_UFFD_WP) == event_fork
        marker = pte_slot(child.mm, w + 21 * P)
        assert int(sp.kernel.mem.u64[marker]) == (_PAGE_UFFD_WP if event_fork else 0)
        poison = pte_slot(child.mm, w + 2 * MiB - 4 * P)
        assert int(sp.kernel.mem.u64[poison]) & PTE_MARKER_POISONED
        assert await read_user_bytes(child, BASE + 3 * P + 5, 3) == bytes([5, 6, 7])
        assert audit(sp.kernel) == []
        for c in kids:
            sp.kernel.do_exit(c)
            sp.kernel.reap(c)
        unpin(sp)
        assert audit(sp.kernel) == []
    for nctx in ctxs:
        await nctx.put()
    for sp in spaces:
        await sp.ctx.put()


async def test_batched_fork_out_of_memory_matches_table_by_table(
    make_kernel: MakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOMEM while allocating the child's leaf tables: the pending batch is copied before the
    error unwinds, so the parent ends as after a one-by-one attempt (same PTEs, counts, free
    pages) and the audit is clean."""
    real_cpr = fork_mod.copy_page_range
    spaces = []
    for cpr in (real_cpr, copy_page_range_one_by_one):
        k = make_kernel(memory_bytes=8 << 20)
        t = k.spawn("p", "s")
        a = BASE
        assert await sys_mmap(t, a, 16 * MiB, RW, ANON) == a
        with pytest.raises(KernelError):
            await write_user(t, a, b"o" * (16 * MiB))
        # Room for the child's pgd, pud, pmd and two leaf tables: the third leaf table fails.
        free = k.mem.nr_free_pages
        assert free <= 5
        await sys_madvise(t, BASE + 2 * MiB, (5 - free) * P, MADV_DONTNEED)
        assert k.mem.nr_free_pages == 5
        monkeypatch.setattr(fork_mod, "copy_page_range", cpr)
        with pytest.raises(KernelError) as ei:
            await fork(t)
        monkeypatch.undo()
        assert ei.value.errno == errno.ENOMEM
        assert audit(k) == []
        spaces.append((k, t))
    (kb, tb), (kr, tr) = spaces
    assert_same(state(kb, tb), state(kr, tr))
    # The failure came after some tables were copied: the first one is write-protected.
    assert not int(kb.mem.u64[pte_slot(tb.mm, BASE)]) & _PAGE_RW
    assert await read_user_bytes(tb, BASE, 1) == b"o"
