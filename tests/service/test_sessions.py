"""Sessions: tokens, keepalive, close semantics, UNAUTHENTICATED."""

from __future__ import annotations

import anyio
import grpc
import pytest

import vkclient
from tests.service.conftest import Daemon
from vkernel.v1 import process_service_pb2 as ppb
from vkernel.v1 import process_service_pb2_grpc as pgrpc
from vkernel.v1 import session_service_pb2 as spb
from vkernel.v1 import session_service_pb2_grpc as sgrpc


async def test_no_session_metadata_is_unauthenticated(daemon: Daemon) -> None:
    """A call without a session token → UNAUTHENTICATED, reason NO_SESSION."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pgrpc.ProcessServiceStub(ch).ListProcesses(ppb.ListProcessesRequest())
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    err = vkclient.errors.from_rpc_error(ei.value)
    assert isinstance(err, vkclient.SessionError)
    assert err.reason == "NO_SESSION"


async def test_unknown_token_is_unauthenticated(daemon: Daemon) -> None:
    """A made-up token → UNAUTHENTICATED."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pgrpc.ProcessServiceStub(ch).ListProcesses(
                ppb.ListProcessesRequest(), metadata=(("vkernel-session", "nope"),)
            )
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_closed_session_is_expired_and_its_processes_gone(daemon: Daemon) -> None:
    """After CloseSession the token is dead and the session's processes have exited."""
    k = await vkclient.connect(daemon.addr)
    await k.spawn("a")
    await k.spawn("b")
    metadata = k._metadata
    await k.close()
    assert not daemon.kernel.tasks
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pgrpc.ProcessServiceStub(ch).ListProcesses(
                ppb.ListProcessesRequest(), metadata=metadata
            )
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_keepalive_stream_end_ends_session_within_a_second(daemon: Daemon) -> None:
    """Cancelling the keepalive stream (what a dying client does) ends the session fast."""
    k = await vkclient.connect(daemon.addr)
    try:
        await k.spawn("orphan")
        assert daemon.kernel.tasks
        assert k._keepalive is not None
        k._keepalive.cancel()
        with anyio.fail_after(1.0):
            while daemon.kernel.tasks:
                await anyio.sleep(0.02)
    finally:
        await k.close()


async def test_keepalive_silence_ends_session(daemon: Daemon) -> None:
    """A stream that stays open but silent (a cut network) ends the session after ~1 s."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        stub = sgrpc.SessionServiceStub(ch)
        opened = await stub.OpenSession(spb.OpenSessionRequest(client_name="silent"))
        md = (("vkernel-session", opened.token),)
        call = stub.Keepalive(metadata=md)
        await call.write(spb.KeepaliveRequest(sequence=1))
        pong = await call.read()
        assert isinstance(pong, spb.KeepaliveResponse)
        assert pong.sequence == 1
        await pgrpc.ProcessServiceStub(ch).Spawn(ppb.SpawnRequest(name="x"), metadata=md)
        with anyio.fail_after(3.0):
            while daemon.kernel.tasks:
                await anyio.sleep(0.05)
        call.cancel()


async def test_second_keepalive_stream_is_refused(daemon: Daemon, k: vkclient.Kernel) -> None:
    """One keepalive stream per session: a second one fails, the first stays alive."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        call = sgrpc.SessionServiceStub(ch).Keepalive(metadata=k._metadata)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call.read()
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await k.ping() > 0


async def test_session_ping_round_trip(k: vkclient.Kernel) -> None:
    """Keepalive answers each ping with its sequence number."""
    for _ in range(5):
        assert 0 < await k.ping() < 5
