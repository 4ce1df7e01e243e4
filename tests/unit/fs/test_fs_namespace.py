"""The flat namespace and descriptor tables: Linux's errno for each misuse, fork and exit."""

from __future__ import annotations

import errno

import pytest

from tests.unit.fs.conftest import MakeFsKernel
from tests.unit.fs.fshelp import P, make_file, raises, sync_raises
from vkernel.kernel.fdtable import RLIMIT_NOFILE_DEFAULT
from vkernel.kernel.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MAX_LFS_FILESIZE,
    O_APPEND,
    O_CREAT,
    O_DIRECT,
    O_EXCL,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
)
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PG_buddy


async def test_open_missing_is_enoent(kernel: Kernel, task: Task) -> None:
    sync_raises(errno.ENOENT, kernel.vfs.do_sys_open, task, "nope", O_RDONLY)
    sync_raises(errno.ENOENT, kernel.vfs.do_sys_open, task, "", O_CREAT | O_RDWR)


async def test_open_excl_existing_is_eexist(kernel: Kernel, task: Task) -> None:
    kernel.vfs.do_sys_open(task, "f", O_CREAT | O_RDWR)
    sync_raises(errno.EEXIST, kernel.vfs.do_sys_open, task, "f", O_CREAT | O_EXCL | O_RDWR)
    fd, _ = kernel.vfs.do_sys_open(task, "f", O_CREAT | O_RDWR)  # without O_EXCL: opens it
    assert fd == 1


async def test_open_bad_flags_and_names_are_einval(kernel: Kernel, task: Task) -> None:
    sync_raises(errno.EINVAL, kernel.vfs.do_sys_open, task, "f", O_CREAT | 3)
    sync_raises(errno.EINVAL, kernel.vfs.do_sys_open, task, "a/b", O_CREAT | O_RDWR)
    sync_raises(errno.ENAMETOOLONG, kernel.vfs.do_sys_open, task, "x" * 256, O_CREAT)
    sync_raises(errno.EINVAL, kernel.vfs.do_sys_open, task, "f", O_CREAT | 0o10000000)


async def test_open_on_unknown_device_is_enodev_and_dax_needs_dax_device(
    kernel: Kernel, task: Task
) -> None:
    sync_raises(errno.ENODEV, kernel.vfs.do_sys_open, task, "f", O_CREAT, "disk", "sdz")
    sync_raises(errno.EOPNOTSUPP, kernel.vfs.do_sys_open, task, "f", O_CREAT, "dax", "ram0")


async def test_o_direct_is_recorded_on_disk_and_refused_on_shmem(
    kernel: Kernel, task: Task
) -> None:
    _, f = kernel.vfs.do_sys_open(task, "d", O_CREAT | O_RDWR | O_DIRECT)
    assert f.f_flags & O_DIRECT
    sync_raises(errno.EINVAL, kernel.vfs.do_sys_open, task, "s", O_CREAT | O_DIRECT, "shmem")


async def test_bad_descriptor_is_ebadf(kernel: Kernel, task: Task) -> None:
    await raises(errno.EBADF, kernel.vfs.read(task, 7, 10))
    await raises(errno.EBADF, kernel.vfs.write(task, 7, b"x"))
    await raises(errno.EBADF, kernel.vfs.fsync(task, 7))
    sync_raises(errno.EBADF, kernel.vfs.close, task, 7)


async def test_access_mode_is_enforced_with_ebadf(kernel: Kernel, task: Task) -> None:
    await make_file(kernel, task, "f", b"abc")
    ro, _ = kernel.vfs.do_sys_open(task, "f", O_RDONLY)
    wo, _ = kernel.vfs.do_sys_open(task, "f", O_WRONLY)
    await raises(errno.EBADF, kernel.vfs.write(task, ro, b"x"))
    await raises(errno.EBADF, kernel.vfs.read(task, wo, 1))
    await raises(errno.EINVAL, kernel.vfs.ftruncate(task, ro, 0))  # do_sys_ftruncate
    await raises(errno.EBADF, kernel.vfs.fallocate(task, ro, 0, 0, P))
    assert await kernel.vfs.read(task, ro, 10) == b"abc"


