"""The bare-transport floor: a plain grpc.aio server in its own process.

Why: vkernel's RPC figures only mean something next to what grpc.aio itself costs on this
machine *right now* (perf-floor.md §1+2).  This server does the least gRPC allows — generic
handlers, raw ``bytes`` in and out (no protobuf, no interceptors, no metadata), default server
options, the default asyncio loop — so the ratio ``floor / vkernel`` isolates what the daemon
adds on top of the transport.

A third method, ``Stream``, is the bulk-bytes floor (perf-floor.md §1+2, "bulk bytes over
gRPC"): the request is two little-endian u64 ``(total, chunk)``; the server answers with
``total`` bytes as raw ``bytes`` messages of ``chunk`` bytes each, every message a fresh copy out
of a resident in-memory buffer (``bytes(view[o:o+chunk])``) — a memcpy through a gRPC stream,
the least a server that streams out memory can do.

It runs as ``python -m bench._floors --listen unix:/path/floor.sock`` (client and server in
separate processes, as perf-floor measured) and prints ``READY`` once it accepts calls.
:func:`floor_server` starts it and hands back a connected :class:`FloorClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio

from bench._harness import ServerProcess, probe_channel

SERVICE = "vkbench.Floor"
UNARY = f"/{SERVICE}/Unary"
PINGPONG = f"/{SERVICE}/PingPong"
STREAM = f"/{SERVICE}/Stream"
#: The Stream request: ``(total bytes, chunk bytes)``.
STREAM_REQUEST = struct.Struct("<QQ")
#: The reply of both methods: small, like a tiny protobuf answer.
REPLY = b"\x08\x01"


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return REPLY


async def _pingpong(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield REPLY


class _Source:
    """The resident buffer Stream copies out of: allocated and touched once per size, so every
    call streams memory that is already there (as vkernel streams resident frames)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def view(self, total: int) -> memoryview:
        if len(self._buf) != total:
            self._buf = bytearray(total)
            pattern = bytes(range(256)) * 16
            mv = memoryview(self._buf)
            for o in range(0, total, len(pattern)):
                mv[o : o + len(pattern)] = pattern[: total - o]
        return memoryview(self._buf)


_SOURCE = _Source()


async def _stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    total, chunk = STREAM_REQUEST.unpack(request)
    if chunk <= 0:
        return
    view = _SOURCE.view(total)
    for o in range(0, total, chunk):
        yield bytes(view[o : o + chunk])


async def serve_until_signalled(server: grpc.aio.Server, listen: str) -> None:
    """Bind ``listen``, start, tell the parent (READY on stdout), serve until SIGTERM/SIGINT."""
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await server.stop(grace=0)


async def serve(listen: str) -> None:
    """Serve the floor methods on ``listen`` until SIGTERM/SIGINT."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # No (de)serializers: grpc hands the handlers raw bytes.
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "PingPong": grpc.stream_stream_rpc_method_handler(_pingpong),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    await serve_until_signalled(server, listen)


class FloorClient:
    """Raw-bytes callables for the floor methods on one channel (as the benchmark's client
    would use one channel to the daemon)."""

    def __init__(self, channel: grpc.aio.Channel, server: ServerProcess) -> None:
        self.channel = channel
        self.server = server
        self.unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        self.pingpong: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            PINGPONG
        )
        self.stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(STREAM)


@contextlib.asynccontextmanager
async def floor_server(scratch: Path, start_limit_s: float = 20.0) -> AsyncIterator[FloorClient]:
    """Start the floor server process on a UNIX socket in ``scratch``, yield a client, stop it."""
    sock = scratch / "floor.sock"
    server = ServerProcess(
        [sys.executable, "-m", "bench._floors", "--listen", f"unix:{sock}"], scratch, "floor"
    )
    try:
        async with probe_channel(f"unix:{sock}") as probe:
            probe_unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = probe.unary_unary(UNARY)

            async def ready() -> bool:
                await probe_unary(b"", timeout=1.0, wait_for_ready=True)
                return True

            await server.wait_until(ready, start_limit_s, "answering")
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            yield FloorClient(channel, server)
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench._floors", description=__doc__)
    p.add_argument("--listen", required=True, help="gRPC address, e.g. unix:/tmp/x/floor.sock")
    args = p.parse_args(argv)
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
