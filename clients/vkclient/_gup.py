"""GUP for driver clients: pins and page references on a process's memory, DMA, gup_test.

::

    async with proc.pin(addr, npages, write=True, longterm=True) as pages:
        pages.pfns                      # numpy int64 array: the pinned frames
        await pages.dma_write(0, b"from the device")
        data = await pages.dma_read(0, 4096)
    # leaving the block unpins what is left (dirty when write=True, as a driver does)

    async with proc.get(addr, npages) as pages: ...   # FOLL_GET references, put on exit

Every GUP call returns a handle owned by this session: release all of it or a subset
(``await pages.release(first, count, dirty=True)``); what the session still holds when it ends
is released by the daemon and logged as leaked. A co-located driver can map physical memory
itself: ``mem = await k.open_dma()`` receives the memfd over the daemon's side socket, and
``mem.write(pages, offset, data)`` goes straight into the pinned frames.
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import socket
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
import numpy as np
import numpy.typing as npt

from vkclient.errors import from_rpc_error
from vkernel.kernel.uapi import (
    FOLL_ANON,
    FOLL_FORCE,
    FOLL_GET,
    FOLL_HWPOISON,
    FOLL_LONGTERM,
    FOLL_NOFAULT,
    FOLL_NOWAIT,
    FOLL_PIN,
    FOLL_SPLIT_PMD,
    FOLL_TOUCH,
    FOLL_WRITE,
)
from vkernel.v1 import gup_service_pb2 as pb
from vkernel.v1 import gup_service_pb2_grpc as pb_grpc
from vkernel.v1 import process_service_pb2

if TYPE_CHECKING:
    from vkclient._kernel import Kernel

__all__ = [
    "FOLL_ANON",
    "FOLL_FORCE",
    "FOLL_GET",
    "FOLL_HWPOISON",
    "FOLL_LONGTERM",
    "FOLL_NOFAULT",
    "FOLL_NOWAIT",
    "FOLL_PIN",
    "FOLL_SPLIT_PMD",
    "FOLL_TOUCH",
    "FOLL_WRITE",
    "DmaMemory",
    "GupStream",
    "HandleInfo",
    "Pages",
]

HandleInfo = pb.HandleInfo
DMA_CHUNK = 16 << 20
"""Bytes per DmaRead/DmaWrite call (the daemon takes up to 32 MiB)."""
IntArray = npt.NDArray[np.int64]
_LE_U64 = np.dtype("<u8")
_LE_U32 = np.dtype("<u4")

PIN_APIS = {
    "fast": pb.GUP_API_PIN_USER_PAGES_FAST,
    "locked": pb.GUP_API_PIN_USER_PAGES,
    "remote": pb.GUP_API_PIN_USER_PAGES_REMOTE,
    "unlocked": pb.GUP_API_PIN_USER_PAGES_UNLOCKED,
}
"""pin_user_pages_fast (default), pin_user_pages, pin_user_pages_remote, *_unlocked."""
GET_APIS = {
    "fast": pb.GUP_API_GET_USER_PAGES_FAST,
    "fast_only": pb.GUP_API_GET_USER_PAGES_FAST_ONLY,
    "locked": pb.GUP_API_GET_USER_PAGES,
    "remote": pb.GUP_API_GET_USER_PAGES_REMOTE,
    "unlocked": pb.GUP_API_GET_USER_PAGES_UNLOCKED,
}
"""get_user_pages_fast (default), *_fast_only, get_user_pages, *_remote, *_unlocked."""


def unpack_pfns(raw: bytes) -> IntArray:
    """Packed little-endian u64 pfns as an int64 array."""
    return np.frombuffer(raw, dtype=_LE_U64).astype(np.int64)


def pack_indices(indices: Sequence[int] | npt.NDArray[Any]) -> bytes:
    """Page indices as packed little-endian u32."""
    return np.asarray(indices, dtype=np.int64).astype(_LE_U32).tobytes()


async def _call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def _flags(write: bool, longterm: bool, force: bool, extra: int) -> int:
    return (
        (FOLL_WRITE if write else 0)
        | (FOLL_LONGTERM if longterm else 0)
        | (FOLL_FORCE if force else 0)
        | extra
    )


class Pages:
    """The references one GUP call took: the handle, the pfns, and DMA through them."""

    def __init__(
        self,
        kernel: Kernel,
        pid: int,
        start: int,
        gup_flags: int,
        pinned: bool,
        resp: pb.GupResponse,
    ) -> None:
        self.kernel = kernel
        self.pid = pid
        self.start = start & ~0xFFF
        self.gup_flags = gup_flags
        self.pinned = pinned
        self.handle = resp.handle
        self.count = resp.count
        """What the entry point returned: may be below the number of pages asked for."""
        self.pfns = unpack_pfns(resp.pfns)
        self.lock_dropped = resp.lock_dropped
        self.remaining = resp.count
        """Pages still held."""

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        kind = "pinned" if self.pinned else "referenced"
        return f"<Pages handle={self.handle} {self.remaining}/{self.count} {kind} pid={self.pid}>"

    async def release(
        self,
        first: int = 0,
        count: int = 0,
        *,
        indices: Sequence[int] | npt.NDArray[Any] | None = None,
        dirty: bool = False,
    ) -> int:
        """Unpin (pins) or put (references) ``indices``, else [first, first+count) (count 0:
        to the end), marking the folios dirty first if asked. Returns the pages still held."""
        if not self.handle or not self.remaining:
            return 0
        request = pb.ReleaseRequest(handle=self.handle, dirty=dirty, first=first, count=count)
        if indices is not None:
            request.indices = pack_indices(indices)
        k = self.kernel
        resp: pb.ReleaseResponse = await _call(
            k._gup.Release(request, metadata=k._metadata, timeout=k.timeout)
        )
        self.remaining = resp.remaining
        return resp.remaining

    async def unpin(self, first: int = 0, count: int = 0, *, dirty: bool = False) -> int:
        """unpin_user_pages(_dirty_lock) on part or all of the pins."""
        return await self.release(first, count, dirty=dirty)

    async def put(self, first: int = 0, count: int = 0, *, dirty: bool = False) -> int:
        """put_page() (after set_page_dirty_lock() if ``dirty``) on part or all of the refs."""
        return await self.release(first, count, dirty=dirty)

    async def dma_read(self, offset: int, length: int) -> bytes:
        """A device read through the pages: ``length`` bytes from ``offset`` (bytes from the
        start of the first page), in calls of at most 16 MiB."""
        k = self.kernel
        parts: list[bytes] = []
        for pos in range(offset, offset + max(length, 1), DMA_CHUNK):
            n = min(DMA_CHUNK, offset + length - pos)
            resp: pb.DmaReadResponse = await _call(
                k._gup.DmaRead(
                    pb.DmaReadRequest(handle=self.handle, offset=pos, length=n),
                    metadata=k._metadata,
                    timeout=k.timeout,
                )
            )
            parts.append(resp.data)
        return b"".join(parts)

    async def dma_write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """A device write through the pages (needs write=True); PTE dirty bits stay as they
        are: release with ``dirty=True`` to mark the folios dirty."""
        k = self.kernel
        view = memoryview(data).cast("B")
        written = 0
        for pos in range(0, max(len(view), 1), DMA_CHUNK):
            resp: pb.DmaWriteResponse = await _call(
                k._gup.DmaWrite(
                    pb.DmaWriteRequest(
                        handle=self.handle,
                        offset=offset + pos,
                        data=bytes(view[pos : pos + DMA_CHUNK]),
                    ),
                    metadata=k._metadata,
                    timeout=k.timeout,
                )
            )
            written += resp.bytes_written
        return written


class _GupContext:
    """``async with proc.pin(...) as pages`` (releases on exit) or ``await proc.pin(...)``."""

    def __init__(self, proc: GupMixin, request: pb.GupRequest, pinned: bool, dirty: bool) -> None:
        self._proc = proc
        self._request = request
        self._pinned = pinned
        self._dirty = dirty
        self._pages: Pages | None = None

    async def _take(self) -> Pages:
        k = self._proc.kernel
        resp: pb.GupResponse = await _call(
            k._gup.Gup(self._request, metadata=k._metadata, timeout=k.timeout)
        )
        r = self._request
        return Pages(k, r.pid, r.start, r.gup_flags, self._pinned, resp)

    def __await__(self) -> Generator[Any, None, Pages]:
        return self._take().__await__()

    async def __aenter__(self) -> Pages:
        self._pages = await self._take()
        return self._pages

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pages = self._pages
        if pages is not None and pages.remaining and not pages.kernel._closed:
            await pages.release(dirty=self._dirty)


class GupMixin:
    """GUP methods of :class:`vkclient.Process`."""

    kernel: Kernel
    pid: int

    def pin(
        self,
        addr: int,
        npages: int,
        *,
        write: bool = False,
        longterm: bool = False,
        force: bool = False,
        api: str = "fast",
        flags: int = 0,
        locked: bool = True,
        dirty: bool | None = None,
    ) -> _GupContext:
        """pin_user_pages*() on ``npages`` pages from ``addr``: ``async with`` it (unpinned on
        exit, dirty when ``write`` unless ``dirty`` says otherwise) or ``await`` it (release
        yourself). ``api``: fast (default), locked, remote (with ``locked``), unlocked."""
        request = pb.GupRequest(
            pid=self.pid,
            api=PIN_APIS[api],
            start=addr,
            nr_pages=npages,
            gup_flags=_flags(write, longterm, force, flags),
            locked=locked,
        )
        return _GupContext(self, request, True, write if dirty is None else dirty)

    def get(
        self,
        addr: int,
        npages: int,
        *,
        write: bool = False,
        force: bool = False,
        api: str = "fast",
        flags: int = 0,
        locked: bool = True,
        dirty: bool = False,
    ) -> _GupContext:
        """get_user_pages*() (FOLL_GET references): as :meth:`pin`, put_page() on exit.
        ``api``: fast (default), fast_only, locked, remote, unlocked."""
        request = pb.GupRequest(
            pid=self.pid,
            api=GET_APIS[api],
            start=addr,
            nr_pages=npages,
            gup_flags=_flags(write, False, force, flags),
            locked=locked,
        )
        return _GupContext(self, request, False, dirty)

    def gup(
        self, api: int, addr: int, npages: int, gup_flags: int = 0, *, locked: bool = True
    ) -> _GupContext:
        """Any entry point by its GupApi number with raw FOLL_* flags."""
        request = pb.GupRequest(
            pid=self.pid,
            api=pb.GupApi.ValueType(api),
            start=addr,
            nr_pages=npages,
            gup_flags=gup_flags,
            locked=locked,
        )
        return _GupContext(self, request, api >= pb.GUP_API_PIN_USER_PAGES, False)

    async def grant(self, session_id: str) -> None:
        """Let session ``session_id`` pin and DMA this process's memory (ProcessService)."""
        k = self.kernel
        await _call(
            k._processes.GrantAccess(
                process_service_pb2.GrantAccessRequest(pid=self.pid, grantee_session_id=session_id),
                metadata=k._metadata,
                timeout=k.timeout,
            )
        )

    async def revoke(self, session_id: str) -> None:
        """Withdraw a grant (references already taken stay held)."""
        k = self.kernel
        await _call(
            k._processes.RevokeAccess(
                process_service_pb2.RevokeAccessRequest(
                    pid=self.pid, grantee_session_id=session_id
                ),
                metadata=k._metadata,
                timeout=k.timeout,
            )
        )

    async def gup_test(
        self,
        command: int,
        addr: int,
        size: int,
        nr_pages_per_call: int,
        gup_flags: int = 0,
        test_flags: int = 0,
        which_pages: Sequence[int] = (),
    ) -> pb.GupTestResponse:
        """One gup_test ioctl (mm/gup_test.c) on this process's memory."""
        k = self.kernel
        resp: pb.GupTestResponse = await _call(
            k._gup.GupTest(
                pb.GupTestRequest(
                    pid=self.pid,
                    command=pb.GupTestCommand.ValueType(command),
                    addr=addr,
                    size=size,
                    nr_pages_per_call=nr_pages_per_call,
                    gup_flags=gup_flags,
                    test_flags=test_flags,
                    which_pages=list(which_pages),
                ),
                metadata=k._metadata,
                timeout=None,
            )
        )
        return resp


