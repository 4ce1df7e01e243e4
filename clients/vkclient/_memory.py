"""Memory calls of the SDK: the mmap family, read/write of user memory, /proc-style views.

:class:`MemoryMixin` gives :class:`vkclient.Process` its memory methods and
:class:`KernelMemoryMixin` gives :class:`vkclient.Kernel` the kernel-wide ones (page dump,
audit). Arguments are C's: addresses and lengths are unsigned long, so a negative length
travels as its two's complement and the kernel answers what Linux answers for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal as _signal
import sys
from array import array
from typing import TYPE_CHECKING, Any

import grpc

from vkclient._stream import TaggedStream
from vkclient.constants import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from vkclient.errors import UserFaultError, from_rpc_error
from vkernel.v1 import memory_service_pb2 as pb
from vkernel.v1 import memory_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vkclient._kernel import Kernel

CHUNK = 1 << 20
"""Bytes per WriteMemory message: large enough for bulk speed, far below message limits."""


def _unsigned(value: int, bits: int, field: str) -> int:
    """``value`` as C passes it in an unsigned ``bits``-wide argument (negatives wrap)."""
    top = 1 << bits
    if -(top >> 1) <= value < 0:
        value += top
    if not 0 <= value < top:
        raise OSError(errno.EINVAL, f"{field} {value} does not fit in {bits} bits")
    return value


def _signed(value: int, bits: int, field: str) -> int:
    """``value`` checked to fit a signed ``bits``-wide argument."""
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise OSError(errno.EINVAL, f"{field} {value} does not fit in {bits} bits")
    return value


def _ulong(value: int, field: str) -> int:
    return _unsigned(value, 64, field)


def _uint(value: int, field: str) -> int:
    return _unsigned(value, 32, field)


class AccessStream(TaggedStream):
    """One open ``MemoryService.Access`` stream: a process's loads and stores, one message
    each way per access (a unary ``read``/``write`` costs about three times that).

    Accesses run in call order, one at a time, like one thread of the process; a fault raises
    :class:`vkclient.UserFaultError` and the stream goes on. Use ``async with
    proc.access_stream() as a: data = await a.load(addr, n)``.
    """

    _what = "Access"

    def __init__(self, kernel: Kernel, pid: int) -> None:
        super().__init__()
        self._kernel = kernel
        self.pid = pid

    def _open(self) -> Any:
        return self._kernel._memory.Access(metadata=self._kernel._metadata)

    async def load(self, addr: int, length: int) -> bytes:
        """A user load of ``length`` bytes (at most 1 MiB) at ``addr``."""
        resp: pb.AccessResponse = await self._roundtrip(
            pb.AccessRequest(
                pid=self.pid,
                kind=pb.ACCESS_KIND_LOAD,
                addr=_ulong(addr, "addr"),
                length=_ulong(length, "length"),
            )
        )
        if resp.errno:
            raise _access_error(resp)
        return resp.data

    async def store(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        """A user store of ``data`` (at most 1 MiB) at ``addr``; returns its length."""
        resp: pb.AccessResponse = await self._roundtrip(
            pb.AccessRequest(
                pid=self.pid, kind=pb.ACCESS_KIND_STORE, addr=_ulong(addr, "addr"), data=bytes(data)
            )
        )
        if resp.errno:
            raise _access_error(resp)
        return resp.bytes_done


def _access_error(resp: pb.AccessResponse) -> OSError:
    """An Access result's errno as the OSError ``read``/``write`` would raise for it."""
    message = errno.errorcode.get(resp.errno, str(resp.errno))
    if resp.signal:
        fault = UserFaultError(
            resp.errno, f"{_signal.Signals(resp.signal).name} at {resp.fault_address:#x}"
        )
        fault.signal = _signal.Signals(resp.signal).name
        fault.address = resp.fault_address
        return fault
    return OSError(resp.errno, message)


