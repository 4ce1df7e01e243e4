"""userfaultfd for vkclient: create a uffd on a process, hand it to a monitor session, serve faults.

::

    uffd = await Userfaultfd.create(k, proc.pid, UFFD_USER_MODE_ONLY)
    await uffd.api()
    await uffd.register(addr, length, UFFDIO_REGISTER_MODE_MISSING)
    await uffd.grant(monitor.session_id)                  # pass the "fd" to the monitor

    # in the monitor session
    m = Userfaultfd.attach(monitor, uffd.handle)
    async for msgs in m.messages():                       # each batch is one read(2)
        await m.resolve([copy(msg.address & ~4095, page_for(msg)) for msg in msgs])

``resolve`` sends many COPY / ZEROPAGE / WAKE operations in one call and returns one
``(result, errno)`` per operation (result: bytes done, or -errno; errno EAGAIN = partial).
Closing the last holder (``close()`` or the holder's session ending) is userfaultfd_release:
blocked faults then complete as ordinary faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from vkclient.errors import from_rpc_error
from vkernel.kernel.userfaultfd import (
    UFFD_API,
    UFFD_EVENT_PAGEFAULT,
    UFFD_FEATURE_EXACT_ADDRESS,
    UFFD_FEATURE_SIGBUS,
    UFFD_FEATURE_THREAD_ID,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
    UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP,
    UFFDIO_ZEROPAGE_MODE_DONTWAKE,
)
from vkernel.v1 import userfaultfd_service_pb2 as pb
from vkernel.v1 import userfaultfd_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vkclient._kernel import Kernel

__all__ = [
    "UFFDIO_COPY_MODE_DONTWAKE",
    "UFFDIO_REGISTER_MODE_MISSING",
    "UFFDIO_REGISTER_MODE_WP",
    "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
    "UFFDIO_WRITEPROTECT_MODE_WP",
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
    "UFFD_API",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_FEATURE_EXACT_ADDRESS",
    "UFFD_FEATURE_SIGBUS",
    "UFFD_FEATURE_THREAD_ID",
    "UFFD_PAGEFAULT_FLAG_WP",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "UFFD_USER_MODE_ONLY",
    "UffdMessage",
    "Userfaultfd",
    "continue_",
    "copy",
    "move",
    "poison",
    "wake",
    "writeprotect",
    "zeropage",
]

UffdMessage = pb.UffdMessage


def copy(dst: int, data: bytes, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_COPY operation (``data``: whole pages)."""
    return pb.UffdResolveOp(copy=pb.UffdCopyOp(dst=dst, data=data, mode=mode))


def zeropage(start: int, length: int, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_ZEROPAGE operation."""
    return pb.UffdResolveOp(zeropage=pb.UffdRangeOp(start=start, len=length, mode=mode))


def wake(start: int, length: int) -> pb.UffdResolveOp:
    """A UFFDIO_WAKE operation."""
    return pb.UffdResolveOp(wake=pb.UffdRangeOp(start=start, len=length))


def continue_(start: int, length: int, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_CONTINUE operation (map the cached shmem page of a MINOR fault)."""
    op = pb.UffdResolveOp()
    getattr(op, "continue").CopyFrom(pb.UffdRangeOp(start=start, len=length, mode=mode))
    return op


def move(dst: int, src: int, length: int, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_MOVE operation (pages of the same process, zero copy)."""
    return pb.UffdResolveOp(move=pb.UffdMoveOp(dst=dst, src=src, len=length, mode=mode))


def poison(start: int, length: int, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_POISON operation (later accesses: SIGBUS)."""
    return pb.UffdResolveOp(poison=pb.UffdRangeOp(start=start, len=length, mode=mode))


def writeprotect(start: int, length: int, mode: int) -> pb.UffdResolveOp:
    """A UFFDIO_WRITEPROTECT operation (mode WP protects, 0 resolves and wakes)."""
    return pb.UffdResolveOp(writeprotect=pb.UffdRangeOp(start=start, len=length, mode=mode))


async def _call(awaitable: Any) -> Any:
    """Await one RPC, turning a gRPC failure into the exception its errno means."""
    import grpc

    try:
        return await awaitable
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


class Userfaultfd:
    """One uffd handle as seen by one session (a holder)."""

    def __init__(self, kernel: Kernel, handle: int) -> None:
        self.kernel = kernel
        self.handle = handle
        self._stub = pb_grpc.UserfaultfdServiceStub(kernel._channel)

    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return self.kernel._metadata

    @classmethod
    async def create(cls, kernel: Kernel, pid: int, flags: int = 0) -> Userfaultfd:
        """userfaultfd(2) on process ``pid`` of this session."""
        stub = pb_grpc.UserfaultfdServiceStub(kernel._channel)
        resp = await _call(
            stub.CreateUffd(
                pb.CreateUffdRequest(pid=pid, flags=flags),
                metadata=kernel._metadata,
                timeout=kernel.timeout,
            )
        )
        return cls(kernel, resp.handle)

    @classmethod
    def attach(cls, kernel: Kernel, handle: int) -> Userfaultfd:
        """The handle as another session sees it once granted."""
        return cls(kernel, handle)

    async def api(self, features: int = 0, api: int = UFFD_API) -> tuple[int, int]:
        """UFFDIO_API: returns ``(features, ioctls)``."""
        r = await _call(
            self._stub.UffdApi(
                pb.UffdApiRequest(handle=self.handle, api=api, features=features),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )
        return int(r.features), int(r.ioctls)

    async def register(
        self, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING
    ) -> int:
        """UFFDIO_REGISTER: returns the range's ioctls bitmask."""
        r = await _call(
            self._stub.UffdRegister(
                pb.UffdRegisterRequest(handle=self.handle, start=start, len=length, mode=mode),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )
        return int(r.ioctls)

    async def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER."""
        await _call(
            self._stub.UffdUnregister(
                pb.UffdUnregisterRequest(handle=self.handle, start=start, len=length),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )

    async def grant(self, session_id: str) -> None:
        """Make session ``session_id`` a holder (hand it the fd)."""
        await _call(
            self._stub.GrantUffd(
                pb.GrantUffdRequest(handle=self.handle, grantee_session_id=session_id),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )

    async def close(self) -> None:
        """Drop this session's hold (the last one releases the uffd)."""
        await _call(
            self._stub.CloseUffd(
                pb.CloseUffdRequest(handle=self.handle),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )

    async def resolve(self, ops: Sequence[pb.UffdResolveOp]) -> list[tuple[int, int]]:
        """Run COPY/ZEROPAGE/WAKE operations in one call: ``(result, errno)`` per op."""
        r = await _call(
            self._stub.UffdResolve(
                pb.UffdResolveRequest(handle=self.handle, ops=list(ops)),
                metadata=self._md,
                timeout=self.kernel.timeout,
            )
        )
        return [(int(x.result), int(x.errno)) for x in r.results]

    async def messages(self, max_messages: int = 64) -> AsyncIterator[list[pb.UffdMessage]]:
        """Every read(2)'s batch of messages until the uffd is released."""
        import grpc

        call = self._stub.ReadUffdMessages(
            pb.ReadUffdMessagesRequest(handle=self.handle, max_messages=max_messages),
            metadata=self._md,
        )
        try:
            async for resp in call:
                yield list(resp.messages)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()
