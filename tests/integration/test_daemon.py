"""`vkernel serve` as a subprocess: sockets, health, signals, tokens, logs."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import vkclient
from tests.integration.conftest import DaemonProcess, health_status, start_daemon

pytestmark = pytest.mark.integration


def test_unix_socket_is_mode_0600(daemon: DaemonProcess) -> None:
    """The default listener's access control is the socket's file mode."""
    assert daemon.socket_path is not None
    mode = daemon.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_health_and_reflection(daemon: DaemonProcess) -> None:
    """Real health and reflection clients see SERVING and every vkernel.v1 service."""
    assert health_status(daemon.addr) == "SERVING"
    with grpc.insecure_channel(daemon.addr) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        stub: Any = health_pb2_grpc.HealthStub(ch)  # its stubs lack the methods
        for svc in ("vkernel.v1.SessionService", "vkernel.v1.ProcessService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert {
        "vkernel.v1.SessionService",
        "vkernel.v1.ProcessService",
        "vkernel.v1.SystemService",
        "grpc.health.v1.Health",
    } <= services


def test_vkctl_agrees(daemon: DaemonProcess) -> None:
    """vkctl health/info/ps/vmstat against the subprocess daemon."""
    vkctl = [sys.executable, "-m", "vkclient.vkctl", "--addr", daemon.addr]
    health = subprocess.run([*vkctl, "health"], capture_output=True, text=True, check=False)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    vmstat = subprocess.run([*vkctl, "vmstat"], capture_output=True, text=True, check=True)
    lines = vmstat.stdout.splitlines()
    assert lines, "vmstat printed nothing"
    for line in lines:
        name, value = line.split(" ")
        assert name.isidentifier(), line
        assert value.lstrip("-").isdigit(), line
    info = subprocess.run([*vkctl, "--json", "info"], capture_output=True, text=True, check=True)
    assert '"memory_bytes": "134217728"' in info.stdout
    ps = subprocess.run([*vkctl, "ps"], capture_output=True, text=True, check=True)
    assert "0 processes" in ps.stdout


def test_vkctl_health_fails_when_no_daemon(tmp_path: Path) -> None:
    """No daemon → vkctl health exits 1."""
    r = subprocess.run(
        [sys.executable, "-m", "vkclient.vkctl", "--addr", f"unix://{tmp_path}/none", "health"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert "UNREACHABLE" in r.stdout


async def test_sigterm_drains_inflight_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: health NOT_SERVING, the in-flight waitpid completes when the session's
    processes end (close semantics), and the daemon exits 0 within the grace."""
    d = start_daemon(tmp_path, "--grace", "1.5")
    async with vkclient.connect(d.addr) as k:
        p = await k.spawn("sleeper")
        async with grpc.aio.insecure_channel(d.addr) as ch:
            health_stub: Any = health_pb2_grpc.HealthStub(ch)
            watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            results: list[object] = []

            async def waiter() -> None:
                try:
                    results.append(await p.wait())
                except Exception as e:
                    results.append(e)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.3)
                start = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                second = await watch.read()
                assert isinstance(second, health_pb2.HealthCheckResponse)
                assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            rc = await anyio.to_thread.run_sync(lambda: d.proc.wait(10))
            elapsed = time.monotonic() - start
    assert rc == 0
    assert elapsed < 1.5 + 2.0
    (result,) = results
    assert isinstance(result, vkclient.WaitResult), result
    assert result.signal == signal.SIGKILL
    events = [e["event"] for e in d.logs()]
    assert "shutdown_requested" in events
    assert events[-1] == "server_stopped"
    assert d.socket_path is not None
    assert not d.socket_path.exists()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """A second SIGTERM during a long drain exits immediately (non-zero)."""
    d = start_daemon(tmp_path, "--grace", "30")
    async with vkclient.connect(d.addr) as k:
        p = await k.spawn("sleeper")
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                try:
                    await p.wait()
                except Exception:
                    pass

            tg.start_soon(waiter)
            await anyio.sleep(0.3)
            d.proc.send_signal(signal.SIGTERM)
            await anyio.sleep(0.5)
            assert d.proc.poll() is None, "the first signal must drain, not exit"
            start = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            rc = await anyio.to_thread.run_sync(lambda: d.proc.wait(10))
            tg.cancel_scope.cancel()
    assert rc != 0
    assert time.monotonic() - start < 3
    assert d.events("shutdown_forced")
    await k.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file left by a dead daemon is removed and rebound."""
    path = tmp_path / "vk.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: a stale socket
    d = start_daemon(tmp_path)
    assert health_status(d.addr) == "SERVING"
    assert d.events("stale_socket_removed")
    assert d.stop() == 0


def test_live_socket_is_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A second daemon on a live daemon's socket exits non-zero with a clear message."""
    second = start_daemon(tmp_path, "--listen", daemon.addr, wait=False, name="second")
    rc = second.proc.wait(timeout=30)
    assert rc != 0
    (failure,) = second.events("startup_failed")
    assert "in use by a running daemon" in str(failure["error"])
    assert health_status(daemon.addr) == "SERVING"


