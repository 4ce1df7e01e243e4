"""AioService through the SDK: O_DIRECT preadv/pwritev, AIO rings, session death mid-I/O."""

from __future__ import annotations

import errno
from pathlib import Path

import anyio
import numpy as np
import pytest
import structlog

import vkclient
from tests.service.conftest import Daemon
from vkclient import O_CREAT, O_DIRECT, O_RDWR
from vkclient._aio import OP_READ, AioRing, preadv, pwritev, set_dio_defaults
from vkernel.kernel.blockdev import DeviceSpec

P = 4096


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed + (i >> 12)) & 0xFF for i in range(n))


async def test_direct_rw_pins_and_releases(k: vkclient.Kernel) -> None:
    """An O_DIRECT pwritev + preadv: the data round-trips, every pin is released, a
    misaligned buffer is EINVAL."""
    p = await k.spawn("dio")
    fd = await p.open("f", O_CREAT | O_RDWR | O_DIRECT)
    a = await p.mmap(8 * P)
    data = _pattern(8 * P)
    await p.write(a, data)
    vm0 = await k.vmstat()
    assert await pwritev(p, fd, [(a, 4 * P), (a + 4 * P, 4 * P)], 0) == 8 * P
    b = await p.mmap(8 * P)
    assert await preadv(p, fd, [(b, 8 * P)], 0) == 8 * P
    assert await p.read(b, 8 * P) == data
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] - vm0["nr_foll_pin_acquired"] == 16
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]
    with pytest.raises(OSError) as ei:
        await preadv(p, fd, [(b + 1, P)], 0)
    assert ei.value.errno == errno.EINVAL
    assert await set_dio_defaults(k, foll="get") == ("fast", "get")
    assert await preadv(p, fd, [(b, P)], 0) == P
    assert (await k.vmstat())["nr_foll_pin_acquired"] == vm["nr_foll_pin_acquired"]
    assert await set_dio_defaults(k, foll="pin") == ("fast", "pin")
    assert await k.audit() == []


async def test_ring_many_ios_per_message(k: vkclient.Kernel) -> None:
    """32 reads in one message on a depth-16 ring: 16 accepted, the rest after a reap;
    completions carry user_data and res."""
    p = await k.spawn("ring")
    fd = await p.open("f", O_CREAT | O_RDWR | O_DIRECT)
    a = await p.mmap(32 * P)
    data = _pattern(32 * P, seed=3)
    await p.write(a, data)
    assert await pwritev(p, fd, [(a, 32 * P)], 0) == 32 * P
    b = await p.mmap(32 * P)
    got: dict[int, int] = {}
    async with AioRing(p, 16) as ring:
        for i in range(32):
            ring.prep_read(fd, b + i * P, P, i * P, user_data=1000 + i)
        while ring.queued or ring.inflight:
            for c in await ring.submit_and_wait(1, timeout=5.0):
                got[c.user_data] = c.res
        ring.prep(vkclient._aio.OP_READ, fd, [(b + 1, P)], 0, user_data=7)
        [bad] = await ring.submit_and_wait(1, timeout=5.0)
    assert got == {1000 + i: P for i in range(32)}
    assert (bad.user_data, bad.res) == (7, -errno.EINVAL)
    assert await p.read(b, 32 * P) == data
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]


async def test_ring_batch_arrays(k: vkclient.Kernel) -> None:
    """Iocbs and completions as packed arrays (IocbBatch / CompletionBatch): 32 reads on a
    depth-16 ring go 16 at a time, each entry gets its own result (EINVAL misaligned, EBADF,
    EINVAL for an unknown opcode), a per-iocb Iocb and an IocbBatch share one message, the
    data lands, the pins balance and the audit is clean."""
    p = await k.spawn("ringb")
    fd = await p.open("f", O_CREAT | O_RDWR | O_DIRECT)
    a = await p.mmap(32 * P)
    data = _pattern(32 * P, seed=5)
    await p.write(a, data)
    assert await pwritev(p, fd, [(a, 32 * P)], 0) == 32 * P
    b = await p.mmap(32 * P)
    vm0 = await k.vmstat()
    got: dict[int, int] = {}
    n = np.arange(32, dtype=np.int64)
    async with AioRing(p, 16) as ring:
        ring.prep_batch(OP_READ, fd, b + n * P, P, n * P, 1000 + n)
        assert ring.queued == 32
        while ring.queued or ring.inflight:
            cq = await ring.submit_and_wait_arrays(1, timeout=5.0)
            assert len(cq.user_data) == len(cq.res) == len(cq.complete_ns)
            got.update(zip(cq.user_data.tolist(), cq.res.tolist(), strict=True))
        ring.prep_read(fd, b, P, 0, user_data=1)  # a per-iocb Iocb, then arrays
        ring.prep_batch(
            [OP_READ, OP_READ, OP_READ, 0],
            [fd, fd, 999, fd],
            [b + P, b + 2 * P + 1, b, b],
            P,
            [P, 0, 0, 0],
            [2, 3, 4, 5],
        )
        mixed: dict[int, int] = {}
        while len(mixed) < 5:
            cq = await ring.submit_and_wait_arrays(5, timeout=5.0)
            mixed.update(zip(cq.user_data.tolist(), cq.res.tolist(), strict=True))
        # a batch whose arrays differ in length is refused whole (EINVAL), the ring lives on
        ring.prep_batch(OP_READ, fd, [b, b + P], P, [0, P], [6, 7])
        req = ring._request(0, 0, 5.0, True)
        del req.submit_batch.fds[-1]
        resp = await ring._enter(req)
        assert (resp.submitted, resp.errno) == (0, errno.EINVAL)
        assert ring._sq is not None  # still queued, all of it
        assert len(ring._sq[0]) == 2
        cq = await ring.submit_and_wait_arrays(2, timeout=5.0)
        assert sorted(zip(cq.user_data.tolist(), cq.res.tolist(), strict=True)) == [(6, P), (7, P)]
    assert got == {1000 + i: P for i in range(32)}
    assert mixed == {1: P, 2: P, 3: -errno.EINVAL, 4: -errno.EBADF, 5: -errno.EINVAL}
    assert await p.read(b, 32 * P) == data
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] - vm0["nr_foll_pin_acquired"] == 36
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]
    assert await k.audit() == []