class KernelMemoryMixin:
    """Kernel-wide memory views for :class:`vkclient.Kernel`."""

    _channel: grpc.aio.Channel
    _metadata: tuple[tuple[str, str], ...]
    timeout: float
    _memory_stub: pb_grpc.MemoryServiceAsyncStub | None = None

    @property
    def _memory(self) -> pb_grpc.MemoryServiceAsyncStub:
        if self._memory_stub is None:
            self._memory_stub = pb_grpc.MemoryServiceStub(self._channel)
        return self._memory_stub

    async def _memory_call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def dump_page(self, pfn: int) -> dict[str, Any]:
        """dump_page(): one frame's struct page.

        Returns a dict with ``pfn``, ``refcount``, ``mapcount``, ``pincount``, ``flags``
        (flag names such as ``anon`` and ``anon_exclusive``), ``flag_bits``,
        ``compound_head``, ``compound_order``, ``mapping``, ``index``, ``entire_mapcount``
        (PMD mappings, included in ``mapcount``), ``zone`` and ``maybe_dma_pinned``.
        """
        resp: pb.DumpPageResponse = await self._memory_call(
            self._memory.DumpPage, pb.DumpPageRequest(pfn=_ulong(pfn, "pfn"))
        )
        return {
            "pfn": resp.pfn,
            "refcount": resp.refcount,
            "mapcount": resp.mapcount,
            "pincount": resp.pincount,
            "flags": list(resp.flag_names),
            "flag_bits": resp.flags,
            "compound_head": resp.compound_head,
            "compound_order": resp.compound_order,
            "mapping": resp.mapping,
            "index": resp.index,
            "entire_mapcount": resp.entire_mapcount,
            "zone": resp.zone,
            "maybe_dma_pinned": resp.maybe_dma_pinned,
        }

    async def audit(self) -> list[str]:
        """Recompute every frame's counts; the problems found (empty when clean)."""
        resp: pb.AuditResponse = await self._memory_call(self._memory.Audit, pb.AuditRequest())
        return list(resp.problems)


