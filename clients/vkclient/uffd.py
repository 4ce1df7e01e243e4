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

The fast path is a :class:`ResolveStream` (``uffd.resolver()``: one long-lived stream, one
message per batch of operations) and, on top of it, :class:`UffdMonitor`, the loop a postcopy
agent or snapshot loader builds on: it reads messages, coalesces adjacent missing pages into
one COPY, sends every batch's operations as one stream message, retries what an event made
fail, and calls back on REMOVE / UNMAP / REMAP / FORK::

    async def pages(start: int, length: int) -> bytes:   # or an int: a src address in
        return image[start - base : start - base + length]  # the monitor's own process

    mon = uffd.monitor(pages, on_remove=forget)
    await mon.run()                                        # until the uffd is released
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from vkclient._stream import StreamBase, TaggedStream, cancelled_under_us, stream_ended
from vkclient.constants import (
    PAGE_SIZE,
    UFFD_API,
    UFFD_EVENT_FORK,
    UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMAP,
    UFFD_EVENT_REMOVE,
    UFFD_EVENT_UNMAP,
    UFFD_FEATURE_EXACT_ADDRESS,
    UFFD_FEATURE_SIGBUS,
    UFFD_FEATURE_THREAD_ID,
    UFFD_PAGEFAULT_FLAG_MINOR,
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
from vkclient.errors import from_rpc_error
from vkclient.uffd_fd import FdReader, FdResolver, UffdFd, receive_uffd
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
    "UFFD_EVENT_FORK",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_EVENT_REMAP",
    "UFFD_EVENT_REMOVE",
    "UFFD_EVENT_UNMAP",
    "UFFD_FEATURE_EXACT_ADDRESS",
    "UFFD_FEATURE_SIGBUS",
    "UFFD_FEATURE_THREAD_ID",
    "UFFD_PAGEFAULT_FLAG_MINOR",
    "UFFD_PAGEFAULT_FLAG_WP",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "UFFD_USER_MODE_ONLY",
    "PageSource",
    "ResolveStream",
    "UffdMessage",
    "UffdMonitor",
    "UffdReader",
    "Userfaultfd",
    "continue_",
    "copy",
    "copy_from",
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


def copy_from(dst: int, src_pid: int, src: int, length: int, mode: int = 0) -> pb.UffdResolveOp:
    """A UFFDIO_COPY whose source is ``src`` in process ``src_pid`` (the monitor's own, owned
    by the resolving session): Linux's ``src``, no page bytes on the wire."""
    return pb.UffdResolveOp(
        copy=pb.UffdCopyOp(dst=dst, src_pid=src_pid, src=src, len=length, mode=mode)
    )


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

    async def open_fd(self) -> UffdFd:
        """The uffd itself as a file descriptor (:mod:`vkclient.uffd_fd`), from the daemon's
        side socket: for a monitor on the daemon's host, one datagram each way per call."""
        from vkernel.v1 import gup_service_pb2 as gpb
        from vkernel.v1 import gup_service_pb2_grpc as gpb_grpc

        info = await _call(
            gpb_grpc.GupServiceStub(self.kernel._channel).GetDmaChannel(
                gpb.GetDmaChannelRequest(), metadata=self._md, timeout=self.kernel.timeout
            )
        )
        if not info.socket_path:
            raise OSError(errno.EOPNOTSUPP, "the daemon has no side socket (not on UNIX?)")
        token = dict(self._md).get("vkernel-session", "")
        sock = await asyncio.to_thread(receive_uffd, info.socket_path, token, self.handle)
        return UffdFd(sock)

    def reader(self) -> UffdReader:
        """A :class:`UffdReader` on this handle: read(2) on demand (the stream opens on first
        use)."""
        return UffdReader(self)

    def resolver(self) -> ResolveStream:
        """A :class:`ResolveStream` on this handle (the stream opens on first use)."""
        return ResolveStream(self)

    def monitor(self, source: PageSource | None = None, **kwargs: Any) -> UffdMonitor:
        """A :class:`UffdMonitor` serving this handle's faults from ``source``."""
        return UffdMonitor(self, source, **kwargs)

    async def serve(self, source: PageSource | None = None, **kwargs: Any) -> None:
        """Serve faults from ``source`` until the uffd is released (``monitor(...).run()``)."""
        await UffdMonitor(self, source, **kwargs).run()

    async def messages(self, max_messages: int = 64) -> AsyncGenerator[list[pb.UffdMessage], None]:
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
        except asyncio.CancelledError:
            if not cancelled_under_us():
                raise
            return  # this Kernel closed under the stream (its session is over): no more reads
        finally:
            call.cancel()


class UffdReader(TaggedStream):
    """``UffdRead``: read(2) on demand, one stream message each way per read.

    Nothing leaves the uffd before :meth:`read` asks, so a fault or event is taken exactly
    when the monitor reads it (:meth:`Userfaultfd.messages` reads ahead while its caller is
    busy: an event's syscall then goes on before the monitor has seen it). A read cancelled
    while it waits drops the stream; the daemon cancels the waiting read, which took nothing.
    """

    _what = "UffdRead"

    def __init__(self, uffd: Userfaultfd) -> None:
        super().__init__()
        self.uffd = uffd
        self.released = False
        """The uffd was released: :meth:`read` returns None from now on."""

    def _open(self) -> Any:
        return self.uffd._stub.UffdRead(metadata=self.uffd.kernel._metadata)

    async def read(
        self, max_messages: int = 64, *, nonblock: bool = False
    ) -> list[pb.UffdMessage] | None:
        """One read(2): the pending messages (waiting for the first, unless ``nonblock``:
        then BlockingIOError, EAGAIN), or None once the uffd is released."""
        if self.released:
            return None
        resp: pb.UffdReadResponse = await self._roundtrip(
            pb.UffdReadRequest(
                handle=self.uffd.handle, max_messages=max_messages, nonblock=nonblock
            )
        )
        if resp.released:
            self.released = True
            self._call = None
            return None
        if resp.errno:
            raise OSError(resp.errno, errno.errorcode.get(resp.errno, str(resp.errno)))
        return list(resp.messages)


class ResolveStream(StreamBase):
    """``UffdResolveStream``: batches of operations on one long-lived stream.

    :meth:`submit` sends one batch and returns a future of its results without waiting (a
    monitor goes back to reading messages while the daemon works); :meth:`resolve` waits.
    Answers come in request order, so one reader task pairs them with the futures FIFO.
    """

    def __init__(self, uffd: Userfaultfd) -> None:
        self.uffd = uffd
        self._call: Any = None
        self._pending: deque[tuple[int, asyncio.Future[list[tuple[int, int]]]]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._tag = 0
        self._error: BaseException | None = None

    def _open(self) -> Any:
        if self._call is None:
            k = self.uffd.kernel
            self._call = self.uffd._stub.UffdResolveStream(metadata=k._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read_answers())
        return self._call

    async def _read_answers(self) -> None:
        call = self._call
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise from_rpc_error(await stream_ended(call))
                tag, fut = self._pending.popleft()
                if tag != resp.tag:  # the proto promises order; a mismatch is a daemon bug
                    raise RuntimeError(f"UffdResolveStream answered tag {resp.tag}, not {tag}")
                if not fut.done():
                    fut.set_result([(int(x.result), int(x.errno)) for x in resp.results])
        except grpc.RpcError as e:
            self._fail(from_rpc_error(e))
        except asyncio.CancelledError:
            self._fail(ConnectionError("the resolve stream was closed"))
            raise
        except Exception as e:  # noqa: BLE001 - handed to every waiter, not swallowed
            self._fail(e)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)
                # Marked retrieved: a caller awaiting it still gets the error, but a future
                # its monitor abandoned (cancelled while the answer was on its way) must not
                # log "exception never retrieved" at its collection.
                fut.exception()

    async def submit(
        self, ops: Sequence[pb.UffdResolveOp]
    ) -> asyncio.Future[list[tuple[int, int]]]:
        """Send one batch; the future gets ``(result, errno)`` per operation."""
        if self._error is not None:
            raise self._error
        call = self._open()
        self._tag += 1
        fut: asyncio.Future[list[tuple[int, int]]] = asyncio.get_running_loop().create_future()
        self._pending.append((self._tag, fut))
        try:
            await call.write(
                pb.UffdResolveStreamRequest(handle=self.uffd.handle, ops=list(ops), tag=self._tag)
            )
        except (grpc.RpcError, asyncio.InvalidStateError):
            # The daemon ended the stream: the reader reports why to every pending future.
            pass
        except BaseException as e:
            # Cancelled mid-write: whether the batch went out is unknown, so answers can no
            # longer be paired with futures. The stream is given up; its batches fail.
            self._fail(ConnectionError("a submit was cancelled; the resolve stream is closed"))
            call.cancel()
            if isinstance(e, asyncio.CancelledError) and cancelled_under_us():
                raise ConnectionError("the resolve stream's connection was closed") from None
            raise
        return fut

    async def resolve(self, ops: Sequence[pb.UffdResolveOp]) -> list[tuple[int, int]]:
        """Send one batch and wait for its ``(result, errno)`` per operation."""
        return await (await self.submit(ops))

    async def close(self) -> None:
        """End the stream once every submitted batch is answered (idempotent)."""
        call, self._call = self._call, None
        if call is None:
            return
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await call.done_writing()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(f for _, f in list(self._pending)), return_exceptions=True)
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        call.cancel()


