"""Direct and asynchronous I/O of the SDK: preadv/pwritev into process memory, AIO rings.

    n = await preadv(proc, fd, [(addr, 4096)], offset)
    async with AioRing(proc, depth=64) as ring:
        ring.prep_read(fd, addr, 4096, offset, user_data=7)
        done = await ring.submit_and_wait(1)
        # struct-of-arrays (io_uring's SQ/CQ arrays): one packed message, no object per I/O
        ring.prep_batch(ops, fds, addrs, lens, offsets, user_data)
        cq = await ring.submit_and_wait_arrays(1)  # cq.user_data, cq.res … as numpy arrays

On an O_DIRECT descriptor the daemon pins the buffers' pages for the I/O (see
``vkernel.kernel.dio``); errors are the OSError subclasses the errno means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self

import grpc
import numpy as np
import numpy.typing as npt

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

__all__ = [
    "AioRing",
    "Completion",
    "CompletionArrays",
    "preadv",
    "pwritev",
    "set_dio_defaults",
]


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


class CompletionArrays(NamedTuple):
    """Completions as arrays (io_uring's CQ array): user_data, res (bytes or -errno) and the
    daemon-side slat/clat times, one entry per io_event."""

    user_data: npt.NDArray[np.uint64]
    res: npt.NDArray[np.int64]
    submit_ns: npt.NDArray[np.uint64]
    complete_ns: npt.NDArray[np.uint64]


_SQ_FIELDS = ("opcodes", "fds", "bases", "lens", "offsets", "user_data")
_SQ_TYPES = (np.int64, np.int64, np.uint64, np.uint64, np.int64, np.uint64)


def _column(v: Any, n: int, dtype: Any) -> np.ndarray:
    """One SQ array: a sequence, or a scalar for every entry."""
    a = np.asarray(v, dtype=dtype)
    return np.full(n, a, dtype=dtype) if a.ndim == 0 else a


class AioRing:
    """An AIO context (io_setup … io_destroy) on one Ring stream."""

    def __init__(self, proc: Process, depth: int, gup: str = "", foll: str = "") -> None:
        self.proc = proc
        self.depth = depth
        self.gup = gup
        self.foll = foll
        self.inflight = 0
        self._pending: list[pb.Iocb] = []
        self._sq: list[np.ndarray] | None = None
        """Iocbs queued as arrays (prep_batch), sent after ``_pending``."""
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

    def prep_batch(
        self,
        opcodes: Any,
        fds: Any,
        bases: Any,
        lens: Any,
        offsets: Any,
        user_data: Any,
    ) -> None:
        """Queue one-buffer iocbs given as arrays (io_uring's SQ array; a scalar stands for
        every entry): entry i is opcodes[i] on fds[i], the buffer bases[i]/lens[i], at
        offsets[i]. They go in one packed IocbBatch, after the iocbs queued with prep()."""
        n = len(user_data)
        cols = [
            _column(v, n, t)
            for v, t in zip((opcodes, fds, bases, lens, offsets, user_data), _SQ_TYPES, strict=True)
        ]
        if any(len(c) != n for c in cols):
            raise ValueError("prep_batch: arrays of unequal length")
        if self._sq is None:
            self._sq = cols
        else:
            self._sq = [np.concatenate((a, c)) for a, c in zip(self._sq, cols, strict=True)]

    @property
    def queued(self) -> int:
        """Iocbs prepared and not yet submitted."""
        return len(self._pending) + (0 if self._sq is None else len(self._sq[0]))

    def _request(
        self, min_complete: int, max_complete: int, timeout: float, arrays: bool
    ) -> pb.RingRequest:
        """The RingRequest of everything queued (setup on the first one)."""
        req = pb.RingRequest(
            submit=self._pending,
            min_complete=min_complete,
            max_complete=max_complete,
            timeout_seconds=timeout,
            batch_completions=arrays,
        )
        if self._sq is not None:
            b = req.submit_batch
            for name, col in zip(_SQ_FIELDS, self._sq, strict=True):
                getattr(b, name).extend(col.tolist())
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
        return req

    async def _enter(self, req: pb.RingRequest) -> pb.RingResponse:
        """One Ring round trip; what was submitted leaves the queues."""
        try:
            await self._call.write(req)
            resp = await self._call.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if resp is grpc.aio.EOF:
            raise ConnectionError("the daemon ended the Ring stream")
        assert isinstance(resp, pb.RingResponse)
        done = resp.submitted
        k = min(done, len(self._pending))
        del self._pending[:k]
        if self._sq is not None and done > k:
            rest = [c[done - k :] for c in self._sq]
            self._sq = rest if len(rest[0]) else None
        self.inflight = resp.inflight
        return resp

    async def submit_and_wait(
        self, min_complete: int = 0, max_complete: int = 0, timeout: float = 0.0
    ) -> list[Completion]:
        """io_uring_enter(to_submit, min_complete): submit what is queued, reap completions.

        Iocbs the ring had no room for stay queued; OSError(EAGAIN) never escapes."""
        resp = await self._enter(self._request(min_complete, max_complete, timeout, False))
        return [
            Completion(c.user_data, c.res, c.submit_ns, c.complete_ns) for c in resp.completions
        ]

    async def submit_and_wait_arrays(
        self, min_complete: int = 0, max_complete: int = 0, timeout: float = 0.0
    ) -> CompletionArrays:
        """io_uring_enter() + the CQ array: as :meth:`submit_and_wait`, the completions as
        arrays (one packed CompletionBatch, no object per I/O)."""
        resp = await self._enter(self._request(min_complete, max_complete, timeout, True))
        cb = resp.completion_batch
        n = len(cb.res)
        return CompletionArrays(
            np.fromiter(cb.user_data, dtype=np.uint64, count=n),
            np.fromiter(cb.res, dtype=np.int64, count=n),
            np.fromiter(cb.submit_ns, dtype=np.uint64, count=n),
            np.fromiter(cb.complete_ns, dtype=np.uint64, count=n),
        )
