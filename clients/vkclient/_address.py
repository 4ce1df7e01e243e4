"""Where the daemon is and how to prove we may talk to it."""

from __future__ import annotations

import os
from pathlib import Path

from vkernel.config import default_address


def resolve_address(addr: str | None) -> str:
    """--addr, else $VKERNEL_ADDR, else the daemon's default socket."""
    return addr or os.environ.get("VKERNEL_ADDR") or default_address()


def grpc_target(addr: str) -> str:
    """``unix:///p`` stays as grpc spells it; ``tcp://h:p`` becomes ``h:p``."""
    if addr.startswith("unix://"):
        return addr
    if addr.startswith("tcp://"):
        return addr[len("tcp://") :]
    raise ValueError(f"address must be unix:///path or tcp://host:port, got {addr!r}")


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """The TCP bearer token: explicit, else --token-file / $VKERNEL_TOKEN_FILE, else None."""
    if token:
        return token
    path = token_file or os.environ.get("VKERNEL_TOKEN_FILE")
    if path:
        return Path(path).read_text().strip()
    return None
