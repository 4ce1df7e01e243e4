"""ProcessService: spawn, list, kill, wait, fork — each on the caller's own processes."""

from __future__ import annotations

import errno
from typing import Any

import grpc

from vkernel.api.rpc import note_pid, require_session
from vkernel.grants import GrantTable
from vkernel.kernel.cred import RLIM_INFINITY, Capability, Cred, Rlimit
from vkernel.kernel.errors import KernelError, einval
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.task import Task, TaskState
from vkernel.sessions import Session, SessionTable
from vkernel.v1 import process_service_pb2 as pb
from vkernel.v1 import process_service_pb2_grpc as pb_grpc

_STATE = {TaskState.RUNNING: pb.PROCESS_STATE_RUNNING, TaskState.ZOMBIE: pb.PROCESS_STATE_ZOMBIE}
_PID_MAX = 2**31 - 1


def task_info(task: Task) -> pb.ProcessInfo:
    """ProcessInfo for one task, as ps would show it."""
    rss = vsize = 0
    mm = task.mm
    if mm is not None:
        rss = int(getattr(mm, "rss_bytes", 0))
        vsize = int(getattr(mm, "total_vm_bytes", 0))
    rl = task.rlimits
    return pb.ProcessInfo(
        pid=task.pid,
        ppid=task.ppid,
        name=task.comm,
        state=_STATE[task.state],
        credentials=pb.Credentials(
            uid=task.cred.uid,
            capabilities=[pb.Capability.ValueType(int(c)) for c in sorted(task.cred.caps)],
        ),
        rlimits=pb.Rlimits(
            as_bytes=min(rl[Rlimit.RLIMIT_AS], RLIM_INFINITY),
            memlock_bytes=min(rl[Rlimit.RLIMIT_MEMLOCK], RLIM_INFINITY),
        ),
        session_id=task.owner,
        min_flt=task.min_flt,
        maj_flt=task.maj_flt,
        rss_bytes=rss,
        vsize_bytes=vsize,
        age_seconds=0.0,
    )


def owned_task(kernel: Kernel, session: Session, pid: int) -> Task:
    """The session's task ``pid``: ESRCH if none, EPERM if another session owns it."""
    if pid <= 0 or pid > _PID_MAX:
        raise einval(f"pid {pid} out of range", field="pid")
    note_pid(pid)
    task = kernel.find_task(pid)
    if task.owner != session.id:
        raise KernelError(errno.EPERM, f"process {pid} belongs to another session", pid=pid)
    return task


class ProcessServicer(pb_grpc.ProcessServiceServicer):
    """Thin servicer over the kernel's task table."""

    def __init__(
        self, kernel: Kernel, sessions: SessionTable, grants: GrantTable | None = None
    ) -> None:
        self._kernel = kernel
        self._sessions = sessions
        self._grants = grants if grants is not None else GrantTable()

    async def Spawn(
        self, request: pb.SpawnRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SpawnResponse:
        session = require_session(context, self._sessions)
        caps: set[Capability] = set()
        for value in request.credentials.capabilities:
            try:
                caps.add(Capability(value))
            except ValueError:
                raise einval(
                    f"unknown capability {value}", field="credentials.capabilities"
                ) from None
        uid = request.credentials.uid if request.HasField("credentials") else 1000
        limits: dict[Rlimit, int] = {}
        if request.rlimits.HasField("as_bytes"):
            limits[Rlimit.RLIMIT_AS] = request.rlimits.as_bytes
        if request.rlimits.HasField("memlock_bytes"):
            limits[Rlimit.RLIMIT_MEMLOCK] = request.rlimits.memlock_bytes
        task = self._kernel.spawn(
            request.name, owner=session.id, cred=Cred(uid=uid, caps=frozenset(caps)), rlimits=limits
        )
        note_pid(task.pid)
        return pb.SpawnResponse(process=task_info(task))

    async def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListProcessesResponse:
        session = require_session(context, self._sessions)
        tasks = [
            t for t in self._kernel.iter_tasks() if request.all_sessions or t.owner == session.id
        ]
        return pb.ListProcessesResponse(processes=[task_info(t) for t in tasks])

    async def Kill(
        self, request: pb.KillRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.KillResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        self._kernel.kill(task, request.signal)
        return pb.KillResponse()

    async def Wait(
        self, request: pb.WaitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WaitResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        status = await self._kernel.wait(task)
        return pb.WaitResponse(
            pid=task.pid, status=status, exit_code=task.exit_code, signal=task.exit_signal
        )

    async def Fork(
        self, request: pb.ForkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ForkResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        fork = getattr(self._kernel, "fork", None)
        if fork is None:
            raise KernelError(errno.ENOSYS, "fork is not available in this kernel")
        child: Task = await fork(task)
        return pb.ForkResponse(child=task_info(child))

    async def GrantAccess(
        self, request: pb.GrantAccessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GrantAccessResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        self._grants.grant(task, request.grantee_session_id)
        return pb.GrantAccessResponse()

    async def RevokeAccess(
        self, request: pb.RevokeAccessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RevokeAccessResponse:
        session = require_session(context, self._sessions)
        task = owned_task(self._kernel, session, request.pid)
        self._grants.revoke(task, request.grantee_session_id)
        return pb.RevokeAccessResponse()
