"""Block devices: RAM- and host-file-backed, with a latency model, a queue depth and fault
injection (block/blk-core.c submit_bio, drivers/block/brd.c, drivers/block/loop.c, null_blk).

A device is an array of 4 KiB blocks. Every bio waits for a slot (at most ``qd`` bios in
flight, the rest queue in FIFO order, like a request queue's tags), then for its service time
(``fixed + per_kib * KiB + U(0, jitter)``, slept with ``anyio.sleep`` so other work runs), then
moves its data. A bio touching a bad sector range fails whole with EIO, as a real bio does.
File-backed devices move large transfers in a worker thread (``anyio.to_thread``).

Device spec syntax (``--device`` and ``VKERNEL_DEVICE``)::

    NAME=ram:SIZE[,OPT…]           e.g. ram0=ram:256M
    NAME=file:PATH:SIZE[,OPT…]     e.g. disk0=file:/var/lib/vk/disk0.img:1G,latency=2ms+10us/KiB
    OPT: latency=FIXED[+PER/KiB]   service time, units ns/us/ms/s (default 0)
         jitter=TIME               uniform extra delay in [0, TIME)
         qd=N                      queue depth, bios in flight (default 32)
         dax=1                     RAM device whose storage is a range of physical frames
         eio=SECTOR+COUNT[/…]      sectors (512 B) that fail with EIO from boot
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from vkernel.kernel.errors import KernelError, einval

if TYPE_CHECKING:
    from vkernel.kernel.physmem import PhysMem

BLOCK_SHIFT = 12
BLOCK_SIZE = 1 << BLOCK_SHIFT
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE
REQ_OP_READ = 0
REQ_OP_WRITE = 1
THREAD_THRESHOLD = 64 << 10
"""File-backed transfers above this many bytes run in a worker thread."""
IOV_MAX = 1024
DEFAULT_QD = 32

U8Array = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]

_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ns|us|µs|ms|s)?\s*$")
_TIME_DIV = {"ns": 1e9, "us": 1e6, "µs": 1e6, "ms": 1e3, "s": 1.0, None: 1e3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


def parse_time(text: str) -> float:
    """``2ms``, ``10us``, ``0.5ms``, ``1s`` → seconds (a bare number is milliseconds)."""
    m = _TIME_RE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 2ms or 10us)")
    return float(m.group(1)) / _TIME_DIV[m.group(2)]


def _parse_size(text: str) -> int:
    """``64K``, ``256M``, ``1G`` → bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 256M)")
    return int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]


def _fmt_time(sec: float) -> str:
    """Seconds as the shortest of ms/us with no trailing zeros."""
    if sec == 0:
        return "0"
    if sec >= 1e-3:
        return f"{sec * 1e3:g}ms"
    return f"{sec * 1e6:g}us"


@dataclass(frozen=True)
class LatencyModel:
    """A device's service time: fixed + per KiB, plus uniform jitter (null_blk completion_nsec)."""

    fixed: float = 0.0
    """Seconds per request."""
    per_kib: float = 0.0
    """Seconds per KiB transferred."""
    jitter: float = 0.0
    """Upper bound of a uniform extra delay, seconds."""

    @classmethod
    def parse(cls, latency: str | None, jitter: str | None = None) -> LatencyModel:
        """``2ms+10us/KiB`` (either part optional) and a jitter like ``0.5ms``."""
        fixed = per_kib = 0.0
        if latency:
            for part in latency.split("+"):
                part = part.strip()
                if part.lower().endswith("/kib"):
                    per_kib += parse_time(part[: -len("/kib")])
                else:
                    fixed += parse_time(part)
        jit = parse_time(jitter) if jitter else 0.0
        if fixed < 0 or per_kib < 0 or jit < 0:
            raise ValueError("latencies must be >= 0")
        return cls(fixed, per_kib, jit)

    def delay(self, nbytes: int, rng: random.Random) -> float:
        """The service time of one request of ``nbytes``."""
        d = self.fixed + self.per_kib * (nbytes / 1024)
        if self.jitter:
            d += rng.uniform(0.0, self.jitter)
        return d

    def __str__(self) -> str:
        s = _fmt_time(self.fixed)
        if self.per_kib:
            s += f"+{_fmt_time(self.per_kib)}/KiB"
        if self.jitter:
            s += f" jitter {_fmt_time(self.jitter)}"
        return s


