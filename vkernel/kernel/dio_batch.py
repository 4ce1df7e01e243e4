"""Batched O_DIRECT for io_submit(): many iocbs, one pass (fs/aio.c ``io_submit_one`` × N under
a block plug, each an ``iomap_dio_rw``; A.14).

:func:`dio_prep` is the synchronous front of ``iomap_dio_rw`` for one iocb (fd, FMODE, offset,
O_DIRECT alignment EINVAL, EOF clamp). :func:`iomap_dio_submit` then runs a whole submission:

- coherence (``kiocb_write_and_wait`` / ``kiocb_invalidate_pages``) only for files that have
  cached pages or dirty ones -- a file read only with O_DIRECT skips it with two dict checks;
- extraction (``iov_iter_extract_user_pages``): the buffers of all iocbs, sorted by address,
  are merged into runs of adjacent pages and each run pinned with one ``pin_user_pages_fast``
  (``get_user_pages_fast`` for FOLL_GET, the ``*_unlocked`` slow GUP under mmap_lock with the
  seed-000 switch) -- reads and writes apart, since only reads pin with FOLL_WRITE. A run that
  comes up short keeps what it pinned for the segments it covered; the segments it did not
  reach are pinned by their own calls, so each iocb sees exactly the prefix a call of its own
  would have pinned (a short prefix is transferred and counted, nothing pinned is EFAULT);
- bios (``bio_iov_iter_get_pages`` + ``blk_mq`` plug merging): per file and direction, the
  page-aligned iocbs' file pages are mapped to device blocks in one gather, sorted, and cut
  into bios of contiguous blocks -- bios of different iocbs merge when their blocks touch
  (``blk_attempt_plug_merge``);
- a zero-latency RAM device completes the plug inline (``brd_submit_bio``): one fancy-indexed
  copy between its storage and the frames for all good bios; other devices get one task per
  bio and every iocb completes as soon as its last bio did;
- completion (``iomap_dio_complete`` / ``__bio_release_pages``): the pins of every iocb
  completing together are dropped in one ``unpin_user_pages_dirty_lock`` (dirtying for reads)
  or one ``put_page`` batch (FOLL_GET); a failed bio fails its iocbs with EIO, a failed
  merged bio is resubmitted as each iocb's own bios first (only the iocbs on the bad sectors
  fail); iocbs whose buffers or offset are only sector-aligned go through
  :func:`vkernel.kernel.dio._bounce`.

Every bio is waited for even when the submitter is cancelled: a frame is never released under
DMA.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from vkernel.kernel import dio
from vkernel.kernel.blockdev import REQ_OP_READ, REQ_OP_WRITE, SECTOR_SIZE, BlockDevice
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.fs import KIND_DISK, O_DIRECT
from vkernel.kernel.gup import _put_pages, unpin_user_pages_dirty_lock
from vkernel.kernel.uapi import FOLL_GET, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from vkernel.kernel.fdtable import File
    from vkernel.kernel.fs import Inode
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.physmem import PhysMem
    from vkernel.kernel.task import Task

_PMASK = PAGE_SIZE - 1
MAX_MERGED_PAGES = 1024
"""Pages per merged request (max_sectors_kb = 4 MiB)."""


@dataclass(slots=True, eq=False)
class _Seg:
    """One iovec's page span (a bio_vec run): pinned into ``pages[slot : slot + got]``."""

    start: int  # page-aligned user address
    n: int  # pages spanned
    off: int  # offset in the first page
    ln: int  # bytes
    wm: bool  # FOLL_WRITE (the device writes memory: a read)
    slot: int = 0
    got: int = 0  # pages pinned, or -errno


@dataclass(slots=True, eq=False)
class DioReq:
    """One iocb's direct I/O inside a submission (struct iomap_dio)."""

    idx: int
    ino: Inode
    pos: int
    write: bool
    count: int
    size: int
    segs: list[_Seg]
    cov: list[tuple[int, int, int]]  # (slot, off, bytes) moved
    res: int = 0
    left: int = 0  # bios (or bounce tasks) still in flight
    failed: bool = False
    done: bool = False
    ahead: bool = False  # issued ahead of a sleeping GUP (iomap_dio_submit's head)


FdCache = dict[int, tuple["File", bool, bool, "Inode | None", int]]
"""fdget() results over one io_submit: file, readable, writable, the inode if it takes
direct I/O (O_DIRECT on a disk file), its logical block size."""


def _fd_entry(task: Task, fd: int) -> tuple[File, bool, bool, Inode | None, int]:
    """fdget() and what the iocbs on this fd need of it."""
    file = dio._kernel(task).vfs.fget(task, fd)
    ino = file.inode
    direct = bool(file.f_flags & O_DIRECT) and ino.kind == KIND_DISK
    lbs = dio.logical_block_size(ino) if direct else SECTOR_SIZE
    return file, file.readable, file.writable, ino if direct else None, lbs