async def test_negative_offsets_and_lengths_are_einval(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "f", b"abc")
    await raises(errno.EINVAL, kernel.vfs.read(task, fd, 1, -1))
    await raises(errno.EINVAL, kernel.vfs.write(task, fd, b"x", -1))
    await raises(errno.EINVAL, kernel.vfs.ftruncate(task, fd, -1))
    await raises(errno.EINVAL, kernel.vfs.fallocate(task, fd, 0, -1, P))
    await raises(errno.EINVAL, kernel.vfs.fallocate(task, fd, 0, 0, 0))


async def test_beyond_max_file_size_is_efbig(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "f", b"")
    await raises(errno.EFBIG, kernel.vfs.write(task, fd, b"x", MAX_LFS_FILESIZE))
    await raises(errno.EFBIG, kernel.vfs.ftruncate(task, fd, MAX_LFS_FILESIZE + 1))


async def test_fallocate_modes(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "f", b"")
    await raises(errno.EOPNOTSUPP, kernel.vfs.fallocate(task, fd, FALLOC_FL_PUNCH_HOLE, 0, P))
    await raises(errno.EOPNOTSUPP, kernel.vfs.fallocate(task, fd, 0x10, 0, P))
    await kernel.vfs.fallocate(task, fd, FALLOC_FL_KEEP_SIZE, 0, 4 * P)
    st = kernel.vfs.stat("f")
    assert (st.size, st.blocks) == (0, 4 * 8)
    await kernel.vfs.fallocate(task, fd, 0, 0, 2 * P + 1)
    assert kernel.vfs.stat("f").size == 2 * P + 1
    assert await kernel.vfs.read(task, fd, 3 * P, 0) == bytes(2 * P + 1)


async def test_full_device_is_enospc_with_a_short_count_first(
    make_fs_kernel: MakeFsKernel,
) -> None:
    k = make_fs_kernel("tiny=ram:256K")
    t = k.spawn("t", "s")
    fd, _ = k.vfs.do_sys_open(t, "f", O_CREAT | O_RDWR)
    free = k.vfs.supers["tiny"].free_blocks
    n = await k.vfs.write(t, fd, b"z" * ((free + 3) * P), 0)
    assert n == free * P  # write(2) returns the short count…
    await raises(errno.ENOSPC, k.vfs.write(t, fd, b"z", n))  # …and the next call ENOSPC
    await k.vfs.ftruncate(t, fd, 0)
    await k.vfs.fsync(t, fd)  # the freed blocks are reusable once the commit is durable
    assert await k.vfs.write(t, fd, b"y" * P, 0) == P


async def test_unlink_missing_is_enoent(kernel: Kernel, task: Task) -> None:
    sync_raises(errno.ENOENT, kernel.vfs.do_unlink, task, "nope")


async def test_fd_table_limit_is_emfile(kernel: Kernel, task: Task) -> None:
    kernel.vfs.do_sys_open(task, "f", O_CREAT | O_RDWR)
    for _ in range(RLIMIT_NOFILE_DEFAULT - 1):
        kernel.vfs.do_sys_open(task, "f", O_RDONLY)
    sync_raises(errno.EMFILE, kernel.vfs.do_sys_open, task, "f", O_RDONLY)
    kernel.vfs.close(task, 500)
    assert kernel.vfs.do_sys_open(task, "f", O_RDONLY)[0] == 500  # lowest free descriptor


