"""userfaultfd through the real daemon: the fault round trip and the monitor's COPY throughput.

Why: a postcopy agent or a snapshot loader lives on two figures (issue 6): how long a faulting
access waits for the monitor (a CPU read in process A → the PAGEFAULT message to monitor
session B → B's COPY → A's read returns), and how many pages per second a monitor can push
with batched UFFDIO_COPY. Both go through gRPC twice or more per fault, so they are judged
against the bare transport measured in the same run (:mod:`bench._floors`).

Setup: one daemon subprocess; session A (:func:`bench._vkernel.vkernel_daemon`) owns process
A and its uffds; each uffd is granted to session B (its own channel and keepalive), the monitor,
which is then a holder as a passed fd makes it. Raw generated stubs on both sides, so the
figures carry no SDK conveniences (the fd path uses :mod:`vkclient.uffd_fd`, a struct codec
over the socket); the monitor is the least a monitor does: for every read(2)
batch of messages, one COPY per fault, all in one request, results checked off the hot path.

Figures:

- ``fault_rt_p50`` / ``fault_rt_p99``: µs from A sending a load of 8 bytes of a missing page
  to its answer, on the fastest path: A's load is one message on a ``MemoryService.Access``
  stream; B holds the uffd itself, the fd from the daemon's side socket
  (:mod:`vkernel.api.uffd_fd`), and loops read(2) → one UFFDIO_COPY per fault, as a Linux
  monitor thread does. The floor is the bare bidi ping-pong's p50, measured paired with the
  loads (blocks of ``PAIR_BLOCK`` loads and as many pings, alternating: the machine's speed
  swings within seconds), per round (for both records: the ping-pong's own p99 is reported
  beside it, but on this machine it is mostly scheduling noise). The harness's ratio is floor / value (higher is better), so the issue's
  goal "p50 ≤ 2.0× the floor" is a minimum ratio of 0.5; ``x_floor`` is value / floor, the
  issue's way of saying it.
- ``fault_rt_grpc_p50``: the same with the monitor on gRPC too: B reads ``ReadUffdMessages``
  and answers on a ``UffdResolveStream`` (no goal: four one-way gRPC messages per fault;
  paired floor too). The other figures use the round's own floor measurement.
- ``fault_rt_grpc_vs_relay_p50``: that p50 against a second floor: a bare grpc.aio server
  (``python -m bench.bench_uffd --relay-floor``) relaying the same four one-way messages — A's
  request to B's message stream, B's answer, A's answer — with raw bytes and no kernel. The
  ping-pong is two one-way messages and such a fault is four, so this floor, not the
  ping-pong, is what a zero-cost daemon would reach on gRPC alone (``relay_x_pingpong``: how
  far that is from the issue's yardstick, ≈ 2.0 or more). No goal.
- ``fault_rt_unary_p50``: the same round trip the way it was done before the streams: A
  reads with the unary ``ReadMemory`` and B resolves with unary ``UffdResolve`` (no goal).
- ``fault_rt_ondemand_p50``: the gRPC path with B reading on demand (``UffdRead``: one read(2)
  request per batch, sent after the batch's COPY, as a monitor thread loops read → resolve)
  instead of the read-ahead ``ReadUffdMessages`` stream (no goal: the price of read(2)'s exact
  semantics).
- ``fault_rt_sdk_p50``: the gRPC path through the SDK: ``AccessStream.load`` in A's session
  and :class:`vkclient.uffd.UffdMonitor` serving B's (no goal: what the helper adds).
- ``fault_rt_sdk_fd_p50``: the same SDK helper with ``fd=``: ``UffdMonitor`` reading and
  resolving through the uffd fd (no goal).
- ``access_rt_p50``: µs for the same 8-byte load of a resident page on the Access stream (no
  fault, no monitor): one stream round trip plus the kernel's load, the part of a fault round
  trip that is not the fault (no goal; it says how far the 2.0× goal can be reached).
- ``copy_inline_pages_s``: B fills a MISSING-registered region (no faults: a postcopy agent's
  background push) with COPY ops of ``RUN_PAGES`` pages each, ``OPS_PER_MESSAGE`` ops per
  ``UffdResolveStream`` message, ``WINDOW`` messages in flight; page bytes inline. Floor: the
  bulk-bytes floor (the floor server streaming ``RUN_PAGES``-page messages), as pages/s.
- ``copy_src_pages_s``: the same with the source in B's own process (``src_pid``/``src``, as
  Linux's src): no page bytes on the wire, only the daemon's two copies.
- ``copy_inline_abs`` / ``copy_src_abs``: those samples against the issue's absolute goal of
  20k pages/s (ratio = value / 20000, goal 1.0; no floor: the goal is not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

import vkclient
from bench._floors import STREAM_REQUEST, FloorClient, floor_server, serve_until_signalled
from bench._harness import BenchContext, Record, ServerProcess, make_record, probe_channel
from bench._vkernel import Metadata, vkernel_daemon
from vkclient.uffd_fd import UffdFd, receive_uffd
from vkernel.dma_socket import dma_socket_path
from vkernel.kernel.uapi import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vkernel.kernel.userfaultfd import (
    UFFD_API,
    UFFD_EVENT_PAGEFAULT,
    UFFD_USER_MODE_ONLY,
    UFFDIO_REGISTER_MODE_MISSING,
)
from vkernel.v1 import memory_service_pb2 as mpb
from vkernel.v1 import memory_service_pb2_grpc as mpb_grpc
from vkernel.v1 import process_service_pb2, process_service_pb2_grpc, session_service_pb2
from vkernel.v1 import session_service_pb2_grpc as spb_grpc
from vkernel.v1 import userfaultfd_service_pb2 as upb
from vkernel.v1 import userfaultfd_service_pb2_grpc as upb_grpc

P = PAGE_SIZE
RT_GOAL = 0.5
"""floor / value ≥ 0.5, i.e. the issue's "p50 ≤ 2.0× the bidi ping-pong"."""
COPY_GOAL_ABS = 20_000.0
RUN_PAGES = 64
"""Pages per COPY op (256 KiB): the bulk floor's sweet spot is 64 KiB–1 MiB messages."""
OPS_PER_MESSAGE = 4
WINDOW = 4
"""Resolve messages in flight: enough to keep the daemon busy while answers travel."""
LOAD = 8
"""Bytes each faulting load reads."""


