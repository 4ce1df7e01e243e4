"""The mmap_lock of an mm_struct: a fair, writer-preferring, killable rwsem.

Models ``struct rw_semaphore`` (kernel/locking/rwsem.c) as used through
include/linux/mmap_lock.h:

- Waiters form one FIFO. A new reader does not jump ahead of a queued writer: while anyone
  waits, every new acquisition (and every trylock) queues or fails.
- Hand-off on release: when the lock becomes available the releasing side grants it to the
  head of the queue directly (the state is updated before the waiter runs). If the head is a
  writer it gets the lock alone; if it is a reader, every consecutive reader at the head is
  granted at once, up to the next queued writer.
- ``write_downgrade`` turns the write hold into a read hold and wakes the readers at the head.
- Killable waits (TASK_KILLABLE): a waiter whose task receives a fatal signal leaves the queue
  and fails with ``-EINTR``; if it was a writer at the head blocking readers, those readers are
  woken. An *uncontended* acquisition succeeds even with a fatal signal pending, as in Linux.
- asyncio cancellation of a waiter is handled like a kill: it leaves the queue, and if the
  lock had already been handed to it, the hold is released again. Cancellation never leaks a
  hold or wedges the queue.

Concurrency (DESIGN.md §4): code between two ``await`` points is atomic, so the state needs no
further protection. The uncontended fast paths never await anything (no loop trip): they check
the state, bump counters and return. Only a contended acquisition creates a future and sleeps.

Statistics are kept per lock (see :meth:`MmapLock.stats`). Hold times of read holds are
measured per hold: each hold is keyed by the asyncio task that took it, so overlapping readers
do not blur each other's times. A read hold released by a task other than the one that took it
(``up_read_non_owner``) is matched with the oldest outstanding read hold.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from time import perf_counter_ns
from types import TracebackType
from typing import TYPE_CHECKING

from vkernel.kernel.errors import KernelError

if TYPE_CHECKING:
    from vkernel.kernel.task import Task

__all__ = ["MmapLock"]

_current_task = asyncio.current_task

# Waiter states.
_WAITING = 0
_GRANTED = 1
_KILLED = 2


class _Waiter:
    """struct rwsem_waiter: one sleeper in the FIFO, also its own kill hook."""

    __slots__ = ("fut", "lock", "owner", "state", "t0", "write")

    def __init__(
        self, lock: MmapLock, fut: asyncio.Future[None], write: bool, owner: object, t0: int
    ) -> None:
        self.lock = lock
        self.fut = fut
        self.write = write
        self.owner = owner
        self.t0 = t0
        self.state = _WAITING

    def __call__(self) -> None:
        """Kill hook (signal_wake_up on a TASK_KILLABLE sleeper)."""
        if self.state == _WAITING:
            self.lock._kill_waiter(self)


class _ReadGuard:
    """``async with lock.read(task):`` — mmap_read_lock_killable() … mmap_read_unlock()."""

    __slots__ = ("_killable", "_lock", "_task")

    def __init__(self, lock: MmapLock, task: Task | None, killable: bool) -> None:
        self._lock = lock
        self._task = task
        self._killable = killable

    async def __aenter__(self) -> MmapLock:
        await self._lock.read_lock(self._task, self._killable)
        return self._lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.read_unlock()


class _WriteGuard:
    """``async with lock.write(task):`` — mmap_write_lock_killable() … mmap_write_unlock().

    If the body downgraded the lock (:meth:`MmapLock.write_downgrade`), the exit releases the
    read hold instead, as a caller of mmap_write_downgrade() ends with mmap_read_unlock().
    """

    __slots__ = ("_killable", "_lock", "_task")

    def __init__(self, lock: MmapLock, task: Task | None, killable: bool) -> None:
        self._lock = lock
        self._task = task
        self._killable = killable

    async def __aenter__(self) -> MmapLock:
        await self._lock.write_lock(self._task, self._killable)
        return self._lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lock._writer:
            self._lock.write_unlock()
        else:
            self._lock.read_unlock()


class MmapLock:
    """struct rw_semaphore mmap_lock of an mm_struct."""

    __slots__ = (
        "_cancelled_waits",
        "_downgrades",
        "_killed_waits",
        "_read_acquired",
        "_read_anon",
        "_read_contended",
        "_read_hold_max",
        "_read_hold_total",
        "_read_nested",
        "_read_starts",
        "_read_trylock_failed",
        "_read_trylock_ok",
        "_read_wait_max",
        "_read_wait_total",
        "_readers",
        "_waiters",
        "_write_acquired",
        "_write_contended",
        "_write_hold_max",
        "_write_hold_total",
        "_write_start",
        "_write_trylock_failed",
        "_write_trylock_ok",
        "_write_wait_max",
        "_write_wait_total",
        "_writer",
    )

    def __init__(self) -> None:
        """init_rwsem(&mm->mmap_lock) (mmap_init_lock)."""
        self._readers = 0
        self._writer = False
        self._waiters: deque[_Waiter] = deque()
        # Start times of the outstanding read holds. One hold may be anonymous (its owner
        # not looked up: asking asyncio for the current task costs more than the rest of the
        # fast path); every other hold is keyed by the asyncio task holding it, and a second
        # hold by the same task (recursive read) goes to _read_nested (LIFO).
        self._read_anon = -1
        self._read_starts: dict[object, int] = {}
        self._read_nested: dict[object, list[int]] = {}
        self._write_start = 0
        # Statistics.
        self._read_acquired = 0
        self._write_acquired = 0
        self._read_trylock_ok = 0
        self._read_trylock_failed = 0
        self._write_trylock_ok = 0
        self._write_trylock_failed = 0
        self._read_contended = 0
        self._write_contended = 0
        self._killed_waits = 0
        self._cancelled_waits = 0
        self._downgrades = 0
        self._read_wait_total = 0
        self._read_wait_max = 0
        self._write_wait_total = 0
        self._write_wait_max = 0
        self._read_hold_total = 0
        self._read_hold_max = 0
        self._write_hold_total = 0
        self._write_hold_max = 0

    # ------------------------------------------------------------------ read side

    async def read_lock(self, task: Task | None = None, killable: bool = True) -> None:
        """mmap_read_lock_killable() (``killable``) or mmap_read_lock(): down_read(_killable).

        Uncontended (no writer holds the lock and nobody waits), the lock is taken without a
        loop trip, even if ``task`` has a fatal signal pending. Contended, the caller queues
        behind every earlier waiter. With ``task`` and ``killable``, a fatal signal sent to
        the task while it waits makes it leave the queue and raise ``KernelError(EINTR)``.
        """
        if not self._writer and not self._waiters:
            self._readers += 1
            self._read_acquired += 1
            if self._read_anon < 0:
                self._read_anon = perf_counter_ns()
            else:
                self._read_hold_keyed(_current_task(), perf_counter_ns())
            return
        await self._wait(False, task, killable)

    def read_trylock(self) -> bool:
        """mmap_read_trylock(): down_read_trylock().

        Fails while a writer holds the lock or anyone waits (a waiting writer is not
        overtaken), so it never sleeps.
        """
        if self._writer or self._waiters:
            self._read_trylock_failed += 1
            return False
        self._readers += 1
        self._read_acquired += 1
        self._read_trylock_ok += 1
        if self._read_anon < 0:
            self._read_anon = perf_counter_ns()
        else:
            self._read_hold_keyed(_owner(), perf_counter_ns())
        return True

    def read_unlock(self) -> None:
        """mmap_read_unlock(): up_read(). The last reader out hands the lock to a writer."""
        readers = self._readers
        if readers == 1 and self._read_anon >= 0:
            # Fast path: the last reader out, holding the anonymous hold.
            held = perf_counter_ns() - self._read_anon
            self._read_anon = -1
            self._readers = 0
            self._read_hold_total += held
            if held > self._read_hold_max:  # noqa: PLR1730 (max() costs a call on the fast path)
                self._read_hold_max = held
            if self._waiters:
                self._wake()
            return
        if readers <= 0:
            raise RuntimeError("mmap_read_unlock: mmap_lock is not held for read")
        now = perf_counter_ns()
        held = now - self._read_hold_take(_owner() if readers > 1 else None)
        self._read_hold_total += held
        self._read_hold_max = max(self._read_hold_max, held)
        self._readers = readers - 1
        if readers == 1 and self._waiters:
            self._wake()

    def read(self, task: Task | None = None, killable: bool = True) -> _ReadGuard:
        """``async with lock.read(task):`` — mmap_read_lock_killable() … mmap_read_unlock()."""
        return _ReadGuard(self, task, killable)

    # ------------------------------------------------------------------ write side

    async def write_lock(self, task: Task | None = None, killable: bool = True) -> None:
        """mmap_write_lock_killable() (``killable``) or mmap_write_lock(): down_write(_killable).

        Uncontended (no holder, no waiter), the lock is taken without a loop trip, even if
        ``task`` has a fatal signal pending. Contended, the caller queues; once it is queued,
        readers arriving later queue behind it. A fatal signal while waiting (``killable``)
        raises ``KernelError(EINTR)``, and readers it was holding back are woken.
        """
        if not self._writer and not self._readers and not self._waiters:
            self._writer = True
            self._write_acquired += 1
            self._write_start = perf_counter_ns()
            return
        await self._wait(True, task, killable)

    def write_trylock(self) -> bool:
        """mmap_write_trylock(): down_write_trylock(). Succeeds only on a free, idle lock."""
        if self._writer or self._readers or self._waiters:
            self._write_trylock_failed += 1
            return False
        self._writer = True
        self._write_acquired += 1
        self._write_trylock_ok += 1
        self._write_start = perf_counter_ns()
        return True

    def write_unlock(self) -> None:
        """mmap_write_unlock(): up_write(). Hands the lock to the head of the queue."""
        if not self._writer:
            raise RuntimeError("mmap_write_unlock: mmap_lock is not held for write")
        held = perf_counter_ns() - self._write_start
        self._write_hold_total += held
        if held > self._write_hold_max:  # noqa: PLR1730 (max() costs a call on the fast path)
            self._write_hold_max = held
        self._writer = False
        if self._waiters:
            self._wake()

    def write_downgrade(self) -> None:
        """mmap_write_downgrade(): downgrade_write().

        The write hold becomes a read hold of the same caller, atomically (no writer can get
        in between), and the readers queued at the head are woken to share it. The write hold
        time ends here and a read hold time starts.
        """
        if not self._writer:
            raise RuntimeError("mmap_write_downgrade: mmap_lock is not held for write")
        now = perf_counter_ns()
        held = now - self._write_start
        self._write_hold_total += held
        self._write_hold_max = max(self._write_hold_max, held)
        self._writer = False
        self._readers += 1
        self._downgrades += 1
        self._read_anon = now  # no read hold was outstanding
        if self._waiters:
            self._wake()

    def write(self, task: Task | None = None, killable: bool = True) -> _WriteGuard:
        """``async with lock.write(task):`` — mmap_write_lock_killable() … mmap_write_unlock()."""
        return _WriteGuard(self, task, killable)

    # ------------------------------------------------------------------ asserts

    def is_locked(self) -> bool:
        """rwsem_is_locked(): held for read or write (mmap_assert_locked)."""
        return self._writer or self._readers > 0

    @property
    def readers(self) -> int:
        """Current read holders."""
        return self._readers

    @property
    def writer(self) -> bool:
        """Held for write (mmap_assert_write_locked)."""
        return self._writer

    @property
    def waiters(self) -> int:
        """Tasks sleeping in the queue (rwsem_has_waiters / the wait_list length)."""
        return len(self._waiters)

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, float | int]:
        """Per-lock statistics (the counters lock_stat would report for mmap_lock).

        - ``read_acquired`` / ``write_acquired``: successful acquisitions of each mode, by
          any path (fast path, after a wait, trylock). A downgrade is counted in
          ``downgrades``, not as a read acquisition.
        - ``read_trylock_ok`` / ``read_trylock_failed``, ``write_trylock_ok`` /
          ``write_trylock_failed``: trylock outcomes.
        - ``read_contended`` / ``write_contended``: acquisitions that had to wait (including
          waits that ended killed or cancelled).
        - ``killed_waits`` / ``cancelled_waits``: waits that ended by a fatal signal (EINTR)
          or by asyncio cancellation.
        - ``wait_ns_total`` / ``wait_ns_max`` (and per mode ``read_wait_*``,
          ``write_wait_*``): time spent queued, over every wait, however it ended.
        - ``hold_ns_total`` / ``hold_ns_max`` (and per mode ``read_hold_*``,
          ``write_hold_*``): time from acquisition to release, over completed holds. Each
          read hold is measured on its own.
        - ``readers``, ``writer`` (0/1), ``waiters``, ``read_waiters``, ``write_waiters``:
          the current state.
        """
        write_waiters = sum(1 for w in self._waiters if w.write)
        return {
            "read_acquired": self._read_acquired,
            "write_acquired": self._write_acquired,
            "read_trylock_ok": self._read_trylock_ok,
            "read_trylock_failed": self._read_trylock_failed,
            "write_trylock_ok": self._write_trylock_ok,
            "write_trylock_failed": self._write_trylock_failed,
            "read_contended": self._read_contended,
            "write_contended": self._write_contended,
            "killed_waits": self._killed_waits,
            "cancelled_waits": self._cancelled_waits,
            "downgrades": self._downgrades,
            "wait_ns_total": self._read_wait_total + self._write_wait_total,
            "wait_ns_max": max(self._read_wait_max, self._write_wait_max),
            "read_wait_ns_total": self._read_wait_total,
            "read_wait_ns_max": self._read_wait_max,
            "write_wait_ns_total": self._write_wait_total,
            "write_wait_ns_max": self._write_wait_max,
            "hold_ns_total": self._read_hold_total + self._write_hold_total,
            "hold_ns_max": max(self._read_hold_max, self._write_hold_max),
            "read_hold_ns_total": self._read_hold_total,
            "read_hold_ns_max": self._read_hold_max,
            "write_hold_ns_total": self._write_hold_total,
            "write_hold_ns_max": self._write_hold_max,
            "readers": self._readers,
            "writer": int(self._writer),
            "waiters": len(self._waiters),
            "read_waiters": len(self._waiters) - write_waiters,
            "write_waiters": write_waiters,
        }

    def __repr__(self) -> str:
        state = "W" if self._writer else f"R{self._readers}" if self._readers else "free"
        return f"<MmapLock {state} waiters={len(self._waiters)}>"

    # ------------------------------------------------------------------ slow paths

    async def _wait(self, write: bool, task: Task | None, killable: bool) -> None:
        """rwsem_down_read_slowpath() / rwsem_down_write_slowpath()."""
        if write:
            self._write_contended += 1
        else:
            self._read_contended += 1
        sleeper = task if killable else None
        if sleeper is not None and sleeper.fatal_signal_pending():
            # Linux checks signal_pending_state() before the first schedule(): a contended
            # killable acquisition by an already-killed task fails at once.
            self._killed_waits += 1
            raise _eintr(write)
        t0 = perf_counter_ns()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Only a read hold is keyed by its task (for per-hold timing); a writer is alone.
        waiter = _Waiter(self, fut, write, None if write else _current_task(), t0)
        self._waiters.append(waiter)
        if sleeper is not None:
            sleeper.add_kill_hook(waiter)
        try:
            await fut
        except BaseException:
            # Cancelled (or anything else thrown into the sleeper): unwind cleanly.
            if waiter.state == _GRANTED:
                # The lock was handed over before the task could run: give it back.
                if write:
                    self.write_unlock()
                else:
                    self._read_release_owner(waiter.owner)
            elif waiter.state == _WAITING:
                self._account_wait(write, perf_counter_ns() - t0)
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass  # _wake() already dropped the cancelled future
                self._wake()
            if waiter.state != _KILLED:
                self._cancelled_waits += 1
            raise
        finally:
            if sleeper is not None:
                sleeper.remove_kill_hook(waiter)
        if waiter.state == _KILLED:
            raise _eintr(write)

    def _kill_waiter(self, waiter: _Waiter) -> None:
        """A fatal signal woke a killable waiter: leave the queue (out_nolock in rwsem.c).

        Whoever was queued behind it may now be able to run — e.g. readers held back by a
        killed writer at the head while other readers hold the lock — so wake the head.
        """
        waiter.state = _KILLED
        self._killed_waits += 1
        self._account_wait(waiter.write, perf_counter_ns() - waiter.t0)
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        if not waiter.fut.done():
            waiter.fut.set_result(None)
        self._wake()

    def _wake(self) -> None:
        """rwsem_mark_wake(): hand the lock to the head of the queue, if it can have it.

        A writer at the head gets it when the lock is free. A reader at the head gets it
        when no writer holds it, together with every consecutive reader behind it.
        """
        q = self._waiters
        now = 0
        while q:
            w = q[0]
            if w.fut.done():
                # Cancelled, its task has not run yet; it will find itself gone.
                q.popleft()
                continue
            if w.write:
                if self._writer or self._readers:
                    return
                q.popleft()
                now = now or perf_counter_ns()
                self._writer = True
                self._write_acquired += 1
                self._write_start = now
                self._grant(w, now)
                return
            if self._writer:
                return
            q.popleft()
            now = now or perf_counter_ns()
            self._readers += 1
            self._read_acquired += 1
            if self._read_anon < 0:
                self._read_anon = now
            else:
                self._read_hold_keyed(w.owner, now)
            self._grant(w, now)

    def _grant(self, w: _Waiter, now: int) -> None:
        w.state = _GRANTED
        self._account_wait(w.write, now - w.t0)
        w.fut.set_result(None)

    def _account_wait(self, write: bool, waited: int) -> None:
        if write:
            self._write_wait_total += waited
            self._write_wait_max = max(self._write_wait_max, waited)
        else:
            self._read_wait_total += waited
            self._read_wait_max = max(self._read_wait_max, waited)

    def _read_hold_keyed(self, owner: object, now: int) -> None:
        """Record a read hold of ``owner`` started at ``now`` (another hold is outstanding)."""
        if owner in self._read_starts:
            self._read_nested.setdefault(owner, []).append(now)
        else:
            self._read_starts[owner] = now

    def _read_hold_take(self, owner: object) -> int:
        """The start time of the read hold ``owner`` releases (before ``_readers`` drops)."""
        if self._readers == 1:
            # The only outstanding hold, whoever releases it.
            if self._read_anon >= 0:
                start = self._read_anon
                self._read_anon = -1
                return start
            return self._read_starts.popitem()[1]
        nested = self._read_nested.get(owner) if self._read_nested else None
        if nested:
            start = nested.pop()
            if not nested:
                del self._read_nested[owner]
            return start
        own = self._read_starts.pop(owner, None)
        if own is not None:
            return own
        if self._read_anon >= 0:
            # The releasing task's hold is the anonymous one.
            start = self._read_anon
            self._read_anon = -1
            return start
        # up_read_non_owner(): match the oldest outstanding hold.
        return self._read_hold_take(next(iter(self._read_starts)))

    def _read_release_owner(self, owner: object) -> None:
        """up_read() on behalf of ``owner`` (a granted waiter that was cancelled)."""
        held = perf_counter_ns() - self._read_hold_take(owner)
        self._read_hold_total += held
        self._read_hold_max = max(self._read_hold_max, held)
        self._readers -= 1
        if not self._readers and self._waiters:
            self._wake()


def _owner() -> object:
    """The asyncio task a hold belongs to (None outside a running loop)."""
    try:
        return _current_task()
    except RuntimeError:
        return None


def _eintr(write: bool) -> KernelError:
    mode = "write" if write else "read"
    return KernelError(errno.EINTR, f"fatal signal while waiting for mmap_lock ({mode})", mode=mode)