def dio_prep(
    task: Task,
    fd: int,
    iov: dio.IoVec,
    pos: int,
    write: bool,
    idx: int,
    files: FdCache | None = None,
) -> DioReq | int:
    """The synchronous front of iomap_dio_rw() for one iocb: a request, or its final result
    (0 for an empty or past-EOF read). Raises KernelError (EBADF, EINVAL …); returns -1 when
    the fd is not O_DIRECT on a disk file (the caller takes the buffered path). ``files``
    caches fdget() over one io_submit (the fd table cannot change under it)."""
    ent = files.get(fd) if files is not None else None
    if ent is None:
        ent = _fd_entry(task, fd)
        if files is not None:
            files[fd] = ent
    _, readable, writable, ino, lbs = ent
    if not (writable if write else readable):
        what = "writing" if write else "reading"
        raise KernelError(errno.EBADF, f"fd {fd} is not open for {what}", fd=fd)
    if pos < 0:
        raise einval("negative offset", field="offset")
    one = len(iov) == 1
    if one:  # the common iocb: one buffer; the generic checks only to raise
        base, total = iov[0]
        if total < 0 or base < 0 or total > 0x7FFFF000:
            dio._check_iov(iov)
        if ino is None:
            return -1
        if (pos | base | total) & (lbs - 1):
            dio._check_alignment(pos, iov, lbs)
    else:
        total = dio._check_iov(iov)
        if ino is None:
            return -1
        dio._check_alignment(pos, iov, lbs)
    if total == 0:
        return 0
    size = ino.size
    wm = not write
    if wm:
        if pos >= size:
            return 0
        clamp = -(-(size - pos) // lbs) * lbs
        if total > clamp:
            total = clamp
            iov = dio._clip(iov, total)
            one = len(iov) == 1
    if one:
        base, ln = iov[0]
        off = base & _PMASK
        seg = _Seg(base - off, (off + ln + _PMASK) >> PAGE_SHIFT, off, ln, wm)
        return DioReq(idx, ino, pos, write, total, size, [seg], [])
    segs = [
        _Seg(b - (b & _PMASK), ((b & _PMASK) + ln + _PMASK) >> PAGE_SHIFT, b & _PMASK, ln, wm)
        for b, ln in iov
        if ln
    ]
    return DioReq(idx, ino, pos, write, total, size, segs, [])


async def _coherence(reqs: list[DioReq]) -> None:
    """kiocb_write_and_wait() (+ invalidate for writes), only where the file has cached or
    dirty pages: a file used only with O_DIRECT costs two dict checks."""
    for r in reqs:
        m = r.ino.mapping
        assert m is not None
        if m.pages or m.dirty_time:
            first = r.pos >> PAGE_SHIFT
            last = (r.pos + r.count + _PMASK) >> PAGE_SHIFT
            try:
                await dio._coherence_before(r.ino, r.write, first, last)
            except KernelError as e:  # a writeback error fails this iocb (before any pin)
                r.res, r.done = -e.errno, True


_start = attrgetter("start")


def _layout(segs: list[_Seg]) -> tuple[int, list[tuple[int, int, int, bool, list[_Seg]]]]:
    """The extraction plan (iov_iter_extract_user_pages() over all iocbs): slots in address
    order per FOLL_WRITE class; runs (start, pages, slot, wm, segs) of adjacent spans, each
    pinned with one call."""
    runs: list[tuple[int, int, int, bool, list[_Seg]]] = []
    slot = 0
    for wm in (True, False):
        group = [s for s in segs if s.wm is wm]
        group.sort(key=_start)
        cur: list[_Seg] = []
        rstart = rslot = end = 0
        for s in group:
            if cur and s.start != end:
                runs.append((rstart, (end - rstart) >> PAGE_SHIFT, rslot, wm, cur))
                cur = []
            if not cur:
                rstart, rslot = s.start, slot
            s.slot = slot
            slot += s.n
            end = s.start + (s.n << PAGE_SHIFT)
            cur.append(s)
        if cur:
            runs.append((rstart, (end - rstart) >> PAGE_SHIFT, rslot, wm, cur))
    return slot, runs


def _mark_prefix(segs: list[_Seg], slot: int, got: int) -> None:
    """A run's ``got`` pinned pages, as each of its segments' share (what _release frees)."""
    for s in segs:
        rel = s.slot - slot
        s.got = s.n if rel + s.n <= got else max(got - rel, 0)


def _first_short(reqs: list[DioReq]) -> int:
    """The position of the first live iocb with a segment not pinned whole (-1: none)."""
    for i, r in enumerate(reqs):
        if not r.done and any(s.got < s.n for s in r.segs):
            return i
    return -1


async def _pin_all(
    kernel: Kernel,
    task: Task,
    reqs: list[DioReq],
    gup: str,
    foll: str,
    go_ahead: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """iov_iter_extract_user_pages() for the whole submission; ``_Seg.got`` set for each.

    With ``go_ahead`` under GUP-fast, every run's lockless walk goes first; when one leaves
    pages for the slow path in an iocb that is not the first, the iocbs before it (pinned
    whole) are marked ``ahead`` and handed to ``go_ahead(first, pages)`` before the slow path
    may sleep."""
    total, runs = _layout([s for r in reqs if not r.done for s in r.segs])
    pages = np.full(max(total, 1), -1, dtype=np.int64)
    try:
        rets: list[int | None] = [None] * len(runs)
        if go_ahead is not None and gup == "fast":
            if task.mm is None:
                raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
            fast = [
                dio._grab_pages_lockless(task, start, n, wm, foll, pages[slot : slot + n])
                for start, n, slot, wm, _ in runs
            ]
            if any(sp >= 0 for _, sp, _ in fast):
                for (_, _, slot, _, segs), (ret, _, _) in zip(runs, fast, strict=True):
                    _mark_prefix(segs, slot, max(ret, 0))
                first = _first_short(reqs)
                if first > 0:
                    for r in reqs[:first]:
                        r.ahead = True
                    go_ahead(first, pages)
            for i, ((_, n, slot, wm, _), (ret, sp, nr)) in enumerate(zip(runs, fast, strict=True)):
                if sp >= 0:  # the slow path, in address order: the submitter may sleep here
                    ret = await dio._grab_pages_slow(
                        task, sp, nr, ret, wm, foll, pages[slot : slot + n]
                    )
                rets[i] = ret
        for i, (start, n, slot, wm, segs) in enumerate(runs):
            if task.mm is None:
                raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
            done = rets[i]
            if done is None:
                done = await dio._grab_pages(task, start, n, wm, gup, foll, pages[slot : slot + n])
            ret = done
            if ret == n:  # the common case: the whole run
                for s in segs:
                    s.got = s.n
                continue
            got = max(ret, 0)
            for s in segs:
                rel = s.slot - slot
                if rel + s.n <= got:
                    s.got = s.n  # (an ``ahead`` iocb's segments are always here: pinned whole)
                elif rel < got:
                    s.got = got - rel  # the short prefix a call of its own would pin
                else:  # not reached: its own call (a bad page before it says nothing of it)
                    s.got = await dio._grab_pages(
                        task, s.start, s.n, wm, gup, foll, pages[s.slot : s.slot + s.n]
                    )
    except BaseException:
        for r in reqs:
            if not r.ahead:  # the head releases its own pins as its bios end
                _release(kernel, [r], pages, foll)
        raise
    return pages


def _settle(r: DioReq) -> bool:
    """bio_iov_iter_get_pages()'s accounting: the iocb moves what was pinned up to its first
    short segment (EFAULT if none); False when it is already finished."""
    for s in r.segs:
        if s.got < 0:
            if not r.cov:
                r.res, r.done = s.got, True
            break
        covered = min(s.ln, s.got * PAGE_SIZE - s.off) if s.got else 0
        if covered > 0:
            r.cov.append((s.slot, s.off, covered))
        if s.got < s.n:
            break
    if not r.done and not r.cov:
        r.res, r.done = -errno.EFAULT, True
    r.count = sum(c[2] for c in r.cov)  # ≤ count: the iov was clipped to it
    return not r.done


def _release(kernel: Kernel, reqs: list[DioReq], pages: np.ndarray, foll: str) -> None:
    """__bio_release_pages() of iocbs completing together: one unpin (or put) per dirtiness.
    A read that moved data dirties the pages it moved into; pages pinned past its first short
    segment are released clean."""
    dirty: list[int] = []  # batch slots
    clean: list[int] = []
    for r in reqs:
        moved = not r.write and r.res > 0
        segs = r.segs
        if len(segs) == 1:  # the common iocb: every pinned page moved, or none did
            sg = segs[0]
            if sg.got > 0:
                whole = moved and sg.got == sg.n and r.cov[0][2] == sg.ln
                if whole or not moved:
                    out = dirty if moved else clean
                    if sg.got == 1:
                        out.append(sg.slot)
                    else:
                        out.extend(range(sg.slot, sg.slot + sg.got))
                    sg.got = 0  # released: a second release is a no-op
                    continue
        used = {sl: (off + ln + _PMASK) >> PAGE_SHIFT for sl, off, ln in r.cov} if moved else {}
        for sg in segs:
            if sg.got > 0:
                k = min(sg.got, used.get(sg.slot, 0))
                dirty.extend(range(sg.slot, sg.slot + k))
                clean.extend(range(sg.slot + k, sg.slot + sg.got))
                sg.got = 0
    for slots, mark in ((dirty, True), (clean, False)):
        if not slots:
            continue
        arr = pages[np.asarray(slots, dtype=np.int64)]
        if foll == "pin":
            unpin_user_pages_dirty_lock(kernel, arr, len(arr), mark)
        else:
            _put_pages(kernel, arr, len(arr), FOLL_GET, mark)


def _plan_write(r: DioReq) -> bool:
    """Block allocation for a write (write_begin): a full device makes it short, or ENOSPC
    (False: finished)."""
    first = r.pos >> PAGE_SHIFT
    nblk = ((r.pos + r.count + _PMASK) >> PAGE_SHIFT) - first
    have = r.ino.prepare_blocks(first, nblk)
    if have < nblk:
        count = min(r.count, have * PAGE_SIZE - (r.pos & _PMASK)) if have else 0
        count -= count % dio.logical_block_size(r.ino)
        if count <= 0:
            r.res, r.done = -errno.ENOSPC, True
            return False
        r.count = count
    return True


def _clip_cov(r: DioReq) -> None:
    """iov_iter_truncate(): the moved bytes cut to the (possibly shortened) count."""
    left = r.count
    out: list[tuple[int, int, int]] = []
    for slot, off, ln in r.cov:
        if left <= 0:
            break
        out.append((slot, off, min(ln, left)))
        left -= ln
    r.cov = out
    r.count = sum(c[2] for c in out)


@dataclass(slots=True, eq=False)
class _Plug:
    """struct blk_plug for one (device, op, file): the aligned iocbs' file pages and the
    batch slots of their frames, page by page (Python ints: one gather each at the flush)."""

    bdev: BlockDevice
    op: int
    ino: Inode
    fidx: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # request index per page


def _issue(
    kernel: Kernel,
    reqs: list[DioReq],
    pages: np.ndarray,
    foll: str,
    complete: Callable[[list[DioReq]], None],
    tasks: _BioTasks,
) -> list[DioReq]:
    """iomap_dio_bio_iter() for each iocb, under one plug: settle each iocb's bytes, complete
    the failed ones, plug the aligned ones and flush the plugs (inline on brd, else bio tasks
    into ``tasks``), start the bounced ones; the iocbs still live."""
    live: list[DioReq] = []
    for r in reqs:
        if r.done:
            continue
        segs = r.segs
        if len(segs) == 1 and segs[0].got == segs[0].n:  # the common iocb, wholly pinned
            sg = segs[0]
            r.cov = [(sg.slot, sg.off, sg.ln)]
        elif not _settle(r):
            continue
        if r.write:
            if not _plan_write(r):
                continue
            _clip_cov(r)
        live.append(r)
    early = [r for r in reqs if r.done]
    if early:
        _finish(kernel, early, pages, foll)
        complete(early)
    plugs: dict[tuple[int, int], _Plug] = {}
    plug: _Plug | None = None
    bounce: list[DioReq] = []
    mem = kernel.mem
    for i, r in enumerate(live):
        cov = r.cov
        if len(cov) == 1:
            aligned = not (r.pos | r.count | cov[0][1] | cov[0][2]) & _PMASK
        else:
            aligned = not (r.pos | r.count) & _PMASK and all(
                off == 0 and not ln & _PMASK for _, off, ln in cov
            )
        if not aligned:
            bounce.append(r)
            continue
        ino = r.ino
        bdev = ino.bdev
        assert bdev is not None
        first = r.pos >> PAGE_SHIFT
        npg = r.count >> PAGE_SHIFT
        op = REQ_OP_WRITE if r.write else REQ_OP_READ
        if plug is None or plug.ino is not ino or plug.op != op:
            key = (id(ino), op)
            plug = plugs.get(key)
            if plug is None:
                plug = plugs[key] = _Plug(bdev, op, ino)
        if npg == 1:
            plug.fidx.append(first)
            plug.slots.append(r.cov[0][0])
            plug.owners.append(i)
            continue
        plug.fidx.extend(range(first, first + npg))
        for s0, _, n in r.cov:
            plug.slots.extend(range(s0, s0 + (n >> PAGE_SHIFT)))
        plug.owners.extend([i] * npg)
    for plug in plugs.values():
        _flush_plug(mem, plug, pages, live, tasks)
    for r in bounce:
        r.left += 1
        t = asyncio.ensure_future(_bounce_one(kernel, r, pages))
        tasks[t] = ([r], None)
    return live


async def iomap_dio_submit(
    task: Task,
    reqs: list[DioReq],
    gup: str,
    foll: str,
    complete: Callable[[list[DioReq]], None],
) -> None:
    """iomap_dio_rw() for every prepared iocb of an io_submit(); ``complete`` gets each group
    of requests as it finishes (``res`` set).

    io_submit() runs io_submit_one() iocb by iocb: under GUP-fast, when an iocb's pages need
    the slow path (which may sleep: a fault on disk, a userfaultfd), the iocbs before it are
    already submitted and the plug is flushed as the submitter sleeps, so they go ahead (the
    ``head``) while the sleeper and the iocbs after it wait, as the blocked io_submit() would.
    """
    kernel = dio._kernel(task)
    await _coherence(reqs)
    head: list[asyncio.Task[None]] = []

    def go_ahead(first: int, pages: np.ndarray) -> None:
        head.append(
            asyncio.ensure_future(_issue_and_wait(kernel, reqs[:first], pages, foll, complete))
        )

    rest = reqs
    try:
        pages = await _pin_all(kernel, task, reqs, gup, foll, go_ahead if len(reqs) > 1 else None)
        if head:
            rest = [r for r in reqs if not r.ahead]
        await _issue_and_wait(kernel, rest, pages, foll, complete)
    finally:
        if head:  # never leave the head's bios (and pins) behind
            await asyncio.gather(*head, return_exceptions=True)


async def _issue_and_wait(
    kernel: Kernel,
    reqs: list[DioReq],
    pages: np.ndarray,
    foll: str,
    complete: Callable[[list[DioReq]], None],
) -> None:
    """submit_bio() for the pinned iocbs, then their completions (and unpins) as bios end."""
    tasks: _BioTasks = {}
    try:
        live = _issue(kernel, reqs, pages, foll, complete, tasks)
    except BaseException:
        # Not expected (a bug, a device gone mid-plug): still never unpin under DMA.
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        _finish(kernel, [r for r in reqs if not r.done], pages, foll)
        raise
    ready = [r for r in live if r.left == 0]  # done inline, or failed before any bio
    await _wait_bios(kernel, tasks, ready, pages, foll, complete)


def _flush_plug(
    mem: PhysMem,
    plug: _Plug,
    pages: np.ndarray,
    live: list[DioReq],
    tasks: _BioTasks,
) -> None:
    """blk_finish_plug(): holes read as zeroes, the rest sorted by block and cut into bios
    (merged across iocbs where blocks touch); inline on brd, else one task per bio."""
    fidx = np.asarray(plug.fidx, dtype=np.int64)
    bmap = plug.ino.blocks  # bmap() of every page at once; past the map: holes
    n = len(fidx)
    if len(bmap) and int(fidx.max()) < len(bmap):
        blocks = bmap[fidx]
    else:
        inside = fidx < len(bmap)
        blocks = np.full(n, -1, dtype=np.int64)
        blocks[inside] = bmap[fidx[inside]]
    pfns = pages[np.asarray(plug.slots, dtype=np.int64)]
    owners = np.asarray(plug.owners, dtype=np.int64)
    step = np.diff(blocks)
    if n > 1 and (step == 1).all() and blocks[0] >= 0:
        starts = _cut_run(n)  # the sequential case: already one sorted run, no holes
    else:
        holes = blocks < 0
        if holes.any():
            if plug.op == REQ_OP_READ:
                mem.frames[pfns[holes]] = 0  # a hole reads as zeroes
            keep = ~holes
            blocks, pfns, owners = blocks[keep], pfns[keep], owners[keep]
        if not len(blocks):
            return
        if len(blocks) > 1 and (np.diff(blocks) < 0).any():
            order = np.argsort(blocks, kind="stable")
            blocks, pfns, owners = blocks[order], pfns[order], owners[order]
        starts = _cut(blocks)
    bdev = plug.bdev
    ends = np.append(starts[1:], len(blocks))
    if bdev.completes_inline():
        failed = _inline(bdev, plug.op, blocks, mem, pfns, starts)
        for i in np.flatnonzero(failed).tolist():
            s, e = int(starts[i]), int(ends[i])
            who = np.unique(owners[s:e])
            if len(who) == 1:
                live[int(who[0])].failed = True
                continue
            for o in who.tolist():  # a failed merged request: each iocb's bios on their own
                m = owners[s:e] == o
                b = blocks[s:e][m]
                if _inline(bdev, plug.op, b, mem, pfns[s:e][m], _cut(b)).any():
                    live[o].failed = True
        return
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        rs = [live[o] for o in np.unique(owners[s:e]).tolist()]
        _submit(mem, bdev, plug.op, blocks[s:e], pfns[s:e], owners[s:e], rs, tasks)


def _cut_run(n: int) -> np.ndarray:
    """Request starts of one contiguous run of ``n`` blocks, split at max_sectors
    (bio_split_rw)."""
    return np.arange(0, n, MAX_MERGED_PAGES, dtype=np.int64)


def _cut(blocks: np.ndarray) -> np.ndarray:
    """Request starts over sorted blocks (plug merging + bio_split_rw): a new one where blocks
    stop being contiguous, and every MAX_MERGED_PAGES."""
    if len(blocks) <= 1:
        return np.zeros(len(blocks), dtype=np.int64)
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], cut)).astype(np.int64)
    sizes = np.diff(np.append(starts, len(blocks)))
    if (sizes > MAX_MERGED_PAGES).any():
        starts = np.concatenate(
            [np.arange(s, s + z, MAX_MERGED_PAGES) for s, z in zip(starts, sizes, strict=True)]
        )
    return starts


