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
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

BASE = 0x40000000
SPAN = 16 * MiB


@pytest.mark.parametrize("seed", range(6))
async def test_random_operations_keep_the_audit_clean(make_kernel: MakeKernel, seed: int) -> None:
    """Any mix of mmap/munmap/mprotect/mremap/madvise/access/fork/exit leaves every count right."""
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
                    ]
                )
                await sys_madvise(t, addr, length, adv)
            elif op == 6 and len(tasks) < 4:
                tasks.append(await fork(t))
            elif op == 7 and len(tasks) > 1:
                tasks.remove(t)
                k.do_exit(t)
            elif op == 8:
                await sys_mremap(t, addr, length, length + rng.choice([-P, P, MiB]), MREMAP_MAYMOVE)
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
