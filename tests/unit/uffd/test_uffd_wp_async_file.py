"""WP_ASYNC on file memory (kernel-semantics.md B.60, A.13; 6.12 vma_can_userfault: WP alone with WP_ASYNC may register any
memory): dirty tracking of a shared disk-file mapping through pagemap bit 57; uffd-wp VMAs
map exactly the faulting page (uffd_disable_fault_around)."""

from __future__ import annotations

import pytest

from tests.unit.fs.conftest import MakeFsKernel, make_fs_kernel
from tests.unit.fs.fshelp import make_file, pattern
from tests.unit.mm.mmhelp import RW, P, errname
from tests.unit.uffd.uffdhelp import pm, pm57, pm_swap, priv, ready
from vkernel.kernel import userfaultfd as uf
from vkernel.kernel.errors import KernelError
from vkernel.kernel.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from vkernel.kernel.mmap import sys_mmap
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import MAP_SHARED, PM_PRESENT

__all__ = ["make_fs_kernel"]

WP = uf.UFFDIO_REGISTER_MODE_WP


async def test_wp_async_dirty_tracking_of_a_shared_file(make_fs_kernel: MakeFsKernel) -> None:
    k = make_fs_kernel("ram0=ram:16M")
    t = priv(k)
    n = 4
    data = pattern(n * P)
    fd = await make_file(k, t, "f", data)
    a = await sys_mmap(t, 0, n * P, RW, MAP_SHARED, fd, 0)
    sync = await ready(t)  # without WP_ASYNC a file mapping cannot be registered at all
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(sync, t, a, n * P, WP)
    assert errname(e.value) == "EINVAL"
    await sync.put()
    ctx = await ready(t, features=uf.UFFD_FEATURE_WP_ASYNC)
    with pytest.raises(KernelError) as e:
        await uf.uffdio_register(ctx, t, a, n * P, WP | uf.UFFDIO_REGISTER_MODE_MISSING)
    assert errname(e.value) == "EINVAL"  # WP only
    await uf.uffdio_register(ctx, t, a, n * P, WP)
    f0 = t.min_flt + t.maj_flt
    assert await read_user_bytes(t, a, 2 * P) == data[: 2 * P]
    assert t.min_flt + t.maj_flt - f0 == 2  # no fault-around: one fault per page
    assert pm(t, a) & PM_PRESENT
    assert not pm(t, a + 2 * P) & PM_PRESENT
    await uf.uffdio_writeprotect(ctx, t, a, n * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    assert all(pm57(t, a + i * P) for i in range(n))  # the mapped page and the markers
    await write_user(t, a + P + 3, b"x")  # a marker: mapped protected, the bit dropped
    await write_user(t, a, b"y")  # a protected page: the bit dropped
    assert [pm57(t, a + i * P) for i in range(n)] == [False, False, True, True]
    assert not ctx.fault_pending
    got = await k.vfs.read(t, fd, 2 * P, 0)
    assert got[0:1] == b"y"
    assert got[P + 3 : P + 4] == b"x"
    # protect again: the written pages read as clean until the next store
    await uf.uffdio_writeprotect(ctx, t, a, n * P, uf.UFFDIO_WRITEPROTECT_MODE_WP)
    assert all(pm57(t, a + i * P) for i in range(n))
    await write_user(t, a + 3 * P, b"z")
    assert [pm57(t, a + i * P) for i in range(n)] == [True, True, True, False]
    # a hole punch zaps without ZAP_FLAG_DROP_MARKER: the protection stays as a marker
    await k.vfs.fallocate(t, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, P)
    assert pm57(t, a)
    assert pm_swap(t, a)
    assert await read_user_bytes(t, a, 2) == b"\0\0"  # the hole, mapped still protected
    assert pm57(t, a)
    await write_user(t, a, b"h")
    assert not pm57(t, a)
    await ctx.put()
    assert not any(pm57(t, a + i * P) for i in range(n))
