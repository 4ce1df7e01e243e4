"""mmap_lock: a fair, writer-preferring, killable rwsem (kernel/locking/rwsem.c semantics)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal
from collections.abc import Awaitable, Callable

import pytest

from vkernel.kernel.cred import Cred
from vkernel.kernel.errors import KernelError
from vkernel.kernel.mmap_lock import MmapLock
from vkernel.kernel.task import Task, default_rlimits

_pids = itertools.count(100)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_task(comm: str = "t") -> Task:
    return Task(pid=next(_pids), comm=comm, cred=Cred(), rlimits=default_rlimits(), owner="s")


async def settle(cond: Callable[[], bool], rounds: int = 50) -> None:
    """Let other tasks run until ``cond`` holds."""
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never reached")


def spawn(coro: Awaitable[None]) -> asyncio.Task[None]:
    async def run() -> None:
        await coro

    return asyncio.create_task(run())


async def hold_read(lock: MmapLock, log: list[str], name: str, release: asyncio.Event) -> None:
    await lock.read_lock()
    log.append(f"{name}+")
    await release.wait()
    lock.read_unlock()
    log.append(f"{name}-")


async def hold_write(lock: MmapLock, log: list[str], name: str, release: asyncio.Event) -> None:
    await lock.write_lock()
    log.append(f"{name}+")
    await release.wait()
    lock.write_unlock()
    log.append(f"{name}-")


def assert_idle(lock: MmapLock) -> None:
    assert not lock.is_locked()
    assert lock.readers == 0
    assert not lock.writer
    assert lock.waiters == 0
    # Usable again, in both modes, without sleeping.
    assert lock.write_trylock()
    lock.write_unlock()
    assert lock.read_trylock()
    lock.read_unlock()


# ---------------------------------------------------------------- basic exclusion


async def test_readers_share() -> None:
    lock = MmapLock()
    log: list[str] = []
    go = asyncio.Event()
    tasks = [spawn(hold_read(lock, log, f"r{i}", go)) for i in range(3)]
    await settle(lambda: lock.readers == 3)
    assert lock.is_locked()
    assert not lock.writer
    assert lock.waiters == 0
    go.set()
    await asyncio.gather(*tasks)
    assert_idle(lock)
    assert lock.stats()["read_contended"] == 0


async def test_writer_excludes_readers_and_writers() -> None:
    lock = MmapLock()
    await lock.write_lock()
    assert lock.writer
    assert lock.is_locked()
    log: list[str] = []
    go = asyncio.Event()
    go.set()
    r = spawn(hold_read(lock, log, "r", go))
    w = spawn(hold_write(lock, log, "w", go))
    await settle(lambda: lock.waiters == 2)
    assert log == []
    assert not lock.read_trylock()
    assert not lock.write_trylock()
    lock.write_unlock()
    await asyncio.gather(r, w)
    assert log == ["r+", "r-", "w+", "w-"]
    assert_idle(lock)


async def test_fast_path_does_not_yield() -> None:
    """Uncontended acquisitions complete without a trip through the event loop."""
    lock = MmapLock()
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    t = asyncio.create_task(other())
    await lock.read_lock()
    await lock.read_lock()
    lock.read_unlock()
    lock.read_unlock()
    await lock.write_lock()
    lock.write_unlock()
    assert ran == []  # the other task never got to run
    await t


# ---------------------------------------------------------------- fairness


async def test_waiting_writer_blocks_new_readers() -> None:
    lock = MmapLock()
    log: list[str] = []
    r1_go, w_go, r2_go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    r1 = spawn(hold_read(lock, log, "r1", r1_go))
    await settle(lambda: lock.readers == 1)
    w = spawn(hold_write(lock, log, "w", w_go))
    await settle(lambda: lock.waiters == 1)
    # Only readers hold the lock, yet a new reader must queue behind the writer.
    r2 = spawn(hold_read(lock, log, "r2", r2_go))
    await settle(lambda: lock.waiters == 2)
    assert lock.readers == 1
    assert not lock.read_trylock()
    assert lock.stats()["read_trylock_failed"] == 1
    r1_go.set()
    await settle(lambda: "w+" in log)
    assert log == ["r1+", "r1-", "w+"]
    assert lock.writer
    assert lock.waiters == 1
    w_go.set()
    r2_go.set()
    await asyncio.gather(r1, w, r2)
    assert log == ["r1+", "r1-", "w+", "w-", "r2+", "r2-"]
    assert_idle(lock)


async def test_readers_woken_together_up_to_next_writer() -> None:
    lock = MmapLock()
    await lock.write_lock()
    log: list[str] = []
    go = {n: asyncio.Event() for n in ("r1", "r2", "w2", "r3")}
    tasks: list[asyncio.Task[None]] = []
    for name in ("r1", "r2", "w2", "r3"):  # queued one at a time, in this order
        hold = hold_write if name.startswith("w") else hold_read
        tasks.append(spawn(hold(lock, log, name, go[name])))
        await settle(lambda: lock.waiters == len(tasks))
    lock.write_unlock()
    # The hand-off happens at release: both head readers hold the lock already.
    assert lock.readers == 2
    assert lock.waiters == 2
    await settle(lambda: len(log) == 2)
    assert sorted(log) == ["r1+", "r2+"]
    await asyncio.sleep(0)
    assert "r3+" not in log  # r3 stays behind the queued writer
    go["r1"].set()
    go["r2"].set()
    await settle(lambda: "w2+" in log)
    assert lock.writer
    assert "r3+" not in log
    go["w2"].set()
    go["r3"].set()
    await asyncio.gather(*tasks)
    assert log.index("w2-") < log.index("r3+")
    assert_idle(lock)


async def test_write_downgrade_wakes_head_readers() -> None:
    lock = MmapLock()
    await lock.write_lock()
    log: list[str] = []
    go = {n: asyncio.Event() for n in ("r1", "r2", "w2")}
    tasks = [
        spawn(hold_read(lock, log, "r1", go["r1"])),
        spawn(hold_read(lock, log, "r2", go["r2"])),
        spawn(hold_write(lock, log, "w2", go["w2"])),
    ]
    await settle(lambda: lock.waiters == 3)
    lock.write_downgrade()
    assert not lock.writer
    assert lock.readers == 3  # the downgrader plus the two readers at the head
    assert lock.waiters == 1
    await settle(lambda: len(log) == 2)
    go["r1"].set()
    go["r2"].set()
    await settle(lambda: lock.readers == 1)
    assert "w2+" not in log  # the downgraded hold still excludes the writer
    lock.read_unlock()
    go["w2"].set()
    await asyncio.gather(*tasks)
    assert log[-2:] == ["w2+", "w2-"]
    assert lock.stats()["downgrades"] == 1
    assert_idle(lock)


async def test_write_guard_after_downgrade_releases_read() -> None:
    lock = MmapLock()
    async with lock.write() as held:
        assert held is lock
        assert lock.writer
        lock.write_downgrade()
        assert lock.readers == 1
    assert_idle(lock)
    async with lock.read():
        assert lock.readers == 1
    assert_idle(lock)


async def test_guards_release_on_exception() -> None:
    lock = MmapLock()
    with pytest.raises(ValueError, match="boom"):
        async with lock.write():
            raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        async with lock.read():
            raise ValueError("boom")
    assert_idle(lock)


# ---------------------------------------------------------------- trylocks


async def test_trylocks() -> None:
    lock = MmapLock()
    assert lock.read_trylock()
    assert lock.read_trylock()
    assert lock.readers == 2
    assert not lock.write_trylock()
    lock.read_unlock()
    lock.read_unlock()
    assert lock.write_trylock()
    assert not lock.read_trylock()
    assert not lock.write_trylock()
    lock.write_unlock()
    s = lock.stats()
    assert s["read_trylock_ok"] == 2
    assert s["read_trylock_failed"] == 1
    assert s["write_trylock_ok"] == 1
    assert s["write_trylock_failed"] == 2
    assert s["read_acquired"] == 2
    assert s["write_acquired"] == 1
    assert_idle(lock)


def test_trylock_outside_event_loop() -> None:
    lock = MmapLock()
    assert lock.read_trylock()
    assert lock.read_trylock()
    lock.read_unlock()
    lock.read_unlock()
    assert lock.write_trylock()
    lock.write_downgrade()
    lock.read_unlock()
    assert not lock.is_locked()


async def test_unbalanced_unlock_is_a_bug() -> None:
    lock = MmapLock()
    with pytest.raises(RuntimeError):
        lock.read_unlock()
    with pytest.raises(RuntimeError):
        lock.write_unlock()
    with pytest.raises(RuntimeError):
        lock.write_downgrade()
    await lock.read_lock()
    with pytest.raises(RuntimeError):
        lock.write_unlock()
    lock.read_unlock()
    assert_idle(lock)


# ---------------------------------------------------------------- killable waits


@pytest.mark.parametrize("write", [False, True])
async def test_killed_waiter_gets_eintr(write: bool) -> None:
    lock = MmapLock()
    await lock.write_lock()
    victim = make_task("victim")
    errs: list[int] = []

    async def waiter() -> None:
        try:
            if write:
                await lock.write_lock(victim)
            else:
                await lock.read_lock(victim)
        except KernelError as e:
            errs.append(e.errno)
        else:
            raise AssertionError("a killed waiter must not get the lock")

    t = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    victim.send_fatal_signal(signal.SIGKILL)
    assert lock.waiters == 0  # it left the queue at once
    await t
    assert errs == [errno.EINTR]
    assert not victim._kill_hooks
    lock.write_unlock()
    s = lock.stats()
    assert s["killed_waits"] == 1
    assert s["read_contended" if not write else "write_contended"] == 1
    assert s["read_acquired"] == 0
    assert s["write_acquired"] == 1
    assert_idle(lock)


async def test_killed_writer_at_head_wakes_readers_behind_it() -> None:
    lock = MmapLock()
    await lock.read_lock()  # a reader holds the lock
    victim = make_task("writer")
    log: list[str] = []
    go = asyncio.Event()

    async def writer() -> None:
        with pytest.raises(KernelError) as ei:
            await lock.write_lock(victim)
        assert ei.value.errno == errno.EINTR
        log.append("w-eintr")

    w = asyncio.create_task(writer())
    await settle(lambda: lock.waiters == 1)
    readers = [spawn(hold_read(lock, log, f"r{i}", go)) for i in range(2)]
    await settle(lambda: lock.waiters == 3)
    assert lock.readers == 1
    victim.send_fatal_signal(signal.SIGKILL)
    # Nothing blocks the readers now: they were handed the lock with the writer's exit.
    assert lock.readers == 3
    assert lock.waiters == 0
    await w
    await settle(lambda: len(log) == 3)
    go.set()
    await asyncio.gather(*readers)
    lock.read_unlock()
    assert_idle(lock)


async def test_killed_writer_in_middle_keeps_queue_order() -> None:
    lock = MmapLock()
    await lock.write_lock()
    victim = make_task("w1")
    log: list[str] = []
    go = asyncio.Event()
    go.set()
    r1 = spawn(hold_read(lock, log, "r1", go))
    await settle(lambda: lock.waiters == 1)

    async def w1() -> None:
        with pytest.raises(KernelError):
            await lock.write_lock(victim)

    k = asyncio.create_task(w1())
    await settle(lambda: lock.waiters == 2)
    w2 = spawn(hold_write(lock, log, "w2", go))
    await settle(lambda: lock.waiters == 3)
    victim.send_fatal_signal(signal.SIGKILL)
    assert lock.waiters == 2
    assert lock.writer  # the holder is untouched
    lock.write_unlock()
    await asyncio.gather(r1, k, w2)
    assert log == ["r1+", "r1-", "w2+", "w2-"]
    assert_idle(lock)


@pytest.mark.parametrize("write", [False, True])
async def test_uncontended_acquire_with_fatal_signal_pending_succeeds(write: bool) -> None:
    lock = MmapLock()
    t = make_task()
    t.send_fatal_signal(signal.SIGKILL)
    assert t.fatal_signal_pending()
    if write:
        await lock.write_lock(t)
        assert lock.writer
        lock.write_unlock()
    else:
        await lock.read_lock(t)
        assert lock.readers == 1
        lock.read_unlock()
    assert lock.stats()["killed_waits"] == 0
    assert_idle(lock)


@pytest.mark.parametrize("write", [False, True])
async def test_contended_acquire_with_fatal_signal_pending_fails_at_once(write: bool) -> None:
    lock = MmapLock()
    await lock.write_lock()
    t = make_task()
    t.send_fatal_signal(signal.SIGKILL)
    acquire = lock.write_lock if write else lock.read_lock
    with pytest.raises(KernelError) as ei:
        await acquire(t)
    assert ei.value.errno == errno.EINTR
    assert lock.waiters == 0
    assert not t._kill_hooks
    lock.write_unlock()
    assert lock.stats()["killed_waits"] == 1
    assert_idle(lock)


async def test_non_killable_wait_ignores_fatal_signal() -> None:
    lock = MmapLock()
    await lock.write_lock()
    t = make_task()
    got: list[bool] = []

    async def waiter() -> None:
        await lock.read_lock(t, killable=False)
        got.append(True)
        lock.read_unlock()

    w = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    t.send_fatal_signal(signal.SIGKILL)
    assert lock.waiters == 1
    lock.write_unlock()
    await w
    assert got == [True]
    assert lock.stats()["killed_waits"] == 0
    assert_idle(lock)


async def test_kill_after_grant_keeps_the_lock() -> None:
    """Once the lock was handed over, a signal no longer makes the acquisition fail."""
    lock = MmapLock()
    await lock.write_lock()
    t = make_task()
    got: list[bool] = []

    async def waiter() -> None:
        await lock.read_lock(t)
        got.append(True)
        lock.read_unlock()

    w = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    lock.write_unlock()  # hands the lock to the waiter before it runs
    t.send_fatal_signal(signal.SIGKILL)
    await w
    assert got == [True]
    assert_idle(lock)


async def test_killable_guard() -> None:
    lock = MmapLock()
    await lock.write_lock()
    t = make_task()

    async def waiter() -> None:
        async with lock.read(t):
            raise AssertionError("unreachable")

    w = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    t.send_fatal_signal(signal.SIGKILL)
    with pytest.raises(KernelError):
        await w
    lock.write_unlock()
    assert_idle(lock)


# ---------------------------------------------------------------- cancellation


@pytest.mark.parametrize("write", [False, True])
async def test_cancelled_waiter_leaves_queue(write: bool) -> None:
    lock = MmapLock()
    await lock.write_lock()
    t = make_task()

    async def waiter() -> None:
        if write:
            await lock.write_lock(t)
        else:
            await lock.read_lock(t)

    w = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert lock.waiters == 0
    assert not t._kill_hooks
    lock.write_unlock()
    assert lock.stats()["cancelled_waits"] == 1
    assert_idle(lock)


@pytest.mark.parametrize("write", [False, True])
async def test_cancel_after_grant_releases_the_hold(write: bool) -> None:
    lock = MmapLock()
    await lock.write_lock()

    async def waiter() -> None:
        if write:
            await lock.write_lock()
        else:
            await lock.read_lock()
        raise AssertionError("the cancelled waiter must not run on with the lock")

    w = asyncio.create_task(waiter())
    await settle(lambda: lock.waiters == 1)
    lock.write_unlock()  # granted: the state already says it holds the lock
    assert lock.is_locked()
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert_idle(lock)
    assert lock.stats()["cancelled_waits"] == 1


async def test_cancel_after_grant_hands_on_to_next_waiter() -> None:
    lock = MmapLock()
    await lock.write_lock()
    log: list[str] = []
    go = asyncio.Event()
    go.set()

    async def doomed() -> None:
        await lock.write_lock()
        raise AssertionError("unreachable")

    d = asyncio.create_task(doomed())
    await settle(lambda: lock.waiters == 1)
    r = spawn(hold_read(lock, log, "r", go))
    await settle(lambda: lock.waiters == 2)
    lock.write_unlock()  # grants to doomed
    d.cancel()  # doomed gives the lock back on its way out, which wakes r
    with pytest.raises(asyncio.CancelledError):
        await d
    await r
    assert log == ["r+", "r-"]
    assert_idle(lock)


async def test_cancelled_writer_at_head_wakes_readers() -> None:
    lock = MmapLock()
    await lock.read_lock()

    async def writer() -> None:
        await lock.write_lock()

    w = asyncio.create_task(writer())
    await settle(lambda: lock.waiters == 1)
    log: list[str] = []
    go = asyncio.Event()
    go.set()
    r = spawn(hold_read(lock, log, "r", go))
    await settle(lambda: lock.waiters == 2)
    w.cancel()
    # Before the cancelled writer runs, another release must not wedge on it either.
    with pytest.raises(asyncio.CancelledError):
        await w
    await r
    assert log == ["r+", "r-"]
    lock.read_unlock()
    assert_idle(lock)


async def test_release_skips_cancelled_waiter_not_yet_run() -> None:
    """A release between the cancellation and the cancelled task's unwinding skips it."""
    lock = MmapLock()
    await lock.write_lock()

    async def writer() -> None:
        await lock.write_lock()

    w = asyncio.create_task(writer())
    await settle(lambda: lock.waiters == 1)
    log: list[str] = []
    go = asyncio.Event()
    go.set()
    r = spawn(hold_read(lock, log, "r", go))
    await settle(lambda: lock.waiters == 2)
    w.cancel()  # the waiter's future is cancelled, its task has not run yet
    lock.write_unlock()
    assert not lock.writer  # not handed to the cancelled writer
    assert lock.readers == 1  # but to the reader behind it
    with pytest.raises(asyncio.CancelledError):
        await w
    await r
    assert_idle(lock)


