"""FileService: file descriptors, file I/O, the namespace, block devices.

Thin: decode, check who may act on the process (``owned_task``), call the kernel's vfs
(:mod:`vkernel.kernel.fs`), encode. Reads stream 1 MiB chunks; writes arrive as a client
stream and go down chunk by chunk, so many-MiB transfers fit message limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from vkernel.api.process import owned_task
from vkernel.api.rpc import require_session
from vkernel.kernel.blockdev import BlockDevice
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.fs import KIND_DAX, KIND_DISK, KIND_SHMEM, FileStat
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task
from vkernel.sessions import SessionTable
from vkernel.v1 import file_service_pb2 as pb
from vkernel.v1 import file_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

READ_CHUNK = 1 << 20
"""Bytes per ReadResponse."""
_KIND_TO_PB = {
    KIND_SHMEM: pb.FILE_KIND_SHMEM,
    KIND_DISK: pb.FILE_KIND_DISK,
    KIND_DAX: pb.FILE_KIND_DAX,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
_I64 = 1 << 63


def file_info(st: FileStat) -> pb.FileInfo:
    """FileInfo from a kernel stat."""
    return pb.FileInfo(
        name=st.name,
        ino=st.ino,
        kind=_KIND_TO_PB[st.kind],
        device=st.device,
        size=st.size,
        blocks=st.blocks,
        nlink=st.nlink,
        opens=st.opens,
        cached_pages=st.cached_pages,
        dirty_pages=st.dirty_pages,
        mtime=st.mtime,
    )


def device_info(bdev: BlockDevice, kernel: Kernel) -> pb.DeviceInfo:
    """DeviceInfo: spec, counters, EIO ranges, space."""
    st = bdev.stats
    lat = bdev.latency
    sb = kernel.vfs.supers.get(bdev.name)
    return pb.DeviceInfo(
        name=bdev.name,
        kind=bdev.kind,
        path=bdev.spec.path,
        size=bdev.size,
        latency_fixed_ns=round(lat.fixed * 1e9),
        latency_per_kib_ns=round(lat.per_kib * 1e9),
        jitter_ns=round(lat.jitter * 1e9),
        queue_depth=bdev.qd,
        dax=bdev.dax,
        reads=st.reads,
        writes=st.writes,
        read_bytes=st.read_bytes,
        write_bytes=st.write_bytes,
        errors=st.errors,
        flushes=st.flushes,
        inflight=st.inflight,
        queued=st.queued,
        bad_ranges=[pb.SectorRange(start=s, count=c) for s, c in bdev.bad_ranges],
        free_blocks=sb.free_blocks if sb is not None else 0,
        files=len([i for i in sb.inodes if i.nlink]) if sb is not None else 0,
        commits=sb.commits if sb is not None else 0,
    )


class FileServicer(pb_grpc.FileServiceServicer):
    """Thin servicer over the kernel's vfs."""

    def __init__(self, kernel: Kernel, sessions: SessionTable) -> None:
        self._kernel = kernel
        self._sessions = sessions

    def _owned(self, context: Context, pid: int) -> Task:
        """The caller's own process ``pid`` (ESRCH if none, EPERM if another session's)."""
        session = require_session(context, self._sessions)
        return owned_task(self._kernel, session, pid)

    async def Open(self, request: pb.OpenRequest, context: Context) -> pb.OpenResponse:
        task = self._owned(context, request.pid)
        kind = _PB_TO_KIND.get(request.kind, "")
        if request.kind and not kind:
            raise einval(f"unknown file kind {request.kind}", field="kind")
        fd, _ = self._kernel.vfs.do_sys_open(
            task, request.name, request.flags, kind, request.device
        )
        return pb.OpenResponse(fd=fd)

    async def Close(self, request: pb.CloseRequest, context: Context) -> pb.CloseResponse:
        task = self._owned(context, request.pid)
        self._kernel.vfs.close(task, request.fd)
        return pb.CloseResponse()

    async def Read(
        self, request: pb.ReadRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        # A plain linear generator, like ReadMemory (conventions §1.4).
        task = self._owned(context, request.pid)
        vfs = self._kernel.vfs
        offset: int | None = request.offset if request.positional else None
        if offset is not None and offset < 0:
            raise einval("negative offset", field="offset")
        left = min(request.length, _I64 - 1)
        got_any = False
        while left > 0:
            want = min(left, READ_CHUNK)
            try:
                data = await vfs.read(task, request.fd, want, offset)
            except KernelError:
                if got_any:
                    return  # a short count, as read(2) returns after partial progress
                raise
            if data:
                got_any = True
                yield pb.ReadResponse(data=data)
            if len(data) < want:
                return
            left -= len(data)
            if offset is not None:
                offset += len(data)

    async def Write(
        self, request_iterator: AsyncIterator[pb.WriteRequest], context: Context
    ) -> pb.WriteResponse:
        session = require_session(context, self._sessions)
        vfs = self._kernel.vfs
        task: Task | None = None
        fd = 0
        offset: int | None = None
        written = 0
        short = False
        async for request in request_iterator:
            if task is None:
                task = owned_task(self._kernel, session, request.pid)
                fd = request.fd
                if request.positional:
                    if request.offset < 0:
                        raise einval("negative offset", field="offset")
                    offset = request.offset
                vfs.fget(task, fd)
            if short or not request.data:
                continue
            pos = None if offset is None else offset + written
            try:
                n = await vfs.write(task, fd, request.data, pos)
            except KernelError:
                if written:
                    short = True
                    continue
                raise
            written += n
            short = n < len(request.data)
        if task is None:
            raise einval("an empty write stream names no process", field="pid")
        return pb.WriteResponse(written=written)

    async def Fsync(self, request: pb.FsyncRequest, context: Context) -> pb.FsyncResponse:
        task = self._owned(context, request.pid)
        await self._kernel.vfs.fsync(task, request.fd, request.datasync)
        return pb.FsyncResponse()

    async def Ftruncate(
        self, request: pb.FtruncateRequest, context: Context
    ) -> pb.FtruncateResponse:
        task = self._owned(context, request.pid)
        await self._kernel.vfs.ftruncate(task, request.fd, request.length)
        return pb.FtruncateResponse()

    async def Fallocate(
        self, request: pb.FallocateRequest, context: Context
    ) -> pb.FallocateResponse:
        task = self._owned(context, request.pid)
        await self._kernel.vfs.fallocate(
            task, request.fd, request.mode, request.offset, request.length
        )
        return pb.FallocateResponse()

    async def Unlink(self, request: pb.UnlinkRequest, context: Context) -> pb.UnlinkResponse:
        task = self._owned(context, request.pid)
        self._kernel.vfs.do_unlink(task, request.name)
        return pb.UnlinkResponse()

    async def Stat(self, request: pb.StatRequest, context: Context) -> pb.StatResponse:
        task = self._owned(context, request.pid)
        vfs = self._kernel.vfs
        st = vfs.stat(request.name) if request.name else vfs.fstat(task, request.fd)
        return pb.StatResponse(file=file_info(st))

    async def ListFiles(
        self, request: pb.ListFilesRequest, context: Context
    ) -> pb.ListFilesResponse:
        require_session(context, self._sessions)
        vfs = self._kernel.vfs
        return pb.ListFilesResponse(files=[file_info(vfs.stat_inode(i)) for i in vfs.iter_inodes()])

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        require_session(context, self._sessions)
        return pb.ListDevicesResponse(
            devices=[device_info(d, self._kernel) for d in self._kernel.vfs.devices.values()]
        )

    async def SetDeviceFault(
        self, request: pb.SetDeviceFaultRequest, context: Context
    ) -> pb.SetDeviceFaultResponse:
        require_session(context, self._sessions)
        bdev = self._kernel.vfs.device(request.device)
        bdev.set_bad_ranges([(r.start, r.count) for r in request.ranges], add=request.add)
        return pb.SetDeviceFaultResponse(device=device_info(bdev, self._kernel))