@dataclass
class Session:
    """A session's channel, metadata and stubs."""

    channel: grpc.aio.Channel
    md: Metadata
    memory: mpb_grpc.MemoryServiceAsyncStub
    uffd: upb_grpc.UserfaultfdServiceAsyncStub
    process: process_service_pb2_grpc.ProcessServiceAsyncStub
    session_id: str = ""

    async def spawn(self, name: str) -> int:
        r = await self.process.Spawn(process_service_pb2.SpawnRequest(name=name), metadata=self.md)
        return int(r.process.pid)

    async def mmap(self, pid: int, npages: int) -> int:
        r = await self.memory.Mmap(
            mpb.MmapRequest(
                pid=pid,
                length=npages * P,
                prot=PROT_READ | PROT_WRITE,
                flags=MAP_PRIVATE | MAP_ANONYMOUS,
                fd=-1,
            ),
            metadata=self.md,
        )
        return int(r.addr)

    async def dontneed(self, pid: int, addr: int, npages: int) -> None:
        await self.memory.Madvise(
            mpb.MadviseRequest(pid=pid, addr=addr, length=npages * P, advice=MADV_DONTNEED),
            metadata=self.md,
        )

    async def userfaultfd(self, pid: int, addr: int, npages: int, grantee: str) -> int:
        """A uffd on ``pid`` over [addr, +npages) (MISSING), handshaken and granted."""
        u = self.uffd
        h = (
            await u.CreateUffd(
                upb.CreateUffdRequest(pid=pid, flags=UFFD_USER_MODE_ONLY), metadata=self.md
            )
        ).handle
        await u.UffdApi(upb.UffdApiRequest(handle=h, api=UFFD_API), metadata=self.md)
        await u.UffdRegister(
            upb.UffdRegisterRequest(
                handle=h, start=addr, len=npages * P, mode=UFFDIO_REGISTER_MODE_MISSING
            ),
            metadata=self.md,
        )
        await u.GrantUffd(
            upb.GrantUffdRequest(handle=h, grantee_session_id=grantee), metadata=self.md
        )
        return int(h)


def _session(channel: grpc.aio.Channel, md: Metadata, session_id: str) -> Session:
    return Session(
        channel,
        md,
        mpb_grpc.MemoryServiceStub(channel),
        upb_grpc.UserfaultfdServiceStub(channel),
        process_service_pb2_grpc.ProcessServiceStub(channel),
        session_id,
    )