PageSource = Callable[[int, int], "bytes | bytearray | memoryview | int | Awaitable[Any] | None"]
"""What a :class:`UffdMonitor` asks for a run of missing pages ``(start, length)``: their bytes
(inline COPY), an ``int`` (the run's address in the monitor's own process ``src_pid``: COPY
from there), or ``None`` (ZEROPAGE). May be a coroutine function."""

EventCallback = Callable[..., Any]


@dataclass
class _Fault:
    page: int
    flags: int


class UffdMonitor:
    """The monitor loop: read messages, resolve faults in batches, dispatch events.

    For each read(2) batch it takes the page of every PAGEFAULT message, drops duplicates,
    cuts the MISSING ones into runs of adjacent pages (at most ``max_run_pages`` each) and
    asks ``source`` for each run; WP faults are resolved by write-unprotecting their page
    (``UFFDIO_WRITEPROTECT`` mode 0), MINOR faults by ``UFFDIO_CONTINUE``. All of a batch's
    operations go out as one :class:`ResolveStream` message. ``on_fault(messages)`` instead
    of ``source`` takes over planning: it returns the operations itself.

    Results are checked as they come back, without holding up the reading: EEXIST (another
    COPY won the race) and ENOENT (the range was unmapped; its UNMAP/REMAP event follows) are
    answered with a WAKE, as the kernel selftests do; with a ``source``, EAGAIN (an event's
    ``mmap_changing``, or a partial COPY) is retried with the next messages or after a short
    backoff, whichever comes first (after REMOVE the source is asked again: ``on_remove`` can
    make it answer ``None``, zero pages). Other errors (EAGAIN too, with ``on_fault``) go to
    ``on_error(op, result, errno)`` (default: raise, ending :meth:`run`).

    Messages are read on demand (:class:`UffdReader`): the next read(2) goes out once a batch
    is handled, so an event's syscall goes on only when the monitor takes it, as on Linux;
    ``read_ahead=True`` uses the :meth:`Userfaultfd.messages` stream instead. With ``fd``
    (:meth:`Userfaultfd.open_fd`, a monitor on the daemon's host) it reads and resolves
    through the uffd fd instead of the gRPC streams: the same loop, a shorter fault round
    trip; COPY then takes bytes (a source answering an address, ``src_pid``, gets EINVAL).

    Events, after the batch's faults: ``on_remove(start, end)``, ``on_unmap(start, end)``,
    ``on_remap(from, to, length)``, ``on_fork(child_uffd)`` (a :class:`Userfaultfd` this
    session now holds). Callbacks may be sync or async.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        source: PageSource | None = None,
        *,
        src_pid: int = 0,
        on_fault: Callable[[list[pb.UffdMessage]], Any] | None = None,
        on_remove: EventCallback | None = None,
        on_unmap: EventCallback | None = None,
        on_remap: EventCallback | None = None,
        on_fork: EventCallback | None = None,
        on_error: Callable[[pb.UffdResolveOp, int, int], Any] | None = None,
        max_messages: int = 256,
        max_run_pages: int = 256,
        page_size: int = PAGE_SIZE,
        read_ahead: bool = False,
        fd: UffdFd | None = None,
    ) -> None:
        if source is None and on_fault is None:
            raise TypeError("a monitor needs a page source or an on_fault planner")
        self.uffd = uffd
        self.source = source
        self.src_pid = src_pid
        self.on_fault = on_fault
        self.on_remove = on_remove
        self.on_unmap = on_unmap
        self.on_remap = on_remap
        self.on_fork = on_fork
        self.on_error = on_error
        self.max_messages = max_messages
        self.max_run_pages = max_run_pages
        self.page_size = page_size
        self.read_ahead = read_ahead
        self.fd = fd
        self.stream: ResolveStream | FdResolver = (
            FdResolver(fd) if fd is not None else uffd.resolver()
        )
        self.faults = 0
        """PAGEFAULT messages read so far."""
        self.ops = 0
        """Resolution operations sent so far."""
        self.events = 0
        """Non-cooperative event messages read so far."""
        self._retry: list[_Fault] = []
        self._retrier: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    async def run(self) -> None:
        """Serve until the uffd is released (the message stream ends), then close the stream.

        Raises what ``on_error`` or a callback raised, or the error that ended a stream.
        """
        reader: UffdReader | FdReader = (
            FdReader(self.fd) if self.fd is not None else self.uffd.reader()
        )
        try:
            if self.read_ahead and self.fd is None:
                async for msgs in self.uffd.messages(self.max_messages):
                    await self.handle(msgs)
                    if self._failure is not None:
                        raise self._failure
            else:
                while (batch := await reader.read(self.max_messages)) is not None:
                    await self.handle(batch)
                    if self._failure is not None:
                        raise self._failure
            if self._checks:
                await asyncio.gather(*self._checks, return_exceptions=True)
            if self._failure is not None:
                raise self._failure
        finally:
            for t in [*self._checks, self._retrier]:
                if t is not None:
                    t.cancel()
            await reader.close()
            await self.stream.close()

    async def handle(self, msgs: Sequence[pb.UffdMessage]) -> None:
        """Serve one read(2) batch: its faults (and earlier retries) as one stream message,
        then its events in order. Public so that a caller with its own read loop reuses it."""
        faults = [m for m in msgs if m.event == UFFD_EVENT_PAGEFAULT]
        self.faults += len(faults)
        if self.on_fault is not None:
            ops = list(await _maybe_await(self.on_fault(faults))) if faults else []
            plan: list[list[_Fault]] = [[] for _ in ops]
        else:
            pending = [_Fault(m.address - m.address % self.page_size, m.flags) for m in faults]
            pending += self._retry
            self._retry = []
            ops, plan = await self._plan(pending)
        await self._send(ops, plan)
        for m in msgs:
            if m.event != UFFD_EVENT_PAGEFAULT:
                self.events += 1
                await self._event(m)

    async def _send(self, ops: list[pb.UffdResolveOp], plan: list[list[_Fault]]) -> None:
        """One stream message; its results are checked by a task of their own."""
        if not ops:
            return
        self.ops += len(ops)
        fut = await self.stream.submit(ops)
        check = asyncio.get_running_loop().create_task(self._check(ops, plan, fut))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    def _retry_later(self, faults: list[_Fault]) -> None:
        """EAGAIN: the fill met an event's mmap_changing (or did part of its pages). The event
        is read by the message loop, whose next batch retries too; the retrier makes sure
        the faults are retried even when no further message comes."""
        self._retry.extend(faults)
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_soon())

    async def _retry_soon(self) -> None:
        delay = 0.001
        try:
            while self._retry:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)  # an unread event can take a while to be read
                pending, self._retry = self._retry, []
                ops, plan = await self._plan(pending)
                await self._send(ops, plan)
        except Exception as e:  # noqa: BLE001 - reported by run(), as the check tasks do
            self._failure = e

    async def _plan(
        self, pending: list[_Fault]
    ) -> tuple[list[pb.UffdResolveOp], list[list[_Fault]]]:
        """Operations for the faults: one per run of adjacent pages of the same kind."""
        by_page: dict[int, int] = {}
        for f in pending:
            by_page[f.page] = by_page.get(f.page, 0) | f.flags
        ops: list[pb.UffdResolveOp] = []
        plan: list[list[_Fault]] = []
        run: list[_Fault] = []

        async def flush() -> None:
            if run:
                ops.append(await self._op(run))
                plan.append(list(run))
                run.clear()

        for page in sorted(by_page):
            f = _Fault(page, by_page[page])
            if run and (
                page != run[-1].page + self.page_size
                or _kind(f.flags) != _kind(run[-1].flags)
                or len(run) >= self.max_run_pages
            ):
                await flush()
            run.append(f)
        await flush()
        return ops, plan

    async def _op(self, run: list[_Fault]) -> pb.UffdResolveOp:
        start = run[0].page
        length = len(run) * self.page_size
        kind = _kind(run[0].flags)
        if kind == "wp":
            return writeprotect(start, length, 0)
        if kind == "minor":
            return continue_(start, length)
        assert self.source is not None
        got = await _maybe_await(self.source(start, length))
        if got is None:
            return zeropage(start, length)
        if isinstance(got, int):
            if not self.src_pid:
                raise TypeError("the page source gave an address but the monitor has no src_pid")
            return copy_from(start, self.src_pid, got, length)
        data = bytes(got)
        if len(data) != length:
            raise ValueError(f"the page source gave {len(data)} bytes for {length}")
        return copy(start, data)

    async def _check(
        self,
        ops: list[pb.UffdResolveOp],
        plan: list[list[_Fault]],
        fut: asyncio.Future[list[tuple[int, int]]],
    ) -> None:
        try:
            results = await fut
            wakes: list[pb.UffdResolveOp] = []
            for op, faults, (result, err) in zip(ops, plan, results, strict=True):
                if not err:
                    continue
                if err == errno.EEXIST and (rng := _op_range(op)) is not None:
                    # Someone else filled the page; make sure this fault's thread wakes.
                    wakes.append(wake(*rng))
                elif err == errno.EAGAIN and faults:
                    self._retry_later(faults[max(result, 0) // self.page_size :])
                elif err == errno.ENOENT and (rng := _op_range(op)) is not None:
                    # The range was unmapped (an UNMAP/REMAP event is on its way): nothing to
                    # fill, but the faulting thread sleeps until woken; awake, it faults
                    # again on what is mapped there now (SIGSEGV if nothing), as on Linux.
                    wakes.append(wake(*rng))
                elif self.on_error is not None:
                    await _maybe_await(self.on_error(op, result, err))
                else:
                    raise OSError(err, f"{op.WhichOneof('op')} failed: {errno.errorcode[err]}")
            if wakes:
                await self.stream.submit(wakes)
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                self._failure = e
            raise

    async def _event(self, m: pb.UffdMessage) -> None:
        if m.event == UFFD_EVENT_REMOVE and self.on_remove is not None:
            await _maybe_await(self.on_remove(m.start, m.end))
        elif m.event == UFFD_EVENT_UNMAP and self.on_unmap is not None:
            await _maybe_await(self.on_unmap(m.start, m.end))
        elif m.event == UFFD_EVENT_REMAP and self.on_remap is not None:
            await _maybe_await(self.on_remap(m.start, m.end, m.len))
        elif m.event == UFFD_EVENT_FORK and self.on_fork is not None:
            await _maybe_await(self.on_fork(Userfaultfd.attach(self.uffd.kernel, m.ufd)))
        if m.event == UFFD_EVENT_UNMAP:
            # Retries in a range that is gone: no fill, but their threads still sleep (munmap
            # does not wake them): wake them, as the ENOENT answer would.
            gone = [f for f in self._retry if m.start <= f.page < m.end]
            if gone:
                self._retry = [f for f in self._retry if not m.start <= f.page < m.end]
                await self.stream.submit([wake(f.page, self.page_size) for f in gone])


def _op_range(op: pb.UffdResolveOp) -> tuple[int, int] | None:
    """The destination range a fill operation covers (what a WAKE after EEXIST names)."""
    kind = op.WhichOneof("op")
    if kind == "copy":
        return op.copy.dst, len(op.copy.data) or op.copy.len
    if kind in ("zeropage", "continue"):
        r = getattr(op, kind)
        return r.start, r.len
    return None


def _kind(flags: int) -> str:
    if flags & UFFD_PAGEFAULT_FLAG_WP:
        return "wp"
    if flags & UFFD_PAGEFAULT_FLAG_MINOR:
        return "minor"
    return "missing"


async def _maybe_await(value: Any) -> Any:
    """A callback's result, awaited when it is a coroutine (callbacks may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value
