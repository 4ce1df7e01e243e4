"""mmap/munmap/mprotect/mremap/madvise: errno tables, VMA split and merge, limits (B.13)."""

from __future__ import annotations

import itertools

import pytest

from tests.unit.mm.mmhelp import ANON, RW, SHARED_ANON, MakeKernel, MiB, P, errname, mmap_anon
from vkernel.kernel.cred import Rlimit
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import (
    proc_maps,
    sys_madvise,
    sys_mmap,
    sys_mprotect,
    sys_mremap,
    sys_munmap,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_HUGEPAGE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MAP_SHARED_VALIDATE,
    MMAP_BASE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PMD_SIZE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    VM_DONTCOPY,
    VM_HUGEPAGE,
)


@pytest.mark.parametrize(
    ("addr", "length", "prot", "flags", "fd", "offset", "err"),
    [
        (0, 0, RW, ANON, -1, 0, "EINVAL"),  # zero length
        (0, P, RW, ANON, -1, 1, "EINVAL"),  # unaligned offset
        (0, P, RW, MAP_ANONYMOUS, -1, 0, "EINVAL"),  # neither PRIVATE nor SHARED
        (0, P, RW, MAP_SHARED_VALIDATE | MAP_ANONYMOUS, -1, 0, "EINVAL"),
        (0, P, RW, MAP_PRIVATE, 3, 0, "EBADF"),  # file mappings are not in scope
        (0, P, RW, MAP_PRIVATE, -1, 0, "EBADF"),
        (0x1000, P, RW, ANON | MAP_FIXED, -1, 0, "EPERM"),  # below mmap_min_addr
        (0x10001000, P, RW, ANON | MAP_FIXED | 0, -1, 0, None),
        (0x10000800, P, RW, ANON | MAP_FIXED, -1, 0, "EINVAL"),  # unaligned fixed
        (0, 1 << 48, RW, ANON, -1, 0, "ENOMEM"),  # larger than TASK_SIZE
        (0x7FFFFFFFE000, 2 * P, RW, ANON | MAP_FIXED, -1, 0, "ENOMEM"),  # crosses TASK_SIZE
    ],
)
async def test_mmap_errno_table(
    task: Task, addr: int, length: int, prot: int, flags: int, fd: int, offset: int, err: str | None
) -> None:
    """do_mmap()/get_unmapped_area() errno (kernel-semantics A.4-style table for mmap)."""
    if err is None:
        assert await sys_mmap(task, addr, length, prot, flags, fd, offset) == addr
        return
    with pytest.raises(KernelError) as ei:
        await sys_mmap(task, addr, length, prot, flags, fd, offset)
    assert errname(ei.value) == err


async def test_mmap_top_down_from_mmap_base(task: Task) -> None:
    """§7: mmap layout: the first mapping ends at mmap_base; the next sits right below it."""
    a = await mmap_anon(task, 3 * P)
    assert a + 3 * P == MMAP_BASE
    b = await mmap_anon(task, P, prot=PROT_READ)
    assert b + P == a


async def test_pmd_multiple_anonymous_mappings_are_thp_aligned(task: Task) -> None:
    """A.12:
    __get_unmapped_area(): anonymous lengths that are multiples of 2 MiB get 2 MiB alignment."""
    a = await mmap_anon(task, 4 * MiB)
    assert a % PMD_SIZE == 0


async def test_fixed_noreplace_gives_eexist_and_fixed_replaces(task: Task) -> None:
    """§7: MAP_FIXED_NOREPLACE over a mapping → EEXIST; MAP_FIXED replaces it."""
    a = await mmap_anon(task, 4 * P)
    with pytest.raises(KernelError) as ei:
        await sys_mmap(task, a + P, P, RW, ANON | MAP_FIXED_NOREPLACE)
    assert errname(ei.value) == "EEXIST"
    assert await sys_mmap(task, a + P, P, PROT_READ, ANON | MAP_FIXED) == a + P
    assert len(task.mm.vmas) == 3


async def test_adjacent_compatible_mappings_merge_and_split(task: Task) -> None:
    """§7:
    vma_merge: adjacent anonymous mappings with equal flags are one VMA; mprotect splits/merges."""
    a = await mmap_anon(task, 4 * P)
    await mmap_anon(task, 4 * P, addr=a - 4 * P, flags=ANON | MAP_FIXED)
    assert len(task.mm.vmas) == 1
    await sys_mprotect(task, a, P, PROT_READ)
    maps = proc_maps(task).splitlines()
    assert len(maps) == 3
    assert maps[1].split()[1] == "r--p"
    await sys_mprotect(task, a, P, RW)
    assert len(task.mm.vmas) == 1
    assert proc_maps(task) == f"{a - 4 * P:08x}-{a + 4 * P:08x} rw-p 00000000 00:00 0 \n"


