"""Files: a flat namespace of shmem, disk and dax files, and the file syscalls (fs/open.c,
fs/read_write.c, fs/namei.c, fs/sync.c, mm/shmem.c, fs/dax.c, fs/ext2-like block mapping).

Three kinds of file:

- ``shmem``: memory only (tmpfs, memfd). Its page cache is a
  :class:`~vkernel.kernel.vma.ShmemObject`, the very object behind MAP_SHARED|MAP_ANONYMOUS,
  so a mapping of it faults through ``do_shmem_fault``. Pages count as ``nr_shmem``.
- ``disk``: data on a block device through the page cache (:mod:`vkernel.kernel.pagecache`).
  Blocks are allocated at write time (ENOSPC there), written back on fsync or by the flusher.
- ``dax``: data in a dax RAM device's frames; reads and writes copy straight to them.

Each device carries its part of the namespace on disk (see :class:`SuperBlock` and
docs/files.md): two metadata slots at the start, written alternately with a generation
number and a CRC, after the data they describe (ordered mode). fsync of a file writes back
every dirty page of its device, flushes, commits the metadata and flushes again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from vkernel.kernel import pagecache
from vkernel.kernel.blockdev import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    REQ_OP_WRITE,
    BlockDevice,
    DeviceSpec,
    RamDevice,
    open_device,
)
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.fdtable import O_ACCMODE, O_RDONLY, O_RDWR, O_WRONLY, FdTable, File
from vkernel.kernel.pagecache import AddressSpace
from vkernel.kernel.uapi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_anon,
    PG_dirty,
    PG_lru,
    PG_shmem,
    PG_writeback,
)
from vkernel.kernel.vma import ShmemObject

if TYPE_CHECKING:
    from vkernel.kernel.kernel import Kernel
    from vkernel.kernel.task import Task
    from vkernel.kernel.vma import VMA

log = structlog.get_logger("vkernel.fs")

IntArray = npt.NDArray[np.int64]

# include/uapi/asm-generic/fcntl.h
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000
O_DIRECT = 0o40000
O_CLOEXEC = 0o2000000
O_SUPPORTED = O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_APPEND | O_DIRECT | O_CLOEXEC
# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

KIND_SHMEM = "shmem"
KIND_DISK = "disk"
KIND_DAX = "dax"
KINDS = (KIND_SHMEM, KIND_DISK, KIND_DAX)
NAME_MAX = 255
MAX_LFS_FILESIZE = 1 << 40
"""s_maxbytes of this filesystem: EFBIG beyond."""
DIRTY_EXPIRE = 3.0
"""vm.dirty_expire_centisecs, in seconds."""
DIRTY_WRITEBACK_INTERVAL = 0.5
"""vm.dirty_writeback_centisecs, in seconds."""

META_MAGIC = b"VKFS\x00\x01\x00\x00"
_META_HDR = struct.Struct("<8sQIIIQ")
"""magic, generation, payload length, crc32 of payload, slot blocks, device blocks."""

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "O_ACCMODE",
    "O_APPEND",
    "O_CLOEXEC",
    "O_CREAT",
    "O_DIRECT",
    "O_EXCL",
    "O_RDONLY",
    "O_RDWR",
    "O_TRUNC",
    "O_WRONLY",
]


def _pages(nbytes: int) -> int:
    """DIV_ROUND_UP(nbytes, PAGE_SIZE)."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def meta_slot_blocks(nblocks: int) -> int:
    """Blocks per metadata slot: 1/256 of the device, between 4 and 256 (1 MiB)."""
    return max(4, min(256, nblocks // 256))


class SuperBlock:
    """struct super_block of one device: block bitmap, metadata slots, the device's inodes."""

    def __init__(self, bdev: BlockDevice) -> None:
        self.bdev = bdev
        self.slot_blocks = meta_slot_blocks(bdev.nblocks)
        self.data_start = 2 * self.slot_blocks
        self.used = np.zeros(bdev.nblocks, dtype=bool)
        self.used[: self.data_start] = True
        self.pending_free: list[IntArray] = []
        """Blocks freed since the last commit: reusable only once it is durable."""
        self.generation = 0
        self.meta_dirty = False
        self.meta_dirty_since = 0.0
        self.inodes: set[Inode] = set()
        self.commit_lock = asyncio.Lock()
        self.commits = 0
        self._hint = self.data_start

    @property
    def free_blocks(self) -> int:
        """Blocks available for allocation now."""
        return int(np.count_nonzero(~self.used))

    def mark_dirty(self) -> None:
        """The namespace or a block map changed: a commit is due."""
        if not self.meta_dirty:
            self.meta_dirty = True
            self.meta_dirty_since = time.monotonic()

    def alloc(self, n: int) -> IntArray:
        """ext2_new_blocks(): up to ``n`` free blocks, contiguous from the last hint if possible."""
        free = np.flatnonzero(~self.used[self._hint :]) + self._hint
        if len(free) < n:
            free = np.concatenate([free, np.flatnonzero(~self.used[: self._hint])])
        got = free[:n].astype(np.int64)
        if len(got):
            self.used[got] = True
            self._hint = int(got[-1]) + 1
            if self._hint >= len(self.used):
                self._hint = self.data_start
            self.mark_dirty()
        return got

    def free(self, blocks: IntArray) -> None:
        """ext2_free_blocks(): released after the next commit (no reuse before it is durable)."""
        blocks = blocks[blocks >= 0]
        if len(blocks):
            self.pending_free.append(blocks.copy())
            self.mark_dirty()

    # ---- on-device metadata -----------------------------------------------------------------

    def _payload(self) -> bytes:
        """The namespace of this device as compressed JSON (names, kinds, sizes, extents)."""
        files = []
        for ino in sorted(self.inodes, key=lambda i: i.name):
            if ino.nlink == 0:
                continue
            files.append(
                {
                    "name": ino.name,
                    "kind": ino.kind,
                    "size": ino.size,
                    "mtime": ino.mtime,
                    "extents": _extents(ino.blocks),
                }
            )
        doc = {"device": self.bdev.name, "files": files}
        return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 6)

    def commit(self) -> None:
        """jbd2 commit: write the metadata to the older slot (the caller flushes around it)."""
        payload = self._payload()
        cap = self.slot_blocks * BLOCK_SIZE - _META_HDR.size
        if len(payload) > cap:
            raise KernelError(errno.ENOSPC, f"{self.bdev.name}: metadata slot full")
        gen = self.generation + 1
        hdr = _META_HDR.pack(
            META_MAGIC,
            gen,
            len(payload),
            _meta_crc(gen, self.slot_blocks, self.bdev.nblocks, payload),
            self.slot_blocks,
            self.bdev.nblocks,
        )
        raw = hdr + payload
        nblk = (len(raw) + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        buf = np.zeros(nblk * BLOCK_SIZE, dtype=np.uint8)
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        slot = ((gen + 1) % 2) * self.slot_blocks  # generation 1 goes to slot A
        self.bdev.write_raw(slot, buf.reshape(nblk, BLOCK_SIZE))
        self.generation = gen
        self.commits += 1

    def finish_commit(self) -> None:
        """After the commit is durable: freed blocks become allocatable."""
        for blocks in self.pending_free:
            self.used[blocks] = False
        self.pending_free.clear()

    def _read_slot(self, block: int) -> tuple[int, int, int, dict[str, Any]] | None:
        """The metadata slot at ``block`` if valid: (generation, slot blocks, device blocks, doc)."""
        try:
            head = self.bdev.read_raw(block, 1).tobytes()
            magic, gen, length, crc, sb, nb = _META_HDR.unpack_from(head)
            if magic != META_MAGIC or not 4 <= sb <= 256 or length > sb * BLOCK_SIZE:
                return None
            nblk = (length + _META_HDR.size + BLOCK_SIZE - 1) >> BLOCK_SHIFT
            raw = self.bdev.read_raw(block, nblk).tobytes()
            payload = raw[_META_HDR.size : _META_HDR.size + length]
            if _meta_crc(gen, sb, nb, payload) != crc:
                return None
            doc = json.loads(zlib.decompress(payload))
        except (KernelError, ValueError, zlib.error, struct.error):
            return None
        return gen, sb, nb, doc

    def load(self) -> list[dict[str, Any]]:
        """Mount: the newest valid metadata slot's files ([] for a fresh device).

        Slot A is always at block 0; slot B's place depends on the size the device was made
        with, so every possible place is probed: a device reopened with another size is
        refused (EINVAL) rather than reformatted over its data.
        """
        found = [self._read_slot(0)]
        found += [r for s in range(4, 257) if (r := self._read_slot(s)) is not None and r[1] == s]
        valid = [r for r in found if r is not None]
        if not valid:
            return []
        gen, sb, nb, doc = max(valid, key=lambda r: r[0])
        if sb != self.slot_blocks or nb != self.bdev.nblocks:
            raise KernelError(
                errno.EINVAL,
                f"device {self.bdev.name} holds a namespace for {nb} blocks,"
                f" not {self.bdev.nblocks}: use the size it was created with",
                device=self.bdev.name,
            )
        self.generation = gen
        files: list[dict[str, Any]] = doc.get("files", [])
        return files


def _meta_crc(gen: int, sb: int, nb: int, payload: bytes) -> int:
    """CRC32 of a slot's header fields and payload (a torn header fails it too)."""
    return zlib.crc32(struct.pack("<QIQ", gen, sb, nb) + payload)


def _extents(blocks: IntArray) -> list[list[int]]:
    """Run-length encode a block map: [file page, device block, count] per extent."""
    idx = np.flatnonzero(blocks >= 0)
    if not len(idx):
        return []
    b = blocks[idx]
    brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(b) != 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(idx)]])
    return [[int(idx[s]), int(b[s]), int(e - s)] for s, e in zip(starts, ends, strict=True)]


