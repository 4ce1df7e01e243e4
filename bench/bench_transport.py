"""Transport floors: vkernel's own RPC round trips against a bare grpc.aio server.

Why: every vkernel operation pays at least one RPC, and perf-floor.md measured that gRPC alone
costs ~700 µs of CPU per unary call on this machine.  These figures tell how much the daemon
adds on top (interceptors, session lookup, protobuf, logging): each is measured against the
floor server of :mod:`bench._floors` in the same run, interleaved round by round.

Figures (ratio 1.0 = as fast as the bare transport, higher is better):

- ``unary_seq``: sequential unary µs/call — ``SystemService.GetInfo`` vs the floor's Unary.
- ``unary_seq_health``: the same with the daemon's ``grpc.health.v1.Health/Check``, which does
  no kernel work: what the daemon's server stack (interceptor, logging) adds by itself.
- ``unary_c8``: unary calls/s with 8 concurrent callers on one channel (the CPU-bound limit).
- ``unary_server_cpu_c8``: the server process's CPU µs per unary call during ``unary_c8``,
  which explains the throughput figure without the client's share.
- ``bidi_pingpong``: µs per round trip on one long-lived stream — the session's Keepalive
  stream vs the floor's PingPong.
- ``bidi_server_cpu``: the server's CPU µs per ping-pong round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from bench._floors import floor_server
from bench._harness import BenchContext, Record, make_record
from bench._vkernel import Vkernel, vkernel_daemon
from vkernel.v1 import system_service_pb2

UNARY_GOAL = 0.7
BIDI_GOAL = 0.7
# About half of a sequential call's time is the client's; the server's own cost can grow more
# than the client-visible time before a 0.7 latency goal is missed.
SERVER_CPU_GOAL = 0.5
CONCURRENCY = 8


@dataclass
class Side:
    """One server under test, as the three operations the rounds time."""

    label: str
    unary: Callable[[], Awaitable[object]]
    ping: Callable[[int], Awaitable[object]]
    cpu_ns: Callable[[], int]
    #: A second unary that does no kernel work (the daemon's health Check), to tell transport
    #: and interceptor overhead from the cost of GetInfo's handler.
    bare_unary: Callable[[], Awaitable[object]] | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)


def vkernel_side(vk: Vkernel) -> Side:
    request = system_service_pb2.GetInfoRequest()
    md = vk.metadata
    get_info = vk.system.GetInfo

    async def unary() -> object:
        return await get_info(request, metadata=md)

    check: grpc.aio.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ] = vk.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    health_request = health_pb2.HealthCheckRequest(service="")

    async def bare_unary() -> object:
        return await check(health_request)

    return Side("vkernel", unary, vk.ping, vk.server.cpu_ns, bare_unary)


async def _unary_seq(side: Side, n: int) -> None:
    t0 = time.perf_counter()
    for _ in range(n):
        await side.unary()
    side.add("unary_seq", (time.perf_counter() - t0) / n * 1e6)
    if side.bare_unary is not None:
        t0 = time.perf_counter()
        for _ in range(n):
            await side.bare_unary()
        side.add("unary_seq_health", (time.perf_counter() - t0) / n * 1e6)


async def _unary_conc(side: Side, n: int) -> None:
    per = max(1, n // CONCURRENCY)

    async def worker() -> None:
        for _ in range(per):
            await side.unary()

    cpu0 = side.cpu_ns()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    dt = time.perf_counter() - t0
    calls = per * CONCURRENCY
    side.add("unary_c8", calls / dt)
    side.add("unary_server_cpu_c8", (side.cpu_ns() - cpu0) / calls / 1e3)


async def _bidi(side: Side, n: int, seq0: int) -> None:
    cpu0 = side.cpu_ns()
    t0 = time.perf_counter()
    for i in range(n):
        await side.ping(seq0 + i)
    dt = time.perf_counter() - t0
    side.add("bidi_pingpong", dt / n * 1e6)
    side.add("bidi_server_cpu", (side.cpu_ns() - cpu0) / n / 1e3)


def _counts(ctx: BenchContext) -> tuple[int, int, int]:
    """Calls per round for (sequential unary, concurrent unary, ping-pong): about 0.3–0.5 s of
    each per side and round on this machine, long enough to average out scheduler jitter."""
    return ctx.n(400, 30), ctx.n(1600, 80), ctx.n(1500, 100)


async def measure(sides: list[Side], ctx: BenchContext) -> None:
    """Warm every side up, then time each phase on both sides back to back, alternating which
    side goes first each round so neither always gets the warmer caches or the quieter moment."""
    n_unary, n_conc, n_bidi = _counts(ctx)
    seq = 1
    for side in sides:
        for _ in range(max(10, n_unary // 10)):
            await side.unary()
            if side.bare_unary is not None:
                await side.bare_unary()
        for _ in range(max(10, n_bidi // 10)):
            seq += 1
            await side.ping(seq)
    for r in range(ctx.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            await _unary_seq(side, n_unary)
        for side in order:
            await _unary_conc(side, n_conc)
        for side in order:
            await _bidi(side, n_bidi, seq)
            seq += n_bidi


async def run(ctx: BenchContext) -> list[Record]:
    async with contextlib.AsyncExitStack() as stack:
        floor = await stack.enter_async_context(floor_server(ctx.scratch))
        vk = await stack.enter_async_context(vkernel_daemon(ctx.scratch))
        stream = floor.pingpong()
        stack.callback(stream.cancel)

        async def floor_ping(seq: int) -> object:
            await stream.write(b"\x08\x01")
            return await stream.read()

        async def floor_unary() -> object:
            return await floor.unary(b"")

        fl = Side("floor", floor_unary, floor_ping, floor.server.cpu_ns)
        vs = vkernel_side(vk)
        await measure([fl, vs], ctx)
    f, v = fl.samples, vs.samples
    common = {"rounds_interleaved": True, "transport": "uds", "loop": "asyncio"}
    return [
        make_record(
            "unary_seq",
            v["unary_seq"],
            "µs/call",
            floor=f["unary_seq"],
            goal=UNARY_GOAL,
            better="lower",
            vkernel_rpc="SystemService.GetInfo",
            n=_counts(ctx)[0],
            **common,
        ),
        make_record(
            "unary_seq_health",
            v["unary_seq_health"],
            "µs/call",
            floor=f["unary_seq"],
            goal=UNARY_GOAL,
            better="lower",
            vkernel_rpc="grpc.health.v1.Health/Check",
            note="the daemon's per-RPC overhead without kernel work",
            n=_counts(ctx)[0],
            **common,
        ),
        make_record(
            "unary_c8",
            v["unary_c8"],
            "calls/s",
            floor=f["unary_c8"],
            goal=UNARY_GOAL,
            better="higher",
            vkernel_rpc="SystemService.GetInfo",
            concurrency=CONCURRENCY,
            n=_counts(ctx)[1],
            **common,
        ),
        make_record(
            "unary_server_cpu_c8",
            v["unary_server_cpu_c8"],
            "µs CPU/call",
            floor=f["unary_server_cpu_c8"],
            goal=SERVER_CPU_GOAL,
            better="lower",
            note="server process only, all threads, from schedstat",
            **common,
        ),
        make_record(
            "bidi_pingpong",
            v["bidi_pingpong"],
            "µs/rt",
            floor=f["bidi_pingpong"],
            goal=BIDI_GOAL,
            better="lower",
            vkernel_rpc="SessionService.Keepalive",
            n=_counts(ctx)[2],
            **common,
        ),
        make_record(
            "bidi_server_cpu",
            v["bidi_server_cpu"],
            "µs CPU/rt",
            floor=f["bidi_server_cpu"],
            goal=SERVER_CPU_GOAL,
            better="lower",
            note="server process only, all threads, from schedstat",
            **common,
        ),
    ]
