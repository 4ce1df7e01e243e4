"""File calls of the SDK: open/close/read/write/fsync/ftruncate/fallocate/unlink/stat.

:class:`FilesMixin` gives :class:`vkclient.Process` its descriptor-based methods and
:class:`KernelFilesMixin` gives :class:`vkclient.Kernel` the kernel-wide views (devices,
files) and device fault injection. Flags are Linux's (``vkclient.O_RDWR | vkclient.O_CREAT``)
and errors are the OSError subclasses Python's os module raises for the errno.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from vkclient.errors import from_rpc_error
from vkernel.v1 import file_service_pb2 as pb
from vkernel.v1 import file_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vkclient._kernel import Kernel

CHUNK = 1 << 20
"""Bytes per Write message."""
KINDS = {"shmem": pb.FILE_KIND_SHMEM, "disk": pb.FILE_KIND_DISK, "dax": pb.FILE_KIND_DAX}
_KIND_NAMES = {v: k for k, v in KINDS.items()}


@dataclass(frozen=True)
class FileStat:
    """stat(2) of a vkernel file, plus its page-cache state."""

    name: str
    ino: int
    kind: str
    device: str
    size: int
    blocks: int
    nlink: int
    opens: int
    cached_pages: int
    dirty_pages: int
    mtime: float

    @classmethod
    def from_pb(cls, f: pb.FileInfo) -> FileStat:
        """From the API's FileInfo."""
        return cls(
            name=f.name,
            ino=f.ino,
            kind=_KIND_NAMES.get(f.kind, "?"),
            device=f.device,
            size=f.size,
            blocks=f.blocks,
            nlink=f.nlink,
            opens=f.opens,
            cached_pages=f.cached_pages,
            dirty_pages=f.dirty_pages,
            mtime=f.mtime,
        )


@dataclass(frozen=True)
class DeviceInfo:
    """A block device: its model, counters and EIO ranges."""

    name: str
    kind: str
    path: str
    size: int
    latency_fixed_ns: int
    latency_per_kib_ns: int
    jitter_ns: int
    queue_depth: int
    dax: bool
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    errors: int
    flushes: int
    inflight: int
    queued: int
    bad_ranges: tuple[tuple[int, int], ...]
    free_blocks: int
    files: int
    commits: int

    @classmethod
    def from_pb(cls, d: pb.DeviceInfo) -> DeviceInfo:
        """From the API's DeviceInfo."""
        return cls(
            name=d.name,
            kind=d.kind,
            path=d.path,
            size=d.size,
            latency_fixed_ns=d.latency_fixed_ns,
            latency_per_kib_ns=d.latency_per_kib_ns,
            jitter_ns=d.jitter_ns,
            queue_depth=d.queue_depth,
            dax=d.dax,
            reads=d.reads,
            writes=d.writes,
            read_bytes=d.read_bytes,
            write_bytes=d.write_bytes,
            errors=d.errors,
            flushes=d.flushes,
            inflight=d.inflight,
            queued=d.queued,
            bad_ranges=tuple((r.start, r.count) for r in d.bad_ranges),
            free_blocks=d.free_blocks,
            files=d.files,
            commits=d.commits,
        )


class KernelFilesMixin:
    """Kernel-wide file views for :class:`vkclient.Kernel`."""

    _channel: grpc.aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    timeout: float
    _files_stub: pb_grpc.FileServiceAsyncStub | None = None

    @property
    def _files(self) -> pb_grpc.FileServiceAsyncStub:
        if self._files_stub is None:
            self._files_stub = pb_grpc.FileServiceStub(self._channel)
        return self._files_stub

    async def _files_call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def devices(self) -> list[DeviceInfo]:
        """The block devices (name, kind, size, latency model, queue depth, counters)."""
        resp: pb.ListDevicesResponse = await self._files_call(
            self._files.ListDevices, pb.ListDevicesRequest()
        )
        return [DeviceInfo.from_pb(d) for d in resp.devices]

    async def files(self) -> list[FileStat]:
        """Every file (unlinked ones still open included)."""
        resp: pb.ListFilesResponse = await self._files_call(
            self._files.ListFiles, pb.ListFilesRequest()
        )
        return [FileStat.from_pb(f) for f in resp.files]

    async def set_device_fault(
        self, device: str, ranges: Sequence[tuple[int, int]], add: bool = False
    ) -> DeviceInfo:
        """Make sectors ``(start, count)`` of ``device`` fail with EIO ([] clears)."""
        resp: pb.SetDeviceFaultResponse = await self._files_call(
            self._files.SetDeviceFault,
            pb.SetDeviceFaultRequest(
                device=device,
                ranges=[pb.SectorRange(start=s, count=c) for s, c in ranges],
                add=add,
            ),
        )
        return DeviceInfo.from_pb(resp.device)


