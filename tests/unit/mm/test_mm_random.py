"""Randomised syscall/access/fork sequences: the audit stays clean after every step (§5, §10)."""

from __future__ import annotations

import random

import pytest

from tests.unit.mm.mmhelp import MakeKernel, MiB, P
from vkernel.kernel.errors import KernelError
from vkernel.kernel.mm_api import (
    audit,
    fork,
    pagemap,
    proc_smaps,
    read_user_bytes,
    sys_madvise,
    sys_mmap,
    sys_mprotect,
    sys_mremap,
    sys_munmap,
    write_user,
)
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import (
    MADV_COLLAPSE,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

BASE = 0x40000000
SPAN = 16 * MiB


@pytest.mark.parametrize("seed", range(6))
async def test_random_operations_keep_the_audit_clean(make_kernel: MakeKernel, seed: int) -> None:
    """§5, §10:
    Any mix of mmap/munmap/mprotect/mremap/madvise/access/fork/exit leaves every count right."""
    rng = random.Random(seed)
    k = make_kernel(memory_bytes=48 << 20, thp="always" if seed % 2 else "madvise")
    tasks: list[Task] = [k.spawn("r0", "s")]
    for _step in range(150):
        t = rng.choice(tasks)
        addr = BASE + rng.randrange(0, SPAN // P) * P
        if t.mm.vmas and rng.random() < 0.7:
            v = rng.choice(t.mm.vmas)
            addr = v.vm_start + rng.randrange(0, (v.vm_end - v.vm_start) // P) * P
        length = rng.choice([P, 3 * P, 64 * P, 2 * MiB, 3 * MiB])
        op = rng.choice([0, 0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 7, 8, 9, 10])
        try:
            if op == 0:
                flags = (
                    MAP_ANONYMOUS | MAP_FIXED | rng.choice([MAP_PRIVATE, MAP_PRIVATE, MAP_SHARED])
                )
                await sys_mmap(t, addr & ~(2 * MiB - 1), length, PROT_READ | PROT_WRITE, flags)
            elif op == 1:
                await sys_munmap(t, addr, length)
            elif op == 2:
                prot = rng.choice([PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE])
                await sys_mprotect(t, addr, length, prot)
            elif op == 3:
                await write_user(t, addr, bytes([rng.randrange(256)]) * min(length, MiB))
            elif op == 4:
                await read_user_bytes(t, addr, min(length, MiB))
            elif op == 5:
                adv = rng.choice(
                    [
                        MADV_DONTNEED,
                        MADV_HUGEPAGE,
                        MADV_DONTFORK,
                        MADV_POPULATE_READ,
                        MADV_POPULATE_WRITE,
                        MADV_COLLAPSE,
                    ]
                )
                await sys_madvise(t, addr, length, adv)
            elif op == 6 and len(tasks) < 4:
                tasks.append(await fork(t))
            elif op == 7 and len(tasks) > 1:
                tasks.remove(t)
                k.do_exit(t)
            elif op == 8:
                if rng.random() < 0.3:
                    await sys_mremap(t, addr, length, length, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
                else:
                    await sys_mremap(
                        t, addr, length, length + rng.choice([-P, P, MiB]), MREMAP_MAYMOVE
                    )
            elif op == 9:
                pagemap(t, addr, 64)
                proc_smaps(t)
            else:
                await write_user(t, addr + rng.randrange(P), b"xyz")
        except KernelError:
            pass
        problems = audit(k)
        assert problems == [], (seed, _step, op, problems[:5])
    for t in tasks:
        k.do_exit(t)
    assert k.mem.nr_free_pages == k.mem.boot_free


class _Shadow:
    """What each private page of a task must contain (absent = zeros)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, addr: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            a = addr + pos
            page = self.pages.setdefault(a & ~(P - 1), bytearray(P))
            off = a & (P - 1)
            n = min(P - off, len(data) - pos)
            page[off : off + n] = data[pos : pos + n]
            pos += n

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            a = addr + len(out)
            page = self.pages.get(a & ~(P - 1), bytes(P))
            off = a & (P - 1)
            out += page[off : off + min(P - off, n - len(out))]
        return bytes(out)

    def drop(self, addr: int, length: int) -> None:
        for pg in [p for p in self.pages if addr <= p < addr + length]:
            del self.pages[pg]

    def move(self, old: int, new: int, length: int) -> None:
        moved = {p - old + new: v for p, v in self.pages.items() if old <= p < old + length}
        self.drop(old, length)
        self.pages.update(moved)

    def copy(self) -> _Shadow:
        s = _Shadow()
        s.pages = {p: bytearray(v) for p, v in self.pages.items()}
        return s


@pytest.mark.parametrize("seed", range(8))
async def test_random_private_memory_never_leaks_between_processes(
    make_kernel: MakeKernel, seed: int
) -> None:
    """B.28 at scale: after any fork/COW/THP/mremap history every process reads its own data."""
    rng = random.Random(1000 + seed)
    k = make_kernel(memory_bytes=48 << 20, thp="always" if seed % 2 else "madvise")
    root = k.spawn("r0", "s")
    shadows: dict[int, _Shadow] = {root.pid: _Shadow()}
    tasks = [root]
    for _step in range(150):
        t = rng.choice(tasks)
        sh = shadows[t.pid]
        vmas = t.mm.vmas
        op = rng.choice([0, 1, 2, 3, 3, 3, 4, 4, 5, 6, 7, 8])
        if op == 0 or not vmas:
            length = rng.choice([3 * P, 2 * MiB, 4 * MiB])
            a = await sys_mmap(t, 0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
            sh.drop(a, length)
            if rng.random() < 0.5:
                await sys_madvise(t, a, length, MADV_HUGEPAGE)
            continue
        v = rng.choice(vmas)
        a = v.vm_start + rng.randrange(0, (v.vm_end - v.vm_start) // P) * P
        n = min(rng.choice([1, P, 5 * P, MiB]), v.vm_end - a)
        try:
            if op == 1:
                await sys_munmap(t, a, n)
                sh.drop(a, n + P - 1 & ~(P - 1))
            elif op == 2:
                if rng.random() < 0.3:
                    await sys_madvise(t, a & ~(2 * MiB - 1), 2 * MiB, MADV_COLLAPSE)
                else:
                    await sys_mprotect(t, a, n, rng.choice([PROT_READ, PROT_READ | PROT_WRITE]))
            elif op == 3:
                data = bytes([rng.randrange(1, 256)]) * n
                off = rng.randrange(0, 64)
                data = data[: max(0, min(n, v.vm_end - a - off))]
                await write_user(t, a + off, data)
                sh.write(a + off, data)
            elif op == 4:
                assert await read_user_bytes(t, a, n) == sh.read(a, n), (
                    seed,
                    _step,
                    t.pid,
                    hex(a),
                    n,
                    t.mm.vmas,
                )
            elif op == 5 and len(tasks) < 4:
                c = await fork(t)
                tasks.append(c)
                shadows[c.pid] = sh.copy()
            elif op == 6 and len(tasks) > 1:
                tasks.remove(t)
                k.do_exit(t)
            elif op == 7:
                length = v.vm_end - a
                if rng.random() < 0.5:
                    fl = MREMAP_MAYMOVE | MREMAP_DONTUNMAP
                    new = await sys_mremap(t, a, length, length, fl)
                else:
                    new = await sys_mremap(t, a, length, length + P, MREMAP_MAYMOVE)
                sh.move(a, new, length)
            else:
                await sys_madvise(t, a, n, MADV_DONTNEED)
                sh.drop(a, n + P - 1 & ~(P - 1))

        except KernelError as e:
            # A write to a read-only VMA stops at the first page: apply what was written.
            if op == 3 and "address" in e.metadata:
                fault = int(e.metadata["address"], 16)
                written = data[: max(0, fault - (a + off))]
                sh.write(a + off, written)
            elif op not in (2, 3) and e.name != "ENOMEM":
                raise
    for t in tasks:
        for v in t.mm.vmas:
            if v.vm_flags & 1:
                got = await read_user_bytes(t, v.vm_start, v.vm_end - v.vm_start)
                assert got == shadows[t.pid].read(v.vm_start, v.vm_end - v.vm_start)
    assert audit(k) == []
    for t in tasks:
        k.do_exit(t)