class Inode:
    """struct inode of one file (plus ext2_inode_info's block map for disk and dax files)."""

    def __init__(
        self, vfs: Vfs, ino: int, name: str, kind: str, sb: SuperBlock | None, size: int = 0
    ) -> None:
        self.vfs = vfs
        self.ino = ino
        self.name = name
        self.kind = kind
        self.sb = sb
        self.bdev: BlockDevice | None = sb.bdev if sb is not None and kind == KIND_DISK else None
        self.nlink = 1
        self.opens = 0
        self.mtime = time.time()
        self.blocks = np.full(0, -1, dtype=np.int64)
        """Page index → device block, -1 for a hole (disk and dax)."""
        self._size = size
        self.i_mmap: set[VMA] = set()
        """VMAs mapping a dax file (disk and shmem files keep theirs on the AddressSpace)."""
        self.i_mmap_locked = 0
        """i_mmap_rwsem readers: dax COW faults holding it (VM_FAULT_LOCKED without a page)."""
        self.mapping: AddressSpace | None = None
        if kind == KIND_SHMEM:
            obj = ShmemObject(vfs.mem, size)
            obj.get()  # the inode's own reference; VMAs of a mapping add theirs
            self.mapping = obj
        elif kind == KIND_DISK:
            self.mapping = AddressSpace(vfs.mem, size)
            self.mapping.host = self
            self.mapping.ra_pages = pagecache.DEFAULT_RA_PAGES if vfs.readahead else 0

    def __repr__(self) -> str:
        return f"Inode({self.ino} {self.name!r} {self.kind} size={self.size})"

    @property
    def size(self) -> int:
        """i_size."""
        return self.mapping.size if self.mapping is not None else self._size

    @size.setter
    def size(self, value: int) -> None:
        if self.mapping is not None:
            self.mapping.size = value
        else:
            self._size = value

    @property
    def device(self) -> str:
        """The name of the device holding the data ('' for shmem)."""
        return self.sb.bdev.name if self.sb is not None else ""

    def bmap_range(self, first: int, n: int) -> IntArray:
        """bmap(): device blocks of pages [first, first+n), -1 for holes."""
        out = np.full(n, -1, dtype=np.int64)
        have = self.blocks[first : first + n]
        out[: len(have)] = have
        return out

    def nr_blocks(self) -> int:
        """i_blocks in 4 KiB units."""
        if self.kind == KIND_SHMEM:
            assert self.mapping is not None
            return self.mapping.nrpages
        return int(np.count_nonzero(self.blocks >= 0))

    def _grow_map(self, npages: int) -> None:
        """Extend the block map to cover ``npages`` pages."""
        if len(self.blocks) < npages:
            grown = np.full(max(npages, 2 * len(self.blocks)), -1, dtype=np.int64)
            grown[: len(self.blocks)] = self.blocks
            self.blocks = grown

    def prepare_blocks(self, first: int, n: int) -> int:
        """write_begin()'s block allocation for pages [first, first+n): how many from ``first``
        now have a block (0 when the device is full). New dax blocks are zeroed."""
        if self.kind == KIND_SHMEM:
            return n
        assert self.sb is not None
        self._grow_map(first + n)
        cur = self.blocks[first : first + n]
        holes = np.flatnonzero(cur < 0)
        if len(holes):
            got = self.sb.alloc(len(holes))
            if len(got):
                self.blocks[first + holes[: len(got)]] = got
                if self.kind == KIND_DAX:
                    dev = self.sb.bdev
                    assert isinstance(dev, RamDevice)
                    self.vfs.mem.frames[dev.block_pfns(0, dev.nblocks)[got]] = 0
            if len(got) < len(holes):
                return int(holes[len(got)])
        return n

    def free_blocks_from(self, first: int, last: int | None = None) -> None:
        """Release the blocks of pages [first, last) (truncate, punch hole)."""
        if self.kind == KIND_SHMEM or self.sb is None:
            return
        sl = self.blocks[first:last]
        if len(sl):
            self.sb.free(sl[sl >= 0])
            sl[:] = -1