@dataclass
class DmaMemory:
    """Physical memory mapped in this client (co-located drivers): frame n at n*page_size."""

    map: mmap.mmap
    size: int
    page_size: int

    def __post_init__(self) -> None:
        self._mv = memoryview(self.map)

    def frame(self, pfn: int) -> memoryview:
        """One frame's bytes (writable)."""
        if not 0 <= pfn < self.size // self.page_size:
            raise IndexError(f"pfn {pfn} outside physical memory")
        return self._mv[pfn * self.page_size : (pfn + 1) * self.page_size]

    def _spans(self, pages: Pages, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(frame byte offset, start, end) pieces of [offset, offset+length) of ``pages``."""
        ps = self.page_size
        if offset < 0 or offset + length > len(pages.pfns) * ps:
            raise ValueError("range beyond the pinned pages")
        out = []
        pos = offset
        end = offset + length
        while pos < end:
            i, off = divmod(pos, ps)
            n = min(ps - off, end - pos)
            out.append((int(pages.pfns[i]) * ps + off, pos - offset, pos - offset + n))
            pos += n
        return out

    def read(self, pages: Pages, offset: int, length: int) -> bytes:
        """Read through the pinned frames directly (no RPC)."""
        out = bytearray(length)
        for base, a, b in self._spans(pages, offset, length):
            out[a:b] = self._mv[base : base + (b - a)]
        return bytes(out)

    def write(self, pages: Pages, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write through the pinned frames directly (no RPC), as a device's DMA would."""
        src = memoryview(data).cast("B")
        for base, a, b in self._spans(pages, offset, len(src)):
            self._mv[base : base + (b - a)] = src[a:b]
        return len(src)

    def close(self) -> None:
        """Unmap."""
        self._mv.release()
        self.map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def side_socket_fd(
    path: str, request: bytes, what: str, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """One request line to the daemon's side socket (blocking): the fd it passes back and its
    JSON reply. A refusal is OSError with the reply's errno (EPERM without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request + b"\n")
        data, fds, _flags, _addr = socket.recv_fds(s, 4096, 1)
    reply = json.loads(data.split(b"\n", 1)[0] or b"{}")
    if not reply.get("ok") or not fds:
        for fd in fds:
            os.close(fd)
        code = int(reply.get("errno", errno.EPERM))
        raise OSError(code, f"the daemon refused {what}: {reply.get('error', reply)}")
    return fds[0], reply


def receive_memfd(path: str, token: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Fetch the physical-memory fd from the daemon's side socket (blocking)."""
    return side_socket_fd(path, token.encode(), "the memory fd", timeout)


class GupStream:
    """The Batch stream: many GUP and release operations per round trip."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self._call: Any = None

    async def __aenter__(self) -> Self:
        k = self._kernel
        self._call = k._gup.Batch(metadata=k._metadata)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None:
            self._call.cancel()

    @staticmethod
    def gup_op(
        pid: int, api: int, start: int, nr_pages: int, gup_flags: int = 0, omit_pfns: bool = False
    ) -> pb.BatchOp:
        """A GUP operation."""
        return pb.BatchOp(
            gup=pb.GupRequest(
                pid=pid,
                api=pb.GupApi.ValueType(api),
                start=start,
                nr_pages=nr_pages,
                gup_flags=gup_flags,
                omit_pfns=omit_pfns,
            )
        )

    @staticmethod
    def release_op(handle: int, dirty: bool = False) -> pb.BatchOp:
        """Release a whole handle."""
        return pb.BatchOp(release=pb.ReleaseRequest(handle=handle, dirty=dirty))

    async def submit(self, ops: Sequence[pb.BatchOp]) -> list[pb.BatchResult]:
        """Send one message of operations; their results, in order."""
        try:
            await self._call.write(pb.BatchRequest(ops=ops))
            resp = await self._call.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if resp is grpc.aio.EOF:
            raise ConnectionError("the daemon ended the Batch stream")
        return list(resp.results)


class KernelGupMixin:
    """Kernel-wide GUP calls for :class:`vkclient.Kernel`."""

    _channel: grpc.aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    timeout: float
    _gup_stub: pb_grpc.GupServiceAsyncStub | None = None

    @property
    def _gup(self) -> pb_grpc.GupServiceAsyncStub:
        if self._gup_stub is None:
            self._gup_stub = pb_grpc.GupServiceStub(self._channel)
        return self._gup_stub

    async def handles(self) -> list[pb.HandleInfo]:
        """This session's GUP handles (what the driver holds)."""
        resp: pb.ListHandlesResponse = await _call(
            self._gup.ListHandles(
                pb.ListHandlesRequest(), metadata=self._metadata, timeout=self.timeout
            )
        )
        return list(resp.handles)

    def gup_stream(self) -> GupStream:
        """``async with k.gup_stream() as s: await s.submit([...])``."""
        return GupStream(self)  # type: ignore[arg-type]

    async def open_dma(self) -> DmaMemory:
        """Map physical memory in this process (co-located drivers on the UNIX socket)."""
        info: pb.GetDmaChannelResponse = await _call(
            self._gup.GetDmaChannel(
                pb.GetDmaChannelRequest(), metadata=self._metadata, timeout=self.timeout
            )
        )
        if not info.socket_path:
            raise OSError(95, "the daemon has no DMA side channel (not a UNIX socket?)")
        token = dict(self._metadata).get("vkernel-session", "")
        fd, reply = await asyncio.to_thread(receive_memfd, info.socket_path, token)
        try:
            size = int(reply["memory_bytes"])
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return DmaMemory(m, size, int(reply["page_size"]))