async def test_read_write_move_the_shared_offset_pread_does_not(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "f", b"0123456789")
    file = kernel.vfs.fget(task, fd)
    file.f_pos = 0
    assert await kernel.vfs.read(task, fd, 4) == b"0123"
    assert await kernel.vfs.read(task, fd, 4, 6) == b"6789"
    assert await kernel.vfs.read(task, fd, 4) == b"4567"
    assert await kernel.vfs.write(task, fd, b"AB") == 2
    assert await kernel.vfs.read(task, fd, 100, 0) == b"01234567AB"
    assert await kernel.vfs.read(task, fd, 100) == b""  # EOF


async def test_o_append_and_o_trunc(kernel: Kernel, task: Task) -> None:
    await make_file(kernel, task, "f", b"hello")
    fd, _ = kernel.vfs.do_sys_open(task, "f", O_WRONLY | O_APPEND)
    await kernel.vfs.write(task, fd, b" world")
    rd, _ = kernel.vfs.do_sys_open(task, "f", O_RDONLY)
    assert await kernel.vfs.read(task, rd, 100, 0) == b"hello world"
    kernel.vfs.do_sys_open(task, "f", O_RDWR | O_TRUNC)
    assert kernel.vfs.stat("f").size == 0
    assert kernel.vfs.stat("f").cached_pages == 0


async def test_fork_duplicates_the_fd_table_sharing_descriptions(
    kernel: Kernel, task: Task
) -> None:
    fd = await make_file(kernel, task, "f", b"abcdef")
    kernel.vfs.fget(task, fd).f_pos = 0
    child = await kernel.fork(task)
    assert await kernel.vfs.read(child, fd, 2) == b"ab"
    assert await kernel.vfs.read(task, fd, 2) == b"cd"  # one open file description
    kernel.vfs.close(child, fd)
    assert await kernel.vfs.read(task, fd, 2) == b"ef"  # the parent's fd is untouched
    assert kernel.vfs.stat("f").opens == 1
    kernel.kill(child, 9)
    kernel.reap(child)


async def test_exit_closes_every_descriptor_and_evicts_unlinked_files(
    kernel: Kernel, task: Task
) -> None:
    await make_file(kernel, task, "gone", b"x" * 3 * P)
    await make_file(kernel, task, "kept", b"y" * P)
    kernel.vfs.do_unlink(task, "gone")
    assert [i.name for i in kernel.vfs.iter_inodes()] == ["kept", "gone"]
    gone = next(i for i in kernel.vfs.iter_inodes() if i.name == "gone")
    assert gone.mapping is not None
    pfns = list(gone.mapping.pages.values())
    assert len(pfns) == 3
    kernel.kill(task, 9)
    assert kernel.vfs.stat("kept").opens == 0
    assert [i.name for i in kernel.vfs.iter_inodes()] == ["kept"]
    assert all(kernel.mem.flags[p] & PG_buddy for p in pfns)  # the cache pages were freed
    await raises(errno.ESRCH, kernel.vfs.read(task, 0, 1))


async def test_unlink_while_open_keeps_data_until_last_close(kernel: Kernel, task: Task) -> None:
    fd = await make_file(kernel, task, "f", b"data")
    kernel.vfs.do_unlink(task, "f")
    sync_raises(errno.ENOENT, kernel.vfs.stat, "f")
    assert await kernel.vfs.read(task, fd, 10, 0) == b"data"
    fd2 = await make_file(kernel, task, "f", b"new")  # the name is free again
    assert await kernel.vfs.read(task, fd2, 10, 0) == b"new"
    kernel.vfs.close(task, fd)
    assert len(kernel.vfs.orphans) == 0


@pytest.mark.parametrize("kind", ["shmem", "disk", "dax"])
async def test_stat_reports_size_and_blocks(kernel: Kernel, task: Task, kind: str) -> None:
    dev = "pmem0" if kind == "dax" else ""
    fd = await make_file(kernel, task, "f", b"x" * (P + 1), kind, dev)
    st = kernel.vfs.fstat(task, fd)
    assert (st.kind, st.size, st.blocks, st.nlink) == (kind, P + 1, 16, 1)