async def test_munmap_splits_and_holes_are_fine(task: Task) -> None:
    """§7, A.8: munmap: punching a hole splits a VMA; unmapping an unmapped range succeeds."""
    a = await mmap_anon(task, 8 * P)
    await write_user(task, a, b"x" * 8 * P)
    await sys_munmap(task, a + 2 * P, 2 * P)
    assert [(v.vm_start - a, v.vm_end - a) for v in task.mm.vmas] == [(0, 2 * P), (4 * P, 8 * P)]
    await sys_munmap(task, a + 2 * P, 2 * P)
    await sys_munmap(task, 0x20000000, 16 * P)
    assert task.mm.rss_stat[1] == 6


@pytest.mark.parametrize(
    ("addr_off", "length", "err"),
    [(1, P, "EINVAL"), (0, 0, "EINVAL"), (0, 1 << 48, "EINVAL")],
)
async def test_munmap_errno_table(task: Task, addr_off: int, length: int, err: str) -> None:
    """§7: __vm_munmap(): unaligned start, zero length and oversize ranges are EINVAL."""
    a = await mmap_anon(task, P)
    with pytest.raises(KernelError) as ei:
        await sys_munmap(task, a + addr_off, length)
    assert errname(ei.value) == err


async def test_mprotect_errno_table(task: Task) -> None:
    """§7: do_mprotect_pkey(): EINVAL, ENOMEM for holes, EACCES beyond VM_MAY*, 0 for len 0."""
    a = await mmap_anon(task, 4 * P)
    await sys_mprotect(task, a, 0, PROT_READ)
    for args, err in [
        ((a + 1, P, PROT_READ), "EINVAL"),
        ((a, P, 0x10), "EINVAL"),
        ((a - 2 * P, 2 * P, PROT_READ), "ENOMEM"),
        ((a, 8 * P, PROT_READ), "ENOMEM"),
        ((a - P, 2 * P, PROT_READ), "ENOMEM"),
    ]:
        with pytest.raises(KernelError) as ei:
            await sys_mprotect(task, *args)
        assert errname(ei.value) == err, args
    # mprotect applied up to the hole: the whole mapping became read-only first.
    assert task.mm.vmas[0].vm_flags & PROT_WRITE == 0
    s = await mmap_anon(task, P, flags=SHARED_ANON)
    task.mm.vma_lookup(s).vm_flags &= ~0x20  # drop VM_MAYWRITE like a read-only file
    with pytest.raises(KernelError) as ei:
        await sys_mprotect(task, s, P, RW)
    assert errname(ei.value) == "EACCES"
    await sys_mprotect(task, s, P, PROT_READ | PROT_EXEC)


async def test_mremap_grow_in_place_move_and_errors(task: Task) -> None:
    """§7: mremap: shrink, grow in place, MAYMOVE, MREMAP_FIXED; data follows the move."""
    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"A" * P + b"B" * P)
    assert await sys_mremap(task, a, 4 * P, 2 * P, 0) == a
    assert await sys_mremap(task, a, 2 * P, 3 * P, 0) == a
    blocker = await mmap_anon(task, P, addr=a + 3 * P, flags=ANON | MAP_FIXED)
    await sys_mprotect(task, blocker, P, PROT_READ)
    with pytest.raises(KernelError) as ei2:
        await sys_mremap(task, a, 3 * P, 6 * P, 0)
    assert errname(ei2.value) == "ENOMEM"
    b = await sys_mremap(task, a, 3 * P, 6 * P, MREMAP_MAYMOVE)
    assert b != a
    from vkernel.kernel.mm_api import read_user_bytes

    assert await read_user_bytes(task, b, 2 * P) == b"A" * P + b"B" * P
    c = 0x30000000
    assert await sys_mremap(task, b, 6 * P, 6 * P, MREMAP_MAYMOVE | MREMAP_FIXED, c) == c
    assert await read_user_bytes(task, c + P, 1) == b"B"
    for args, err in [
        ((c + 1, P, P, 0), "EINVAL"),
        ((c, P, 0, 0), "EINVAL"),
        ((c, P, P, 8), "EINVAL"),
        ((c, P, P, MREMAP_FIXED, 0x40000000), "EINVAL"),
        ((0x50000000, P, 2 * P, MREMAP_MAYMOVE), "EFAULT"),
        ((c, 8 * P, 9 * P, MREMAP_MAYMOVE), "EFAULT"),
        ((c, P, P, MREMAP_MAYMOVE | MREMAP_FIXED, c), "EINVAL"),
    ]:
        with pytest.raises(KernelError) as ei3:
            await sys_mremap(task, *args)
        assert errname(ei3.value) == err, args


