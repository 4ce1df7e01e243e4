"""The daemon as a real subprocess, driven by real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration


@dataclass
class DaemonProcess:
    """A `vkernel serve` subprocess and its JSON log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    socket_path: Path | None
    addresses: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return self.addresses[0]

    def logs(self) -> list[dict[str, object]]:
        """The daemon's log lines so far, parsed."""
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, object]]:
        """Log lines whose event is ``name``."""
        return [rec for rec in self.logs() if rec.get("event") == name]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait for its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def health_status(addr: str, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE, via the real grpc.health.v1 client."""
    target = addr.removeprefix("tcp://")
    with grpc.insecure_channel(target) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # its stubs lack the methods
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def start_daemon(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    name: str = "vk",
) -> DaemonProcess:
    """Start `python -m vkernel serve` (on tmp_path/<name>.sock unless --listen is given)."""
    sock = tmp_path / f"{name}.sock"
    argv = [sys.executable, "-m", "vkernel", "serve", "--log-format", "json", *args]
    if "--listen" not in args and not (env or {}).get("VKERNEL_LISTEN"):
        argv += ["--listen", f"unix://{sock}"]
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    d = DaemonProcess(proc=proc, log_path=log_path, socket_path=sock)
    if not wait:
        return d
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {log_path.read_text()}")
        started = d.events("server_started")
        if started:
            d.addresses = [str(a) for a in started[0]["addresses"]]  # type: ignore[attr-defined]
            return d
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("daemon did not start within 30 s")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """One daemon on a UNIX socket; it must exit 0 on SIGTERM at the end."""
    d = start_daemon(tmp_path, "--memory", "128M", "--grace", "2")
    yield d
    assert d.stop() == 0, d.log_path.read_text()[-3000:]
