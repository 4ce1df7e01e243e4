"""O_DIRECT through pinned user pages (fs/iomap/direct-io.c ``iomap_dio_rw``, A.14).

``vfs_preadv`` / ``vfs_pwritev`` take user buffers (address, length) of a task. On an O_DIRECT
fd of a ``disk`` file they go to :func:`iomap_dio_rw`:

- alignment: file offset, each buffer address and each length must be multiples of the
  device's logical block size (512), otherwise EINVAL (``iomap_dio_bio_iter``'s check);
- page-cache coherence: dirty cached pages are written back before the I/O
  (``kiocb_write_and_wait``) and, for a write, the cached range is unmapped and invalidated
  before and after it (``kiocb_invalidate_pages`` / ``kiocb_invalidate_post_direct_write``);
- the user pages are extracted and pinned (``iov_iter_extract_user_pages`` →
  ``pin_user_pages_fast``, FOLL_WRITE for a read into memory) or, with the seed-004 switch,
  referenced with FOLL_GET (``get_user_pages_fast``); with the seed-000 switch the slow
  ``*_user_pages_unlocked`` under mmap_lock replaces GUP-fast;
- bios (``bio_iov_iter_get_pages``): when the file offset, the buffers and the lengths are all
  page aligned, one bio per run of contiguous device blocks and the device copies straight
  between its storage and the pinned frames; otherwise through a bounce buffer of whole
  blocks (sub-block writes read the partial edge blocks first: the device is 4 KiB granular);
- completion (``__bio_release_pages``) waits for every bio -- even when the caller is
  cancelled, so a frame is never released under DMA -- then unpins, dirtying for reads
  (``unpin_user_pages_dirty_lock``) or ``put_page`` for FOLL_GET;
- errors as iomap: a failed bio makes the whole call EIO; a short pin (EFAULT part-way)
  transfers the pinned prefix and returns its count, or EFAULT when nothing was pinned.

Other files (dax, shmem) and non-O_DIRECT fds copy through the page cache
(``copy_to_user`` / ``copy_from_user``).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vkernel.kernel import pagecache
from vkernel.kernel.blockdev import (
    BLOCK_SIZE,
    REQ_OP_READ,
    REQ_OP_WRITE,
    SECTOR_SIZE,
    RamDevice,
)
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.gup import (
    _put_pages,
    get_user_pages_unlocked,
    pin_user_pages_unlocked,
    unpin_user_pages_dirty_lock,
    valid_gup_flags,
)
from vkernel.kernel.gup_fast import (
    _fast_part,
    _slow_part,
    get_user_pages_fast,
    pin_user_pages_fast,
)
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import FOLL_GET, FOLL_PIN, FOLL_WRITE, PAGE_SHIFT, PAGE_SIZE, PG_writeback

if TYPE_CHECKING:
    from vkernel.kernel.fdtable import File
    from vkernel.kernel.fs import Inode
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.task import Task

IoVec = Sequence[tuple[int, int]]
"""struct iovec: (base address, length) pairs."""

MAX_DIO_PAGES = 256
"""Pages per bio (BIO_MAX_VECS)."""

GUP_MODES = ("fast", "slow")
FOLL_MODES = ("pin", "get")


class DioStats:
    """Per-kernel counters of the direct I/O path (exported as vmstat-like keys)."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.bounced = 0


def _kernel(task: Task) -> Kernel:
    """The kernel a task lives in (through its mm)."""
    if task.mm is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
    k: Kernel = task.mm.kernel
    return k


def logical_block_size(ino: Inode) -> int:
    """bdev_logical_block_size()."""
    bdev = ino.bdev
    return int(getattr(bdev, "logical_block_size", SECTOR_SIZE))


def _check_iov(iov: IoVec) -> int:
    """import_iovec(): validate the vector, return its total length."""
    total = 0
    for base, ln in iov:
        if ln < 0 or base < 0:
            raise einval("negative iovec", field="iov")
        total += ln
    if total > 0x7FFFF000:
        raise einval("iovec too long", field="iov")
    return total


def _check_alignment(pos: int, iov: IoVec, lbs: int) -> None:
    """The O_DIRECT rule: offset, addresses and lengths aligned to the logical block size."""
    mask = lbs - 1
    if pos & mask:
        raise einval(f"O_DIRECT offset {pos} not aligned to {lbs}", field="offset")
    for base, ln in iov:
        if base & mask or ln & mask:
            raise einval(f"O_DIRECT buffer {base:#x}+{ln} not aligned to {lbs}", field="iov")


