"""The async SDK: a Kernel handle (one session) and Process handles."""

from __future__ import annotations

import asyncio
import contextlib
import signal as _signal
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vkclient._address import grpc_target, resolve_address, resolve_token
from vkclient._files import FilesMixin, KernelFilesMixin
from vkclient._gup import GupMixin, KernelGupMixin
from vkclient._keepalive import KeepaliveThread
from vkclient._memory import KernelMemoryMixin, MemoryMixin
from vkclient.errors import VkernelError, from_rpc_error
from vkernel.v1 import (
    process_service_pb2,
    process_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
)

if TYPE_CHECKING:
    from vkclient.uffd import Userfaultfd

T = TypeVar("T")

CAP_IPC_LOCK = process_service_pb2.CAPABILITY_CAP_IPC_LOCK
CAP_SYS_PTRACE = process_service_pb2.CAPABILITY_CAP_SYS_PTRACE
ProcessInfo = process_service_pb2.ProcessInfo
SystemInfo = system_service_pb2.GetInfoResponse

KEEPALIVE_INTERVAL = 0.2
"""Seconds between keepalive pings (from their own thread); the daemon ends a session after
about 1 s of silence."""
DEFAULT_TIMEOUT = 60.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


async def _call(awaitable: Awaitable[T]) -> T:
    """Await one RPC, turning a gRPC failure into the exception its errno means."""
    try:
        return await awaitable
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


@dataclass(frozen=True)
class WaitResult:
    """What waitpid(2) reports."""

    pid: int
    status: int
    exit_code: int
    signal: int