async def test_madvise_errno_table_and_flags(task: Task) -> None:
    """§7, B.13:
    madvise: EINVAL for bad advice/alignment, ENOMEM for holes (applied elsewhere anyway)."""
    a = await mmap_anon(task, 4 * P)
    for args, err in [((a, P, 999), "EINVAL"), ((a + 1, P, MADV_DONTFORK), "EINVAL")]:
        with pytest.raises(KernelError) as ei:
            await sys_madvise(task, *args)
        assert errname(ei.value) == err
    await sys_madvise(task, a, 0, MADV_DONTFORK)
    await sys_madvise(task, a + P, P, MADV_DONTFORK)
    assert [bool(v.vm_flags & VM_DONTCOPY) for v in task.mm.vmas] == [False, True, False]
    await sys_madvise(task, a + P, P, MADV_DOFORK)
    assert len(task.mm.vmas) == 1
    with pytest.raises(KernelError) as ei:
        await sys_madvise(task, a - P, 2 * P, MADV_HUGEPAGE)
    assert errname(ei.value) == "ENOMEM"
    assert task.mm.vma_lookup(a).vm_flags & VM_HUGEPAGE


@pytest.mark.parametrize(
    ("prot", "advice", "err"),
    [
        (PROT_READ, MADV_POPULATE_READ, None),
        (PROT_READ, MADV_POPULATE_WRITE, "EINVAL"),
        (PROT_WRITE, MADV_POPULATE_READ, "EINVAL"),
        (PROT_WRITE, MADV_POPULATE_WRITE, None),
        (PROT_NONE, MADV_POPULATE_READ, "EINVAL"),
        (RW, MADV_POPULATE_WRITE, None),
    ],
)
async def test_madv_populate_protection_rules(
    task: Task, prot: int, advice: int, err: str | None
) -> None:
    """B.13: POPULATE_READ needs VM_READ, POPULATE_WRITE needs VM_WRITE, else EINVAL."""
    a = await mmap_anon(task, 4 * P, prot=prot)
    if err is None:
        await sys_madvise(task, a, 4 * P, advice)
        from vkernel.kernel.mm_api import pagemap

        pm = pagemap(task, a, 4)
        assert all(int.from_bytes(pm[i : i + 8], "little") >> 63 for i in range(0, 32, 8))
        return
    with pytest.raises(KernelError) as ei:
        await sys_madvise(task, a, 4 * P, advice)
    assert errname(ei.value) == err


@pytest.mark.parametrize("where", ["start", "middle", "end"])
async def test_madv_populate_over_a_hole_is_enomem(task: Task, where: str) -> None:
    """B.13: a hole at the start, middle or end of the range → ENOMEM."""
    a = await mmap_anon(task, 6 * P)
    hole = {"start": a, "middle": a + 2 * P, "end": a + 5 * P}[where]
    await sys_munmap(task, hole, P)
    with pytest.raises(KernelError) as ei:
        await sys_madvise(task, a, 6 * P, MADV_POPULATE_WRITE)
    assert errname(ei.value) == "ENOMEM"


async def test_rlimit_as_limits_mmap_and_mremap(kernel: Kernel) -> None:
    """§6, §7: may_expand_vm(): growing past RLIMIT_AS gives ENOMEM from mmap and mremap."""
    t = kernel.spawn("lim", "s", rlimits={Rlimit.RLIMIT_AS: 16 * P})
    a = await mmap_anon(t, 8 * P)
    with pytest.raises(KernelError) as ei:
        await mmap_anon(t, 9 * P)
    assert errname(ei.value) == "ENOMEM"
    with pytest.raises(KernelError) as ei:
        await sys_mremap(t, a, 8 * P, 17 * P, MREMAP_MAYMOVE)
    assert errname(ei.value) == "ENOMEM"
    await mmap_anon(t, 8 * P)
    await sys_mmap(t, a, 8 * P, PROT_READ, ANON | MAP_FIXED)  # replacing does not grow


async def test_max_map_count(make_kernel: MakeKernel) -> None:
    """§7: vm.max_map_count: mmap and splitting munmap fail with ENOMEM at the limit."""
    k = make_kernel()
    k.sysctl_max_map_count = 3
    t = k.spawn("m", "s")
    a = await mmap_anon(t, 3 * P, prot=PROT_READ)
    await mmap_anon(t, P, prot=RW)
    await mmap_anon(t, P, prot=PROT_READ | PROT_EXEC)
    with pytest.raises(KernelError) as ei:
        await sys_munmap(t, a + P, P)
    assert errname(ei.value) == "ENOMEM"
    # do_mmap() checks map_count > max: the count may reach max + 1, never more.
    await mmap_anon(t, P, prot=PROT_NONE)
    with pytest.raises(KernelError) as ei:
        await mmap_anon(t, P, prot=PROT_WRITE)
    assert errname(ei.value) == "ENOMEM"