class DioDefaults:
    """The daemon-wide switches (seed 000: GUP-fast or slow GUP; seed 004: FOLL_PIN or GET)."""

    def __init__(self, gup: str = "fast", foll: str = "pin") -> None:
        self.gup = gup
        self.foll = foll


def dio_defaults(kernel: Kernel) -> DioDefaults:
    """The kernel's switches, created on first use (from KernelConfig.dio_gup/dio_foll if any)."""
    d = getattr(kernel, "dio_defaults", None)
    if d is None:
        cfg = kernel.config
        d = DioDefaults(str(getattr(cfg, "dio_gup", "fast")), str(getattr(cfg, "dio_foll", "pin")))
        kernel.dio_defaults = d  # type: ignore[attr-defined]
    assert isinstance(d, DioDefaults)
    return d


def set_dio_defaults(kernel: Kernel, gup: str | None = None, foll: str | None = None) -> None:
    """Change the daemon-wide switches (EINVAL on an unknown mode)."""
    _check_modes(gup or "fast", foll or "pin")
    d = dio_defaults(kernel)
    d.gup = gup or d.gup
    d.foll = foll or d.foll


def _check_modes(g: str, f: str) -> None:
    """EINVAL for an unknown switch value."""
    if g not in GUP_MODES:
        raise einval(f"unknown GUP mode {g!r}", field="gup")
    if f not in FOLL_MODES:
        raise einval(f"unknown FOLL mode {f!r}", field="foll")


def _modes(task: Task, gup: str | None, foll: str | None) -> tuple[str, str]:
    """The switches: per call, else the kernel's."""
    d = dio_defaults(_kernel(task))
    g, f = gup or d.gup, foll or d.foll
    _check_modes(g, f)
    return g, f


async def _grab_pages(
    task: Task, start: int, n: int, write_mem: bool, gup: str, foll: str, pages: np.ndarray
) -> int:
    """iov_iter_extract_user_pages(): pin (or reference) ``n`` pages from ``start``."""
    mm = task.mm
    flags = FOLL_WRITE if write_mem else 0
    if foll == "pin":
        if gup == "fast":
            return await pin_user_pages_fast(mm, start, n, flags, pages, current=task)
        return await pin_user_pages_unlocked(mm, start, n, pages, flags, current=task)
    if gup == "fast":
        return await get_user_pages_fast(mm, start, n, flags, pages, current=task)
    return await get_user_pages_unlocked(mm, start, n, pages, flags, current=task)


def _fast_flags(write_mem: bool, foll: str, pages: np.ndarray) -> int | None:
    """The flags pin_user_pages_fast / get_user_pages_fast would use (None: invalid)."""
    to_set = FOLL_PIN if foll == "pin" else FOLL_GET
    return valid_gup_flags(pages, None, FOLL_WRITE if write_mem else 0, to_set)


def _grab_pages_lockless(
    task: Task, start: int, n: int, write_mem: bool, foll: str, pages: np.ndarray
) -> tuple[int, int, int]:
    """The lockless half of _grab_pages() under GUP-fast (gup_fast_fallback() up to its slow
    path): ``(ret, start, nr)``; ``start < 0``: ``ret`` is final, else the rest needs
    :func:`_grab_pages_slow` (which may sleep)."""
    flags = _fast_flags(write_mem, foll, pages)
    if flags is None:
        return -errno.EINVAL, -1, 0
    return _fast_part(task.mm, start, n, flags, pages)


async def _grab_pages_slow(
    task: Task, start: int, n: int, got: int, write_mem: bool, foll: str, pages: np.ndarray
) -> int:
    """The slow half after :func:`_grab_pages_lockless` left ``got`` of ``n`` pages."""
    flags = _fast_flags(write_mem, foll, pages)
    assert flags is not None
    return await _slow_part(task.mm, start, n, got, flags, pages, task)


def _release_pages(kernel: Kernel, pages: np.ndarray, n: int, foll: str, dirty: bool) -> None:
    """__bio_release_pages(): unpin (dirtying for reads) or put_page for FOLL_GET."""
    if n <= 0:
        return
    if foll == "pin":
        unpin_user_pages_dirty_lock(kernel, pages, n, dirty)
    else:
        _put_pages(kernel, pages, n, FOLL_GET, dirty)


async def _wait_device(io: asyncio.Future[Any]) -> None:
    """Wait for bios in flight even if the caller is being cancelled (no free under DMA)."""
    while not io.done():
        try:
            await asyncio.shield(io)
        except asyncio.CancelledError:
            if io.done():
                break
            continue


