"""MemoryService: the mmap family, user memory reads and writes, and mm introspection.

Thin, like every servicer: decode, check who may act on the process, call the kernel's mm
facade (:mod:`vkernel.kernel.mm_api`), encode. Access rule (see memory_service.proto):
calls that change an address space or touch user memory need the caller's own process
(EPERM otherwise); read-only introspection works on any process, like /proc/PID files for
a tool running in its own session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from vkernel.api.process import owned_task
from vkernel.api.rpc import note_pid, require_live, require_session
from vkernel.kernel import mm_api
from vkernel.kernel.errors import KernelError, UserFault, einval
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.proc import MAX_PAGEMAP_PAGES
from vkernel.kernel.task import Task
from vkernel.kernel.uapi import PAGE_FLAG_NAMES, PAGE_MASK, PAGE_SHIFT
from vkernel.sessions import SessionTable
from vkernel.v1 import memory_service_pb2 as pb
from vkernel.v1 import memory_service_pb2_grpc as pb_grpc

MAX_ACCESS_BYTES = 1 << 20
"""Bytes one load or store on the Access stream may move (one ReadMemory chunk)."""
U64_LIMIT = 1 << 64
"""One past the largest unsigned long: a range must not wrap around the address space."""
_PID_MAX = 2**31 - 1

Context = grpc.aio.ServicerContext[Any, Any]


def check_range(addr: int, length: int, field: str = "length") -> None:
    """EINVAL naming ``field`` when [addr, addr + length) wraps past the top of u64."""
    if addr + length > U64_LIMIT:
        raise einval(f"{field} {length:#x} from {addr:#x} wraps around the address space", field)


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """Thin servicer over the kernel's mm facade."""

    def __init__(self, kernel: Kernel, sessions: SessionTable) -> None:
        self._kernel = kernel
        self._sessions = sessions

    # ---- access ---------------------------------------------------------------------------

    def _owned(self, context: Context, pid: int) -> Task:
        """The caller's own process ``pid`` (ESRCH if none, EPERM if another session's)."""
        session = require_session(context, self._sessions)
        return owned_task(self._kernel, session, pid)

    def _any(self, context: Context, pid: int) -> Task:
        """Any session's process ``pid``, for read-only introspection (ESRCH if none)."""
        require_session(context, self._sessions)
        if pid <= 0 or pid > _PID_MAX:
            raise einval(f"pid {pid} out of range", field="pid")
        note_pid(pid)
        return self._kernel.find_task(pid)

    # ---- the mmap family ------------------------------------------------------------------

    async def Mmap(self, request: pb.MmapRequest, context: Context) -> pb.MmapResponse:
        task = self._owned(context, request.pid)
        addr = await mm_api.sys_mmap(
            task,
            request.addr,
            request.length,
            request.prot,
            request.flags,
            request.fd,
            request.offset,
        )
        return pb.MmapResponse(addr=addr)

    async def Munmap(self, request: pb.MunmapRequest, context: Context) -> pb.MunmapResponse:
        task = self._owned(context, request.pid)
        check_range(request.addr, request.length)
        await mm_api.sys_munmap(task, request.addr, request.length)
        return pb.MunmapResponse()

    async def Mprotect(self, request: pb.MprotectRequest, context: Context) -> pb.MprotectResponse:
        task = self._owned(context, request.pid)
        # No wrap check: mprotect(2) answers ENOMEM for a wrapping range, and the kernel does.
        await mm_api.sys_mprotect(task, request.addr, request.length, request.prot)
        return pb.MprotectResponse()

    async def Mremap(self, request: pb.MremapRequest, context: Context) -> pb.MremapResponse:
        task = self._owned(context, request.pid)
        check_range(request.old_addr, request.old_length, "old_length")
        addr = await mm_api.sys_mremap(
            task,
            request.old_addr,
            request.old_length,
            request.new_length,
            request.flags,
            request.new_addr,
        )
        return pb.MremapResponse(addr=addr)

    async def Madvise(self, request: pb.MadviseRequest, context: Context) -> pb.MadviseResponse:
        task = self._owned(context, request.pid)
        check_range(request.addr, request.length)
        await mm_api.sys_madvise(task, request.addr, request.length, request.advice)
        return pb.MadviseResponse()

    async def Msync(self, request: pb.MsyncRequest, context: Context) -> pb.MsyncResponse:
        task = self._owned(context, request.pid)
        check_range(request.addr, request.length)
        await mm_api.sys_msync(task, request.addr, request.length, request.flags)
        return pb.MsyncResponse()

    # ---- user memory ----------------------------------------------------------------------

    async def ReadMemory(
        self, request: pb.ReadMemoryRequest, context: Context
    ) -> AsyncIterator[pb.ReadMemoryResponse]:
        # A plain linear generator (no task group, no cancel scope), so yield is safe here
        # (conventions §1.4); the interceptor relays each item with context.write, whose
        # await is the backpressure.
        task = self._owned(context, request.pid)
        check_range(request.addr, request.length)
        addr = request.addr
        async for chunk in mm_api.read_user(task, request.addr, request.length):
            data = _as_bytes(chunk)
            yield pb.ReadMemoryResponse(addr=addr, data=data)
            addr += len(data)

    async def WriteMemory(
        self, request_iterator: AsyncIterator[pb.WriteMemoryRequest], context: Context
    ) -> pb.WriteMemoryResponse:
        session = require_session(context, self._sessions)
        task: Task | None = None
        start = written = 0
        async for request in request_iterator:
            if task is None:
                task = owned_task(self._kernel, session, request.pid)
                start = request.addr
            elif request.pid and request.pid != task.pid:
                raise einval(
                    f"pid changed from {task.pid} to {request.pid} within one write", "pid"
                )
            if request.data:
                check_range(start + written, len(request.data), "data")
                await mm_api.write_user(task, start + written, request.data)
                written += len(request.data)
        if task is None:
            raise einval("an empty write stream names no process", field="pid")
        return pb.WriteMemoryResponse(bytes_written=written)

    async def Access(  # type: ignore[override]  # the stub types only the generator form
        self, request_iterator: AsyncIterator[pb.AccessRequest], context: Context
    ) -> None:
        # Read/write style, which grpc.aio takes as well as a generator: no generator layers
        # for the interceptor to relay (≈ 5-10 % of an Access round trip). The accesses run one
        # at a time, in order, as one thread of the process runs its loads and stores; a
        # fault that sleeps holds up the stream.
        session = require_session(context, self._sessions)
        task: Task | None = None
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            require_live(session)  # the client's session ended under its stream
            if task is None or task.pid != request.pid:
                # Ownership never changes, so the lookup is paid once per process, not per
                # access; a process that exits meanwhile answers ESRCH from its access.
                task = owned_task(self._kernel, session, request.pid)
            await context.write(await _access(task, request))

    # ---- introspection --------------------------------------------------------------------

    async def GetMaps(self, request: pb.GetMapsRequest, context: Context) -> pb.GetMapsResponse:
        task = self._any(context, request.pid)
        return pb.GetMapsResponse(text=mm_api.proc_maps(task))

    async def GetSmaps(self, request: pb.GetSmapsRequest, context: Context) -> pb.GetSmapsResponse:
        task = self._any(context, request.pid)
        return pb.GetSmapsResponse(text=mm_api.proc_smaps(task))

    async def GetPagemap(
        self, request: pb.GetPagemapRequest, context: Context
    ) -> pb.GetPagemapResponse:
        task = self._any(context, request.pid)
        if request.npages > MAX_PAGEMAP_PAGES:
            raise einval(
                f"npages {request.npages} is more than {MAX_PAGEMAP_PAGES} per call", "npages"
            )
        addr = request.addr & PAGE_MASK
        check_range(addr, request.npages << PAGE_SHIFT, "npages")
        entries = mm_api.pagemap(task, addr, request.npages)
        return pb.GetPagemapResponse(addr=addr, entries=bytes(entries))

    async def DumpPage(self, request: pb.DumpPageRequest, context: Context) -> pb.DumpPageResponse:
        require_session(context, self._sessions)
        return dump_page_response(request.pfn, mm_api.dump_page(self._kernel, request.pfn))

    async def GetMmapLockStats(
        self, request: pb.GetMmapLockStatsRequest, context: Context
    ) -> pb.GetMmapLockStatsResponse:
        task = self._any(context, request.pid)
        return pb.GetMmapLockStatsResponse(stats=named_values(mm_api.mmap_lock_stats(task)))

    async def GetProcessStatus(
        self, request: pb.GetProcessStatusRequest, context: Context
    ) -> pb.GetProcessStatusResponse:
        task = self._any(context, request.pid)
        return pb.GetProcessStatusResponse(fields=named_values(mm_api.proc_status_mm(task)))

    async def Audit(self, request: pb.AuditRequest, context: Context) -> pb.AuditResponse:
        require_session(context, self._sessions)
        problems = [str(p) for p in mm_api.audit(self._kernel)]
        return pb.AuditResponse(clean=not problems, problems=problems)


