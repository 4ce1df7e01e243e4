"""A thin synchronous façade over the async SDK: an event loop in a background thread.

with vkclient.sync.connect() as k:
    p = k.spawn("worker")
    print(k.ps())
"""

from __future__ import annotations

import signal as _signal
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self

from anyio.from_thread import BlockingPortal, start_blocking_portal

from vkclient import _kernel
from vkclient._kernel import ProcessInfo, SystemInfo, WaitResult
from vkclient.uffd_fd import UffdFd


class _Proxy:
    """An async SDK object driven from sync code: coroutine methods run on the portal."""

    def __init__(self, portal: BlockingPortal, obj: Any) -> None:
        self._portal = portal
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = self._portal.call(lambda: attr(*args, **kwargs))
            # The uffd fd's calls are coroutines on the portal's loop too (its socket is
            # watched there).
            return _Proxy(self._portal, out) if isinstance(out, UffdFd) else out

        return call

    def __len__(self) -> int:
        return len(self._obj)

    def __repr__(self) -> str:
        return repr(self._obj)


class _SyncGup:
    """``with proc.pin(...) as pages`` (released on exit), or ``proc.pin(...).take()``."""

    def __init__(self, portal: BlockingPortal, ctx: Any) -> None:
        self._portal = portal
        self._ctx = ctx

    def take(self) -> _Proxy:
        """Take the references without a with-block (release them yourself)."""
        return _Proxy(self._portal, self._portal.call(self._ctx._take))

    def __enter__(self) -> _Proxy:
        return _Proxy(self._portal, self._portal.call(self._ctx.__aenter__))

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._portal.call(self._ctx.__aexit__, et, e, tb)


class Process:
    """Synchronous twin of :class:`vkclient.Process`."""

    def __init__(self, kernel: Kernel, proc: _kernel.Process) -> None:
        self._kernel = kernel
        self._proc = proc
        self.pid = proc.pid
        self.info = proc.info

    def _run(self, fn: Any, *args: Any) -> Any:
        return self._kernel._portal.call(fn, *args)

    def kill(self, sig: int = _signal.SIGKILL) -> None:
        """kill(2)."""
        self._run(self._proc.kill, sig)

    def wait(self, timeout: float | None = None) -> WaitResult:
        """waitpid(2)."""
        result: WaitResult = self._run(self._proc.wait, timeout)
        return result

    def fork(self) -> Process:
        """fork(2)."""
        return Process(self._kernel, self._run(self._proc.fork))

    def pin(self, addr: int, npages: int, **kwargs: Any) -> _SyncGup:
        """pin_user_pages*(): ``with p.pin(addr, n, write=True) as pages``."""
        return _SyncGup(self._kernel._portal, self._proc.pin(addr, npages, **kwargs))

    def get(self, addr: int, npages: int, **kwargs: Any) -> _SyncGup:
        """get_user_pages*(): ``with p.get(addr, n) as pages``."""
        return _SyncGup(self._kernel._portal, self._proc.get(addr, npages, **kwargs))

    def __getattr__(self, name: str) -> Any:
        # Later capabilities (memory, uffd …) add async methods on the async Process; they
        # are reachable here unchanged, each call run to completion on the portal.
        attr = getattr(self._proc, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._kernel._portal.call(lambda: attr(*args, **kwargs))

        return call

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._run(self._proc.__aexit__, et, e, tb)


class Kernel:
    """Synchronous twin of :class:`vkclient.Kernel`."""

    def __init__(self, portal: BlockingPortal, cm: AbstractContextManager[Any], k: Any) -> None:
        self._portal = portal
        self._portal_cm = cm
        self._k: _kernel.Kernel = k
        self.session_id = self._k.session_id

    def info(self) -> SystemInfo:
        """Version, arch, memory size, uptime."""
        result: SystemInfo = self._portal.call(self._k.info)
        return result

    def vmstat(self) -> dict[str, int]:
        """/proc/vmstat."""
        result: dict[str, int] = self._portal.call(self._k.vmstat)
        return result

    def ps(self, all_sessions: bool = False) -> list[ProcessInfo]:
        """The process table."""
        result: list[ProcessInfo] = self._portal.call(self._k.ps, all_sessions)
        return result

    def health(self) -> str:
        """grpc.health.v1 status."""
        result: str = self._portal.call(self._k.health)
        return result

    def dump_page(self, pfn: int) -> dict[str, Any]:
        """dump_page(): one frame's struct page."""
        result: dict[str, Any] = self._portal.call(self._k.dump_page, pfn)
        return result

    def audit(self) -> list[str]:
        """The kernel's audit: the problems found (empty when clean)."""
        result: list[str] = self._portal.call(self._k.audit)
        return result

    def handles(self) -> list[Any]:
        """This session's GUP handles."""
        result: list[Any] = self._portal.call(self._k.handles)
        return result

    def open_dma(self) -> Any:
        """Map physical memory here (co-located drivers): a :class:`vkclient.DmaMemory`."""
        return self._portal.call(self._k.open_dma)

    def spawn(self, name: str, **kwargs: Any) -> Process:
        """Spawn a process owned by this session."""
        proc = self._portal.call(lambda: self._k.spawn(name, **kwargs))
        return Process(self, proc)

    def process(self, pid: int) -> Process:
        """A handle on an existing process."""
        return Process(self, self._k.process(pid))

    def userfaultfd(
        self, process: Process | int, flags: int = 0, *, features: int | None = 0
    ) -> Any:
        """userfaultfd(2) + UFFDIO_API: a :class:`vkclient.uffd.Userfaultfd` whose methods
        block (``u.register(...)``, ``u.resolve([...])``, ``u.serve(source)`` until release;
        the page source is then called on the SDK's loop thread)."""
        target = process.pid if isinstance(process, Process) else process
        uffd = self._portal.call(lambda: self._k.userfaultfd(target, flags, features=features))
        return _Proxy(self._portal, uffd)

    def attach_userfaultfd(self, handle: int) -> Any:
        """A uffd handle granted to this session, with blocking methods."""
        return _Proxy(self._portal, self._k.attach_userfaultfd(handle))

    def close(self) -> None:
        """End the session and stop the background loop."""
        try:
            self._portal.call(self._k.close)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(addr: str | None = None, **kwargs: Any) -> Kernel:
    """Synchronous :func:`vkclient.connect`; close with ``with`` or ``.close()``."""
    cm = start_blocking_portal("asyncio")
    portal = cm.__enter__()
    try:
        k = portal.call(lambda: _kernel.connect(addr, **kwargs)._open())
    except BaseException:
        cm.__exit__(None, None, None)
        raise
    return Kernel(portal, cm, k)
