"""Start the real vkernel daemon for a benchmark and talk to it with the generated stubs.

Why a subprocess and raw stubs: a benchmark must see what a client sees — the daemon's own
process, its interceptors, logging and event loop — with client and server on separate
processes exactly like the floor server (perf-floor.md), and without the SDK's conveniences
adding client-side cost the floor does not pay.  Later ``bench_*.py`` modules reuse
:func:`vkernel_daemon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from bench._harness import ServerProcess, probe_channel
from vkernel.v1 import (
    process_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    system_service_pb2,
    system_service_pb2_grpc,
)

Metadata = tuple[tuple[str, str], ...]


@dataclasses.dataclass
class Vkernel:
    """A running daemon with one open session.

    ``metadata`` must go on every call; ``keepalive`` is the session's long-lived Keepalive
    stream (kept open for the session's whole life, as a real client does), which
    :meth:`ping` drives one request → one response.
    """

    server: ServerProcess
    channel: grpc.aio.Channel
    session_id: str
    token: str
    metadata: Metadata
    session: session_service_pb2_grpc.SessionServiceAsyncStub
    system: system_service_pb2_grpc.SystemServiceAsyncStub
    process: process_service_pb2_grpc.ProcessServiceAsyncStub
    keepalive: grpc.aio.StreamStreamCall[
        session_service_pb2.KeepaliveRequest, session_service_pb2.KeepaliveResponse
    ]

    async def ping(self, sequence: int) -> session_service_pb2.KeepaliveResponse:
        """One keepalive round trip; raises if the daemon breaks the echo contract."""
        try:
            await self.keepalive.write(session_service_pb2.KeepaliveRequest(sequence=sequence))
            got = await self.keepalive.read()
        except asyncio.InvalidStateError:
            got = grpc.aio.EOF
        if got is grpc.aio.EOF:
            raise RuntimeError(
                f"the daemon ended the Keepalive stream at ping {sequence}: "
                f"{await self.keepalive.code()} {await self.keepalive.details()!r}; "
                f"daemon log tail:\n{self.server.log_tail()}"
            )
        resp = cast(session_service_pb2.KeepaliveResponse, got)
        if resp.sequence != sequence:
            raise RuntimeError(
                f"Keepalive answered sequence {resp.sequence} to ping {sequence}"
                " (the proto promises one response per request, same sequence)"
            )
        return resp


async def _healthy(target: str) -> bool:
    async with probe_channel(target) as ch:
        # The typeshed stub of HealthStub lacks its methods; a typed multicallable instead.
        check: grpc.aio.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        resp = await check(
            health_pb2.HealthCheckRequest(service=""), timeout=1.0, wait_for_ready=True
        )
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


async def _prefault_over(vk: Vkernel) -> bool:
    """GetInfo says the daemon's background prefault thread has finished (or never ran)."""
    info = await vk.system.GetInfo(
        system_service_pb2.GetInfoRequest(), metadata=vk.metadata, timeout=5
    )
    return not info.prefault_running


@contextlib.asynccontextmanager
async def vkernel_daemon(
    scratch: Path,
    *,
    client_name: str = "bench",
    extra_args: Sequence[str] = (),
    session_timeout_s: float = 3600.0,
    start_limit_s: float = 30.0,
    prefault_limit_s: float = 60.0,
) -> AsyncIterator[Vkernel]:
    """Run ``python -m vkernel serve`` on a UNIX socket in ``scratch`` until the block ends.

    Waits for gRPC health "" to say SERVING, opens a session and its Keepalive stream, waits
    (up to ``prefault_limit_s``) until GetInfo says the boot-time prefault is over, and on
    exit closes the session and stops the daemon with SIGTERM.  Raises, quoting the daemon's
    log, if it fails to start or settle, or does not exit cleanly.

    ``session_timeout_s`` is passed as ``--session-timeout``: the daemon ends a session whose
    keepalive stream is silent that long (1 s by default), and a benchmark must be free to
    leave the stream idle while it times something else rather than ping in the background
    and disturb its own measurement.
    """
    sock = scratch / "vk.sock"
    target = f"unix://{sock}"
    server = ServerProcess(
        [
            sys.executable,
            "-m",
            "vkernel",
            "serve",
            "--listen",
            target,
            "--log-format",
            "json",
            "--session-timeout",
            f"{session_timeout_s:g}",
            *extra_args,
        ],
        scratch,
        "vkernel",
        # One info line per RPC would push everything telling out of a quoted log tail.
        quiet=lambda line: '"rpc_finished"' in line and '"code": "OK"' in line,
    )
    clean_exit = False
    try:
        await server.wait_until(lambda: _healthy(target), start_limit_s, "SERVING")
        async with grpc.aio.insecure_channel(target) as channel:
            session = session_service_pb2_grpc.SessionServiceStub(channel)
            opened = await session.OpenSession(
                session_service_pb2.OpenSessionRequest(client_name=client_name), timeout=10
            )
            if not opened.token:
                raise RuntimeError(f"OpenSession returned no token: {opened}")
            md: Metadata = (("vkernel-session", opened.token),)
            keepalive = session.Keepalive(metadata=md)
            vk = Vkernel(
                server=server,
                channel=channel,
                session_id=opened.session_id,
                token=opened.token,
                metadata=md,
                session=session,
                system=system_service_pb2_grpc.SystemServiceStub(channel),
                process=process_service_pb2_grpc.ProcessServiceStub(channel),
                keepalive=keepalive,
            )
            try:
                await vk.ping(0)
                # At boot the daemon backs its memfd with host pages in a background thread
                # (PhysMem.prefault; --no-prefault turns it off). On a 2-vCPU machine it took a
                # whole CPU for seconds while the first figures were measured. At SCHED_IDLE it
                # yields the CPU, but still competes for memory bandwidth and the mapping's
                # mmap lock, and how much of the memfd is host-backed yet would vary between
                # runs: measure a settled daemon (GetInfo polled every 50 ms).
                await server.wait_until(
                    lambda: _prefault_over(vk), prefault_limit_s, "done with its boot prefault"
                )
                yield vk
                server.check_alive()
                await session.CloseSession(
                    session_service_pb2.CloseSessionRequest(), metadata=md, timeout=10
                )
                clean_exit = True
            finally:
                keepalive.cancel()
    finally:
        rc = await server.stop()
        # 0 is a clean shutdown; -SIGTERM means the daemon let the signal kill it, which is
        # only acceptable when we are already failing for another reason.
        if clean_exit and rc != 0:
            raise RuntimeError(
                f"vkernel (pid {server.pid}) exited with status {rc} on SIGTERM; log tail:\n"
                f"{server.log_tail()}"
            )