class MemoryMixin:
    """Memory methods of :class:`vkclient.Process`."""

    kernel: Kernel
    pid: int

    async def _unary_memory(self, method_name: str, request: Any) -> Any:
        k = self.kernel
        return await k._memory_call(getattr(k._memory, method_name), request)

    # ---- the mmap family ------------------------------------------------------------------

    async def mmap(
        self,
        length: int,
        prot: int = PROT_READ | PROT_WRITE,
        flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
        addr: int = 0,
        fd: int = -1,
        offset: int = 0,
    ) -> int:
        """mmap(2): map ``length`` bytes; returns the address."""
        resp: pb.MmapResponse = await self._unary_memory(
            "Mmap",
            pb.MmapRequest(
                pid=self.pid,
                addr=_ulong(addr, "addr"),
                length=_ulong(length, "length"),
                prot=_uint(prot, "prot"),
                flags=_uint(flags, "flags"),
                fd=_signed(fd, 32, "fd"),
                offset=_signed(offset, 64, "offset"),
            ),
        )
        return resp.addr

    async def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        await self._unary_memory(
            "Munmap",
            pb.MunmapRequest(
                pid=self.pid, addr=_ulong(addr, "addr"), length=_ulong(length, "length")
            ),
        )

    async def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2)."""
        await self._unary_memory(
            "Mprotect",
            pb.MprotectRequest(
                pid=self.pid,
                addr=_ulong(addr, "addr"),
                length=_ulong(length, "length"),
                prot=_uint(prot, "prot"),
            ),
        )

    async def mremap(
        self, old_addr: int, old_length: int, new_length: int, flags: int = 0, new_addr: int = 0
    ) -> int:
        """mremap(2); returns the mapping's (possibly new) address."""
        resp: pb.MremapResponse = await self._unary_memory(
            "Mremap",
            pb.MremapRequest(
                pid=self.pid,
                old_addr=_ulong(old_addr, "old_addr"),
                old_length=_ulong(old_length, "old_length"),
                new_length=_ulong(new_length, "new_length"),
                flags=_uint(flags, "flags"),
                new_addr=_ulong(new_addr, "new_addr"),
            ),
        )
        return resp.addr

    async def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2)."""
        await self._unary_memory(
            "Madvise",
            pb.MadviseRequest(
                pid=self.pid,
                addr=_ulong(addr, "addr"),
                length=_ulong(length, "length"),
                advice=_signed(advice, 32, "advice"),
            ),
        )

    async def msync(self, addr: int, length: int, flags: int) -> None:
        """msync(2): MS_SYNC writes the files of shared mappings in the range to their device."""
        await self._unary_memory(
            "Msync",
            pb.MsyncRequest(
                pid=self.pid,
                addr=_ulong(addr, "addr"),
                length=_ulong(length, "length"),
                flags=_signed(flags, 32, "flags"),
            ),
        )

    # ---- user memory ----------------------------------------------------------------------

    async def read(self, addr: int, length: int) -> bytes:
        """Read ``length`` bytes at ``addr`` as the process would (faults pages in).

        Streams in chunks of at most 1 MiB. Raises :class:`vkclient.UserFaultError`
        (``signal``, ``address``) when the access faults; the process lives on.
        """
        k = self.kernel
        request = pb.ReadMemoryRequest(
            pid=self.pid, addr=_ulong(addr, "addr"), length=_ulong(length, "length")
        )
        parts: list[bytes] = []
        try:
            async for resp in k._memory.ReadMemory(
                request, metadata=k._metadata, timeout=k.timeout
            ):
                parts.append(resp.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return b"".join(parts)

    async def write(self, addr: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``addr`` as the process would (COW included); returns its length.

        Streams in 1 MiB messages. Raises :class:`vkclient.UserFaultError` on a fault.
        """
        k = self.kernel
        view = memoryview(data).cast("B")
        start = _ulong(addr, "addr")
        pid = self.pid

        call = k._memory.WriteMemory(metadata=k._metadata, timeout=k.timeout)
        try:
            # Explicit writes, not a request iterator: when the kernel stops early (a fault,
            # ENOMEM) the call ends while data is still being sent; the final status is then
            # read from the call instead of surfacing as a transport error of the sender.
            first = True
            for offset in range(0, max(len(view), 1), CHUNK):
                chunk = bytes(view[offset : offset + CHUNK])
                msg = (
                    pb.WriteMemoryRequest(pid=pid, addr=start, data=chunk)
                    if first
                    else pb.WriteMemoryRequest(data=chunk)
                )
                first = False
                if call.done():
                    break
                try:
                    await call.write(msg)
                except (grpc.RpcError, asyncio.InvalidStateError):
                    break
            if not call.done():
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            resp: pb.WriteMemoryResponse = await call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return resp.bytes_written

    def access_stream(self) -> AccessStream:
        """An Access stream for this process's loads and stores (opened on first use)."""
        return AccessStream(self.kernel, self.pid)

    # ---- introspection --------------------------------------------------------------------

    async def maps(self) -> str:
        """/proc/PID/maps."""
        resp: pb.GetMapsResponse = await self._unary_memory(
            "GetMaps", pb.GetMapsRequest(pid=self.pid)
        )
        return resp.text

    async def smaps(self) -> str:
        """/proc/PID/smaps."""
        resp: pb.GetSmapsResponse = await self._unary_memory(
            "GetSmaps", pb.GetSmapsRequest(pid=self.pid)
        )
        return resp.text

    async def pagemap(self, addr: int, npages: int) -> list[int]:
        """/proc/PID/pagemap entries for ``npages`` pages from ``addr``'s page.

        Each entry is a u64: see ``vkclient.PM_PRESENT``, ``PM_MMAP_EXCLUSIVE`` …, and
        ``vkclient.pagemap_pfn()``.
        """
        resp: pb.GetPagemapResponse = await self._unary_memory(
            "GetPagemap",
            pb.GetPagemapRequest(
                pid=self.pid, addr=_ulong(addr, "addr"), npages=_ulong(npages, "npages")
            ),
        )
        entries = array("Q")
        entries.frombytes(resp.entries)
        if sys.byteorder == "big":
            entries.byteswap()  # pagemap entries travel little-endian
        return entries.tolist()

    async def status(self) -> dict[str, int]:
        """The memory fields of /proc/PID/status (VmSize, VmRSS, VmPin …), in kB like the file."""
        resp: pb.GetProcessStatusResponse = await self._unary_memory(
            "GetProcessStatus", pb.GetProcessStatusRequest(pid=self.pid)
        )
        return {f.name: f.value for f in resp.fields}

    async def mmap_lock_stats(self) -> dict[str, int]:
        """The process's mmap_lock statistics (acquisitions, contention, wait and hold ns)."""
        resp: pb.GetMmapLockStatsResponse = await self._unary_memory(
            "GetMmapLockStats", pb.GetMmapLockStatsRequest(pid=self.pid)
        )
        return {s.name: s.value for s in resp.stats}