async def _access(task: Task, request: pb.AccessRequest) -> pb.AccessResponse:
    """One load or store of an Access stream; a fault is its result, not the stream's end."""
    addr = request.addr
    if request.kind == pb.ACCESS_KIND_LOAD:
        length = request.length
        if length > MAX_ACCESS_BYTES:
            raise einval(f"a load of more than {MAX_ACCESS_BYTES} bytes", "length")
        check_range(addr, length)
        parts: list[bytes] = []
        try:
            async for chunk in mm_api.read_user(task, addr, length):
                parts.append(_as_bytes(chunk))
        except KernelError as e:
            data = b"".join(parts)
            return _access_error(request.tag, e, data, len(data))
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return pb.AccessResponse(tag=request.tag, data=data, bytes_done=len(data))
    if request.kind == pb.ACCESS_KIND_STORE:
        data = request.data
        if len(data) > MAX_ACCESS_BYTES:
            raise einval(f"a store of more than {MAX_ACCESS_BYTES} bytes", "data")
        check_range(addr, len(data), "data")
        try:
            await mm_api.write_user(task, addr, data)
        except UserFault as e:
            # write_user stores everything before the faulting byte, so that is the count.
            done = min(max(e.address - addr, 0), len(data))
            return _access_error(request.tag, e, b"", done)
        except KernelError as e:
            return _access_error(request.tag, e, b"", 0)
        return pb.AccessResponse(tag=request.tag, bytes_done=len(data))
    raise einval("an access is neither a load nor a store", "kind")


