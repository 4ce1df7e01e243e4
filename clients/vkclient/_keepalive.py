"""The session's keepalive stream, driven from its own thread.

The daemon ends a session after about a second of keepalive silence (that is how a cut
network is noticed). Pinging from the caller's event loop would tie the session's life to
that loop's responsiveness: one long synchronous computation in the client and its processes
would be killed. A thread with its own (sync) channel pings regardless, so the session lives
exactly as long as the client process and its connection do.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from vkernel.v1 import session_service_pb2, session_service_pb2_grpc

_STOP = object()


class KeepaliveThread:
    """Pings every ``interval`` seconds; ``ping()`` measures one round trip on demand."""

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        metadata: tuple[tuple[str, str], ...],
        interval: float,
    ) -> None:
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._stub = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self._metadata = metadata
        self._interval = interval
        self._outbox: queue.Queue[object] = queue.Queue()
        self._pending: dict[int, tuple[float, concurrent.futures.Future[float]]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="vkclient-keepalive", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        """Open the stream and start pinging."""
        self._call = self._stub.Keepalive(self._requests(), metadata=self._metadata)
        self._thread.start()

    def _requests(self) -> Iterator[session_service_pb2.KeepaliveRequest]:
        while True:
            try:
                item = self._outbox.get(timeout=self._interval)
            except queue.Empty:
                item = next(self._seq)
            if item is _STOP:
                return
            assert isinstance(item, int)
            yield session_service_pb2.KeepaliveRequest(sequence=item)

    def _run(self) -> None:
        try:
            for resp in self._call:
                with self._lock:
                    entry = self._pending.pop(resp.sequence, None)
                if entry is not None:
                    start, fut = entry
                    fut.set_result(time.perf_counter() - start)
        except grpc.RpcError as e:
            self.error = e
        finally:
            with self._lock:
                pending, self._pending = self._pending, {}
            for _, fut in pending.values():
                fut.set_exception(ConnectionError("keepalive stream ended"))

    def ping(self) -> concurrent.futures.Future[float]:
        """Send one ping now; the future gets the round-trip time in seconds."""
        fut: concurrent.futures.Future[float] = concurrent.futures.Future()
        seq = next(self._seq)
        with self._lock:
            if not self._thread.is_alive() and self._call is not None and self._call.done():
                fut.set_exception(ConnectionError("keepalive stream ended"))
                return fut
            self._pending[seq] = (time.perf_counter(), fut)
        self._outbox.put(seq)
        return fut

    def cancel(self) -> None:
        """Drop the stream abruptly, as a dying client would (tests use this)."""
        if self._call is not None:
            self._call.cancel()

    def stop(self) -> None:
        """End the stream and the thread, and close the channel."""
        self._outbox.put(_STOP)
        self.cancel()
        self._thread.join(timeout=5)
        self._channel.close()
