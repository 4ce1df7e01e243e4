"""Fixtures for files, page cache and block devices: small kernels audited clean at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from vkernel.kernel.audit import audit
from vkernel.kernel.blockdev import DeviceSpec
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.task import Task

MakeFsKernel = Callable[..., Kernel]


@pytest.fixture
async def make_fs_kernel() -> AsyncIterator[MakeFsKernel]:
    """Build kernels with the given device specs; each is quiesced and audited at teardown."""
    kernels: list[Kernel] = []

    def make(
        *devices: str, memory: int = 64 << 20, readahead: bool = True, fault_retry: bool = True
    ) -> Kernel:
        k = Kernel(KernelConfig(memory_bytes=memory, readahead=readahead, fault_retry=fault_retry))
        for spec in devices:
            k.vfs.add_device(DeviceSpec.parse(spec))
        kernels.append(k)
        return k

    yield make
    for k in kernels:
        await k.vfs.quiesce()
        assert audit(k) == []
        for t in list(k.tasks.values()):
            k.do_exit(t)  # the daemon ends every session before vfs.shutdown()
        assert audit(k) == []
        await k.vfs.shutdown()
        assert audit(k) == []


@pytest.fixture
def kernel(make_fs_kernel: MakeFsKernel) -> Kernel:
    """A 64 MiB kernel with a 16 MiB RAM disk (no latency) and an 8 MiB dax device."""
    return make_fs_kernel("ram0=ram:16M", "pmem0=ram:8M,dax=1")


@pytest.fixture
def task(kernel: Kernel) -> Task:
    """A fresh process."""
    return kernel.spawn("test", "session")