async def test_mremap_dontunmap_moves_pages_and_keeps_an_empty_source(
    kernel: Kernel, task: Task
) -> None:
    """§7, A.13:
    MREMAP_DONTUNMAP: pages move to the new place, the old range stays mapped and reads zero."""
    from vkernel.kernel.mm_api import read_user_bytes
    from vkernel.kernel.uapi import MREMAP_DONTUNMAP

    a = await mmap_anon(task, 4 * P)
    await write_user(task, a, b"D" * 4 * P)
    with pytest.raises(KernelError) as ei:
        await sys_mremap(task, a, 4 * P, 8 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert errname(ei.value) == "EINVAL"
    with pytest.raises(KernelError) as ei:
        await sys_mremap(task, a, 4 * P, 4 * P, MREMAP_DONTUNMAP)
    assert errname(ei.value) == "EINVAL"
    b = await sys_mremap(task, a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert b != a
    assert await read_user_bytes(task, b, 4 * P) == b"D" * 4 * P
    assert await read_user_bytes(task, a, 4 * P) == bytes(4 * P)
    assert task.mm.rss_stat[1] == 4
    c = 0x30000000
    assert (
        await sys_mremap(task, b, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP | MREMAP_FIXED, c)
        == c
    )
    assert await read_user_bytes(task, c + P, 1) == b"D"


async def test_lengths_wrap_like_unsigned_long(task: Task) -> None:
    """§7: PAGE_ALIGN of a length near 2**64 wraps to 0 → mmap ENOMEM, mprotect ENOMEM,
    madvise EINVAL, mremap EINVAL (nothing is changed)."""
    a = await mmap_anon(task, P)
    huge = (1 << 64) - 1
    for coro, err in [
        (sys_mmap(task, 0, huge, RW, ANON), "ENOMEM"),
        (sys_mprotect(task, a, huge, PROT_READ), "ENOMEM"),
        (sys_madvise(task, a, huge, MADV_DONTFORK), "EINVAL"),
        (sys_mremap(task, a, P, huge, MREMAP_MAYMOVE), "EINVAL"),
        (sys_munmap(task, a, huge), "EINVAL"),
    ]:
        with pytest.raises(KernelError) as ei:
            await coro
        assert errname(ei.value) == err
    assert task.mm.vmas[0].vm_flags & PROT_WRITE


@pytest.mark.parametrize("target", [PROT_READ, RW, PROT_NONE, PROT_READ | PROT_EXEC])
async def test_mprotect_across_vmas_that_merge_while_walking(task: Task, target: int) -> None:
    """§7 do_mprotect_pkey: VMAs merged or split by one step do not derail the walk; the span
    ends fully covered with the new protection (VMAs with different anon_vmas stay apart, as
    in Linux) and the data is kept."""
    from vkernel.kernel.mm_api import read_user_bytes

    base = 0x20000000
    prots = [PROT_READ, RW, PROT_READ, PROT_NONE, RW, PROT_READ | PROT_EXEC]
    for i, prot in enumerate(prots):
        await sys_mmap(task, base + i * 4 * P, 4 * P, RW, ANON | MAP_FIXED)
        await write_user(task, base + i * 4 * P, bytes([i + 1]) * P)
        await sys_mprotect(task, base + i * 4 * P, 4 * P, prot)
    await sys_mprotect(task, base, len(prots) * 4 * P, target)
    vmas = task.mm.vmas
    assert vmas[0].vm_start == base
    assert vmas[-1].vm_end == base + len(prots) * 4 * P
    assert all(v.vm_end == w.vm_start for v, w in itertools.pairwise(vmas))
    assert all(v.vm_flags & 7 == target for v in vmas)
    assert len(vmas) < len(prots)
    if target & PROT_READ:
        for i in range(len(prots)):
            assert await read_user_bytes(task, base + i * 4 * P, 1) == bytes([i + 1])


async def test_mprotect_when_a_step_absorbs_the_next_vma(task: Task) -> None:
    """§7: mprotect(RW) of [R][RW][R]: the first step merges the RW neighbour into the first
    VMA; the walk goes on from the merged end and the whole span becomes one RW VMA."""
    base = 0x20000000
    await sys_mmap(task, base, 4 * P, PROT_READ, ANON | MAP_FIXED)
    await sys_mmap(task, base + 4 * P, 4 * P, RW, ANON | MAP_FIXED)
    await sys_mmap(task, base + 8 * P, 4 * P, PROT_READ, ANON | MAP_FIXED)
    assert len(task.mm.vmas) == 3
    await sys_mprotect(task, base, 12 * P, RW)
    assert [(v.vm_start, v.vm_end) for v in task.mm.vmas] == [(base, base + 12 * P)]
