"""The container health probe against a small in-process health server on a UNIX socket."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vkernel.healthcheck import grpc_target, main


@pytest.mark.parametrize(
    ("addr", "target"),
    [
        ("unix:///run/vkernel/vkernel.sock", "unix:///run/vkernel/vkernel.sock"),
        ("tcp://127.0.0.1:50051", "127.0.0.1:50051"),
        ("tcp://vkernel:50051", "vkernel:50051"),
        ("tcp://[::1]:50051", "[::1]:50051"),
    ],
)
def test_grpc_target(addr: str, target: str) -> None:
    assert grpc_target(addr) == target


@pytest.mark.parametrize("addr", ["127.0.0.1:50051", "tcp://host", "tcp://host:x", "unix://"])
def test_grpc_target_rejects(addr: str) -> None:
    with pytest.raises(ValueError, match="address must be"):
        grpc_target(addr)


@pytest.fixture
def health_server(tmp_path: Path) -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    addr = f"unix://{tmp_path}/h.sock"
    server.add_insecure_port(addr)
    server.start()
    try:
        yield addr, servicer
    finally:
        server.stop(None).wait()


def test_serving_exits_0(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["--addr", addr]) == 0
    assert capsys.readouterr().out.strip() == f"{addr}: SERVING"


def test_not_serving_exits_1(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--addr", addr]) == 1
    assert capsys.readouterr().out.strip() == f"{addr}: NOT_SERVING"


def test_unknown_service_exits_1(
    health_server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["--addr", addr, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_no_server_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"unix://{tmp_path}/absent.sock"
    assert main(["--addr", addr, "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_bad_address_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--addr", "localhost:1"])
    assert exc.value.code == 2