async def test_cancellation_with_many_waiters_never_wedges() -> None:
    lock = MmapLock()
    done: list[str] = []

    async def worker(i: int) -> None:
        for _ in range(20):
            if i % 3 == 0:
                async with lock.write():
                    await asyncio.sleep(0)
            else:
                async with lock.read():
                    await asyncio.sleep(0)
        done.append(f"w{i}")

    tasks = [asyncio.create_task(worker(i)) for i in range(12)]
    for _ in range(10):
        await asyncio.sleep(0)
    for t in tasks[::4]:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(x, asyncio.CancelledError) for x in results) <= 3
    assert len(done) >= 9
    assert_idle(lock)


# ---------------------------------------------------------------- statistics


async def test_stats_counts() -> None:
    lock = MmapLock()
    s0 = lock.stats()
    assert all(v == 0 for v in s0.values()), s0
    await lock.read_lock()
    lock.read_unlock()
    await lock.write_lock()
    log: list[str] = []
    go = asyncio.Event()
    go.set()
    r = spawn(hold_read(lock, log, "r", go))
    w = spawn(hold_write(lock, log, "w", go))
    await settle(lambda: lock.waiters == 2)
    s = lock.stats()
    assert s["writer"] == 1
    assert s["waiters"] == 2
    assert s["read_waiters"] == 1
    assert s["write_waiters"] == 1
    await asyncio.sleep(0.002)
    lock.write_unlock()
    await asyncio.gather(r, w)
    s = lock.stats()
    assert s["read_acquired"] == 2
    assert s["write_acquired"] == 2
    assert s["read_contended"] == 1
    assert s["write_contended"] == 1
    assert s["killed_waits"] == 0
    assert s["cancelled_waits"] == 0
    assert s["read_wait_ns_max"] >= 2_000_000
    assert s["write_wait_ns_max"] >= 2_000_000
    assert s["wait_ns_total"] == s["read_wait_ns_total"] + s["write_wait_ns_total"]
    assert s["wait_ns_max"] == max(s["read_wait_ns_max"], s["write_wait_ns_max"])
    assert s["write_hold_ns_max"] >= 2_000_000
    assert s["hold_ns_total"] == s["read_hold_ns_total"] + s["write_hold_ns_total"]
    assert s["hold_ns_max"] == max(s["read_hold_ns_max"], s["write_hold_ns_max"])
    assert s["readers"] == 0
    assert s["writer"] == 0
    assert s["waiters"] == 0