def _inline(
    bdev: BlockDevice,
    op: int,
    blocks: np.ndarray,
    mem: PhysMem,
    pfns: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """brd: the plug's bios done in place; the failed-bio mask (all, if the device went away)."""
    try:
        return bdev.submit_bios_inline(op, blocks, mem, pfns, starts)
    except KernelError:
        return np.ones(len(starts), dtype=np.bool_)


_BioTasks = dict[asyncio.Future[None], tuple[list["DioReq"], tuple[np.ndarray, ...] | None]]


def _submit(
    mem: PhysMem,
    bdev: BlockDevice,
    op: int,
    blocks: np.ndarray,
    pfns: np.ndarray,
    owners: np.ndarray,
    own: list[DioReq],
    tasks: _BioTasks,
) -> asyncio.Future[None]:
    """submit_bio() of one (possibly merged) bio in its own task; a merged one keeps what is
    needed to resubmit its iocbs' parts on their own should it fail (``own`` is in the order
    of ``np.unique(owners)``)."""
    for r in own:
        r.left += 1
    t = asyncio.ensure_future(bdev.submit_bio(op, int(blocks[0]), mem, pfns, None))
    tasks[t] = (own, (blocks, pfns, owners) if len(own) > 1 else None)
    return t


async def _bounce_one(kernel: Kernel, r: DioReq, pages: np.ndarray) -> None:
    """A sector-aligned iocb through whole-block bounce buffers (dio._bounce)."""
    first = r.pos >> PAGE_SHIFT
    nblk = ((r.pos + r.count + _PMASK) >> PAGE_SHIFT) - first
    blocks = r.ino.bmap_range(first, nblk)
    err = await dio._bounce(kernel, r.ino, pages, r.cov, r.pos, r.count, blocks, r.write)
    if err is not None:
        raise err


async def _wait_bios(
    kernel: Kernel,
    tasks: _BioTasks,
    ready: list[DioReq],
    pages: np.ndarray,
    foll: str,
    complete: Callable[[list[DioReq]], None],
) -> None:
    """iomap_dio_bio_end_io() for each bio: an iocb completes when its last bio did. A failed
    merged bio is resubmitted as each iocb's own bios (the block layer fails bios, not
    neighbours). A cancelled submitter keeps waiting (no frame is released under DMA) and is
    told once everything completed."""
    cancelled = False
    pending = set(tasks)
    mem = kernel.mem
    while True:
        if ready:
            try:
                await _complete_ready(kernel, ready, pages, foll, complete)
            except asyncio.CancelledError:  # their pins are gone; the caller posts ECANCELED
                cancelled = True
        if not pending:
            break
        try:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
            continue
        ready = []
        for t in done:
            err = None if t.cancelled() else t.exception()
            own, merged = tasks.pop(t)
            if err is not None and merged is not None:
                blocks, pfns, owners = merged
                bdev = own[0].ino.bdev
                assert bdev is not None
                op = REQ_OP_WRITE if own[0].write else REQ_OP_READ
                for idx, r in zip(np.unique(owners).tolist(), own, strict=True):
                    m = owners == idx
                    b, p = blocks[m], pfns[m]
                    starts = _cut(b)
                    ends = np.append(starts[1:], len(b))
                    for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
                        pending.add(_submit(mem, bdev, op, b[s0:e0], p[s0:e0], m[:0], [r], tasks))
                    r.left -= 1
                continue
            for r in own:
                if err is not None:
                    r.failed = True
                    if isinstance(err, KernelError) and err.errno != errno.EIO:
                        r.res = -err.errno
                r.left -= 1
                if r.left == 0:
                    ready.append(r)
    if cancelled:
        raise asyncio.CancelledError


async def _complete_ready(
    kernel: Kernel,
    ready: list[DioReq],
    pages: np.ndarray,
    foll: str,
    complete: Callable[[list[DioReq]], None],
) -> None:
    """iomap_dio_complete() of iocbs whose bios are all done: results, one batched unpin, then
    the write's post-I/O invalidation and i_size/mtime update."""
    if not ready:
        return
    nreads = 0
    writes: list[DioReq] = []
    for r in ready:
        r.done = True
        if r.failed:
            r.res = r.res if r.res < 0 else -errno.EIO
        elif r.write:
            r.res = r.count
            writes.append(r)
        else:
            r.res = min(r.count, r.size - r.pos)
            nreads += 1
    _release(kernel, ready, pages, foll)
    st = dio._stats(kernel)
    st.reads += nreads
    for r in writes:
        st.writes += 1
        ino = r.ino
        m = ino.mapping
        if m is not None and m.pages:  # kiocb_invalidate_post_direct_write()
            first = r.pos >> PAGE_SHIFT
            await dio._invalidate(ino, first, (r.pos + r.count + _PMASK) >> PAGE_SHIFT)
        if r.pos + r.res > ino.size:
            ino.size = r.pos + r.res
            if ino.sb is not None:
                ino.sb.mark_dirty()
        ino.mtime = time.time()
    complete(ready)


def _finish(kernel: Kernel, reqs: list[DioReq], pages: np.ndarray, foll: str) -> None:
    """iomap_dio_complete() of iocbs that failed before any bio: mark done, release pins."""
    for r in reqs:
        r.done = True
    _release(kernel, reqs, pages, foll)


# ---- the struct-of-arrays path (io_uring's SQ/CQ arrays) --------------------------------------


def _intra(counts: np.ndarray, total: int) -> np.ndarray:
    """For runs of ``counts`` items laid end to end: each item's index inside its run."""
    starts = np.cumsum(counts) - counts
    out: np.ndarray = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
    return out


GoAhead = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
"""``go_ahead(idx, pages, slot)``: iocbs ``idx`` (the caller's order) are wholly pinned in
``pages`` at ``slot`` and go now, before a GUP that may sleep."""


async def _pin_array(
    task: Task,
    addr: np.ndarray,
    npg: np.ndarray,
    one: bool,
    wm: bool,
    gup: str,
    foll: str,
    go_ahead: GoAhead | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """iov_iter_extract_user_pages() for one-buffer iocbs given as arrays: buffers sorted by
    address and merged into runs of adjacent pages, one GUP call per run; a short run keeps
    its prefix and the buffers it did not reach get their own call (as :func:`_pin_all`).
    ``one``: every buffer is one page. Returns (pages, slot, got) with slot/got per iocb in
    the caller's order.

    With ``go_ahead`` under GUP-fast, every run's lockless walk goes first; when one leaves
    pages to the slow path (a fault, a userfaultfd: it may sleep), the iocbs before the first
    one not wholly pinned (in the caller's order) are handed to ``go_ahead`` and their slots
    in ``pages`` set to -1 (theirs now), as io_submit() has issued them by then and the plug
    is flushed as the submitter sleeps."""
    m = len(addr)
    order = np.argsort(addr, kind="stable")
    sa = addr[order]
    if one:
        sn = npg
        sslot = np.arange(m, dtype=np.int64)
        total = m
        ends = sa + PAGE_SIZE
    else:
        sn = npg[order]
        sslot = np.cumsum(sn) - sn
        total = int(sslot[-1] + sn[-1])
        ends = sa + (sn << PAGE_SHIFT)
    brk = np.flatnonzero(sa[1:] != ends[:-1]) + 1
    pages = np.full(total, -1, dtype=np.int64)
    slots = np.empty(m, dtype=np.int64)  # each iocb's first slot, in the caller's order
    slots[order] = sslot
    rstarts = [0, *brk.tolist()]
    rends = [*brk.tolist(), m]
    if task.mm is None:
        raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
    rets: list[int] | None = None
    if go_ahead is not None and gup == "fast":
        rets = await _pin_runs_ahead(
            task, sa, sn, sslot, order, slots, npg, rstarts, rends, wm, foll, pages, go_ahead
        )
    elif not len(brk):  # the common case: the buffers tile one range, one call
        ret = await dio._grab_pages(task, int(sa[0]), total, wm, gup, foll, pages)
        if ret == total:
            return pages, slots, npg.copy()
        rets = [ret]
    sgot = sn.copy()
    pinned: list[tuple[int, int]] = []  # (slot, pages) held, released on an exception
    try:
        for ri, (rs, re) in enumerate(zip(rstarts, rends, strict=True)):
            slot = int(sslot[rs])
            n = int(sslot[re - 1] + sn[re - 1]) - slot
            if rets is not None:  # the run's call, made above
                ret = rets[ri]
            else:
                if task.mm is None:
                    raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
                view = pages[slot : slot + n]
                ret = await dio._grab_pages(task, int(sa[rs]), n, wm, gup, foll, view)
            if ret == n:  # the whole run
                pinned.append((slot, n))
                continue
            got = max(ret, 0)
            pinned.append((slot, got))
            for j in range(rs, re):
                rel = int(sslot[j]) - slot
                k = int(sn[j])
                if rel + k <= got:
                    continue
                if rel < got:
                    sgot[j] = got - rel  # the short prefix a call of its own would pin
                    continue
                s0 = int(sslot[j])  # not reached: its own call
                r = await dio._grab_pages(task, int(sa[j]), k, wm, gup, foll, pages[s0 : s0 + k])
                sgot[j] = r
                if r > 0:
                    pinned.append((s0, r))
    except BaseException:
        held = [pages[s : s + c] for s, c in pinned if c > 0]
        if held:
            arr = np.concatenate(held)
            arr = arr[arr >= 0]  # not what went ahead: those are released by their bios
            dio._release_pages(dio._kernel(task), arr, len(arr), foll, False)
        raise
    gotv = np.empty(m, dtype=np.int64)
    gotv[order] = sgot
    return pages, slots, gotv


async def _pin_runs_ahead(
    task: Task,
    sa: np.ndarray,
    sn: np.ndarray,
    sslot: np.ndarray,
    order: np.ndarray,
    slots: np.ndarray,
    npg: np.ndarray,
    rstarts: list[int],
    rends: list[int],
    wm: bool,
    foll: str,
    pages: np.ndarray,
    go_ahead: GoAhead,
) -> list[int]:
    """_pin_array()'s runs under GUP-fast with the head going ahead: every run's lockless
    walk, then (only if one left pages to the slow path) ``go_ahead`` for the wholly pinned
    iocbs before the first that is not, then the slow paths. Each run's result, in order."""
    rets: list[int] = []
    slow: list[tuple[int, int, int, int]] = []  # (run, start, pages, pinned so far)
    for ri, (rs, re) in enumerate(zip(rstarts, rends, strict=True)):
        slot = int(sslot[rs])
        n = int(sslot[re - 1] + sn[re - 1]) - slot
        ret, start, _ = dio._grab_pages_lockless(
            task, int(sa[rs]), n, wm, foll, pages[slot : slot + n]
        )
        rets.append(ret)
        if start >= 0:
            slow.append((ri, int(sa[rs]), n, ret))
    if not slow:
        return rets
    # Which iocbs the lockless walks pinned whole, in the caller's order: the head before
    # the first that is not goes now.
    run_of = np.repeat(np.arange(len(rstarts)), np.diff([*rstarts, len(sa)]))
    run_slot = sslot[np.asarray(rstarts)][run_of]
    rel_end = sslot - run_slot + sn
    whole_sorted = rel_end <= np.maximum(np.asarray(rets, dtype=np.int64), 0)[run_of]
    whole = np.empty(len(sa), dtype=np.bool_)
    whole[order] = whole_sorted
    k = len(whole) if whole.all() else int(np.argmin(whole))
    if k:
        head = np.arange(k, dtype=np.int64)
        go_ahead(head, pages, slots)
        pages[_slot_positions(slots[head], npg[head], int(npg[head].sum()))] = -1
    for ri, start, n, got in slow:
        slot = int(sslot[rstarts[ri]])
        if task.mm is None:
            raise KernelError(errno.ESRCH, f"process {task.pid} has exited")
        rets[ri] = await dio._grab_pages_slow(task, start, n, got, wm, foll, pages[slot : slot + n])
    return rets


async def _bios_async(
    mem: PhysMem,
    bdev: BlockDevice,
    op: int,
    blocks: np.ndarray,
    pfns: np.ndarray,
    owners: np.ndarray,
    starts: np.ndarray,
) -> tuple[np.ndarray, bool]:
    """submit_bio() of each cut bio in its own task when the device queues (not inline); a
    failed merged bio is resubmitted per iocb. Waits for all even if cancelled (no frame is
    released under DMA). Returns (owners whose bios failed, whether a cancel arrived)."""
    ends = np.append(starts[1:], len(blocks))
    tasks: dict[asyncio.Future[None], np.ndarray] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        bio: asyncio.Future[None] = asyncio.ensure_future(
            bdev.submit_bio(op, int(blocks[s]), mem, pfns[s:e], None)
        )
        tasks[bio] = np.arange(s, e)
    failed: list[int] = []
    cancelled = False
    pending: set[asyncio.Future[None]] = set(tasks)
    while pending:
        try:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
            continue
        for t in done:
            rows = tasks.pop(t)
            if t.cancelled() or t.exception() is None:
                continue
            who = np.unique(owners[rows])
            if len(who) == 1:
                failed.append(int(who[0]))
                continue
            for o in who.tolist():  # a failed merged request: each iocb's bios on their own
                sub = rows[owners[rows] == o]
                b = blocks[sub]
                cut = _cut(b)
                cend = np.append(cut[1:], len(b))
                for s0, e0 in zip(cut.tolist(), cend.tolist(), strict=True):
                    r = sub[s0:e0]
                    t2: asyncio.Future[None] = asyncio.ensure_future(
                        bdev.submit_bio(op, int(blocks[r[0]]), mem, pfns[r], None)
                    )
                    tasks[t2] = r
                    pending.add(t2)
    return np.asarray(failed, dtype=np.int64), cancelled


async def iomap_dio_submit_array(
    task: Task,
    ino: Inode,
    write: bool,
    addr: np.ndarray,
    length: np.ndarray,
    pos: np.ndarray,
    gup: str,
    foll: str,
    post_ahead: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, bool]:
    """iomap_dio_rw() for a batch of one-buffer, page-aligned iocbs on one file and direction,
    as arrays (the io_uring SQ array path): one GUP call per run of adjacent buffer pages, the
    file pages mapped and cut into merged bios in one gather, the copy inline on brd (bio
    tasks otherwise), one unpin per dirtiness. Every read starts below EOF, every write's
    blocks are allocated and the file has no cached pages (the caller checked). Returns (res
    per iocb, whether the submitter was cancelled while bios were in flight: the results are
    real, the caller re-raises after posting them).

    ``post_ahead(idx, res)`` (GUP-fast): when an iocb's GUP must take the slow path (it may
    sleep on a fault or a userfaultfd), the iocbs before it are done first, on their own, and
    their results handed to ``post_ahead`` as they complete, as io_submit() issues iocb by
    iocb and the plug goes out when the submitter sleeps; the returned ``res`` has them too."""
    m = len(addr)
    npg = length >> PAGE_SHIFT
    one = int(npg.max()) == 1  # page-aligned and non-empty: every npg ≥ 1
    ahead = np.zeros(m, dtype=np.bool_)
    heads: list[tuple[np.ndarray, asyncio.Future[tuple[np.ndarray, bool]]]] = []
    go_ahead: GoAhead | None = None
    if post_ahead is not None and m > 1:

        def go_ahead(idx: np.ndarray, pages: np.ndarray, slot: np.ndarray) -> None:
            ahead[idx] = True
            hp, hs = _subset_pages(pages, slot, npg, idx)

            async def head() -> tuple[np.ndarray, bool]:
                out = await _move_array(
                    task, ino, write, hp, hs, npg[idx], npg[idx], length[idx], pos[idx], one, foll
                )
                post_ahead(idx, out[0])
                return out

            heads.append((idx, asyncio.ensure_future(head())))

    try:
        pages, slot, got = await _pin_array(task, addr, npg, one, not write, gup, foll, go_ahead)
        if not ahead.any():
            return await _move_array(
                task, ino, write, pages, slot, npg, got, length, pos, one, foll
            )
        rest = np.flatnonzero(~ahead)
        res = np.zeros(m, dtype=np.int64)
        rp, rs = _subset_pages(pages, slot, npg, rest)
        res[rest], cancelled = await _move_array(
            task, ino, write, rp, rs, npg[rest], got[rest], length[rest], pos[rest], one, foll
        )
    finally:
        for _, h in heads:  # the head's bios and pins are its own: it always finishes
            await dio._wait_device(h)
    for idx, h in heads:
        res[idx], c = h.result()
        cancelled |= c
    return res, cancelled


def _subset_pages(
    pages: np.ndarray, slot: np.ndarray, npg: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pages of iocbs ``idx`` as a batch of their own (a copy) and their slots in it."""
    n = npg[idx]
    total = int(n.sum())
    sub: np.ndarray = pages[_slot_positions(slot[idx], n, total)]
    return sub, np.cumsum(n) - n


async def _move_array(
    task: Task,
    ino: Inode,
    write: bool,
    pages: np.ndarray,
    slot: np.ndarray,
    npg: np.ndarray,
    got: np.ndarray,
    length: np.ndarray,
    pos: np.ndarray,
    one: bool,
    foll: str,
) -> tuple[np.ndarray, bool]:
    """The bios, the unpin and the inode's bookkeeping of iocbs whose pages are pinned:
    (res per iocb, whether a cancel arrived while bios were in flight)."""
    kernel = dio._kernel(task)
    mem = kernel.mem
    bdev = ino.bdev
    assert bdev is not None
    m = len(slot)
    whole = bool((got == npg).all())
    if whole:  # every buffer wholly pinned: each iocb moves its length
        res = length.copy()
        mv = npg
        nmove = len(pages)
    else:  # bio_iov_iter_get_pages(): the pinned prefix; EFAULT (or GUP's errno) if none
        res = np.where(got >= npg, length, np.maximum(got, 0) << PAGE_SHIFT)
        res = np.where(got < 0, got, np.where(got == 0, -errno.EFAULT, res))
        mv = np.where(got > 0, np.minimum(got, npg), 0)
        nmove = int(mv.sum())
    cancelled = False
    try:
        if nmove:
            if one and whole:  # one page each, all pinned: no repeat
                fidx = pos >> PAGE_SHIFT
                slots = slot
                owners = np.arange(m, dtype=np.int64)
            else:
                intra = _intra(mv, nmove)
                fidx = np.repeat(pos >> PAGE_SHIFT, mv) + intra
                slots = np.repeat(slot, mv) + intra
                owners = np.repeat(np.arange(m, dtype=np.int64), mv)
            cancelled = await _dio_bios(mem, bdev, ino, write, fidx, pages[slots], owners, res)
    finally:
        _release_array(kernel, pages, slot, npg, got, res, whole, one, write, foll)
    ok = res > 0
    st = dio._stats(kernel)
    nok = int(np.count_nonzero(ok))
    if write:
        st.writes += nok
        if nok:
            m_ = ino.mapping
            if m_ is not None and m_.pages:  # kiocb_invalidate_post_direct_write()
                for p0, n0 in zip(pos[ok].tolist(), res[ok].tolist(), strict=True):
                    await dio._invalidate(ino, p0 >> PAGE_SHIFT, (p0 + n0 + _PMASK) >> PAGE_SHIFT)
            end = int((pos + res)[ok].max())
            if end > ino.size:
                ino.size = end
                if ino.sb is not None:
                    ino.sb.mark_dirty()
            ino.mtime = time.time()
    else:
        st.reads += nok
        size = ino.size
        if nok and int((pos + res).max()) > size:  # a read never returns bytes past i_size
            res = np.where(ok, np.minimum(res, size - pos), res)
    return res, cancelled


async def _dio_bios(
    mem: PhysMem,
    bdev: BlockDevice,
    ino: Inode,
    write: bool,
    fidx: np.ndarray,
    pfns: np.ndarray,
    owners: np.ndarray,
    res: np.ndarray,
) -> bool:
    """The bios of the batch (one per run of contiguous blocks, merged across iocbs): holes
    read as zeroes, inline on brd, bio tasks otherwise; the iocbs of failed bios get EIO in
    ``res``. Whether a cancel arrived while waiting for bio tasks."""
    bmap = ino.blocks
    if len(bmap) and int(fidx.max()) < len(bmap):
        blocks = bmap[fidx]
    else:
        inside = fidx < len(bmap)
        blocks = np.full(len(fidx), -1, dtype=np.int64)
        blocks[inside] = bmap[fidx[inside]]
    if int(blocks.min()) < 0:  # a read of a hole reads zeroes (writes were allocated)
        holes = blocks < 0
        mem.frames[pfns[holes]] = 0
        keep = ~holes
        blocks, pfns, owners = blocks[keep], pfns[keep], owners[keep]
        if not len(blocks):
            return False
    n = len(blocks)
    step = np.diff(blocks)
    if n > 1 and (step == 1).all():
        starts = _cut_run(n)  # already one sorted run
    else:
        if n > 1 and (step < 0).any():
            srt = np.argsort(blocks, kind="stable")
            blocks, pfns, owners = blocks[srt], pfns[srt], owners[srt]
        starts = _cut(blocks)
    op = REQ_OP_WRITE if write else REQ_OP_READ
    if bdev.completes_inline():
        bad = _inline(bdev, op, blocks, mem, pfns, starts)
        if bad.any():
            res[_inline_failed(bdev, op, blocks, mem, pfns, owners, starts, bad)] = -errno.EIO
        return False
    failed, cancelled = await _bios_async(mem, bdev, op, blocks, pfns, owners, starts)
    res[failed] = -errno.EIO
    return cancelled


def _release_array(
    kernel: Kernel,
    pages: np.ndarray,
    slot: np.ndarray,
    npg: np.ndarray,
    got: np.ndarray,
    res: np.ndarray,
    whole: bool,
    one: bool,
    write: bool,
    foll: str,
) -> None:
    """__bio_release_pages() of the batch: one unpin (or put) per dirtiness; reads that moved
    data dirty the pages they moved into (all they pinned: the prefix is whole pages)."""
    total = len(pages)
    if whole and (write or bool((res > 0).all())):  # the common case: one call, no masks
        dio._release_pages(kernel, pages, total, foll, not write)
        return
    m = len(slot)
    slot_owner = np.empty(total, dtype=np.int64)
    slot_owner[_slot_positions(slot, npg, total) if not one else slot] = np.repeat(
        np.arange(m, dtype=np.int64), npg
    )
    rel = np.arange(total, dtype=np.int64) - slot[slot_owner]
    held = rel < np.maximum(got, 0)[slot_owner]
    if write:
        dirty_slot = np.zeros(total, dtype=np.bool_)
    else:
        dirty_slot = held & (res > 0)[slot_owner]
    for mask, mark in ((dirty_slot, True), (held & ~dirty_slot, False)):
        if mask.any():
            arr = pages[mask]
            dio._release_pages(kernel, arr, len(arr), foll, mark)


def _slot_positions(slot: np.ndarray, npg: np.ndarray, total: int) -> np.ndarray:
    """Batch slots of every iocb's pages, iocb by iocb (slot[i] … slot[i]+npg[i]-1)."""
    if total == len(slot):
        return slot
    out: np.ndarray = np.repeat(slot, npg) + _intra(npg, total)
    return out


def _inline_failed(
    bdev: BlockDevice,
    op: int,
    blocks: np.ndarray,
    mem: PhysMem,
    pfns: np.ndarray,
    owners: np.ndarray,
    starts: np.ndarray,
    bad: np.ndarray,
) -> np.ndarray:
    """The iocbs a failed inline plug fails: a failed merged bio is redone as each iocb's
    own bios, so only the iocbs on the bad sectors get EIO."""
    ends = np.append(starts[1:], len(blocks))
    out: list[int] = []
    for i in np.flatnonzero(bad).tolist():
        s, e = int(starts[i]), int(ends[i])
        who = np.unique(owners[s:e])
        if len(who) == 1:
            out.append(int(who[0]))
            continue
        for o in who.tolist():
            msk = owners[s:e] == o
            b = blocks[s:e][msk]
            if _inline(bdev, op, b, mem, pfns[s:e][msk], _cut(b)).any():
                out.append(o)
    return np.asarray(out, dtype=np.int64)
