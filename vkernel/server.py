"""The daemon: a grpc.aio server around one Kernel, with health, reflection and clean shutdown."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vkernel import __version__
from vkernel.api.aio import AioServicer
from vkernel.api.files import FileServicer
from vkernel.api.gup import GupServicer
from vkernel.api.memory import MemoryServicer
from vkernel.api.process import ProcessServicer
from vkernel.api.rpc import InflightCalls, KernelInterceptor
from vkernel.api.session import SessionServicer
from vkernel.api.system import SystemServicer
from vkernel.api.userfaultfd import UserfaultfdServicer
from vkernel.config import DEFAULT_DEVICE, Listen, ServeConfig
from vkernel.dma_socket import DmaSocketServer, dma_socket_path
from vkernel.grants import GrantTable
from vkernel.gup_handles import HandleTable
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.errors import KernelError
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.sessions import SessionTable
from vkernel.v1 import (
    aio_service_pb2,
    aio_service_pb2_grpc,
    file_service_pb2,
    file_service_pb2_grpc,
    gup_service_pb2,
    gup_service_pb2_grpc,
    memory_service_pb2,
    memory_service_pb2_grpc,
    process_service_pb2,
    process_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
    userfaultfd_service_pb2,
    userfaultfd_service_pb2_grpc,
)

log = structlog.get_logger("vkernel.server")

SERVICE_NAMES = (
    session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    process_service_pb2.DESCRIPTOR.services_by_name["ProcessService"].full_name,
    system_service_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
    memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,
    gup_service_pb2.DESCRIPTOR.services_by_name["GupService"].full_name,
    file_service_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
    userfaultfd_service_pb2.DESCRIPTOR.services_by_name["UserfaultfdService"].full_name,
    aio_service_pb2.DESCRIPTOR.services_by_name["AioService"].full_name,
)
# 64 MiB messages: page data moves in large chunks, and a malformed huge request must be
# refused by size rather than crash anything.
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a live daemon's port must not be silently shared
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class StartupError(Exception):
    """The daemon cannot start (address in use, bad socket path …): a clear message, exit 1."""


def prepare_unix_socket(path: str) -> None:
    """Make a UNIX socket path bindable: create its folder (0700) and remove a stale socket.

    A socket file whose daemon is gone refuses connections: it is replaced. One that accepts
    a connection belongs to a live daemon: that is an error, never a takeover.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            p.unlink(missing_ok=True)
            log.info("stale_socket_removed", path=path)
            return
        raise StartupError(f"cannot probe {path}: {e.strerror}") from e
    finally:
        probe.close()
    raise StartupError(f"{path} is in use by a running daemon")


def bind(server: grpc.aio.Server, listen: Listen) -> str:
    """Bind one listener; UNIX sockets get mode 0600. Returns the bound address."""
    if listen.scheme == "unix":
        prepare_unix_socket(listen.target)
        old = os.umask(0o177)  # the socket is born 0600: no window with wider permissions
        try:
            server.add_insecure_port(listen.grpc_address())
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {listen}: {e}") from e
        finally:
            os.umask(old)
        os.chmod(listen.target, 0o600)
        return str(listen)
    try:
        port = server.add_insecure_port(listen.grpc_address())
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {listen}: address in use or unavailable") from e
    host = listen.target.rpartition(":")[0]
    return f"tcp://{host}:{port}"