class FilesMixin:
    """File methods of :class:`vkclient.Process` (they act on its descriptor table)."""

    kernel: Kernel
    pid: int

    async def _unary_files(self, method_name: str, request: Any) -> Any:
        k = self.kernel
        return await k._files_call(getattr(k._files, method_name), request)

    async def open(self, name: str, flags: int, kind: str = "", device: str = "") -> int:
        """open(2): a descriptor; ``kind`` (shmem, disk, dax) and ``device`` apply to O_CREAT."""
        if kind and kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}")
        resp: pb.OpenResponse = await self._unary_files(
            "Open",
            pb.OpenRequest(
                pid=self.pid,
                name=name,
                flags=flags,
                kind=KINDS.get(kind, pb.FILE_KIND_UNSPECIFIED),
                device=device,
            ),
        )
        return resp.fd

    async def close(self, fd: int) -> None:
        """close(2)."""
        await self._unary_files("Close", pb.CloseRequest(pid=self.pid, fd=fd))

    async def _read(self, fd: int, length: int, offset: int | None) -> bytes:
        k = self.kernel
        request = pb.ReadRequest(
            pid=self.pid,
            fd=fd,
            length=length,
            positional=offset is not None,
            offset=offset or 0,
        )
        parts: list[bytes] = []
        try:
            async for resp in k._files.Read(request, metadata=k._metadata, timeout=k.timeout):
                parts.append(resp.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return b"".join(parts)

    async def read_fd(self, fd: int, length: int) -> bytes:
        """read(2) at the file position (advancing it); short at end of file."""
        return await self._read(fd, length, None)

    async def pread(self, fd: int, length: int, offset: int) -> bytes:
        """pread(2): read at ``offset`` without moving the file position."""
        return await self._read(fd, length, offset)

    async def _write(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int | None
    ) -> int:
        k = self.kernel
        view = memoryview(data).cast("B")
        pid = self.pid

        def messages() -> Iterator[pb.WriteRequest]:
            yield pb.WriteRequest(
                pid=pid,
                fd=fd,
                positional=offset is not None,
                offset=offset or 0,
                data=bytes(view[:CHUNK]),
            )
            for off in range(CHUNK, len(view), CHUNK):
                yield pb.WriteRequest(data=bytes(view[off : off + CHUNK]))

        try:
            resp: pb.WriteResponse = await k._files.Write(
                messages(), metadata=k._metadata, timeout=k.timeout
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return resp.written

    async def write_fd(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """write(2) at the file position (or the end with O_APPEND); returns the count."""
        return await self._write(fd, data, None)

    async def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """pwrite(2): write at ``offset`` without moving the file position."""
        return await self._write(fd, data, offset)

    async def fsync(self, fd: int, datasync: bool = False) -> None:
        """fsync(2) (fdatasync(2) with ``datasync``)."""
        await self._unary_files("Fsync", pb.FsyncRequest(pid=self.pid, fd=fd, datasync=datasync))

    async def ftruncate(self, fd: int, length: int) -> None:
        """ftruncate(2)."""
        await self._unary_files(
            "Ftruncate", pb.FtruncateRequest(pid=self.pid, fd=fd, length=length)
        )

    async def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): mode 0, FALLOC_FL_KEEP_SIZE or FALLOC_FL_PUNCH_HOLE|KEEP_SIZE."""
        await self._unary_files(
            "Fallocate",
            pb.FallocateRequest(pid=self.pid, fd=fd, mode=mode, offset=offset, length=length),
        )

    async def unlink(self, name: str) -> None:
        """unlink(2)."""
        await self._unary_files("Unlink", pb.UnlinkRequest(pid=self.pid, name=name))

    async def stat(self, name: str) -> FileStat:
        """stat(2) by name."""
        resp: pb.StatResponse = await self._unary_files(
            "Stat", pb.StatRequest(pid=self.pid, name=name)
        )
        return FileStat.from_pb(resp.file)

    async def fstat(self, fd: int) -> FileStat:
        """fstat(2)."""
        resp: pb.StatResponse = await self._unary_files("Stat", pb.StatRequest(pid=self.pid, fd=fd))
        return FileStat.from_pb(resp.file)