class Kernel(KernelMemoryMixin, KernelGupMixin, KernelFilesMixin):
    """A connection to one vkernel daemon with one session; use ``async with connect()``."""

    def __init__(
        self, channel: grpc.aio.Channel, target: str, auth: tuple[tuple[str, str], ...]
    ) -> None:
        self._channel = channel
        self._target = target
        self._auth = auth
        self._metadata = auth
        self.session_id = ""
        self.timeout = DEFAULT_TIMEOUT
        self._sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self._processes = process_service_pb2_grpc.ProcessServiceStub(channel)
        self._system = system_service_pb2_grpc.SystemServiceStub(channel)
        self._health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs lack the methods
        self._keepalive: KeepaliveThread | None = None
        self._closed = False

    # ---- session ------------------------------------------------------------------------

    async def _open(self, client_name: str) -> None:
        resp = await _call(
            self._sessions.OpenSession(
                session_service_pb2.OpenSessionRequest(client_name=client_name),
                metadata=self._auth,
                timeout=self.timeout,
            )
        )
        self.session_id = resp.session_id
        self._metadata = (*self._auth, ("vkernel-session", resp.token))
        self._keepalive = KeepaliveThread(
            self._target, CHANNEL_OPTIONS, self._metadata, KEEPALIVE_INTERVAL
        )
        self._keepalive.start()
        await self.ping()  # the session is alive once the first pong comes back

    async def ping(self) -> float:
        """One keepalive round trip (a bidi stream message each way); returns seconds."""
        if self._keepalive is None:
            raise VkernelError(grpc.StatusCode.FAILED_PRECONDITION, "session not open")
        try:
            return await asyncio.wrap_future(self._keepalive.ping())
        except ConnectionError:
            err = self._keepalive.error
            if isinstance(err, grpc.RpcError):
                raise from_rpc_error(err) from None
            raise

    async def close(self) -> None:
        """End the session (its processes exit) and close the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(grpc.RpcError, VkernelError):
            await _call(
                self._sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(),
                    metadata=self._metadata,
                    timeout=5,
                )
            )
        if self._keepalive is not None:
            await asyncio.to_thread(self._keepalive.stop)
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- system -------------------------------------------------------------------------

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 Check: SERVING, NOT_SERVING …"""
        resp = await _call(
            self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def info(self) -> SystemInfo:
        """Version, arch, memory size, uptime."""
        return await _call(
            self._system.GetInfo(
                system_service_pb2.GetInfoRequest(), metadata=self._metadata, timeout=self.timeout
            )
        )

    async def vmstat(self) -> dict[str, int]:
        """/proc/vmstat as a dict, in the kernel's order."""
        resp = await _call(
            self._system.GetVmstat(
                system_service_pb2.GetVmstatRequest(),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        )
        return {c.name: c.value for c in resp.counters}

    # ---- processes ----------------------------------------------------------------------

    async def spawn(
        self,
        name: str,
        *,
        uid: int = 1000,
        capabilities: Iterable[int] = (),
        rlimit_as: int | None = None,
        rlimit_memlock: int | None = None,
    ) -> Process:
        """Spawn a process owned by this session; ``async with`` it to kill and reap it."""
        rlimits = process_service_pb2.Rlimits(as_bytes=rlimit_as, memlock_bytes=rlimit_memlock)
        resp = await _call(
            self._processes.Spawn(
                process_service_pb2.SpawnRequest(
                    name=name,
                    credentials=process_service_pb2.Credentials(
                        uid=uid,
                        capabilities=[
                            process_service_pb2.Capability.ValueType(c) for c in capabilities
                        ],
                    ),
                    rlimits=rlimits,
                ),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        )
        return Process(self, resp.process)

    async def ps(self, all_sessions: bool = False) -> list[ProcessInfo]:
        """The process table (this session's, or everyone's)."""
        resp = await _call(
            self._processes.ListProcesses(
                process_service_pb2.ListProcessesRequest(all_sessions=all_sessions),
                metadata=self._metadata,
                timeout=self.timeout,
            )
        )
        return list(resp.processes)

    def process(self, pid: int) -> Process:
        """A handle on an existing process by pid (no call is made)."""
        return Process(self, ProcessInfo(pid=pid))

    # ---- userfaultfd --------------------------------------------------------------------

    async def userfaultfd(
        self, process: Process | int, flags: int = 0, *, features: int | None = 0
    ) -> Userfaultfd:
        """userfaultfd(2) on one of this session's processes, then the UFFDIO_API handshake
        asking for ``features`` (``None``: no handshake, for callers that test it).

        ``flags``: ``O_CLOEXEC``, ``O_NONBLOCK``, ``UFFD_USER_MODE_ONLY`` (without it the
        process needs CAP_SYS_PTRACE unless the daemon allows unprivileged userfaultfd).
        Returns a :class:`vkclient.uffd.Userfaultfd` this session holds; ``grant()`` passes
        it to a monitor session, which uses :meth:`attach_userfaultfd`.
        """
        from vkclient.uffd import Userfaultfd

        pid = process if isinstance(process, int) else process.pid
        uffd = await Userfaultfd.create(self, pid, flags)
        if features is not None:
            try:
                await uffd.api(features)
            except BaseException:
                with contextlib.suppress(OSError, VkernelError):
                    await uffd.close()
                raise
        return uffd

    def attach_userfaultfd(self, handle: int) -> Userfaultfd:
        """A uffd handle granted to this session (no call is made)."""
        from vkclient.uffd import Userfaultfd

        return Userfaultfd.attach(self, handle)

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        return await _call(method(request, metadata=self._metadata, timeout=timeout))


class Process(MemoryMixin, GupMixin, FilesMixin):
    """A process owned by the kernel handle's session."""

    def __init__(self, kernel: Kernel, info: ProcessInfo) -> None:
        self.kernel = kernel
        self.info = info
        self.pid = info.pid
        self._reaped = False

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} name={self.info.name!r}>"

    async def kill(self, sig: int = _signal.SIGKILL) -> None:
        """kill(2)."""
        k = self.kernel
        await k._unary(
            k._processes.Kill,
            process_service_pb2.KillRequest(pid=self.pid, signal=int(sig)),
            k.timeout,
        )

    async def wait(self, timeout: float | None = None) -> WaitResult:
        """waitpid(2): block until the process exits, then reap it."""
        k = self.kernel
        resp = await k._unary(
            k._processes.Wait, process_service_pb2.WaitRequest(pid=self.pid), timeout
        )
        self._reaped = True
        return WaitResult(resp.pid, resp.status, resp.exit_code, resp.signal)

    async def fork(self) -> Process:
        """fork(2): a child with a copy-on-write copy of the address space."""
        k = self.kernel
        resp = await k._unary(
            k._processes.Fork, process_service_pb2.ForkRequest(pid=self.pid), k.timeout
        )
        return Process(k, resp.child)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reaped or self.kernel._closed:
            return
        with contextlib.suppress(ProcessLookupError):
            await self.kill()
            await self.wait(timeout=self.kernel.timeout)


class connect:
    # Lower-case on purpose: it reads as a function call, like open().
    """Open a session on the daemon at ``addr`` ($VKERNEL_ADDR, else the default socket).

    ``async with connect() as k:`` closes the session on exit; ``k = await connect()`` leaves
    closing to the caller (``await k.close()``).
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        token: str | None = None,
        token_file: str | None = None,
        client_name: str = "vkclient",
    ) -> None:
        self._target = grpc_target(resolve_address(addr))
        self._bearer = resolve_token(token, token_file)
        self._client_name = client_name
        self._kernel: Kernel | None = None

    async def _open(self) -> Kernel:
        auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self._bearer}"),) if self._bearer else ()
        )
        channel = grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
        kernel = Kernel(channel, self._target, auth)
        try:
            await kernel._open(self._client_name)
        except BaseException:
            await channel.close()
            raise
        return kernel

    def __await__(self) -> Generator[Any, None, Kernel]:
        return self._open().__await__()

    async def __aenter__(self) -> Kernel:
        self._kernel = await self._open()
        return self._kernel

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._kernel is not None:
            await self._kernel.close()