@dataclass(frozen=True)
class DeviceSpec:
    """One ``--device`` option, parsed."""

    name: str
    kind: str
    """``ram`` or ``file``."""
    size: int
    path: str = ""
    latency: LatencyModel = field(default_factory=LatencyModel)
    qd: int = DEFAULT_QD
    dax: bool = False
    bad_sectors: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """Parse ``NAME=ram:SIZE[,opts]`` or ``NAME=file:PATH:SIZE[,opts]`` (see module doc)."""
        name, sep, rest = text.strip().partition("=")
        name = name.strip()
        if not sep or not _NAME_RE.match(name):
            raise ValueError(f"device spec must start with NAME= (letters, digits, _-): {text!r}")
        head, *opts = rest.split(",")
        kind, _, body = head.partition(":")
        kind = kind.strip()
        path = ""
        if kind == "ram":
            size_text = body
        elif kind == "file":
            path, colon, size_text = body.rpartition(":")
            if not colon or not path:
                raise ValueError(f"file device needs file:PATH:SIZE: {text!r}")
            if not os.path.isabs(path):
                raise ValueError(f"file device path must be absolute: {path!r}")
        else:
            raise ValueError(f"device kind must be ram or file: {text!r}")
        size = _parse_size(size_text)
        if size < 64 * BLOCK_SIZE or size % BLOCK_SIZE:
            raise ValueError(f"device {name}: size must be a multiple of 4 KiB, at least 256 KiB")
        kv: dict[str, str] = {}
        for opt in opts:
            if not opt.strip():
                continue
            k, eq, v = opt.partition("=")
            k = k.strip().lower()
            if not eq or k not in ("latency", "jitter", "qd", "dax", "eio"):
                raise ValueError(f"device {name}: unknown option {opt!r}")
            kv[k] = v.strip()
        latency = LatencyModel.parse(kv.get("latency"), kv.get("jitter"))
        qd = int(kv.get("qd", DEFAULT_QD))
        if not 1 <= qd <= 4096:
            raise ValueError(f"device {name}: qd must be 1..4096")
        dax = kv.get("dax", "0") in ("1", "true", "yes", "on")
        if dax and kind != "ram":
            raise ValueError(f"device {name}: dax=1 needs a RAM device")
        bad: list[tuple[int, int]] = []
        for r in filter(None, kv.get("eio", "").split("/")):
            s, plus, c = r.partition("+")
            bad.append((int(s), int(c) if plus else 1))
        return cls(name, kind, size, path, latency, qd, dax, tuple(bad))


@dataclass
class DeviceStats:
    """Per-device I/O counters (/sys/block/*/stat: reads, sectors, ios in flight)."""

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0
    flushes: int = 0
    inflight: int = 0
    queued: int = 0