@pytest.mark.parametrize("arrays", [False, True])
async def test_session_killed_with_io_in_flight_leaks_nothing(
    daemon: Daemon, k: vkclient.Kernel, arrays: bool
) -> None:
    """A client dies with reads in flight on a slow device (submitted per iocb, or as an
    IocbBatch): the daemon ends its session and its process, waits for the device, then
    unpins; nothing leaks."""
    daemon.kernel.vfs.add_device(DeviceSpec.parse("slow0=ram:16M,latency=50ms"))
    client = await vkclient.connect(daemon.addr, client_name="fio")
    p = await client.spawn("victim")
    fd = await p.open("f", O_CREAT | O_RDWR | O_DIRECT, "disk", "slow0")
    a = await p.mmap(16 * P)
    await p.write(a, _pattern(16 * P))
    assert await pwritev(p, fd, [(a, 16 * P)], 0) == 16 * P
    dev = daemon.kernel.vfs.device("slow0")
    with structlog.testing.capture_logs():
        async with AioRing(p, 32) as ring:
            if arrays:
                n = np.arange(16, dtype=np.int64)
                ring.prep_batch(OP_READ, fd, a + n * P, P, n * P, n)
                await ring.submit_and_wait_arrays(0)
            else:
                for i in range(16):
                    ring.prep_read(fd, a + i * P, P, i * P, user_data=i)
                await ring.submit_and_wait(0)
            with anyio.fail_after(1):  # the submission's task starts its bios a tick later
                while dev.stats.inflight + dev.stats.queued == 0:
                    await anyio.sleep(0.001)
            vm = await k.vmstat()
            assert vm["nr_foll_pin_acquired"] > vm["nr_foll_pin_released"]
            assert client._keepalive is not None
            client._keepalive.cancel()
            with anyio.fail_after(5):
                while True:
                    vm = await k.vmstat()
                    if vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]:
                        break
                    await anyio.sleep(0.02)
            assert dev.stats.inflight == 0
    await client.close()
    assert await k.audit() == []


async def test_daemon_boots_dio_switches_from_its_config(tmp_path: Path) -> None:
    """`vkernel serve --dio-gup slow --dio-foll get`: the daemon's kernel boots with them (an
    O_DIRECT read then takes FOLL_GET references through slow GUP: no pins, no GUP-fast)."""
    from vkernel.config import build_parser, config_from_args
    from vkernel.server import serve

    sock = tmp_path / "vk.sock"
    args = build_parser().parse_args(
        [
            *("serve", "--listen", f"unix://{sock}", "--memory", "64M", "--no-prefault"),
            *("--dio-gup", "slow", "--dio-foll", "get", "--grace", "1"),
        ]
    )
    cfg = config_from_args(args, {}, False)
    stop = anyio.Event()
    ready = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            assert (
                await serve(
                    cfg, on_ready=lambda _: ready.set(), shutdown=stop, handle_signals=False
                )
                == 0
            )

        tg.start_soon(run)
        with anyio.fail_after(10):
            await ready.wait()
        async with vkclient.connect(f"unix://{sock}", client_name="t") as k:
            assert await set_dio_defaults(k) == ("slow", "get")
            p = await k.spawn("dio")
            fd = await p.open("f", O_CREAT | O_RDWR | O_DIRECT)
            a = await p.mmap(P)
            await p.write(a, b"x" * P)
            vm0 = await k.vmstat()
            assert await pwritev(p, fd, [(a, P)], 0) == P
            assert await preadv(p, fd, [(a, P)], 0) == P
            vm = await k.vmstat()
            assert vm["nr_foll_pin_acquired"] == vm0["nr_foll_pin_acquired"]
            assert vm["fast_gup"] == vm0["fast_gup"]
            await p.kill()
        stop.set()