@contextlib.asynccontextmanager
async def second_session(scratch: Path) -> AsyncIterator[Session]:
    """Session B on its own channel (a second client), with its keepalive attached; the
    daemon is the one :func:`vkernel_daemon` started in ``scratch``."""
    target = f"unix://{scratch / 'vk.sock'}"
    async with grpc.aio.insecure_channel(target) as channel:
        sess = spb_grpc.SessionServiceStub(channel)
        opened = await sess.OpenSession(
            session_service_pb2.OpenSessionRequest(client_name="bench-monitor"), timeout=10
        )
        md: Metadata = (("vkernel-session", opened.token),)
        keepalive = sess.Keepalive(metadata=md)
        try:
            await keepalive.write(session_service_pb2.KeepaliveRequest(sequence=1))
            await keepalive.read()
            yield _session(channel, md, opened.session_id)
            await sess.CloseSession(session_service_pb2.CloseSessionRequest(), metadata=md)
        finally:
            keepalive.cancel()


# ---- the monitors ----------------------------------------------------------------------------


@dataclass
class Monitor:
    """Session B serving one uffd: every message batch → one request of one COPY per fault."""

    b: Session
    handle: int
    streamed: bool
    """True: answers on a UffdResolveStream; False: one unary UffdResolve per batch."""
    on_demand: bool = False
    """True: reads with UffdRead (one read(2) per request, after each batch is answered);
    False: the ReadUffdMessages stream, which reads ahead."""
    page: bytes = b"\x5a" * P
    faults: int = 0
    errors: list[str] = field(default_factory=list)

    async def _batches(self) -> AsyncGenerator[Any, None]:
        """The message batches, read ahead by the daemon or on demand."""
        if not self.on_demand:
            reads = self.b.uffd.ReadUffdMessages(
                upb.ReadUffdMessagesRequest(handle=self.handle, max_messages=64),
                metadata=self.b.md,
            )
            try:
                async for resp in reads:
                    yield resp
            finally:
                reads.cancel()
            return
        call = self.b.uffd.UffdRead(metadata=self.b.md)
        tag = 0
        try:
            while True:
                tag += 1
                await call.write(upb.UffdReadRequest(handle=self.handle, max_messages=64, tag=tag))
                answer = cast(upb.UffdReadResponse, await call.read())
                if answer.released:
                    return
                yield answer
        finally:
            call.cancel()

    async def run(self) -> None:
        reads = self._batches()
        stream = self.b.uffd.UffdResolveStream(metadata=self.b.md) if self.streamed else None
        drain = asyncio.ensure_future(self._drain(stream)) if stream is not None else None
        tag = 0
        try:
            async for resp in reads:
                ops = []
                for m in resp.messages:
                    if m.event != UFFD_EVENT_PAGEFAULT:
                        self.errors.append(f"unexpected event {m.event:#x}")
                        continue
                    ops.append(
                        upb.UffdResolveOp(copy=upb.UffdCopyOp(dst=m.address, data=self.page))
                    )
                self.faults += len(ops)
                if stream is not None:
                    tag += 1
                    await stream.write(
                        upb.UffdResolveStreamRequest(handle=self.handle, ops=ops, tag=tag)
                    )
                else:
                    r = await self.b.uffd.UffdResolve(
                        upb.UffdResolveRequest(handle=self.handle, ops=ops), metadata=self.b.md
                    )
                    self._check(r.results)
        finally:
            await reads.aclose()
            if stream is not None:
                stream.cancel()
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await drain

    async def _drain(self, stream: Any) -> None:
        """The answers, checked off the hot path (the monitor does not wait for them)."""
        async for resp in stream:
            self._check(resp.results)

    def _check(self, results: Any) -> None:
        for r in results:
            if r.errno:
                self.errors.append(f"COPY answered errno {r.errno}")


@dataclass
class FdMonitor:
    """Session B serving one uffd through the uffd itself (the fd from the side socket): each
    read(2) batch, then one UFFDIO_COPY per fault, as a Linux monitor thread loops; like
    :class:`Monitor` it sends the COPYs and reads on, checking their answers off the hot
    path."""

    fd: UffdFd
    page: bytes = b"\x5a" * P
    faults: int = 0
    errors: list[str] = field(default_factory=list)

    async def run(self) -> None:
        answers: list[asyncio.Future[tuple[int, int]]] = []
        while msgs := await self.fd.read(64):
            answers = self._check(answers)
            for m in msgs:
                if m.event != UFFD_EVENT_PAGEFAULT:
                    self.errors.append(f"unexpected event {m.event:#x}")
                    continue
                self.faults += 1
                answers.append(self.fd.copy_nowait(m.address, self.page))

    def _check(
        self, answers: list[asyncio.Future[tuple[int, int]]]
    ) -> list[asyncio.Future[tuple[int, int]]]:
        """The answers, checked off the hot path (the monitor does not wait for them)."""
        for f in answers:
            if f.done() and f.result()[1]:
                self.errors.append(f"COPY answered {f.result()}")
        return [f for f in answers if not f.done()]