def _access_error(tag: int, e: KernelError, data: bytes, done: int) -> pb.AccessResponse:
    if isinstance(e, UserFault):
        return pb.AccessResponse(
            tag=tag,
            errno=e.errno,
            data=data,
            bytes_done=done,
            signal=e.signo,
            fault_address=e.address,
        )
    return pb.AccessResponse(tag=tag, errno=e.errno, data=data, bytes_done=done)


def _as_bytes(chunk: bytes | memoryview) -> bytes:
    """A chunk as the bytes protobuf needs, without a second copy when it already is one."""
    if isinstance(chunk, bytes):
        return chunk
    whole = chunk.obj
    if isinstance(whole, bytes) and chunk.nbytes == len(whole) and chunk.c_contiguous:
        return whole
    return chunk.tobytes()


def named_values(values: Mapping[str, Any]) -> list[pb.NamedValue]:
    """A name → number mapping as NamedValues, in the mapping's order."""
    return [pb.NamedValue(name=str(k), value=int(v)) for k, v in values.items()]


def _flags(raw: Any) -> tuple[int, list[str]]:
    """Page flags as (bits, names), whether the kernel gave bits or names."""
    if isinstance(raw, int):
        return raw, [name for bit, name in PAGE_FLAG_NAMES if raw & bit]
    names = [str(n) for n in raw or ()]
    bits_by_name = {name: bit for bit, name in PAGE_FLAG_NAMES}
    return sum(bits_by_name.get(n, 0) for n in set(names)), names


def _mapping(page: Mapping[str, Any]) -> str:
    """page->mapping as "kind:id", or empty when the page has none."""
    mapping = page.get("mapping")
    if not mapping:
        return ""
    if isinstance(mapping, int):
        kind = str(page.get("mapping_kind") or "mapping")
        return f"{kind}:{mapping:#x}"
    return str(mapping)


def dump_page_response(pfn: int, page: Mapping[str, Any]) -> pb.DumpPageResponse:
    """The kernel's dump_page() dict as a DumpPageResponse."""
    bits, names = _flags(page.get("flags", 0))
    return pb.DumpPageResponse(
        pfn=int(page.get("pfn", pfn)),
        refcount=int(page.get("refcount", 0)),
        mapcount=int(page.get("mapcount", 0)),
        pincount=int(page.get("pincount", 0)),
        flags=bits,
        flag_names=names,
        compound_head=int(page.get("compound_head", pfn)),
        compound_order=int(page.get("order", page.get("compound_order", 0))),
        mapping=_mapping(page),
        index=int(page.get("index", 0)),
        entire_mapcount=int(page.get("entire_mapcount", 0)),
        zone=str(page.get("zone", "")),
        maybe_dma_pinned=bool(page.get("maybe_dma_pinned", False)),
    )