async def test_read_hold_time_is_measured_per_hold() -> None:
    """Overlapping read holds are each timed on their own: a short hold released while a
    long one is outstanding does not take the long one's start time, nor the reverse."""
    lock = MmapLock()
    long_go, short_go = asyncio.Event(), asyncio.Event()
    log: list[str] = []
    long_t = spawn(hold_read(lock, log, "long", long_go))
    await settle(lambda: lock.readers == 1)
    await asyncio.sleep(0.02)
    short_t = spawn(hold_read(lock, log, "short", short_go))
    await settle(lambda: lock.readers == 2)
    short_go.set()  # held ~0 ms, while "long" has been held 20 ms
    await short_t
    await asyncio.sleep(0.02)
    long_go.set()
    await long_t
    s = lock.stats()
    assert s["read_hold_ns_max"] >= 40_000_000
    short_hold = s["read_hold_ns_total"] - s["read_hold_ns_max"]
    assert short_hold < 15_000_000
    # Same with the long hold taken second (keyed by its task rather than anonymous).
    lock2 = MmapLock()
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a = spawn(hold_read(lock2, log, "a", a_go))
    await settle(lambda: lock2.readers == 1)
    b = spawn(hold_read(lock2, log, "b", b_go))
    await settle(lambda: lock2.readers == 2)
    await asyncio.sleep(0.01)
    a_go.set()  # a: ~10 ms
    await a
    await asyncio.sleep(0.03)
    b_go.set()  # b: ~40 ms
    await b
    s = lock2.stats()
    assert s["read_hold_ns_max"] >= 40_000_000
    assert s["read_hold_ns_total"] - s["read_hold_ns_max"] < 30_000_000


async def test_recursive_and_non_owner_read_release_keep_counts() -> None:
    lock = MmapLock()
    await lock.read_lock()
    await lock.read_lock()  # same task, twice
    got = asyncio.Event()

    async def other() -> None:
        await lock.read_lock()
        got.set()

    await asyncio.create_task(other())
    assert got.is_set()
    assert lock.readers == 3
    for _ in range(3):
        lock.read_unlock()  # one of them releases the other task's hold (non-owner)
    s = lock.stats()
    assert s["read_acquired"] == 3
    assert s["read_hold_ns_total"] >= 0
    assert_idle(lock)