async def _run_bios(bios: Sequence[Awaitable[None]], inline: bool = False) -> BaseException | None:
    """submit_bio() of each, wait for all; the first error (blk_status_to_errno) or None.

    ``inline``: one bio on a device whose data copy is synchronous (brd): awaited directly,
    since a cancellation can only land before the copy starts (in the queue or the service
    wait), never during it. Otherwise the bios run in their own tasks and a cancelled caller
    still waits for them (a thread may be copying into the frames)."""
    if not bios:
        return None
    if inline and len(bios) == 1:
        try:
            await bios[0]
        except KernelError as e:
            return e
        return None
    io = asyncio.ensure_future(asyncio.gather(*bios, return_exceptions=True))
    cancelled = False
    try:
        await asyncio.shield(io)
    except asyncio.CancelledError:
        cancelled = True
        await _wait_device(io)
    if cancelled:
        raise asyncio.CancelledError
    for r in io.result():
        if r is not None:
            return r
    return None


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index runs of contiguous device blocks (or of holes: -1), ≤ MAX_DIO_PAGES."""
    out: list[tuple[int, int]] = []
    s = 0
    n = len(blocks)
    while s < n:
        e = s + 1
        if blocks[s] < 0:
            while e < n and e - s < MAX_DIO_PAGES and blocks[e] < 0:
                e += 1
        else:
            while e < n and e - s < MAX_DIO_PAGES and blocks[e] == blocks[e - 1] + 1:
                e += 1
        out.append((s, e))
        s = e
    return out


async def _coherence_before(ino: Inode, write: bool, first: int, last: int) -> None:
    """kiocb_write_and_wait() (+ kiocb_invalidate_pages() for a write)."""
    mapping = ino.mapping
    assert mapping is not None
    if mapping.dirty_time:
        await pagecache.filemap_fdatawrite(mapping)
        pagecache.filemap_check_errors(mapping)
    if mapping.pages:  # filemap_fdatawait_range(): writeback another caller started
        mem = mapping.mem
        if last - first < len(mapping.pages):
            idxs = [i for i in range(first, last) if i in mapping.pages]
        else:
            idxs = [i for i in mapping.pages if first <= i < last]
        for i in idxs:
            pfn = mapping.pages.get(i)
            if pfn is not None and mem.flags[pfn] & PG_writeback:
                await pagecache.folio_wait_writeback(mem, pfn)
    if write:
        await _invalidate(ino, first, last)


async def _invalidate(ino: Inode, first: int, last: int) -> None:
    """invalidate_inode_pages2_range(): unmap and drop the cached pages of [first, last)."""
    mapping = ino.mapping
    assert mapping is not None
    if not mapping.pages:
        return
    ino.vfs._unmap(ino, first, last, False)
    await pagecache.truncate_inode_pages_range(mapping, first, last)


async def _extract(
    kernel: Kernel, task: Task, iov: IoVec, write_mem: bool, gup: str, foll: str
) -> tuple[np.ndarray, list[tuple[int, int, int]], int]:
    """Pin every segment's pages: (pages, per-segment (first page slot, page offset, bytes
    covered), pinned page count). Stops at the first short segment (its prefix is kept)."""
    npages = sum(((b & (PAGE_SIZE - 1)) + ln + PAGE_SIZE - 1) >> PAGE_SHIFT for b, ln in iov if ln)
    pages = np.full(max(npages, 1), -1, dtype=np.int64)
    segs: list[tuple[int, int, int]] = []
    got = 0
    try:
        for base, ln in iov:
            if not ln:
                continue
            off = base & (PAGE_SIZE - 1)
            n = (off + ln + PAGE_SIZE - 1) >> PAGE_SHIFT
            view = pages[got : got + n]
            if task.mm is None:
                raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
            ret = await _grab_pages(task, base - off, n, write_mem, gup, foll, view)
            if ret < 0:
                if not segs:
                    raise KernelError(-ret, "cannot pin the user buffer")
                break
            got += ret
            covered = min(ln, ret * PAGE_SIZE - off) if ret else 0
            if covered > 0:
                segs.append((got - ret, off, covered))
            if ret < n:
                break
    except BaseException:
        _release_pages(kernel, pages, got, foll, False)
        raise
    return pages, segs, got


def _gather(
    kernel: Kernel, pages: np.ndarray, segs: list[tuple[int, int, int]], out: memoryview
) -> None:
    """Copy user bytes out of the pinned frames (the device reading memory)."""
    mv = kernel.mem.mv
    pos = 0
    for slot, off, ln in segs:
        done = 0
        cur = off
        k = slot
        while done < ln:
            n = min(ln - done, PAGE_SIZE - cur)
            base = (int(pages[k]) << PAGE_SHIFT) + cur
            out[pos : pos + n] = mv[base : base + n]
            pos += n
            done += n
            cur = 0
            k += 1


def _scatter(
    kernel: Kernel, pages: np.ndarray, segs: list[tuple[int, int, int]], src: memoryview
) -> None:
    """Copy bytes into the pinned frames (the device writing memory)."""
    mv = kernel.mem.mv
    pos = 0
    for slot, off, ln in segs:
        done = 0
        cur = off
        k = slot
        while done < ln and pos < len(src):
            n = min(ln - done, PAGE_SIZE - cur, len(src) - pos)
            base = (int(pages[k]) << PAGE_SHIFT) + cur
            mv[base : base + n] = src[pos : pos + n]
            pos += n
            done += n
            cur = 0
            k += 1


async def iomap_dio_rw(
    task: Task,
    ino: Inode,
    iov: IoVec,
    pos: int,
    write: bool,
    *,
    gup: str | None = None,
    foll: str | None = None,
) -> int:
    """iomap_dio_rw(): direct I/O between a disk file and pinned user pages; bytes moved."""
    bdev = ino.bdev
    assert bdev is not None
    assert ino.mapping is not None
    kernel = _kernel(task)
    gmode, fmode = _modes(task, gup, foll)
    total = _check_iov(iov)
    lbs = logical_block_size(ino)
    _check_alignment(pos, iov, lbs)
    if pos < 0:
        raise einval("negative offset", field="offset")
    if total == 0:
        return 0
    size = ino.size
    if not write:
        if pos >= size:
            return 0
        total = min(total, -(-(size - pos) // lbs) * lbs)
        iov = _clip(iov, total)
    first = pos >> PAGE_SHIFT
    last = (pos + total + PAGE_SIZE - 1) >> PAGE_SHIFT
    await _coherence_before(ino, write, first, last)
    pages, segs, npinned = await _extract(kernel, task, iov, not write, gmode, fmode)
    err: BaseException | None = None
    done = 0
    try:
        count = sum(s[2] for s in segs)
        if count == 0:
            raise KernelError(errno.EFAULT, "bad user buffer")
        last = (pos + count + PAGE_SIZE - 1) >> PAGE_SHIFT
        nblk = last - first
        if write:
            have = ino.prepare_blocks(first, nblk)
            if have < nblk:
                if have == 0:
                    raise KernelError(errno.ENOSPC, "no space left on device")
                count = min(count, have * PAGE_SIZE - (pos & (PAGE_SIZE - 1)))
                count -= count % lbs
                nblk = have
                if count <= 0:
                    raise KernelError(errno.ENOSPC, "no space left on device")
        blocks = ino.bmap_range(first, nblk)
        aligned = not (pos | count) & (PAGE_SIZE - 1) and all(
            off == 0 and ln & (PAGE_SIZE - 1) == 0 for _, off, ln in segs
        )
        mem = kernel.mem
        if aligned:
            pfns = pages[: count >> PAGE_SHIFT]
            bios: list[Awaitable[None]] = []
            for s, e in _runs(blocks):
                if blocks[s] < 0:
                    mem.frames[pfns[s:e]] = 0  # a hole reads as zeroes
                    continue
                op = REQ_OP_WRITE if write else REQ_OP_READ
                bios.append(bdev.submit_bio(op, int(blocks[s]), mem, pfns[s:e], None))
            err = await _run_bios(bios, inline=isinstance(bdev, RamDevice))
        else:
            err = await _bounce(kernel, ino, pages, segs, pos, count, blocks, write)
        if err is None:
            done = count
    finally:
        # The process may have exited meanwhile (its mm gone): the pins are the kernel's.
        _release_pages(kernel, pages, npinned, fmode, not write and done > 0)
    if err is not None:
        if isinstance(err, KernelError):
            raise KernelError(err.errno, str(err))
        raise err
    stats = _stats(kernel)
    if write:
        await _invalidate(ino, first, last)  # kiocb_invalidate_post_direct_write()
        if pos + done > ino.size:
            ino.size = pos + done
            if ino.sb is not None:
                ino.sb.mark_dirty()
        ino.mtime = time.time()
        stats.writes += 1
        return done
    stats.reads += 1
    return min(done, size - pos)


def _clip(iov: IoVec, total: int) -> list[tuple[int, int]]:
    """iov_iter_truncate()."""
    out: list[tuple[int, int]] = []
    for base, ln in iov:
        if total <= 0:
            break
        n = min(ln, total)
        out.append((base, n))
        total -= n
    return out


def _stats(k: Kernel) -> DioStats:
    """The kernel's DioStats, created on first use."""
    st = getattr(k, "dio_stats", None)
    if st is None:
        st = DioStats()
        k.dio_stats = st  # type: ignore[attr-defined]
    return st