async def open_fd(scratch: Path, b: Session, handle: int) -> UffdFd:
    """Session B's uffd ``handle`` as an fd, from the daemon's side socket."""
    path = dma_socket_path(str(scratch / "vk.sock"))
    sock = await asyncio.to_thread(receive_uffd, path, dict(b.md)["vkernel-session"], handle)
    return UffdFd(sock)


# ---- fault round trip --------------------------------------------------------------------------


Load = Callable[[int], Awaitable[None]]


def _access_load(a: Session, pid: int) -> tuple[Load, Callable[[], bool]]:
    """A's loads on one Access stream: one message each way per load."""
    call = a.memory.Access(metadata=a.md)
    tag = 0

    async def load(addr: int) -> None:
        nonlocal tag
        tag += 1
        await call.write(
            mpb.AccessRequest(pid=pid, kind=mpb.ACCESS_KIND_LOAD, addr=addr, length=LOAD, tag=tag)
        )
        resp = cast(mpb.AccessResponse, await call.read())
        if resp.errno or len(resp.data) != LOAD:
            raise RuntimeError(f"load at {addr:#x}: errno {resp.errno}, {len(resp.data)} bytes")

    return load, call.cancel


def _unary_load(a: Session, pid: int) -> Load:
    """A's loads the old way: one ReadMemory call each."""

    async def load(addr: int) -> None:
        got = b""
        async for r in a.memory.ReadMemory(
            mpb.ReadMemoryRequest(pid=pid, addr=addr, length=LOAD), metadata=a.md
        ):
            got += r.data
        if len(got) != LOAD:
            raise RuntimeError(f"load at {addr:#x}: {len(got)} bytes")

    return load


async def _time_loads(load: Load, addrs: list[int]) -> list[float]:
    out = []
    for addr in addrs:
        t0 = time.perf_counter()
        await load(addr)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def _ping(stream: Any) -> float:
    """One bidi ping-pong on the floor's stream: µs."""
    t0 = time.perf_counter()
    await stream.write(b"\x08\x01")
    await stream.read()
    return (time.perf_counter() - t0) * 1e6


async def _time_pings(floor: FloorClient, n: int) -> list[float]:
    stream = floor.pingpong()
    try:
        return [await _ping(stream) for _ in range(n)]
    finally:
        stream.cancel()


PAIR_BLOCK = 20
"""Loads per block of a paired measurement (then as many pings)."""


async def _time_paired(
    load: Load, addrs: list[int], floor: FloorClient
) -> tuple[list[float], list[float]]:
    """``addrs``' loads in blocks of PAIR_BLOCK, each followed by as many floor pings:
    (load µs, ping µs). This machine's speed swings 2-3x within seconds, so a floor measured
    seconds away can land in another regime than the figure; blocks a few ms apart share it."""
    stream = floor.pingpong()
    rts: list[float] = []
    pings: list[float] = []
    try:
        for i in range(0, len(addrs), PAIR_BLOCK):
            block = await _time_loads(load, addrs[i : i + PAIR_BLOCK])
            rts += block
            pings += [await _ping(stream) for _ in block]
        return rts, pings
    finally:
        stream.cancel()