class BlockDevice:
    """struct block_device + gendisk + its request queue: a bio-level interface to storage."""

    kind = "none"

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.size = spec.size
        self.nblocks = spec.size >> BLOCK_SHIFT
        self.latency = spec.latency
        self.qd = spec.qd
        self.dax = spec.dax
        self.stats = DeviceStats()
        self.bad_ranges: list[tuple[int, int]] = []
        self._rng = random.Random(zlib.crc32(spec.name.encode()))  # reproducible jitter
        self._sem: asyncio.Semaphore | None = None
        self.closed = False
        self.set_bad_ranges(spec.bad_sectors)

    # ---- fault injection ------------------------------------------------------------------

    def set_bad_ranges(self, ranges: Sequence[tuple[int, int]], add: bool = False) -> None:
        """Replace (or extend) the sectors that fail with EIO (dm-flakey / null_blk badblocks)."""
        total = self.size >> SECTOR_SHIFT
        new = list(self.bad_ranges) if add else []
        for start, count in ranges:
            if start < 0 or count <= 0 or start + count > total:
                raise einval(
                    f"bad range {start}+{count} outside device {self.name} ({total} sectors)",
                    field="ranges",
                )
            new.append((int(start), int(count)))
        self.bad_ranges = sorted(new)

    def _check_bad(self, offset: int, nbytes: int) -> bool:
        """Whether [offset, offset+nbytes) touches a bad sector."""
        s0 = offset >> SECTOR_SHIFT
        s1 = (offset + nbytes + SECTOR_SIZE - 1) >> SECTOR_SHIFT
        return any(s < s1 and s0 < s + c for s, c in self.bad_ranges)

    # ---- the bio path ---------------------------------------------------------------------

    def _check(self, block: int, n: int) -> None:
        """bio_check_eod(): the range must lie on the device."""
        if block < 0 or n < 0 or block + n > self.nblocks:
            raise KernelError(errno.EIO, f"{self.name}: access beyond end of device")
        if self.closed:
            raise KernelError(errno.EIO, f"{self.name}: device closed")

    async def _service(self, op: int, offset: int, nbytes: int) -> None:
        """Queue for a tag, then wait the service time; EIO on a bad range (blk_mq_submit_bio)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.qd)
        st = self.stats
        st.queued += 1
        try:
            await self._sem.acquire()
        finally:
            st.queued -= 1
        st.inflight += 1
        try:
            delay = self.latency.delay(nbytes, self._rng)
            if delay > 0:
                await anyio.sleep(delay)
        finally:
            st.inflight -= 1
            self._sem.release()
        if self._check_bad(offset, nbytes):
            st.errors += 1
            raise KernelError(errno.EIO, f"{self.name}: I/O error at sector {offset >> 9}")
        if op == REQ_OP_READ:
            st.reads += 1
            st.read_bytes += nbytes
        else:
            st.writes += 1
            st.write_bytes += nbytes

    async def submit_bio(
        self, op: int, block: int, mem: PhysMem | None, pfns: IntArray | None, buf: U8Array | None
    ) -> None:
        """submit_bio_wait(): move ``n`` blocks between the device and frames or a buffer.

        Exactly one of ``pfns`` (physical frames, one per block) and ``buf`` (an (n, 4096)
        uint8 array) is given. Raises EIO if any sector of the range is bad.
        """
        n = len(pfns) if pfns is not None else (len(buf) if buf is not None else 0)
        self._check(block, n)
        if n == 0:
            return
        await self._service(op, block << BLOCK_SHIFT, n << BLOCK_SHIFT)
        self._check(block, n)
        await self._transfer(op, block, mem, pfns, buf)

    async def _transfer(
        self, op: int, block: int, mem: PhysMem | None, pfns: IntArray | None, buf: U8Array | None
    ) -> None:
        """Move the data (driver specific)."""
        raise NotImplementedError

    # ---- inline completion (brd: the bio is done when submit_bio returns) ------------------

    def completes_inline(self) -> bool:
        """Whether a bio submitted now completes in the submitter's context (brd_submit_bio):
        no service time, nothing queued for a tag, the device open. Drivers with a real
        queue (loop, latency) never do."""
        return False

    def submit_bios_inline(
        self, op: int, blocks: IntArray, mem: PhysMem, pfns: IntArray, starts: IntArray
    ) -> npt.NDArray[np.bool_]:
        """A plugged batch of bios (blk_finish_plug → brd_submit_bio each), done synchronously.

        Bio ``i`` covers the contiguous device blocks ``blocks[starts[i]:starts[i+1]]`` (the
        last one runs to the end; ``blocks`` ascending, as a plug sorts them) and the frames
        ``pfns`` of the same slots. Every bio is
        checked (end of device, bad sectors: EIO fails it whole and moves nothing) and
        accounted; the data of all the good ones moves in one vectorised copy. Returns a
        per-bio "failed" mask. Only valid while :meth:`completes_inline` is true."""
        raise NotImplementedError

    async def flush(self) -> None:
        """REQ_PREFLUSH: make acknowledged writes durable (blkdev_issue_flush)."""
        self.stats.flushes += 1

    def close(self) -> None:
        """blkdev_put() of the last opener: release host resources."""
        self.closed = True

    # ---- raw access for metadata (no latency, no fault injection) -------------------------

    def read_raw(self, block: int, n: int) -> U8Array:
        """Synchronous read of ``n`` blocks (mount-time superblock read)."""
        raise NotImplementedError

    def write_raw(self, block: int, data: U8Array) -> None:
        """Synchronous write of whole blocks (metadata commit)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.name} {self.kind} {self.size >> 20} MiB latency={self.latency} qd={self.qd}"