async def _bounce(
    kernel: Kernel,
    ino: Inode,
    pages: np.ndarray,
    segs: list[tuple[int, int, int]],
    pos: int,
    count: int,
    blocks: np.ndarray,
    write: bool,
) -> BaseException | None:
    """A sector-aligned transfer through whole-block bounce buffers."""
    bdev = ino.bdev
    assert bdev is not None
    _stats(kernel).bounced += 1
    nblk = len(blocks)
    buf = np.zeros((nblk, BLOCK_SIZE), dtype=np.uint8)
    flat = memoryview(buf.reshape(-1).data)
    head = pos & (PAGE_SIZE - 1)

    async def read_blocks(idx: list[int]) -> BaseException | None:
        bios: list[Awaitable[None]] = []
        for i in idx:
            if blocks[i] >= 0:
                bios.append(
                    bdev.submit_bio(REQ_OP_READ, int(blocks[i]), None, None, buf[i : i + 1])
                )
        return await _run_bios(bios)

    if not write:
        err = await read_blocks(list(range(nblk)))
        if err is None:
            _scatter(kernel, pages, segs, flat[head : head + count])
        return err
    edges = sorted({0, nblk - 1})
    partial = [
        i for i in edges if (i == 0 and head) or (i == nblk - 1 and (pos + count) & (PAGE_SIZE - 1))
    ]
    if partial:
        err = await read_blocks(partial)
        if err is not None:
            return err
    _gather(kernel, pages, segs, flat[head : head + count])
    bios = [
        bdev.submit_bio(REQ_OP_WRITE, int(blocks[s]), None, None, buf[s:e])
        for s, e in _runs(blocks)
        if blocks[s] >= 0
    ]
    return await _run_bios(bios)


