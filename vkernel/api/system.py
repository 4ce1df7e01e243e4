"""SystemService: version, memory, uptime, vmstat."""

from __future__ import annotations

from typing import Any

import grpc

from vkernel.kernel.kernel import PAGE_SIZE, Kernel
from vkernel.sessions import SessionTable
from vkernel.v1 import system_service_pb2 as pb
from vkernel.v1 import system_service_pb2_grpc as pb_grpc


class SystemServicer(pb_grpc.SystemServiceServicer):
    """Thin servicer over kernel-wide state. Needs no session: it is /proc for everyone."""

    def __init__(self, kernel: Kernel, sessions: SessionTable) -> None:
        self._kernel = kernel
        self._sessions = sessions

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        k = self._kernel
        try:
            free_pages = k.vmstat["nr_free_pages"]  # one gauge, not the whole vmstat
        except KeyError:
            free_pages = 0
        return pb.GetInfoResponse(
            version=k.version,
            arch=k.config.arch,
            memory_bytes=k.config.memory_bytes,
            page_size=PAGE_SIZE,
            uptime_seconds=k.uptime(),
            sessions=len(self._sessions),
            processes=len(k.tasks),
            free_bytes=free_pages * PAGE_SIZE,
            host_populated_bytes=k.mem.populated_bytes,
            prefault_running=k.mem.prefault_running,
        )

    async def GetVmstat(
        self, request: pb.GetVmstatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetVmstatResponse:
        return pb.GetVmstatResponse(
            counters=[pb.VmstatCounter(name=n, value=v) for n, v in self._kernel.vmstat.items()]
        )
