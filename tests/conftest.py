"""Shared fixtures: every async test runs on asyncio (grpc.aio needs it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """grpc.aio only works on asyncio."""
    return "asyncio"
