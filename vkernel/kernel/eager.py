"""Eager coroutine start: run a coroutine in the caller until it first sleeps.

asyncio (3.12's eager task factory aside) always starts a task on the next trip through the
loop. A syscall path that usually completes without sleeping (io_submit of cached pages, a
UFFDIO_COPY whose mmap_lock is free) can instead run in the caller, as Linux runs them in the
submitting thread, and only the part after its first sleep becomes a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Resume:
    """The rest of a coroutine that already ran up to its first suspension: awaiting this
    hands the future it yielded to the running task and carries on (an eager task)."""

    __slots__ = ("coro", "fut")

    def __init__(self, coro: Coroutine[Any, Any, None], fut: object) -> None:
        self.coro = coro
        self.fut = fut

    def __await__(self) -> Generator[Any, None, None]:
        coro, fut = self.coro, self.fut
        while True:
            try:
                yield fut
            except BaseException as e:  # noqa: BLE001 -- a cancel (or other throw) goes on in
                try:
                    fut = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    fut = coro.send(None)
                except StopIteration:
                    return


def start_eager(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None] | None:
    """Run ``coro`` in the caller until it first sleeps (None: it finished); the rest goes
    on in a task (asyncio's eager task start, as io_submit() works in the submitter)."""
    try:
        fut = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_Resume(coro, fut))
