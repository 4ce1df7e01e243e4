"""No input crashes the daemon: raw garbage, empty, huge, negative, wrong wire types."""

from __future__ import annotations

import grpc
import pytest

import vkclient
from tests.service.conftest import Daemon
from vkernel.v1 import process_service_pb2 as ppb


def _raw(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # invalid tag
        b"\x0a\xff\xff\xff\xff\x0f",  # length-delimited field longer than the message
        b"\x08" + b"\xff" * 11,  # varint longer than 10 bytes
        b"\x0a\x02\xc3\x28",  # invalid UTF-8 in a string field
        b"\x10\x01",  # pid given as a varint where the field is a message (wrong wire type)
        b"",
        b"\x00" * 4096,
    ],
)
async def test_garbage_requests_fail_cleanly(
    daemon: Daemon, k: vkclient.Kernel, payload: bytes
) -> None:
    """Undecodable bytes → an error status; the daemon and the session keep working."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        call = _raw(ch, "/vkernel.v1.ProcessService/Spawn")
        code = grpc.StatusCode.OK
        try:
            await call(payload, metadata=k._metadata, timeout=5)
        except grpc.aio.AioRpcError as e:
            code = e.code()
        assert code != grpc.StatusCode.UNAVAILABLE
    assert await k.ping() > 0
    assert (await k.info()).version


async def test_huge_request_is_refused(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A request over the 64 MiB limit → RESOURCE_EXHAUSTED; nothing else disturbed."""
    async with grpc.aio.insecure_channel(
        daemon.addr, options=[("grpc.max_send_message_length", -1)]
    ) as ch:
        big = ppb.SpawnRequest(name="x" * (65 << 20)).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _raw(ch, "/vkernel.v1.ProcessService/Spawn")(big, metadata=k._metadata)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await k.ping() > 0


async def test_unknown_method_is_unimplemented(daemon: Daemon) -> None:
    """A method the daemon does not have → UNIMPLEMENTED."""
    async with grpc.aio.insecure_channel(daemon.addr) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _raw(ch, "/vkernel.v1.ProcessService/Nope")(b"")
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_extreme_values(k: vkclient.Kernel) -> None:
    """Huge rlimits and uids are stored as given; huge pids are EINVAL, not crashes."""
    p = await k.spawn("x", uid=2**32 - 1, rlimit_as=2**64 - 1, rlimit_memlock=0)
    assert p.info.credentials.uid == 2**32 - 1
    assert p.info.rlimits.memlock_bytes == 0
    with pytest.raises(OSError, match="out of range"):
        await k.process(2**31 - 1 + 1 - 2**32).kill()
    assert len(await k.ps()) == 1