# ---- the syscalls: preadv / pwritev with user buffers ----------------------------------------


def _file(task: Task, fd: int, write: bool) -> File:
    """fdget() + FMODE_READ/FMODE_WRITE check."""
    file = _kernel(task).vfs.fget(task, fd)
    if write and not file.writable:
        raise KernelError(errno.EBADF, f"fd {fd} is not open for writing", fd=fd)
    if not write and not file.readable:
        raise KernelError(errno.EBADF, f"fd {fd} is not open for reading", fd=fd)
    return file


def _is_direct(file: File) -> bool:
    """IOCB_DIRECT on a file whose a_ops have direct_IO (disk files)."""
    from vkernel.kernel.fs import KIND_DISK, O_DIRECT

    return bool(file.f_flags & O_DIRECT) and file.inode.kind == KIND_DISK


async def vfs_preadv(
    task: Task,
    fd: int,
    iov: IoVec,
    offset: int | None = None,
    *,
    gup: str | None = None,
    foll: str | None = None,
) -> int:
    """preadv2() / pread64() / read(2) into user memory (offset None: at f_pos)."""
    file = _file(task, fd, False)
    pos = file.f_pos if offset is None else offset
    if pos < 0:
        raise einval("negative offset", field="offset")
    total = _check_iov(iov)
    if _is_direct(file):
        n = await iomap_dio_rw(task, file.inode, iov, pos, False, gup=gup, foll=foll)
    else:
        data = await _kernel(task).vfs.read_inode(file.inode, pos, total, task)
        n = 0
        for base, ln in iov:
            if n >= len(data):
                break
            chunk = data[n : n + ln]
            await write_user(task, base, chunk, user=False)  # copy_to_user: kernel mode
            n += len(chunk)
    if offset is None:
        file.f_pos = pos + n
    return n


async def vfs_pwritev(
    task: Task,
    fd: int,
    iov: IoVec,
    offset: int | None = None,
    *,
    gup: str | None = None,
    foll: str | None = None,
) -> int:
    """pwritev2() / pwrite64() / write(2) from user memory (offset None: at f_pos or EOF)."""
    from vkernel.kernel.fs import O_APPEND

    file = _file(task, fd, True)
    if offset is None:
        pos = file.inode.size if file.f_flags & O_APPEND else file.f_pos
    else:
        if offset < 0:
            raise einval("negative offset", field="offset")
        pos = offset
    _check_iov(iov)
    if _is_direct(file):
        n = await iomap_dio_rw(task, file.inode, iov, pos, True, gup=gup, foll=foll)
    else:
        data = b"".join([await read_user_bytes(task, b, ln, user=False) for b, ln in iov if ln])
        n = await _kernel(task).vfs.write_inode(file.inode, pos, data, task)
    if offset is None:
        file.f_pos = pos + n
    return n