class RamDevice(BlockDevice):
    """brd: storage in memory. With ``dax`` the storage is a set of physical frames (pmem)."""

    kind = "ram"

    def __init__(self, spec: DeviceSpec, mem: PhysMem | None = None) -> None:
        super().__init__(spec)
        self.mem = mem
        self.pfns: IntArray | None = None
        self._store: U8Array | None = None
        if spec.dax:
            if mem is None:
                raise einval("a dax device needs physical memory", field="device")
            from vkernel.kernel.uapi import PG_reserved, PG_uptodate

            pfns = mem.alloc_pages_bulk(self.nblocks, movable=False)
            if pfns is None:
                raise KernelError(errno.ENOMEM, f"no memory for dax device {self.name}")
            mem.flags[pfns] |= np.uint32(PG_reserved | PG_uptodate)
            self.pfns = pfns
        else:
            self._store = np.zeros((self.nblocks, BLOCK_SIZE), dtype=np.uint8)

    def block_pfns(self, block: int, n: int) -> IntArray:
        """The frames holding blocks [block, block+n) of a dax device (dax_direct_access)."""
        assert self.pfns is not None
        return self.pfns[block : block + n]

    def _rows(self, block: int, n: int) -> U8Array:
        """A copy of blocks [block, block+n)."""
        if self._store is not None:
            return self._store[block : block + n]
        assert self.mem is not None
        assert self.pfns is not None
        return self.mem.frames[self.pfns[block : block + n]]

    def _put_rows(self, block: int, data: U8Array) -> None:
        """Store whole blocks."""
        if self._store is not None:
            self._store[block : block + len(data)] = data
        else:
            assert self.mem is not None
            assert self.pfns is not None
            self.mem.frames[self.pfns[block : block + len(data)]] = data

    async def _transfer(
        self, op: int, block: int, mem: PhysMem | None, pfns: IntArray | None, buf: U8Array | None
    ) -> None:
        """brd_do_bvec(): a memcpy."""
        if op == REQ_OP_READ:
            n = len(pfns) if pfns is not None else len(buf)  # type: ignore[arg-type]
            rows = self._rows(block, n)
            if pfns is not None:
                assert mem is not None
                mem.frames[pfns] = rows
            else:
                assert buf is not None
                buf[...] = rows
        elif pfns is not None:
            assert mem is not None
            self._put_rows(block, mem.frames[pfns])
        else:
            assert buf is not None
            self._put_rows(block, buf)

    def completes_inline(self) -> bool:
        """brd has no queue: with no modelled service time a bio is done in submit_bio()."""
        lat = self.latency
        return (
            not self.closed
            and not (lat.fixed or lat.per_kib or lat.jitter)
            and not self.stats.queued
            and (self._sem is None or not self._sem.locked())
        )

    def submit_bios_inline(
        self, op: int, blocks: IntArray, mem: PhysMem, pfns: IntArray, starts: IntArray
    ) -> npt.NDArray[np.bool_]:
        """brd_submit_bio() for a plugged batch: one fancy-indexed copy for every good bio."""
        nb = len(starts)
        failed = np.zeros(nb, dtype=np.bool_)
        if not nb:
            return failed
        lo, hi = int(blocks[0]), int(blocks[-1])  # ascending
        self._check(lo, 0)  # a closed device fails the whole batch (EIO)
        if lo < 0 or hi >= self.nblocks:  # bio_check_eod(), per bio
            ends = np.append(starts[1:], len(blocks))
            for i in range(nb):
                b = blocks[int(starts[i]) : int(ends[i])]
                failed[i] = bool((b < 0).any() or (b >= self.nblocks).any())
        if self.bad_ranges:
            sizes = np.diff(np.append(starts, len(blocks)))
            first = blocks[starts]
            for s, c in self.bad_ranges:  # null_blk badblocks: the whole bio fails
                b0 = s >> (BLOCK_SHIFT - SECTOR_SHIFT)
                b1 = (s + c - 1) >> (BLOCK_SHIFT - SECTOR_SHIFT)
                failed |= (first <= b1) & (first + sizes > b0)
        st = self.stats
        nfail = int(failed.sum())
        good_blocks = blocks
        good_pfns = pfns
        if nfail:
            st.errors += nfail
            per_slot = np.repeat(failed, np.diff(np.append(starts, len(blocks))))
            good_blocks = blocks[~per_slot]
            good_pfns = pfns[~per_slot]
        nbytes = len(good_blocks) << BLOCK_SHIFT
        run = nb == 1 and not nfail  # one contiguous bio: its rows are a slice, no gather
        if op == REQ_OP_READ:
            st.reads += nb - nfail
            st.read_bytes += nbytes
            rows = self._rows(lo, len(blocks)) if run else self._rows_at(good_blocks)
            mem.frames[good_pfns] = rows
        else:
            st.writes += nb - nfail
            st.write_bytes += nbytes
            if run:
                self._put_rows(lo, mem.frames[good_pfns])
            else:
                self._put_rows_at(good_blocks, mem.frames[good_pfns])
        return failed

    def _rows_at(self, blocks: IntArray) -> U8Array:
        """Blocks at arbitrary indices (a gather)."""
        if self._store is not None:
            return self._store[blocks]
        assert self.mem is not None
        assert self.pfns is not None
        return self.mem.frames[self.pfns[blocks]]

    def _put_rows_at(self, blocks: IntArray, data: U8Array) -> None:
        """Store whole blocks at arbitrary indices (a scatter)."""
        if self._store is not None:
            self._store[blocks] = data
        else:
            assert self.mem is not None
            assert self.pfns is not None
            self.mem.frames[self.pfns[blocks]] = data

    def read_raw(self, block: int, n: int) -> U8Array:
        """Synchronous read of ``n`` blocks."""
        self._check(block, n)
        return np.array(self._rows(block, n), dtype=np.uint8)

    def write_raw(self, block: int, data: U8Array) -> None:
        """Synchronous write of whole blocks."""
        self._check(block, len(data))
        self._put_rows(block, data)

    def close(self) -> None:
        """Free the dax frames back to the allocator."""
        if not self.closed and self.pfns is not None and self.mem is not None:
            from vkernel.kernel.uapi import PG_reserved

            self.mem.flags[self.pfns] &= ~np.uint32(PG_reserved)
            self.mem.refcount[self.pfns] = 1
            self.mem.put_folios(self.pfns)
            self.pfns = None
        self._store = None
        super().close()


