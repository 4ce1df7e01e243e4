"""Fixtures for the mm core: small kernels whose audit must be clean when each test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.mm.mmhelp import MakeKernel
from vkernel.kernel.audit import audit
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.task import Task


@pytest.fixture
def make_kernel() -> Iterator[MakeKernel]:
    """Build kernels with any config (default 64 MiB); each one is audited at teardown."""
    kernels: list[Kernel] = []

    def make(**kw: object) -> Kernel:
        kw.setdefault("memory_bytes", 64 << 20)
        k = Kernel(KernelConfig(**kw))  # type: ignore[arg-type]
        kernels.append(k)
        return k

    yield make
    for k in kernels:
        assert audit(k) == []


@pytest.fixture
def kernel(make_kernel: MakeKernel) -> Kernel:
    """A 64 MiB kernel, audited clean at teardown."""
    return make_kernel()


@pytest.fixture
def task(kernel: Kernel) -> Task:
    """A fresh process with an empty address space."""
    return kernel.spawn("test", "session")