@dataclass(frozen=True)
class FileStat:
    """struct stat (the fields vkernel has), plus page-cache state."""

    name: str
    ino: int
    kind: str
    device: str
    size: int
    blocks: int
    """st_blocks: 512-byte units allocated."""
    nlink: int
    opens: int
    cached_pages: int
    dirty_pages: int
    mtime: float


class Vfs:
    """The flat namespace, the block devices with their superblocks, and the flusher."""

    def __init__(self, kernel: Kernel, readahead: bool = True) -> None:
        self.kernel = kernel
        self.mem = kernel.mem
        self.readahead = readahead
        self.names: dict[str, Inode] = {}
        self.orphans: set[Inode] = set()
        """Unlinked files still open (or still being truncated)."""
        self.devices: dict[str, BlockDevice] = {}
        self.supers: dict[str, SuperBlock] = {}
        self.default_device = ""
        self._ino = 1
        self._bg: set[asyncio.Task[None]] = set()
        self.dirty_expire = DIRTY_EXPIRE
        self.dirty_limit_pages = 0
        """vm.dirty_bytes in pages: above it a task dirtying pages through a shared mapping
        writes the file back itself (balance_dirty_pages); 0 = no limit."""
        self._register_vmstat()

    def _register_vmstat(self) -> None:
        """NR_FILE_PAGES, NR_FILE_DIRTY, NR_WRITEBACK as /proc/vmstat names them."""
        mem = self.mem
        vm = self.kernel.vmstat

        def count(want: int, mask: int) -> int:
            return int(np.count_nonzero((mem.flags & np.uint32(mask)) == np.uint32(want)))

        # Page-cache pages are on the LRU and not anonymous (shmem included, as in Linux);
        # shmem pages never count as dirty file pages (no writeback for them).
        vm.register_gauge("nr_file_pages", lambda: count(PG_lru, PG_lru | PG_anon))
        vm.register_gauge(
            "nr_dirty",
            lambda: count(PG_lru | PG_dirty, PG_lru | PG_dirty | PG_anon | PG_shmem),
        )
        vm.register_gauge("nr_writeback", lambda: count(PG_writeback, PG_writeback))

    # ---- devices ----------------------------------------------------------------------------

    def add_device(self, spec: DeviceSpec) -> BlockDevice:
        """add_disk() + mount: open the device, read its namespace, add its files."""
        if spec.name in self.devices:
            raise KernelError(errno.EEXIST, f"device {spec.name} exists", device=spec.name)
        bdev = open_device(spec, self.mem)
        sb = SuperBlock(bdev)
        try:
            files = sb.load()
        except KernelError:
            bdev.close()
            raise
        self.devices[spec.name] = bdev
        self.supers[spec.name] = sb
        if not self.default_device:
            self.default_device = spec.name
        for f in files:
            name = f.get("name", "")
            kind = f.get("kind", KIND_DISK)
            if name in self.names or kind not in (KIND_DISK, KIND_DAX) or not name:
                log.warning("fs_load_skipped", device=spec.name, file=name)
                continue
            if kind == KIND_DAX and not bdev.dax:
                continue
            ino = Inode(self, self._next_ino(), name, kind, sb, int(f.get("size", 0)))
            ino.mtime = float(f.get("mtime", time.time()))
            for fidx, blk, cnt in f.get("extents", []):
                ino._grow_map(fidx + cnt)
                blocks = np.arange(blk, blk + cnt, dtype=np.int64)
                ino.blocks[fidx : fidx + cnt] = blocks
                sb.used[blocks] = True
            sb.inodes.add(ino)
            self.names[name] = ino
        log.info("device_added", device=bdev.describe(), files=len(sb.inodes))
        return bdev

    def device(self, name: str) -> BlockDevice:
        """The device ``name`` or ENODEV."""
        bdev = self.devices.get(name)
        if bdev is None:
            raise KernelError(errno.ENODEV, f"no device {name!r}", device=name)
        return bdev

    def reserved_frames(self) -> IntArray:
        """Frames owned by dax devices (each holds one reference): the audit expects them."""
        parts = [
            d.pfns for d in self.devices.values() if isinstance(d, RamDevice) and d.pfns is not None
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def address_spaces(self) -> Iterator[AddressSpace]:
        """Every live page cache of a file (for the audit)."""
        for ino in (*self.names.values(), *self.orphans):
            if ino.mapping is not None:
                yield ino.mapping

    def iter_inodes(self) -> list[Inode]:
        """Files in name order, then unlinked-but-open ones."""
        return [self.names[k] for k in sorted(self.names)] + sorted(
            self.orphans, key=lambda i: i.ino
        )

    def _next_ino(self) -> int:
        self._ino += 1
        return self._ino

    # ---- namespace --------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        """getname() + the flat namespace's rules."""
        if not name:
            raise KernelError(errno.ENOENT, "empty file name")
        if len(name.encode()) > NAME_MAX:
            raise KernelError(errno.ENAMETOOLONG, "file name too long")
        if "/" in name or "\0" in name:
            raise einval("file names may not contain '/' or NUL", field="name")

    def lookup(self, name: str) -> Inode:
        """lookup_one(): the file or ENOENT."""
        self._check_name(name)
        ino = self.names.get(name)
        if ino is None:
            raise KernelError(errno.ENOENT, f"no file {name!r}", name=name)
        return ino

    def create(self, name: str, kind: str = KIND_DISK, device: str = "") -> Inode:
        """vfs_create(): a new empty file of ``kind`` (EEXIST if the name is taken)."""
        self._check_name(name)
        if name in self.names:
            raise KernelError(errno.EEXIST, f"file {name!r} exists", name=name)
        if kind not in KINDS:
            raise einval(f"unknown file kind {kind!r}", field="kind")
        sb: SuperBlock | None = None
        if kind != KIND_SHMEM:
            dev = device or self.default_device
            if not dev:
                raise KernelError(errno.ENODEV, "no block device configured")
            bdev = self.device(dev)
            if kind == KIND_DAX and not bdev.dax:
                raise KernelError(
                    errno.EOPNOTSUPP, f"device {dev} does not support dax", device=dev
                )
            sb = self.supers[dev]
        ino = Inode(self, self._next_ino(), name, kind, sb)
        self.names[name] = ino
        if sb is not None:
            sb.inodes.add(ino)
            sb.mark_dirty()
        return ino

    def unlink(self, name: str) -> None:
        """vfs_unlink(): drop the name; the data goes with the last open."""
        ino = self.lookup(name)
        del self.names[name]
        ino.nlink = 0
        if ino.sb is not None:
            ino.sb.mark_dirty()
        self.orphans.add(ino)
        if ino.opens == 0:
            self._evict(ino)

    def _evict(self, ino: Inode) -> None:
        """evict(): truncate the page cache, free the blocks, forget the inode."""
        if ino.kind == KIND_SHMEM:
            assert isinstance(ino.mapping, ShmemObject)
            ino.mapping.put()
            self._forget(ino)
            return
        mapping = ino.mapping
        if mapping is not None:
            busy = pagecache.truncate_inode_pages_sync(mapping, 0, 1 << 62)
            if busy or mapping.io:
                self._spawn(self._evict_async(ino))
                return
            mapping.release()
        ino.free_blocks_from(0)
        self._forget(ino)

    async def _evict_async(self, ino: Inode) -> None:
        """The sleeping part of eviction: wait for I/O on the pages, then drop them."""
        assert ino.mapping is not None
        await pagecache.wait_io(ino.mapping)
        await pagecache.truncate_inode_pages_range(ino.mapping, 0, 1 << 62)
        ino.mapping.release()
        ino.free_blocks_from(0)
        self._forget(ino)

    def _forget(self, ino: Inode) -> None:
        """Last step of eviction."""
        self.orphans.discard(ino)
        if ino.sb is not None:
            ino.sb.inodes.discard(ino)

    def _spawn(self, coro: Any) -> None:
        """Background kernel work (eviction) tracked until done."""
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def quiesce(self) -> None:
        """Wait for background evictions and read bios (tests and shutdown)."""
        while True:
            pending: list[asyncio.Future[None]] = list(self._bg)
            for ino in self.iter_inodes():
                if ino.mapping is not None:
                    pending.extend(ino.mapping.io)
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    # ---- open / close -----------------------------------------------------------------------

    def do_sys_open(
        self, task: Task, name: str, flags: int, kind: str = "", device: str = ""
    ) -> tuple[int, File]:
        """do_sys_openat2(): open (maybe create) ``name``; returns the descriptor and file."""
        files = self._files(task)
        if flags & ~O_SUPPORTED:
            raise einval(f"unsupported open flags {flags & ~O_SUPPORTED:#o}", field="flags")
        if flags & O_ACCMODE == O_ACCMODE:
            raise einval("O_ACCMODE 3 is not an access mode", field="flags")
        self._check_name(name)
        files.alloc_fd()  # EMFILE before any side effect
        ino = self.names.get(name)
        if ino is None:
            if not flags & O_CREAT:
                raise KernelError(errno.ENOENT, f"no file {name!r}", name=name)
            ino = self.create(name, kind or KIND_DISK, device)
        elif flags & O_CREAT and flags & O_EXCL:
            raise KernelError(errno.EEXIST, f"file {name!r} exists", name=name)
        elif kind and kind != ino.kind:
            raise einval(f"{name!r} is a {ino.kind} file, not {kind}", field="kind")
        if flags & O_DIRECT and ino.kind == KIND_SHMEM:
            raise einval("O_DIRECT is not supported on shmem files", field="flags")
        if flags & O_TRUNC and flags & O_ACCMODE != O_RDONLY and ino.size:
            self._truncate_now(ino, 0)
        file = File(ino, flags & ~(O_CREAT | O_EXCL | O_TRUNC), release=self._release)
        ino.opens += 1
        fd = files.install(file)
        return fd, file

    def _release(self, file: File) -> None:
        """__fput() → the file's release: last close of an unlinked file evicts it."""
        ino = file.inode
        ino.opens -= 1
        if ino.opens == 0 and ino.nlink == 0 and ino in self.orphans:
            self._evict(ino)

    @staticmethod
    def _files(task: Task) -> FdTable:
        """current->files (ESRCH once the task has exited)."""
        files = task.files
        if not isinstance(files, FdTable) or files.closed:
            raise KernelError(errno.ESRCH, f"process {task.pid} has exited", pid=task.pid)
        return files

    def fget(self, task: Task, fd: int) -> File:
        """fdget() on ``task``'s table."""
        return self._files(task).fget(fd)

    def close(self, task: Task, fd: int) -> None:
        """close(2)."""
        self._files(task).close_fd(fd)

    # ---- read / write -----------------------------------------------------------------------

    async def read(self, task: Task, fd: int, count: int, offset: int | None = None) -> bytes:
        """vfs_read() (offset None: read(2) at f_pos, advancing it) or pread64()."""
        file = self.fget(task, fd)
        if not file.readable:
            raise KernelError(errno.EBADF, f"fd {fd} is not open for reading", fd=fd)
        if count < 0:
            raise einval("negative count", field="count")
        pos = file.f_pos if offset is None else offset
        if pos < 0:
            raise einval("negative offset", field="offset")
        data = await self.read_inode(file.inode, pos, count, task)
        if offset is None:
            file.f_pos = pos + len(data)
        return data

    async def read_inode(self, ino: Inode, pos: int, count: int, task: Task | None) -> bytes:
        """file->f_op->read_iter(): filemap_read, shmem_file_read_iter or dax_iomap_rw."""
        if ino.kind == KIND_DAX:
            return self._dax_read(ino, pos, count)
        assert ino.mapping is not None
        return await pagecache.filemap_read(ino.mapping, pos, count, task)

    async def write(
        self, task: Task, fd: int, data: bytes | memoryview, offset: int | None = None
    ) -> int:
        """vfs_write() (offset None: write(2) at f_pos or the end for O_APPEND) or pwrite64()."""
        file = self.fget(task, fd)
        if not file.writable:
            raise KernelError(errno.EBADF, f"fd {fd} is not open for writing", fd=fd)
        if offset is None:
            pos = file.inode.size if file.f_flags & O_APPEND else file.f_pos
        else:
            if offset < 0:
                raise einval("negative offset", field="offset")
            pos = offset
        n = await self.write_inode(file.inode, pos, data, task)
        if offset is None:
            file.f_pos = pos + n
        return n

    async def write_inode(
        self, ino: Inode, pos: int, data: bytes | memoryview, task: Task | None
    ) -> int:
        """generic_file_write_iter() / shmem / dax_iomap_rw for writes (EFBIG past s_maxbytes)."""
        count = len(data)
        if count == 0:
            return 0
        if pos >= MAX_LFS_FILESIZE:
            raise KernelError(errno.EFBIG, "file too large")
        if pos + count > MAX_LFS_FILESIZE:
            data = memoryview(data)[: MAX_LFS_FILESIZE - pos]
        if ino.kind == KIND_DAX:
            n = self._dax_write(ino, pos, data)
        else:
            assert ino.mapping is not None
            old_size = ino.size
            n = await pagecache.generic_perform_write(
                ino.mapping, pos, data, task, ino.prepare_blocks
            )
            if ino.sb is not None and ino.size != old_size:
                ino.sb.mark_dirty()
        ino.mtime = time.time()
        return n

    # ---- dax (fs/dax.c) -------------------------------------------------------------------------

    def _dax_pfns(self, ino: Inode, first: int, n: int) -> tuple[IntArray, npt.NDArray[np.bool_]]:
        """dax_direct_access(): the device frames of pages [first, first+n) and a hole mask."""
        assert ino.sb is not None
        dev = ino.sb.bdev
        assert isinstance(dev, RamDevice)
        blocks = ino.bmap_range(first, n)
        holes = blocks < 0
        pfns = np.zeros(n, dtype=np.int64)
        pfns[~holes] = dev.block_pfns(0, dev.nblocks)[blocks[~holes]]
        return pfns, holes

    def _dax_read(self, ino: Inode, pos: int, count: int) -> bytes:
        """dax_iomap_rw() read: copy from the device frames (holes read as zeros)."""
        end = min(pos + count, ino.size)
        if pos >= end:
            return b""
        first = pos >> PAGE_SHIFT
        n = _pages(end) - first
        pfns, holes = self._dax_pfns(ino, first, n)
        buf = self.mem.frames[pfns]
        buf[holes] = 0
        off = pos - (first << PAGE_SHIFT)
        return buf.reshape(-1)[off : off + end - pos].tobytes()

    def _dax_write(self, ino: Inode, pos: int, data: bytes | memoryview) -> int:
        """dax_iomap_rw() write: allocate blocks (ENOSPC, short count), copy into the frames."""
        mv = memoryview(data).cast("B")
        first = pos >> PAGE_SHIFT
        n = _pages(pos + len(mv)) - first
        got = ino.prepare_blocks(first, n)
        if got <= 0:
            raise KernelError(errno.ENOSPC, "no space left on device")
        end = min(pos + len(mv), (first + got) << PAGE_SHIFT)
        pfns, _ = self._dax_pfns(ino, first, got)
        off = pos - (first << PAGE_SHIFT)
        src = np.frombuffer(mv, dtype=np.uint8)[: end - pos]
        if off == 0 and len(src) == got * PAGE_SIZE:
            self.mem.frames[pfns] = src.reshape(got, PAGE_SIZE)
        else:
            buf = self.mem.frames[pfns].reshape(-1)
            buf[off : off + len(src)] = src
            self.mem.frames[pfns] = buf.reshape(got, PAGE_SIZE)
        if end > ino.size:
            ino.size = end
            assert ino.sb is not None
            ino.sb.mark_dirty()
        return end - pos

    # ---- sync -------------------------------------------------------------------------------

    async def fsync(self, task: Task, fd: int, datasync: bool = False) -> None:
        """vfs_fsync_range(): write back the file, then make the device's namespace durable."""
        await self.fsync_inode(self.fget(task, fd).inode, task)

    async def fsync_inode(self, ino: Inode, task: Task | None) -> None:
        """->fsync of one inode (fsync(2), msync(MS_SYNC)): its pages, then the device."""
        if ino.kind == KIND_SHMEM:
            return
        assert ino.sb is not None
        err: KernelError | None = None
        if ino.mapping is not None:
            await pagecache.filemap_fdatawrite(ino.mapping, task=task)
            try:
                pagecache.filemap_check_errors(ino.mapping)
            except KernelError as e:
                err = e
        await self.sync_sb(ino.sb, task)
        if err is not None:
            raise err

    async def sync_sb(self, sb: SuperBlock, task: Task | None = None) -> None:
        """sync_filesystem() in ordered mode: all data, flush, metadata commit, flush."""
        async with sb.commit_lock:
            for ino in list(sb.inodes):
                if ino.mapping is not None and ino.mapping.dirty_time:
                    await pagecache.filemap_fdatawrite(ino.mapping, task=task)
            if not sb.meta_dirty:
                await sb.bdev.flush()
                return
            sb.meta_dirty = False
            await sb.bdev.flush()
            try:
                sb.commit()
            except KernelError:
                sb.mark_dirty()
                raise
            await sb.bdev.flush()
            sb.finish_commit()

    async def sync_all(self) -> None:
        """ksys_sync(): every device."""
        for sb in list(self.supers.values()):
            await self.sync_sb(sb)

    async def flusher(self, interval: float = DIRTY_WRITEBACK_INTERVAL) -> None:
        """wb_workfn(): every ``interval``, write back what has been dirty for dirty_expire."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.writeback_expired()
            except KernelError as e:
                log.warning("writeback_failed", error=str(e))
            except Exception:  # a bug here must not take the daemon down with it
                log.exception("flusher_failed")

    async def writeback_expired(self, now: float | None = None) -> None:
        """wb_writeback(WB_REASON_PERIODIC): sync devices holding expired dirty data."""
        now = time.monotonic() if now is None else now
        limit = now - self.dirty_expire
        for sb in list(self.supers.values()):
            due = sb.meta_dirty and sb.meta_dirty_since <= limit
            for ino in sb.inodes:
                m = ino.mapping
                if m is not None and m.dirty_time and min(m.dirty_time.values()) <= limit:
                    due = True
                    break
            if due:
                await self.sync_sb(sb)

    # ---- truncate / fallocate --------------------------------------------------------------

    @staticmethod
    def _unmap(ino: Inode, first: int, last: int, even_cows: bool) -> None:
        """unmap_mapping_range() over every VMA mapping the file (its i_mmap)."""
        from vkernel.kernel.memory import unmap_mapping_range

        vmas = ino.mapping.i_mmap if ino.mapping is not None else ino.i_mmap
        if vmas:
            unmap_mapping_range(vmas, first, last, even_cows)

    def _truncate_now(self, ino: Inode, length: int) -> None:
        """O_TRUNC to 0 (no sleep when no page is busy; otherwise finishes in the background)."""
        old = ino.size
        ino.size = length
        self._unmap(ino, 0, 1 << 62, True)
        if ino.mapping is not None:
            busy = pagecache.truncate_inode_pages_sync(ino.mapping, 0, 1 << 62)
            if busy:
                self._spawn(pagecache.truncate_inode_pages_range(ino.mapping, 0, 1 << 62))
        ino.free_blocks_from(0)
        if ino.sb is not None and old != length:
            ino.sb.mark_dirty()
        ino.mtime = time.time()

    async def ftruncate(self, task: Task, fd: int, length: int) -> None:
        """do_sys_ftruncate(): EINVAL unless open for writing; EFBIG past s_maxbytes."""
        file = self.fget(task, fd)
        if length < 0:
            raise einval("negative length", field="length")
        if not file.writable:
            raise einval(f"fd {fd} is not open for writing", field="fd")
        if length > MAX_LFS_FILESIZE:
            raise KernelError(errno.EFBIG, "file too large")
        await self.truncate_inode(file.inode, length, task)

    async def truncate_inode(self, ino: Inode, length: int, task: Task | None) -> None:
        """truncate_setsize() + truncate_pagecache() + the filesystem's block freeing."""
        old = ino.size
        if length < old:
            await self._zero_range(ino, length, min(old, _pages(length) << PAGE_SHIFT), task)
            ino.size = length
            first = _pages(length)
            self._unmap(ino, first, 1 << 62, True)  # truncate_pagecache(): no PTE past EOF
            if ino.mapping is not None:
                await pagecache.truncate_inode_pages_range(ino.mapping, first, 1 << 62)
            ino.free_blocks_from(first)
        else:
            ino.size = length
        if ino.sb is not None and length != old:
            ino.sb.mark_dirty()
        ino.mtime = time.time()

    async def _zero_range(self, ino: Inode, start: int, end: int, task: Task | None) -> None:
        """Zero bytes [start, end) inside at most two partial pages (block_truncate_page)."""
        if start >= end:
            return
        if ino.kind == KIND_DAX:
            first = start >> PAGE_SHIFT
            n = _pages(end) - first
            pfns, holes = self._dax_pfns(ino, first, n)
            buf = self.mem.frames[pfns].reshape(-1)
            off = start - (first << PAGE_SHIFT)
            buf[off : off + end - start] = 0
            live = np.flatnonzero(~holes)
            self.mem.frames[pfns[live]] = buf.reshape(n, PAGE_SIZE)[live]
            return
        mapping = ino.mapping
        assert mapping is not None
        pos = start
        while pos < end:
            idx = pos >> PAGE_SHIFT
            nxt = min(end, (idx + 1) << PAGE_SHIFT)
            cached = mapping.pages.get(idx)
            has_block = ino.kind == KIND_DISK and ino.bmap_range(idx, 1)[0] >= 0
            if cached is not None or has_block:
                if idx << PAGE_SHIFT < mapping.size:
                    await pagecache.filemap_get_folio_uptodate(mapping, idx, task)
                pagecache.zero_user_range(mapping, pos, nxt)
            pos = nxt

    async def fallocate(self, task: Task, fd: int, mode: int, offset: int, length: int) -> None:
        """vfs_fallocate(): mode 0 / KEEP_SIZE preallocate; PUNCH_HOLE|KEEP_SIZE deallocates."""
        file = self.fget(task, fd)
        if offset < 0 or length <= 0:
            raise einval("offset must be >= 0 and length > 0", field="length")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KernelError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} not supported")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise KernelError(errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
        if not file.writable:
            raise KernelError(errno.EBADF, f"fd {fd} is not open for writing", fd=fd)
        if offset + length > MAX_LFS_FILESIZE:
            raise KernelError(errno.EFBIG, "file too large")
        ino = file.inode
        if mode & FALLOC_FL_PUNCH_HOLE:
            await self.punch_hole(ino, offset, length, task)
        else:
            await self._preallocate(ino, offset, length, not mode & FALLOC_FL_KEEP_SIZE)
        ino.mtime = time.time()

    async def punch_hole(self, ino: Inode, offset: int, length: int, task: Task | None) -> None:
        """ext4_punch_hole()/shmem_fallocate(PUNCH_HOLE): zero partial pages, drop and free
        the whole ones (pages with other references live on until released)."""
        end = min(offset + length, ino.size)
        if offset >= end:
            return
        first_full = _pages(offset)
        last_full = end >> PAGE_SHIFT
        if first_full > last_full:  # inside one page
            await self._zero_range(ino, offset, end, task)
            return
        await self._zero_range(ino, offset, first_full << PAGE_SHIFT, task)
        if end & (PAGE_SIZE - 1):
            await self._zero_range(ino, last_full << PAGE_SHIFT, end, task)
        self._unmap(ino, first_full, last_full, False)  # truncate_pagecache_range()
        if ino.mapping is not None:
            await pagecache.truncate_inode_pages_range(ino.mapping, first_full, last_full)
        ino.free_blocks_from(first_full, last_full)

    async def _preallocate(self, ino: Inode, offset: int, length: int, extend: bool) -> None:
        """ext4_fallocate() mode 0: reserve blocks (zeroed on the device), maybe extend i_size."""
        first = offset >> PAGE_SHIFT
        n = _pages(offset + length) - first
        if ino.kind != KIND_SHMEM:
            assert ino.sb is not None
            before = ino.bmap_range(first, n)
            if int(np.count_nonzero(before < 0)) > ino.sb.free_blocks:
                raise KernelError(errno.ENOSPC, "no space left on device")
            got = ino.prepare_blocks(first, n)
            if got < n:
                raise KernelError(errno.ENOSPC, "no space left on device")
            if ino.kind == KIND_DISK:
                await self._zero_new_blocks(ino, first, before, ino.bmap_range(first, n))
        if extend and offset + length > ino.size:
            ino.size = offset + length
            if ino.sb is not None:
                ino.sb.mark_dirty()

    async def _zero_new_blocks(
        self, ino: Inode, first: int, before: IntArray, after: IntArray
    ) -> None:
        """Unwritten extents, modelled as zeroed blocks: zero the blocks just allocated for
        uncached pages, in bios of runs contiguous on the device."""
        assert ino.sb is not None
        assert ino.mapping is not None
        cached = ino.mapping.pages
        new = [k for k in np.flatnonzero(before < 0).tolist() if first + k not in cached]
        if not new:
            return
        blocks = after[new]
        brk = np.flatnonzero(np.diff(blocks) != 1) + 1
        bios = []
        for run in np.split(blocks, brk):
            for s0 in range(0, len(run), pagecache.MAX_BIO_PAGES):
                part = run[s0 : s0 + pagecache.MAX_BIO_PAGES]
                zeros = np.zeros((len(part), BLOCK_SIZE), dtype=np.uint8)
                bios.append(ino.sb.bdev.submit_bio(REQ_OP_WRITE, int(part[0]), None, None, zeros))
        await asyncio.gather(*bios)

    # ---- unlink / stat --------------------------------------------------------------------

    def do_unlink(self, task: Task, name: str) -> None:
        """do_unlinkat()."""
        self._files(task)
        self.unlink(name)

    def stat_inode(self, ino: Inode) -> FileStat:
        """generic_fillattr()."""
        m = ino.mapping
        return FileStat(
            name=ino.name,
            ino=ino.ino,
            kind=ino.kind,
            device=ino.device,
            size=ino.size,
            blocks=ino.nr_blocks() * (PAGE_SIZE // 512),
            nlink=ino.nlink,
            opens=ino.opens,
            cached_pages=m.nrpages if m is not None else 0,
            dirty_pages=m.nr_dirty() if m is not None else 0,
            mtime=ino.mtime,
        )

    def stat(self, name: str) -> FileStat:
        """stat(2) by name."""
        return self.stat_inode(self.lookup(name))

    def fstat(self, task: Task, fd: int) -> FileStat:
        """fstat(2)."""
        return self.stat_inode(self.fget(task, fd).inode)

    def drop_caches(self) -> int:
        """echo 1 > /proc/sys/vm/drop_caches: drop clean unused page-cache pages."""
        return sum(
            pagecache.drop_clean_pages(ino.mapping)
            for ino in self.iter_inodes()
            if ino.mapping is not None
        )

    async def shutdown(self) -> None:
        """Unmount everything: sync, wait for I/O, drop the caches, close the devices."""
        try:
            await self.sync_all()
        except KernelError as e:
            log.warning("sync_failed_at_shutdown", error=str(e))
        except Exception:  # never keep the daemon from exiting cleanly
            log.exception("sync_failed_at_shutdown")
        await self.quiesce()
        for bdev in self.devices.values():
            try:
                bdev.close()
            except OSError as e:
                log.warning("device_close_failed", device=bdev.name, error=str(e))