def _p(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) by the inclusive method: p99 of 100 samples is their maximum's
    neighbour, not an extrapolation."""
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q * 100) - 1]


async def _sdk_round(scratch: Path, warm: int, n: int, on_fd: bool = False) -> list[float]:
    """The fast path through the SDK: ``AccessStream.load`` in session A, a
    :class:`vkclient.uffd.UffdMonitor` in session B. The two SDK sessions live for this round
    only: each runs a keepalive thread, whose GIL hand-offs would otherwise slow every other
    figure measured in this process. Returns the µs of the ``n`` timed loads."""
    addr = f"unix://{scratch / 'vk.sock'}"
    async with (
        vkclient.connect(addr, client_name="bench-sdk-a") as ka,
        vkclient.connect(addr, client_name="bench-sdk-b") as kb,
    ):
        proc = await ka.spawn("bench-sdk-faulter")
        area = await proc.mmap((warm + n) * P)
        u = await ka.userfaultfd(proc, UFFD_USER_MODE_ONLY)
        await u.register(area, (warm + n) * P)
        await u.grant(kb.session_id)
        page = b"\x5a" * P
        served = kb.attach_userfaultfd(u.handle)
        fd = await served.open_fd() if on_fd else None
        monitor = served.monitor(lambda _, length: page * (length // P), fd=fd)
        serving = asyncio.ensure_future(monitor.run())
        try:
            async with proc.access_stream() as access:

                async def load(at: int) -> None:
                    if len(await access.load(at, LOAD)) != LOAD:
                        raise RuntimeError(f"SDK load at {at:#x} came back short")

                await _time_loads(load, [area + i * P for i in range(warm)])
                rts = await _time_loads(load, [area + (warm + i) * P for i in range(n)])
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            if fd is not None:
                fd.close()
        if monitor.faults != warm + n:
            raise RuntimeError(f"the SDK monitor served {monitor.faults} of {warm + n} faults")
    return rts


# ---- COPY throughput ---------------------------------------------------------------------------


async def _push(b: Session, handle: int, ops: list[upb.UffdResolveOp]) -> float:
    """Send ``ops`` on one UffdResolveStream, OPS_PER_MESSAGE per message, WINDOW messages in
    flight; returns the seconds until the last answer, after checking every result."""
    call = b.uffd.UffdResolveStream(metadata=b.md)
    messages = [
        upb.UffdResolveStreamRequest(handle=handle, ops=ops[i : i + OPS_PER_MESSAGE], tag=i + 1)
        for i in range(0, len(ops), OPS_PER_MESSAGE)
    ]
    errors: list[int] = []
    try:
        t0 = time.perf_counter()
        sent = answered = 0
        while answered < len(messages):
            while sent < len(messages) and sent - answered < WINDOW:
                await call.write(messages[sent])
                sent += 1
            resp = cast(upb.UffdResolveStreamResponse, await call.read())
            errors.extend(r.errno for r in resp.results if r.errno)
            answered += 1
        dt = time.perf_counter() - t0
    finally:
        call.cancel()
    if errors:
        raise RuntimeError(f"COPY failed: errnos {sorted(set(errors))}")
    return dt


async def _time_floor_bulk(floor: FloorClient, npages: int) -> float:
    """Seconds for the floor server to stream npages pages as RUN_PAGES-page messages."""
    request = STREAM_REQUEST.pack(npages * P, RUN_PAGES * P)
    t0 = time.perf_counter()
    got = 0
    async for chunk in floor.stream(request):
        got += len(chunk)
    dt = time.perf_counter() - t0
    if got != npages * P:
        raise RuntimeError(f"floor stream sent {got} bytes, not {npages * P}")
    return dt


# ---- the relay floor -------------------------------------------------------------------------


RELAY_SERVICE = "vkbench.UffdRelay"
RELAY_REPLY = b"\x08\x01"


class _Relay:
    """The least a fault round trip's server can do: hand A's request to B's message stream,
    wait for B's answer, answer A. Raw bytes, no interceptor, no kernel: the four one-way
    messages of a fault and nothing else, as the ping-pong is two and nothing else."""

    def __init__(self) -> None:
        self.to_b: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting: dict[bytes, asyncio.Future[None]] = {}

    async def access(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            fut = asyncio.get_running_loop().create_future()
            self.waiting[r] = fut
            self.to_b.put_nowait(r)
            await fut
            yield RELAY_REPLY

    async def messages(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        while True:
            yield await self.to_b.get()

    async def resolve(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            fut = self.waiting.pop(r, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            await asyncio.sleep(0)  # as the daemon: the woken access answers first
            yield RELAY_REPLY


async def _relay_serve(listen: str) -> None:
    """Serve the relay floor until SIGTERM (``python -m bench.bench_uffd --relay-floor``)."""
    relay = _Relay()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                RELAY_SERVICE,
                {
                    "Access": grpc.stream_stream_rpc_method_handler(relay.access),
                    "Messages": grpc.unary_stream_rpc_method_handler(relay.messages),
                    "Resolve": grpc.stream_stream_rpc_method_handler(relay.resolve),
                },
            ),
        )
    )
    await serve_until_signalled(server, listen)


@contextlib.asynccontextmanager
async def relay_floor(scratch: Path) -> AsyncIterator[Load]:
    """Start the relay floor process, run its monitor (session B's part) on a second channel,
    and yield A's load: one fault-shaped round trip through the bare relay."""
    sock = scratch / "relay.sock"
    server = ServerProcess(
        [sys.executable, "-m", "bench.bench_uffd", "--relay-floor", f"unix:{sock}"],
        scratch,
        "relay-floor",
    )
    try:
        async with probe_channel(f"unix:{sock}") as probe:

            async def ready() -> bool:
                await asyncio.wait_for(probe.channel_ready(), 1.0)
                return True

            await server.wait_until(ready, 20.0, "answering")
        async with (
            grpc.aio.insecure_channel(f"unix:{sock}") as cha,
            grpc.aio.insecure_channel(f"unix:{sock}") as chb,
        ):
            msgs: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = chb.unary_stream(
                f"/{RELAY_SERVICE}/Messages"
            )
            answers: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = chb.stream_stream(
                f"/{RELAY_SERVICE}/Resolve"
            )
            reads = msgs(b"")
            resolve = answers()

            async def monitor() -> None:
                async for m in reads:
                    await resolve.write(m)

            async def drain() -> None:
                async for _ in resolve:
                    pass

            tasks = [asyncio.ensure_future(monitor()), asyncio.ensure_future(drain())]
            access: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = cha.stream_stream(
                f"/{RELAY_SERVICE}/Access"
            )
            call = access()
            seq = 0

            async def load(_: int) -> None:
                nonlocal seq
                seq += 1
                await call.write(seq.to_bytes(8, "little"))
                await call.read()

            try:
                yield load
            finally:
                call.cancel()
                reads.cancel()
                resolve.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await server.stop()


# ---- run -----------------------------------------------------------------------------------------


def _counts(ctx: BenchContext) -> tuple[int, int]:
    """(faults per round and path, pages per COPY round)."""
    return ctx.n(300, 40), ctx.n(8192, 1024)


async def run(ctx: BenchContext) -> list[Record]:
    n_faults, n_copy = _counts(ctx)
    n_copy -= n_copy % (RUN_PAGES * OPS_PER_MESSAGE)
    warm = 20
    s: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        s.setdefault(key, []).append(v)

    async with contextlib.AsyncExitStack() as stack:
        floor = await stack.enter_async_context(floor_server(ctx.scratch))
        relay_load = await stack.enter_async_context(relay_floor(ctx.scratch))
        vk = await stack.enter_async_context(vkernel_daemon(ctx.scratch))
        a = _session(vk.channel, vk.metadata, vk.session_id)
        b = await stack.enter_async_context(second_session(ctx.scratch))
        pid = await a.spawn("bench-faulter")
        per_path = warm + n_faults * ctx.rounds
        fast_area = await a.mmap(pid, per_path)
        slow_area = await a.mmap(pid, per_path)
        od_area = await a.mmap(pid, per_path)
        fd_area = await a.mmap(pid, per_path)
        copy_area = await a.mmap(pid, n_copy)
        fast = Monitor(b, await a.userfaultfd(pid, fast_area, per_path, b.session_id), True)
        slow = Monitor(b, await a.userfaultfd(pid, slow_area, per_path, b.session_id), False)
        od_handle = await a.userfaultfd(pid, od_area, per_path, b.session_id)
        ondemand = Monitor(b, od_handle, True, on_demand=True)
        fd_handle = await a.userfaultfd(pid, fd_area, per_path, b.session_id)
        fdmon = FdMonitor(await open_fd(ctx.scratch, b, fd_handle))
        stack.callback(fdmon.fd.close)
        copy_handle = await a.userfaultfd(pid, copy_area, n_copy, b.session_id)
        # B's own process holds the COPY source pages (written once, outside the timing).
        bpid = await b.spawn("bench-monitor-image")
        image = await b.mmap(bpid, n_copy)
        pattern = bytes(range(256)) * (P // 256)
        for off in range(0, n_copy, 256):
            await b.memory.WriteMemory(
                iter([mpb.WriteMemoryRequest(pid=bpid, addr=image + off * P, data=pattern * 256)]),
                metadata=b.md,
            )
        inline_ops = [
            upb.UffdResolveOp(copy=upb.UffdCopyOp(dst=copy_area + i * P, data=pattern * RUN_PAGES))
            for i in range(0, n_copy, RUN_PAGES)
        ]
        src_ops = [
            upb.UffdResolveOp(
                copy=upb.UffdCopyOp(
                    dst=copy_area + i * P, src_pid=bpid, src=image + i * P, len=RUN_PAGES * P
                )
            )
            for i in range(0, n_copy, RUN_PAGES)
        ]
        monitors = [asyncio.ensure_future(m.run()) for m in (fast, slow, ondemand, fdmon)]
        access_load, close_access = _access_load(a, pid)
        stack.callback(close_access)
        try:
            unary_load = _unary_load(a, pid)
            await _time_loads(access_load, [fast_area + i * P for i in range(warm)])
            await _time_loads(access_load, [od_area + i * P for i in range(warm)])
            await _time_loads(access_load, [fd_area + i * P for i in range(warm)])
            await _time_loads(unary_load, [slow_area + i * P for i in range(warm)])
            await _time_pings(floor, warm)
            await _time_loads(relay_load, [0] * warm)
            await _time_floor_bulk(floor, RUN_PAGES * 4)
            for r in range(ctx.rounds):
                base = warm + r * n_faults
                fast_addrs = [fast_area + (base + i) * P for i in range(n_faults)]
                slow_addrs = [slow_area + (base + i) * P for i in range(n_faults)]
                od_addrs = [od_area + (base + i) * P for i in range(n_faults)]
                fd_addrs = [fd_area + (base + i) * P for i in range(n_faults)]
                keys = [
                    "floor",
                    "fd",
                    "fast",
                    "unary",
                    "present",
                    "sdk",
                    "sdkfd",
                    "relay",
                    "ondemand",
                ]
                for key in keys if r % 2 == 0 else keys[::-1]:
                    if key == "floor":
                        pings = await _time_pings(floor, n_faults)
                        add("floor_p50", _p(pings, 0.5))
                        add("floor_p99", _p(pings, 0.99))
                    elif key == "fast":
                        rts, pings = await _time_paired(access_load, fast_addrs, floor)
                        add("fast_p50", _p(rts, 0.5))
                        add("fast_p99", _p(rts, 0.99))
                        add("fast_floor_p50", _p(pings, 0.5))
                    elif key == "unary":
                        rts = await _time_loads(unary_load, slow_addrs)
                        add("unary_p50", _p(rts, 0.5))
                        add("unary_p99", _p(rts, 0.99))
                    elif key == "fd":
                        rts, pings = await _time_paired(access_load, fd_addrs, floor)
                        add("fd_p50", _p(rts, 0.5))
                        add("fd_p99", _p(rts, 0.99))
                        add("fd_floor_p50", _p(pings, 0.5))
                    elif key == "ondemand":
                        rts = await _time_loads(access_load, od_addrs)
                        add("ondemand_p50", _p(rts, 0.5))
                    elif key == "relay":
                        rts = await _time_loads(relay_load, [0] * n_faults)
                        add("relay_p50", _p(rts, 0.5))
                    elif key in ("sdk", "sdkfd"):
                        rts = await _sdk_round(ctx.scratch, warm, n_faults, key == "sdkfd")
                        add(f"{key}_p50", _p(rts, 0.5))
                        add(f"{key}_p99", _p(rts, 0.99))
                    else:  # the first page, resident since the warm-up: no fault
                        rts = await _time_loads(access_load, [fast_area] * n_faults)
                        add("present_p50", _p(rts, 0.5))
                # COPY throughput: the floor, then both sources into the emptied region.
                add("floor_bulk", n_copy / await _time_floor_bulk(floor, n_copy))
                for key, ops in (("inline", inline_ops), ("src", src_ops))[:: 1 if r % 2 else -1]:
                    await a.dontneed(pid, copy_area, n_copy)
                    add(key, n_copy / await _push(b, copy_handle, ops))
        finally:
            for t in monitors:
                t.cancel()
            await asyncio.gather(*monitors, return_exceptions=True)
        for m in (fast, slow, ondemand, fdmon):
            if m.errors:
                raise RuntimeError(f"monitor errors: {m.errors[:5]}")
        expected = warm + n_faults * ctx.rounds
        served = (fast.faults, slow.faults, ondemand.faults, fdmon.faults)
        if served != (expected,) * 4:
            raise RuntimeError(f"monitors served {served} faults, expected {expected} each")
        audit = await a.memory.Audit(mpb.AuditRequest(), metadata=a.md)
        if not audit.clean:
            raise RuntimeError(f"audit not clean: {list(audit.problems)[:5]}")

    common = {"rounds_interleaved": True, "transport": "uds", "loop": "asyncio"}

    def x_floor(key: str, fkey: str) -> float:
        return statistics.median(v / f for v, f in zip(s[key], s[fkey], strict=True))

    return [
        make_record(
            "fault_rt_p50",
            s["fd_p50"],
            "µs",
            floor=s["fd_floor_p50"],
            goal=RT_GOAL,
            better="lower",
            x_floor=x_floor("fd_p50", "fd_floor_p50"),
            floor_basis=f"ping-pongs paired with the loads, {PAIR_BLOCK} and {PAIR_BLOCK}",
            path="MemoryService.Access + the uffd fd (read(2) + UFFDIO_COPY on the side socket)",
            n=n_faults,
            note="ratio = floor/value; the issue's goal p50 <= 2.0x floor is ratio >= 0.5",
            **common,
        ),
        make_record(
            "fault_rt_p99",
            s["fd_p99"],
            "µs",
            floor=s["fd_floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("fd_p99", "fd_floor_p50"),
            floor_p99=statistics.median(s["floor_p99"]),
            floor_basis="the paired ping-pongs' p50 (their p99 is mostly the machine's noise)",
            path="MemoryService.Access + the uffd fd",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_grpc_p50",
            s["fast_p50"],
            "µs",
            floor=s["fast_floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("fast_p50", "fast_floor_p50"),
            floor_basis=f"ping-pongs paired with the loads, {PAIR_BLOCK} and {PAIR_BLOCK}",
            grpc_p99=statistics.median(s["fast_p99"]),
            path="MemoryService.Access + ReadUffdMessages + UffdResolveStream",
            note="the monitor on gRPC too: four one-way gRPC messages per fault",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_grpc_vs_relay_p50",
            s["fast_p50"],
            "µs",
            floor=s["relay_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("fast_p50", "relay_p50"),
            relay_x_pingpong=x_floor("relay_p50", "floor_p50"),
            floor_basis="a bare grpc.aio relay of the same four messages (no kernel, raw bytes)",
            note="what the daemon (kernel, protobuf, server stack) adds to a fault's transport",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_unary_p50",
            s["unary_p50"],
            "µs",
            floor=s["floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("unary_p50", "floor_p50"),
            unary_p99=statistics.median(s["unary_p99"]),
            path="unary ReadMemory + ReadUffdMessages + unary UffdResolve",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_ondemand_p50",
            s["ondemand_p50"],
            "µs",
            floor=s["floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("ondemand_p50", "floor_p50"),
            path="MemoryService.Access + UffdRead (read on demand) + UffdResolveStream",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_sdk_p50",
            s["sdk_p50"],
            "µs",
            floor=s["floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("sdk_p50", "floor_p50"),
            sdk_p99=statistics.median(s["sdk_p99"]),
            path="vkclient AccessStream.load + UffdMonitor (ResolveStream)",
            n=n_faults,
            **common,
        ),
        make_record(
            "fault_rt_sdk_fd_p50",
            s["sdkfd_p50"],
            "µs",
            floor=s["floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("sdkfd_p50", "floor_p50"),
            sdk_fd_p99=statistics.median(s["sdkfd_p99"]),
            path="vkclient AccessStream.load + UffdMonitor(fd=...) on the uffd fd",
            n=n_faults,
            **common,
        ),
        make_record(
            "access_rt_p50",
            s["present_p50"],
            "µs",
            floor=s["floor_p50"],
            goal=None,
            better="lower",
            x_floor=x_floor("present_p50", "floor_p50"),
            path="MemoryService.Access, a load of a resident page (no fault)",
            note="one Access round trip: what a fault's two extra hops and kernel work add to",
            n=n_faults,
            **common,
        ),
        make_record(
            "copy_inline_pages_s",
            s["inline"],
            "pages/s",
            floor=s["floor_bulk"],
            goal=None,
            better="higher",
            floor_basis=f"floor server streaming {RUN_PAGES}-page messages",
            run_pages=RUN_PAGES,
            ops_per_message=OPS_PER_MESSAGE,
            window=WINDOW,
            n=n_copy,
            **common,
        ),
        make_record(
            "copy_src_pages_s",
            s["src"],
            "pages/s",
            floor=s["floor_bulk"],
            goal=None,
            better="higher",
            floor_basis=f"floor server streaming {RUN_PAGES}-page messages",
            run_pages=RUN_PAGES,
            ops_per_message=OPS_PER_MESSAGE,
            window=WINDOW,
            n=n_copy,
            **common,
        ),
        make_record(
            "copy_inline_abs",
            s["inline"],
            "pages/s",
            floor=None,
            goal=1.0,
            better="higher",
            ratio=statistics.median(s["inline"]) / COPY_GOAL_ABS,
            note="absolute goal: >= 20k pages/s (ratio = value / 20000)",
            **common,
        ),
        make_record(
            "copy_src_abs",
            s["src"],
            "pages/s",
            floor=None,
            goal=1.0,
            better="higher",
            ratio=statistics.median(s["src"]) / COPY_GOAL_ABS,
            note="absolute goal: >= 20k pages/s (ratio = value / 20000)",
            **common,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.bench_uffd --relay-floor unix:PATH``: serve the relay floor."""
    p = argparse.ArgumentParser(prog="python -m bench.bench_uffd")
    p.add_argument("--relay-floor", required=True, metavar="LISTEN", help="gRPC address")
    args = p.parse_args(argv)
    asyncio.run(_relay_serve(args.relay_floor))


if __name__ == "__main__":
    main()