def test_tcp_port_in_use_is_refused(tmp_path: Path) -> None:
    """A TCP port held by another listener → non-zero exit, never a shared port."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        d = start_daemon(
            tmp_path,
            "--listen",
            f"tcp://127.0.0.1:{port}",
            "--token-file",
            str(token),
            wait=False,
        )
        assert d.proc.wait(timeout=30) != 0
        assert d.events("startup_failed")
    finally:
        holder.close()


def test_tcp_requires_token_file(tmp_path: Path) -> None:
    """tcp:// without --token-file is a usage error."""
    r = subprocess.run(
        [sys.executable, "-m", "vkernel", "serve", "--listen", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert r.returncode == 2
    assert "requires --token-file" in r.stderr


async def test_tcp_token_is_checked(tmp_path: Path) -> None:
    """On TCP: no token or a wrong one → UNAUTHENTICATED; the right one works; health is open."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = start_daemon(tmp_path, "--listen", "tcp://127.0.0.1:0", "--token-file", str(token))
    tcp = d.addr
    assert tcp.startswith("tcp://127.0.0.1:")
    assert not tcp.endswith(":0")
    assert health_status(tcp) == "SERVING"
    for bad in (None, "wrong"):
        with pytest.raises(vkclient.SessionError) as ei:
            await vkclient.connect(tcp, token=bad)
        assert ei.value.reason == "BAD_TOKEN"
    async with vkclient.connect(tcp, token_file=str(token)) as k:
        assert (await k.info()).version
    assert d.stop() == 0


def test_env_vars_configure_the_daemon(tmp_path: Path) -> None:
    """Every option also comes from VKERNEL_*: listen, memory, arch."""
    sock = tmp_path / "env.sock"
    d = start_daemon(
        tmp_path,
        env={
            "VKERNEL_LISTEN": f"unix://{sock}",
            "VKERNEL_MEMORY": "96M",
            "VKERNEL_ARCH": "arm64",
        },
    )
    assert d.addr == f"unix://{sock}"
    (started,) = d.events("server_started")
    assert started["memory_bytes"] == 96 << 20
    assert started["arch"] == "arm64"
    assert d.stop() == 0


_CLIENT = """
import asyncio, sys, vkclient
async def main():
    k = await vkclient.connect(sys.argv[1])
    for name in ("a", "b"):
        await k.spawn(name)
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_client_kill9_ends_its_session_within_a_second(
    daemon: DaemonProcess,
) -> None:
    """A client killed with SIGKILL: its session ends and its processes are gone in < 1 s."""
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, daemon.addr], stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        line = await anyio.to_thread.run_sync(client.stdout.readline)
        assert line.strip() == b"ready"
        async with vkclient.connect(daemon.addr) as k:
            assert len(await k.ps(all_sessions=True)) == 2
            client.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(client.wait)
            killed_at = time.monotonic()
            with anyio.fail_after(1.0):
                while await k.ps(all_sessions=True):
                    await anyio.sleep(0.02)
            assert time.monotonic() - killed_at < 1.0
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
    closed = daemon.events("session_closed")
    assert any(e["processes_exited"] == 2 for e in closed)


def test_logs_are_structured(daemon: DaemonProcess) -> None:
    """server_started, session_opened/closed and one rpc_finished per call, as JSON."""
    r = subprocess.run(
        [sys.executable, "-m", "vkclient.vkctl", "--addr", daemon.addr, "ps"],
        capture_output=True,
        check=True,
    )
    assert r.returncode == 0
    assert daemon.events("server_started")
    assert daemon.events("session_opened")
    deadline = time.monotonic() + 5
    while not daemon.events("session_closed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.events("session_closed")
    finished = daemon.events("rpc_finished")
    listing = [e for e in finished if e["method"] == "/vkernel.v1.ProcessService/ListProcesses"]
    assert len(listing) == 1
    assert listing[0]["code"] == "OK"
    assert isinstance(listing[0]["duration_ms"], float)
    assert listing[0]["session"]


def test_python_m_vkernel_help() -> None:
    """`python -m vkernel serve --help` documents the environment variables."""
    r = subprocess.run(
        [sys.executable, "-m", "vkernel", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "VKERNEL_MEMORY" in r.stdout


async def test_busy_client_loop_keeps_its_session(daemon: DaemonProcess) -> None:
    """The SDK pings from its own thread: a client computing for 2 s keeps its processes."""
    async with vkclient.connect(daemon.addr) as k:
        p = await k.spawn("x")
        time.sleep(2.0)  # noqa: ASYNC251 - a long synchronous computation in the client
        assert [x.pid for x in await k.ps()] == [p.pid]