async def serve(
    cfg: ServeConfig,
    *,
    on_ready: Callable[[list[str]], None] | None = None,
    shutdown: anyio.Event | None = None,
    handle_signals: bool = True,
    kernel: Kernel | None = None,
    freeze_gc: bool = False,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown`` is set); return the exit status."""
    stop = shutdown or anyio.Event()
    if handle_signals:
        # Before anything else: a SIGTERM that arrives while we start must drain, not kill.
        _install_signal_handlers(stop)
    kernel = kernel or Kernel(
        KernelConfig(
            memory_bytes=cfg.memory_bytes,
            arch=cfg.arch,
            movable_bytes=cfg.movable_bytes,
            thp=cfg.thp,
            readahead=cfg.readahead,
            fault_retry=cfg.fault_retry,
            unprivileged_userfaultfd=cfg.unprivileged_userfaultfd,
            dio_gup=cfg.dio_gup,
            dio_foll=cfg.dio_foll,
        )
    )
    if not kernel.vfs.devices:
        try:
            for spec in cfg.devices or (DeviceSpec.parse(DEFAULT_DEVICE),):
                kernel.vfs.add_device(spec)
        except KernelError as e:
            log.error("startup_failed", error=f"block device: {e}")
            await kernel.vfs.shutdown()
            return 1
    if cfg.prefault:
        # The host's first touch of a memfd page costs far more than a vkernel fault; pay it
        # once, off the event loop, while the daemon already serves.
        kernel.mem.prefault(background=True)
    sessions = SessionTable(kernel)
    inflight = InflightCalls()
    server = grpc.aio.server(
        interceptors=[KernelInterceptor(cfg.token, inflight)], options=GRPC_OPTIONS
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    session_service_pb2_grpc.add_SessionServiceServicer_to_server(
        SessionServicer(sessions, cfg.session_timeout), server
    )
    grants = GrantTable()
    handles = HandleTable(kernel, grants)
    # Co-located drivers fetch the physical-memory fd next to the first UNIX socket.
    unix = [item.target for item in cfg.listen if item.scheme == "unix"]
    uffd_servicer = UserfaultfdServicer(kernel, sessions)
    # The same side channel hands co-located monitors their uffds as real fds.
    dma = (
        DmaSocketServer(dma_socket_path(unix[0]), kernel, sessions, uffd_servicer.table.open_fd)
        if unix
        else None
    )
    gup_servicer = GupServicer(kernel, sessions, handles, dma.path if dma else "")
    process_service_pb2_grpc.add_ProcessServiceServicer_to_server(
        ProcessServicer(kernel, sessions, grants), server
    )
    system_service_pb2_grpc.add_SystemServiceServicer_to_server(
        SystemServicer(kernel, sessions), server
    )
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(
        MemoryServicer(kernel, sessions), server
    )
    file_service_pb2_grpc.add_FileServiceServicer_to_server(FileServicer(kernel, sessions), server)
    gup_service_pb2_grpc.add_GupServiceServicer_to_server(gup_servicer, server)
    userfaultfd_service_pb2_grpc.add_UserfaultfdServiceServicer_to_server(uffd_servicer, server)
    aio_servicer = AioServicer(kernel, sessions)
    aio_service_pb2_grpc.add_AioServiceServicer_to_server(aio_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    try:
        addresses = [bind(server, item) for item in cfg.listen]
    except StartupError as e:
        log.error("startup_failed", error=str(e))
        await kernel.vfs.shutdown()
        return 1
    if dma is not None and not dma.start():
        gup_servicer.set_dma_socket_path("")
        dma = None
    if freeze_gc:
        # What boot made (modules, the kernel's structures, protobuf descriptors) lives as
        # long as the daemon: out of the collector's generations, a full collection no longer
        # walks it (≈35 ms with a fresh 1 GiB kernel, a latency spike for the call it lands
        # in). Only for a daemon process: in a test process it would pin earlier tests' cycles.
        gc.collect()
        gc.freeze()
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "server_started",
        addresses=addresses,
        version=__version__,
        arch=cfg.arch,
        memory_bytes=cfg.memory_bytes,
        pid=os.getpid(),
    )
    if on_ready is not None:
        on_ready(addresses)

    async with anyio.create_task_group() as tg:
        tg.start_soon(kernel.vfs.flusher)  # the dirty-page flusher (wb_workfn)
        await stop.wait()
        tg.cancel_scope.cancel()

    with anyio.CancelScope(shield=True):
        await health_servicer.enter_graceful_shutdown()
        gup_servicer.stop_streams()
        uffd_servicer.stop_streams()
        aio_servicer.stop_streams()
        # Stop accepting now. Ordinary in-flight calls get the grace; long-lived keepalive
        # streams would hold all of it, so sessions end (with close semantics) once the
        # ordinary calls are done or the grace is up, and calls still waiting on a session's
        # processes (waitpid …) then complete. The extra second lets those answers go out.
        stopping = _spawn_stop(server, cfg.grace + 1.0)
        with anyio.move_on_after(cfg.grace):
            await inflight.wait_idle()
        sessions.close_all("daemon shutting down")
        # What is left are long-lived streams (health Watch) and answers being sent: a short
        # tightened grace lets the answers out without waiting on the watchers.
        await server.stop(0.5)
        await stopping.wait()
        if dma is not None:
            await dma.stop()
        await aio_servicer.drain()  # AIO still in flight: its pages stay pinned until done
        # Unmount: write back dirty pages, commit each device's namespace, close devices.
        await kernel.vfs.shutdown()
        _remove_sockets(cfg.listen)
    log.info("server_stopped")
    return 0


def _remove_sockets(listen: tuple[Listen, ...]) -> None:
    """Unlink our UNIX sockets so the next daemon finds no stale file."""
    for item in listen:
        if item.scheme == "unix":
            Path(item.target).unlink(missing_ok=True)


def _spawn_stop(server: grpc.aio.Server, grace: float) -> anyio.Event:
    """Start server.stop(grace) in the background; the returned event fires when it is done."""
    done = anyio.Event()

    async def run() -> None:
        try:
            await server.stop(grace)
        finally:
            done.set()

    task = asyncio.get_running_loop().create_task(run())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return done


_background: set[object] = set()


def _install_signal_handlers(stop: anyio.Event) -> None:
    """First SIGTERM/SIGINT: orderly shutdown (``stop``). A second one: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("shutdown_forced", signal=name)
            os._exit(1)
        log.info("shutdown_requested", signal=name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