class FileDevice(BlockDevice):
    """loop: storage in a host file (the host file persists across daemon restarts)."""

    kind = "file"

    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__(spec)
        self.path = spec.path
        try:
            os.makedirs(os.path.dirname(spec.path) or "/", exist_ok=True)
            self.fd = os.open(spec.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self.fd).st_size < spec.size:
                os.ftruncate(self.fd, spec.size)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"device {spec.name}: {spec.path}: {e}") from e

    def _io(self, op: int, block: int, views: list[memoryview]) -> None:
        """preadv/pwritev of whole blocks, IOV_MAX at a time (lo_rw_aio)."""
        off = block << BLOCK_SHIFT
        for i in range(0, len(views), IOV_MAX):
            part = views[i : i + IOV_MAX]
            want = len(part) << BLOCK_SHIFT
            done = (
                os.preadv(self.fd, part, off)
                if op == REQ_OP_READ
                else os.pwritev(self.fd, part, off)
            )
            if done != want:
                if op == REQ_OP_READ:
                    # Short read past the host file's end: the rest reads as zeros.
                    flat = list(part)
                    skip = done
                    for v in flat:
                        if skip >= len(v):
                            skip -= len(v)
                            continue
                        v[skip:] = bytes(len(v) - skip)
                        skip = 0
                else:
                    raise OSError(errno.EIO, "short write")
            off += want

    def _views(
        self, mem: PhysMem | None, pfns: IntArray | None, buf: U8Array | None
    ) -> list[memoryview]:
        """One 4 KiB memoryview per block."""
        if pfns is not None:
            assert mem is not None
            mv = mem.mv
            return [mv[p << BLOCK_SHIFT : (p + 1) << BLOCK_SHIFT] for p in pfns.tolist()]
        assert buf is not None
        if not buf.flags.c_contiguous:
            raise einval("bio buffer must be contiguous", field="buf")
        flat = buf.reshape(-1).data
        return [flat[i << BLOCK_SHIFT : (i + 1) << BLOCK_SHIFT] for i in range(len(buf))]

    async def _transfer(
        self, op: int, block: int, mem: PhysMem | None, pfns: IntArray | None, buf: U8Array | None
    ) -> None:
        """lo_rw_aio(): host preadv/pwritev, in a worker thread when large."""
        views = self._views(mem, pfns, buf)
        try:
            if len(views) << BLOCK_SHIFT > THREAD_THRESHOLD:
                await anyio.to_thread.run_sync(self._io, op, block, views)
            else:
                self._io(op, block, views)
        except OSError as e:
            self.stats.errors += 1
            raise KernelError(errno.EIO, f"{self.name}: host I/O error: {e}") from e

    async def flush(self) -> None:
        """REQ_PREFLUSH on a loop device: fdatasync the host file (in a worker thread)."""
        await super().flush()
        if not self.closed:
            await anyio.to_thread.run_sync(os.fdatasync, self.fd)

    def flush_sync(self) -> None:
        """fdatasync without the event loop (shutdown)."""
        if not self.closed:
            os.fdatasync(self.fd)

    def read_raw(self, block: int, n: int) -> U8Array:
        """Synchronous read of ``n`` blocks."""
        self._check(block, n)
        buf = np.zeros((n, BLOCK_SIZE), dtype=np.uint8)
        self._io(REQ_OP_READ, block, self._views(None, None, buf))
        return buf

    def write_raw(self, block: int, data: U8Array) -> None:
        """Synchronous write of whole blocks."""
        self._check(block, len(data))
        self._io(REQ_OP_WRITE, block, self._views(None, None, np.ascontiguousarray(data)))

    def close(self) -> None:
        """Close the host file (after a final fdatasync)."""
        if not self.closed:
            try:
                os.fdatasync(self.fd)
            finally:
                os.close(self.fd)
        super().close()


def open_device(spec: DeviceSpec, mem: PhysMem | None) -> BlockDevice:
    """add_disk(): instantiate the driver for ``spec``."""
    if spec.kind == "ram":
        return RamDevice(spec, mem)
    if spec.kind == "file":
        return FileDevice(spec)
    raise einval(f"unknown device kind {spec.kind!r}", field="device")
