"""Direct and asynchronous I/O of the SDK: preadv/pwritev into process memory, AIO rings.

    n = await preadv(proc, fd, [(addr, 4096)], offset)
    async with AioRing(proc, depth=64) as ring:
        ring.prep_read(fd, addr, 4096, offset, user_data=7)
        done = await ring.submit_and_wait(1)

On an O_DIRECT descriptor the daemon pins the buffers' pages for the I/O (see
``vkernel.kernel.dio``); errors are the OSError subclasses the errno means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from vkclient.errors import from_rpc_error
from vkernel.v1 import aio_service_pb2 as pb
from vkernel.v1 import aio_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vkclient._kernel import Kernel, Process

GUP_MODES = {"": pb.GUP_MODE_UNSPECIFIED, "fast": pb.GUP_MODE_FAST, "slow": pb.GUP_MODE_SLOW}
FOLL_MODES = {"": pb.FOLL_MODE_UNSPECIFIED, "pin": pb.FOLL_MODE_PIN, "get": pb.FOLL_MODE_GET}
_GUP_NAMES = {v: k for k, v in GUP_MODES.items()}
_FOLL_NAMES = {v: k for k, v in FOLL_MODES.items()}
OP_READ = pb.AIO_OPCODE_READ
OP_WRITE = pb.AIO_OPCODE_WRITE
OP_FSYNC = pb.AIO_OPCODE_FSYNC
OP_FDSYNC = pb.AIO_OPCODE_FDSYNC
OP_NOOP = pb.AIO_OPCODE_NOOP

__all__ = ["AioRing", "Completion", "preadv", "pwritev", "set_dio_defaults"]


def _stub(kernel: Kernel) -> pb_grpc.AioServiceAsyncStub:
    """The AioService stub on the kernel handle's channel (cached on the handle)."""
    stub = getattr(kernel, "_aio_stub", None)
    if stub is None:
        stub = pb_grpc.AioServiceStub(kernel._channel)
        kernel._aio_stub = stub  # type: ignore[attr-defined]
    return stub


def _iov(iov: Sequence[tuple[int, int]]) -> list[pb.IoVec]:
    return [pb.IoVec(base=b, len=n) for b, n in iov]


async def _rw(
    proc: Process,
    fd: int,
    iov: Sequence[tuple[int, int]],
    offset: int | None,
    write: bool,
    gup: str,
    foll: str,
) -> int:
    k = proc.kernel
    req = pb.RwRequest(
        pid=proc.pid,
        fd=fd,
        write=write,
        iov=_iov(iov),
        offset=-1 if offset is None else offset,
        gup=GUP_MODES[gup],
        foll=FOLL_MODES[foll],
    )
    try:
        resp = await _stub(k).Rw(req, metadata=k._metadata, timeout=k.timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    return int(resp.bytes)


async def preadv(
    proc: Process,
    fd: int,
    iov: Sequence[tuple[int, int]],
    offset: int | None = None,
    gup: str = "",
    foll: str = "",
) -> int:
    """preadv2(): file → the process's buffers (offset None: at the fd's position)."""
    return await _rw(proc, fd, iov, offset, False, gup, foll)


async def pwritev(
    proc: Process,
    fd: int,
    iov: Sequence[tuple[int, int]],
    offset: int | None = None,
    gup: str = "",
    foll: str = "",
) -> int:
    """pwritev2(): the process's buffers → file."""
    return await _rw(proc, fd, iov, offset, True, gup, foll)


async def set_dio_defaults(kernel: Kernel, gup: str = "", foll: str = "") -> tuple[str, str]:
    """The daemon-wide switches ("fast"/"slow", "pin"/"get"; "" keeps); returns those in force."""
    try:
        resp = await _stub(kernel).SetDioDefaults(
            pb.SetDioDefaultsRequest(gup=GUP_MODES[gup], foll=FOLL_MODES[foll]),
            metadata=kernel._metadata,
            timeout=kernel.timeout,
        )
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    return _GUP_NAMES[resp.gup], _FOLL_NAMES[resp.foll]


@dataclass(frozen=True)
class Completion:
    """One io_event: user_data, res (bytes or -errno) and the daemon-side times."""

    user_data: int
    res: int
    submit_ns: int
    complete_ns: int


class AioRing:
    """An AIO context (io_setup … io_destroy) on one Ring stream."""

    def __init__(self, proc: Process, depth: int, gup: str = "", foll: str = "") -> None:
        self.proc = proc
        self.depth = depth
        self.gup = gup
        self.foll = foll
        self.inflight = 0
        self._pending: list[pb.Iocb] = []
        self._call: Any = None
        self._setup_sent = False

    async def __aenter__(self) -> Self:
        k = self.proc.kernel
        self._call = _stub(k).Ring(metadata=k._metadata)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """io_destroy(): end the stream (the daemon waits for what is in flight)."""
        if self._call is not None:
            call, self._call = self._call, None
            try:
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                pass
            call.cancel()

    def prep(
        self,
        opcode: int,
        fd: int,
        iov: Sequence[tuple[int, int]] = (),
        offset: int = 0,
        user_data: int = 0,
    ) -> None:
        """Queue one iocb for the next submit."""
        self._pending.append(
            pb.Iocb(
                opcode=pb.AioOpcode.ValueType(opcode),
                fd=fd,
                iov=_iov(iov),
                offset=offset,
                user_data=user_data,
            )
        )

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int = 0) -> None:
        """io_prep_pread()."""
        self.prep(OP_READ, fd, [(addr, length)], offset, user_data)

    def prep_write(self, fd: int, addr: int, length: int, offset: int, user_data: int = 0) -> None:
        """io_prep_pwrite()."""
        self.prep(OP_WRITE, fd, [(addr, length)], offset, user_data)

    @property
    def queued(self) -> int:
        """Iocbs prepared and not yet submitted."""
        return len(self._pending)

    async def submit_and_wait(
        self, min_complete: int = 0, max_complete: int = 0, timeout: float = 0.0
    ) -> list[Completion]:
        """io_uring_enter(to_submit, min_complete): submit what is queued, reap completions.

        Iocbs the ring had no room for stay queued; OSError(EAGAIN) never escapes."""
        req = pb.RingRequest(
            submit=self._pending,
            min_complete=min_complete,
            max_complete=max_complete,
            timeout_seconds=timeout,
        )
        if not self._setup_sent:
            req.setup.CopyFrom(
                pb.RingSetup(
                    pid=self.proc.pid,
                    queue_depth=self.depth,
                    gup=GUP_MODES[self.gup],
                    foll=FOLL_MODES[self.foll],
                )
            )
            self._setup_sent = True
        try:
            await self._call.write(req)
            resp = await self._call.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if resp is grpc.aio.EOF:
            raise ConnectionError("the daemon ended the Ring stream")
        del self._pending[: resp.submitted]
        self.inflight = resp.inflight
        return [
            Completion(c.user_data, c.res, c.submit_ns, c.complete_ns) for c in resp.completions
        ]
