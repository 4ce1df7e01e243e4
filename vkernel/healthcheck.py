"""A container health probe: ``python -m vkernel.healthcheck --addr ADDR``.

Asks the daemon's standard gRPC health service (``grpc.health.v1.Health/Check``, which
needs no token) and exits 0 only when the answer is SERVING, 1 otherwise. It prints the
status (or the RPC error) on one line, which ``docker inspect`` shows in the health log.
It stands in for ``grpc_health_probe``, a Go binary that cannot be downloaded here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TIMEOUT_S = 2.0


class _HealthCheckStub(Protocol):
    """The part of ``HealthStub`` we call (its published stubs leave the methods out)."""

    Check: grpc.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]


def grpc_target(addr: str) -> str:
    """``unix:///abs/path`` is passed to grpc as is; ``tcp://host:port`` becomes ``host:port``.

    Raises:
        ValueError: the address has neither form.
    """
    if addr.startswith("unix://") and len(addr) > len("unix://"):
        return addr
    if addr.startswith("tcp://"):
        hostport = addr[len("tcp://") :]
        host, sep, port = hostport.rpartition(":")
        if sep and host and port.isdigit():
            return hostport
    raise ValueError(f"address must be unix:///path or tcp://host:port, got {addr!r}")


def check(target: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Return the health status name of ``service`` at the grpc ``target``.

    Raises:
        grpc.RpcError: the call failed (daemon down, unknown service, deadline exceeded).
    """
    with grpc.insecure_channel(target) as channel:
        stub = cast(_HealthCheckStub, health_pb2_grpc.HealthStub(channel))
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m vkernel.healthcheck",
        description="exit 0 when the vkernel daemon at ADDR reports SERVING, 1 otherwise",
    )
    parser.add_argument("--addr", required=True, help="unix:///path or tcp://host:port")
    parser.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; return 0 when SERVING, 1 otherwise (2 for a bad command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = grpc_target(args.addr)
    except ValueError as e:
        parser.error(str(e))
    try:
        status = check(target, args.service, args.timeout)
    except grpc.RpcError as e:
        print(f"{args.addr}: {e.code().name}: {e.details()}")
        return 1
    print(f"{args.addr}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
