"""GupService through the real SDK: handles, release, grants, errno, DMA, fork, gup-test.

Section references (A.5, B.34 …) are to reference/kernel-semantics.md; every test ends with
the audit clean (the ``daemon`` fixture's teardown).
"""

from __future__ import annotations

import errno
import io
import re

import anyio
import pytest
import structlog

import vkclient
import vkclient.sync
from tests.service.conftest import Daemon
from vkclient import (
    FOLL_GET,
    FOLL_LONGTERM,
    FOLL_NOFAULT,
    FOLL_PIN,
    PAGE_SIZE,
    GupStream,
    gup_test,
    pagemap_pfn,
)
from vkernel.v1 import gup_service_pb2 as pb


async def _populated(p: vkclient.Process, npages: int, fill: bytes = b"x") -> int:
    """An anonymous mapping whose pages are all written (faulted in, exclusive)."""
    addr = await p.mmap(npages * PAGE_SIZE)
    await p.write(addr, fill * (npages * PAGE_SIZE // len(fill)))
    return addr


async def _pfns(p: vkclient.Process, addr: int, npages: int) -> list[int]:
    return [pagemap_pfn(e) for e in await p.pagemap(addr, npages)]


async def _refcounts(k: vkclient.Kernel, pfns: list[int]) -> list[int]:
    return [(await k.dump_page(pfn))["refcount"] for pfn in pfns]


async def test_pin_handle_holds_exactly_the_refs(k: vkclient.Kernel) -> None:
    """A pin through the API is +1024 per small page (A.5), recorded in one handle; unpin
    gives exactly that back and the vmstat pin counters balance."""
    p = await k.spawn("driver-target")
    addr = await _populated(p, 4)
    pfns = await _pfns(p, addr, 4)
    before = await _refcounts(k, pfns)
    vm0 = await k.vmstat()
    async with p.pin(addr, 4, write=True) as pages:
        assert pages.count == 4
        assert pages.pfns.tolist() == pfns
        assert await _refcounts(k, pfns) == [r + 1024 for r in before]
        assert all([(await k.dump_page(pfn))["maybe_dma_pinned"] for pfn in pfns])
        [info] = await k.handles()
        assert (info.handle, info.pid, info.pinned, info.held) == (pages.handle, p.pid, True, 4)
        assert info.api == pb.GUP_API_PIN_USER_PAGES_FAST
    assert await _refcounts(k, pfns) == before
    assert await k.handles() == []
    vm1 = await k.vmstat()
    assert vm1["nr_foll_pin_acquired"] - vm0["nr_foll_pin_acquired"] == 4
    assert vm1["nr_foll_pin_released"] - vm0["nr_foll_pin_released"] == 4


async def test_get_takes_one_reference_per_page_and_put_returns_it(k: vkclient.Kernel) -> None:
    """FOLL_GET references are +1 each (no bias), with every entry point, and put_page()
    returns them."""
    p = await k.spawn("get")
    addr = await _populated(p, 3)
    pfns = await _pfns(p, addr, 3)
    before = await _refcounts(k, pfns)
    for api in ("fast", "fast_only", "locked", "remote", "unlocked"):
        async with p.get(addr, 3, api=api) as pages:
            assert pages.count == 3, api
            assert not pages.pinned
            assert await _refcounts(k, pfns) == [r + 1 for r in before], api
        assert await _refcounts(k, pfns) == before, api


async def test_every_pin_entry_point_takes_a_bias_per_page(k: vkclient.Kernel) -> None:
    """pin_user_pages, *_remote (with and without locked), *_unlocked and *_fast all pin."""
    p = await k.spawn("pins")
    addr = await _populated(p, 2)
    pfns = await _pfns(p, addr, 2)
    before = await _refcounts(k, pfns)
    for api, locked in (("locked", True), ("remote", True), ("remote", False), ("unlocked", True)):
        async with p.pin(addr, 2, write=True, api=api, locked=locked) as pages:
            assert pages.count == 2
            assert not pages.lock_dropped  # nothing had to be faulted: no retry
            assert await _refcounts(k, pfns) == [r + 1024 for r in before]
    assert await _refcounts(k, pfns) == before


async def test_unpin_a_subset_then_the_rest(k: vkclient.Kernel) -> None:
    """Release a range, then explicit indices, then the rest; a released page cannot be
    released twice (EINVAL, nothing released)."""
    p = await k.spawn("subset")
    addr = await _populated(p, 8)
    pfns = await _pfns(p, addr, 8)
    before = await _refcounts(k, pfns)
    pages = await p.pin(addr, 8, write=True)
    assert await pages.unpin(0, 3) == 5
    after = await _refcounts(k, pfns)
    assert after[:3] == before[:3]
    assert after[3:] == [r + 1024 for r in before[3:]]
    assert await pages.release(indices=[5, 7]) == 3
    with pytest.raises(OSError) as exc:
        await pages.release(indices=[4, 5])
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        await pages.release(indices=[8])
    assert exc.value.errno == errno.EINVAL
    assert (await k.handles())[0].held == 3
    assert await pages.release() == 0
    assert await _refcounts(k, pfns) == before
    assert await k.handles() == []


async def test_release_dirty_marks_the_folio_dirty(k: vkclient.Kernel) -> None:
    """unpin_user_pages_dirty_lock(make_dirty): the folio is dirty after the release; a DMA
    write alone leaves PTE and folio dirty bits as they were."""
    p = await k.spawn("dirty")
    addr = await p.mmap(PAGE_SIZE)
    await p.read(addr, 1)  # the zero page: R/O, clean
    async with p.pin(addr, 1, write=True, dirty=False) as pages:
        pfn = int(pages.pfns[0])
        # A write pin breaks COW into a fresh anon page; clear nothing, just note its state.
        await pages.dma_write(0, b"device data")
        await pages.unpin(dirty=True)
        assert "dirty" in (await k.dump_page(pfn))["flags"]
    assert await p.read(addr, 11) == b"device data"


async def test_session_killed_while_holding_pins_leaks_nothing(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """A driver whose keepalive stream dies mid-pin: its session ends, every pin goes back
    (refcounts restored, pin counters balanced) and a pins_leaked event says how many."""
    p = await k.spawn("victim")
    addr = await _populated(p, 16)
    pfns = await _pfns(p, addr, 16)
    before = await _refcounts(k, pfns)
    driver = await vkclient.connect(daemon.addr, client_name="driver")
    await p.grant(driver.session_id)
    target = driver.process(p.pid)
    await target.pin(addr, 16, write=True, longterm=True)
    await target.get(addr, 4)
    assert await _refcounts(k, pfns[:4]) == [r + 1025 for r in before[:4]]
    with structlog.testing.capture_logs() as logs:
        assert driver._keepalive is not None
        driver._keepalive.cancel()
        with anyio.fail_after(5):
            while daemon.kernel.extra_refs.any() or await _refcounts(k, pfns) != before:
                await anyio.sleep(0.02)
    leaked = [e for e in logs if e["event"] == "pins_leaked"]
    assert len(leaked) == 1
    assert (leaked[0]["handles"], leaked[0]["pins"], leaked[0]["refs"]) == (2, 16, 4)
    assert leaked[0]["session"] == driver.session_id
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]
    assert await k.audit() == []
    await driver.close()


async def test_another_sessions_process_needs_a_grant(daemon: Daemon, k: vkclient.Kernel) -> None:
    """DESIGN §6: EPERM without a grant, OK with one; revoking stops new pins but leaves the
    ones taken in the driver's hands."""
    p = await k.spawn("owner")
    addr = await _populated(p, 2)
    async with vkclient.connect(daemon.addr, client_name="driver") as driver:
        target = driver.process(p.pid)
        with pytest.raises(PermissionError):
            await target.pin(addr, 2)
        with pytest.raises(PermissionError):  # only the owner may grant
            await target.grant(driver.session_id)
        await p.grant(driver.session_id)
        pages = await target.pin(addr, 2, write=True)
        assert pages.count == 2
        await p.revoke(driver.session_id)
        with pytest.raises(PermissionError):
            await target.get(addr, 1)
        with pytest.raises(FileNotFoundError):  # no grant left to revoke: ENOENT
            await p.revoke(driver.session_id)
        assert await pages.unpin() == 0
        # The owner cannot release the driver's handle: handles are per session (EBADF).
        with pytest.raises(OSError) as exc:
            await vkclient.Pages(
                k, p.pid, addr, 0, True, pb.GupResponse(handle=pages.handle, count=2)
            ).release()
        assert exc.value.errno == errno.EBADF


async def test_errno_round_trips(k: vkclient.Kernel) -> None:
    """A.4/B.1: EFAULT on a hole, a partial count at a VMA's end, EINVAL for flags the entry
    point refuses; pin_* answer invalid flags with 0 (no handle), ESRCH for no process."""
    p = await k.spawn("errs")
    addr = await _populated(p, 4)
    await p.munmap(addr + 4 * PAGE_SIZE, PAGE_SIZE)  # make sure a hole follows
    with pytest.raises(OSError) as exc:
        await p.pin(addr + 4 * PAGE_SIZE, 1, api="locked")
    assert exc.value.errno == errno.EFAULT
    async with p.get(addr, 6, api="locked") as pages:
        assert pages.count == 4  # the partial count wins over the error (B.1 #7)
    with pytest.raises(OSError) as exc:
        await p.gup(pb.GUP_API_GET_USER_PAGES_FAST, addr, 1, FOLL_PIN)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        await p.gup(pb.GUP_API_GET_USER_PAGES, addr, 1, FOLL_LONGTERM)
    assert exc.value.errno == errno.EINVAL
    zero = await p.gup(pb.GUP_API_PIN_USER_PAGES, addr, 1, FOLL_GET)
    assert (zero.count, zero.handle) == (0, 0)
    with pytest.raises(OSError) as exc:
        await p.gup(0, addr, 1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(ProcessLookupError):
        await k.process(4_000_000).pin(addr, 1)
    # FOLL_NOFAULT (B.1 #9): never faults; a partial count, then EFAULT at the first hole.
    lazy = await p.mmap(4 * PAGE_SIZE)
    await p.write(lazy, b"\1" * (2 * PAGE_SIZE))
    async with p.pin(lazy, 4, write=True, api="locked", flags=FOLL_NOFAULT) as pages:
        assert pages.count == 2
    with pytest.raises(OSError) as exc:
        await p.pin(lazy + 2 * PAGE_SIZE, 2, write=True, flags=FOLL_NOFAULT)
    assert exc.value.errno == errno.EFAULT
    assert [e & vkclient.PM_PRESENT for e in await p.pagemap(lazy + 2 * PAGE_SIZE, 2)] == [0, 0]
    assert await k.handles() == []


async def test_dma_through_a_pin_is_coherent_with_the_process(k: vkclient.Kernel) -> None:
    """Device writes land in the process's memory and process writes are what the device
    reads: the pin holds the very frames the page table maps."""
    p = await k.spawn("dma")
    addr = await _populated(p, 3, b"\0")
    async with p.pin(addr, 3, write=True, longterm=True) as pages:
        payload = bytes(range(256)) * 20  # crosses a page boundary
        assert await pages.dma_write(PAGE_SIZE - 100, payload) == len(payload)
        assert await p.read(addr + PAGE_SIZE - 100, len(payload)) == payload
        await p.write(addr + 2 * PAGE_SIZE + 7, b"from the CPU")
        assert await pages.dma_read(2 * PAGE_SIZE + 7, 12) == b"from the CPU"
        big = bytes([7]) * (3 * PAGE_SIZE)
        await pages.dma_write(0, big)
        assert await p.read(addr, 3 * PAGE_SIZE) == big
        with pytest.raises(OSError) as exc:
            await pages.dma_read(3 * PAGE_SIZE - 1, 2)  # beyond the pinned pages
        assert exc.value.errno == errno.EINVAL
        await pages.unpin(0, 1)
        with pytest.raises(OSError) as exc:
            await pages.dma_read(0, 1)  # the first page is no longer held
        assert exc.value.errno == errno.EFAULT
    async with p.pin(addr, 1) as ro:
        with pytest.raises(PermissionError):  # EACCES: a read-only pin is read-only DMA
            await ro.dma_write(0, b"x")


async def test_longterm_pin_survives_fork(k: vkclient.Kernel) -> None:
    """B.34: with a R/W long-term pin held, fork gives the child its own copy; the parent's
    pinned page stays mapped and coherent with the pin."""
    parent = await k.spawn("iouring")
    addr = await _populated(parent, 2, b"A")
    async with parent.pin(addr, 2, write=True, longterm=True) as pages:
        pinned = pages.pfns.tolist()
        child = await parent.fork()
        assert await _pfns(parent, addr, 2) == pinned
        child_pfns = await _pfns(child, addr, 2)
        assert set(child_pfns).isdisjoint(pinned)
        assert await child.read(addr, 4) == b"AAAA"
        await parent.write(addr, b"parent writes")
        assert await pages.dma_read(0, 13) == b"parent writes"
        assert await _pfns(parent, addr, 2) == pinned  # no COW in the parent
        await pages.dma_write(PAGE_SIZE, b"device")
        assert await parent.read(addr + PAGE_SIZE, 6) == b"device"
        assert await child.read(addr, 4) == b"AAAA"
        assert await child.read(addr + PAGE_SIZE, 6) == b"AAAAAA"
        await child.kill()
        await child.wait()
    vm = await k.vmstat()
    assert vm["nr_foll_pin_acquired"] == vm["nr_foll_pin_released"]


async def test_batch_stream_pins_and_releases_many_per_message(k: vkclient.Kernel) -> None:
    """The Batch stream: many operations per message, results in order, a failing operation
    answered with its errno without ending the stream."""
    p = await k.spawn("batch")
    addr = await _populated(p, 64)
    pfns = await _pfns(p, addr, 64)
    before = await _refcounts(k, pfns[:1])
    async with k.gup_stream() as s:
        ops = [
            GupStream.gup_op(
                p.pid, pb.GUP_API_PIN_USER_PAGES_FAST, addr + i * 16 * PAGE_SIZE, 16, 1
            )
            for i in range(4)
        ]
        ops.append(GupStream.gup_op(p.pid, pb.GUP_API_PIN_USER_PAGES_FAST, 0x1000, 1))
        results = await s.submit(ops)
        assert [r.gup.count for r in results[:4]] == [16] * 4
        assert results[4].errno == errno.EFAULT
        assert await _refcounts(k, pfns[:1]) == [before[0] + 1024]
        got = [pfn for r in results[:4] for pfn in vkclient._gup.unpack_pfns(r.gup.pfns)]
        assert got == pfns
        released = await s.submit([GupStream.release_op(r.gup.handle) for r in results[:4]])
        assert [r.release.remaining for r in released] == [0] * 4
        again = await s.submit([GupStream.release_op(results[0].gup.handle)])
        assert again[0].errno == errno.EBADF
    assert await _refcounts(k, pfns[:1]) == before
    assert await k.handles() == []


async def test_sync_facade_pins(daemon: Daemon) -> None:
    """vkclient.sync: ``with p.pin(...) as pages`` works without async."""

    def work() -> tuple[int, int, bytes]:
        with vkclient.sync.connect(daemon.addr) as k:
            p = k.spawn("sync")
            addr = p.mmap(2 * PAGE_SIZE)
            p.write(addr, b"hello")
            with p.pin(addr, 2, write=True) as pages:
                pages.dma_write(5, b", world")
                n = len(pages)
                held = k.handles()[0].held
            return n, held, p.read(addr, 12)

    assert await anyio.to_thread.run_sync(work) == (2, 2, b"hello, world")


async def test_vkctl_gup_test_prints_linux_lines(k: vkclient.Kernel) -> None:
    """vkctl gup-test: the selftest's TAP output and benchmark lines (B.1 #1)."""
    out = io.StringIO()
    assert await gup_test.run(k, ["-a", "-m", "4", "-n", "512", "-r", "2"], out) == 0
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["TAP version 13", "1..1"]
    timing = [ln for ln in lines if "Time" in ln]
    assert len(timing) == 2
    assert all(re.fullmatch(r"# PIN_FAST_BENCHMARK: Time: get:\d+ put:\d+ us", t) for t in timing)
    assert lines[-2:] == [
        "ok 1 ioctl status 0",
        "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0",
    ]
    for argv, name in (
        (["-u", "-n", "123", "-T"], "GUP_FAST_BENCHMARK"),
        (["-L", "-n", "1", "-W"], "PIN_LONGTERM_BENCHMARK"),
    ):
        out = io.StringIO()
        assert await gup_test.run(k, [*argv, "-m", "2"], out) == 0
        assert re.search(rf"^# {name}: Time: get:\d+ put:\d+ us$", out.getvalue(), re.MULTILINE)
    for argv, name in ((["-U"], "GUP_BASIC_TEST"), (["-b", "-S"], "PIN_BASIC_TEST")):
        out = io.StringIO()
        assert await gup_test.run(k, [*argv, "-m", "2", "-n", "512"], out) == 0
        assert f"# {name}: done" in out.getvalue().splitlines()
    out = io.StringIO()
    assert await gup_test.run(k, ["-c", "-p", "-m", "2", "-n", "512", "0", "19"], out) == 0
    dumped = [ln for ln in out.getvalue().splitlines() if ln.startswith("# page[")]
    assert [d.split(":")[0] for d in dumped] == ["# page[0]", "# page[19]"]
    assert "refcount:1025" in dumped[0]  # dumped while pinned: 1 mapping + 1024
    # -z is the selftest's stale FOLL_TOUCH 0x02 = FOLL_GET in 6.12: pin_user_pages_fast
    # refuses it with EINVAL (C.3); the ioctl stops at the first failed call and reports
    # the size it covered, as mm/gup_test.c does.
    out = io.StringIO()
    assert await gup_test.run(k, ["-a", "-z", "-m", "1", "-n", "16"], out) == 0
    assert re.search(r"get:\d+ put:\d+ us, truncated \(size: 0\)$", out.getvalue(), re.MULTILINE)


async def test_longterm_pins_are_charged_to_rlimit_memlock(k: vkclient.Kernel) -> None:
    """A long-term pin is locked memory (ib_umem_get): VmPin grows, RLIMIT_MEMLOCK stops it
    with ENOMEM (nothing held), CAP_IPC_LOCK lifts the limit, release uncharges."""
    p = await k.spawn("rdma-app", rlimit_memlock=16 * PAGE_SIZE)
    addr = await _populated(p, 20)
    pages = await p.pin(addr, 16, write=True, longterm=True)
    assert (await p.status())["VmPin"] == 64
    with pytest.raises(OSError) as exc:
        await p.pin(addr + 16 * PAGE_SIZE, 1, write=True, longterm=True)
    assert exc.value.errno == errno.ENOMEM
    async with p.pin(addr + 16 * PAGE_SIZE, 4, write=True):  # short-term pins are not charged
        assert (await p.status())["VmPin"] == 64
    await pages.unpin(0, 10)
    assert (await p.status())["VmPin"] == 24
    await pages.unpin()
    assert (await p.status())["VmPin"] == 0
    assert len(await k.handles()) == 0
    locker = await k.spawn("qemu", capabilities=[vkclient.CAP_IPC_LOCK], rlimit_memlock=0)
    addr = await _populated(locker, 4)
    async with locker.pin(addr, 4, write=True, longterm=True):
        assert (await locker.status())["VmPin"] == 16


async def test_batch_stream_of_an_ended_session_fails(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A driver's session ends while its Batch stream is open: the pins taken through the
    stream are released with the session, and the stream refuses further work."""
    p = await k.spawn("owner")
    addr = await _populated(p, 8)
    pfns = await _pfns(p, addr, 8)
    before = await _refcounts(k, pfns)
    driver = await vkclient.connect(daemon.addr, client_name="driver")
    await p.grant(driver.session_id)
    with structlog.testing.capture_logs():
        async with driver.gup_stream() as s:
            [res] = await s.submit(
                [GupStream.gup_op(p.pid, pb.GUP_API_PIN_USER_PAGES_FAST, addr, 8, 1)]
            )
            assert res.gup.count == 8
            assert daemon.kernel.extra_refs.any()
            assert driver._keepalive is not None
            driver._keepalive.cancel()
            with anyio.fail_after(5):
                while await _refcounts(k, pfns) != before:
                    await anyio.sleep(0.02)
            with pytest.raises(vkclient.SessionError):
                await s.submit([GupStream.gup_op(p.pid, pb.GUP_API_PIN_USER_PAGES_FAST, addr, 1)])
    await driver.close()


async def test_large_dma_runs_off_loop_and_in_chunks(k: vkclient.Kernel) -> None:
    """A 17 MiB DMA: the SDK splits it into calls of 16 MiB, the daemon copies the large
    ones in a worker thread while the pins keep the frames; the process sees every byte."""
    p = await k.spawn("bulk-dma")
    npages = (17 << 20) // PAGE_SIZE
    addr = await p.mmap(npages * PAGE_SIZE)
    data = bytes(range(251)) * ((npages * PAGE_SIZE) // 251 + 1)
    data = data[: npages * PAGE_SIZE]
    async with p.pin(addr, npages, write=True) as pages:
        assert pages.count == npages
        assert await pages.dma_write(0, data) == len(data)
        assert await p.read(addr, len(data)) == data
        assert await pages.dma_read(0, len(data)) == data


async def test_pins_on_a_thp_count_in_pincount(k: vkclient.Kernel) -> None:
    """A.5/B.1 #3: a pin on a large folio adds 1 to its refcount and 1 to _pincount per page;
    releasing a subset of the handle takes exactly that subset back."""
    p = await k.spawn("thp")
    size = 4 << 20
    addr = await p.mmap(size)
    await p.madvise(addr, size, vkclient.MADV_HUGEPAGE)
    await p.write(addr, b"\1" * size)
    hp = (addr + (2 << 20) - 1) & ~((2 << 20) - 1)
    [head] = await _pfns(p, hp, 1)
    page = await k.dump_page(head)
    if page["compound_order"] != 9:
        pytest.skip("no THP at the aligned address (THP disabled in this kernel)")
    rc0 = page["refcount"]
    async with p.pin(hp, 512, write=True) as pages:
        page = await k.dump_page(head)
        assert (page["refcount"], page["pincount"]) == (rc0 + 512, 512)
        assert pages.pfns.tolist() == list(range(head, head + 512))
        await pages.unpin(100, 50)
        page = await k.dump_page(head)
        assert (page["refcount"], page["pincount"]) == (rc0 + 462, 462)
    page = await k.dump_page(head)
    assert (page["refcount"], page["pincount"]) == (rc0, 0)


async def test_remote_with_locked_reports_a_dropped_lock(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """B.24 through the API: pin_user_pages_remote with ``locked`` lets a blocking fault drop
    mmap_lock and retry (lock_dropped, and the daemon did not unlock twice); without it the
    lock is never dropped. The fault blocks the way a locked folio does (the test-only
    ->fault hook: anonymous faults never block by themselves)."""
    from vkernel.kernel.memory import set_test_fault_hook
    from vkernel.kernel.uapi import FAULT_FLAG_ALLOW_RETRY, FAULT_FLAG_RETRY_NOWAIT, VM_FAULT_RETRY
    from vkernel.kernel.vma import VMA

    p = await k.spawn("remote")
    addr = await p.mmap(4 * PAGE_SIZE)
    retries: list[int] = []

    def blocking_fault(vma: VMA, a: int, flags: int) -> int | None:
        if flags & FAULT_FLAG_ALLOW_RETRY and not retries:
            retries.append(a)
            if not flags & FAULT_FLAG_RETRY_NOWAIT:
                vma.mm.mmap_lock.read_unlock()
            return VM_FAULT_RETRY
        return None

    mm = daemon.kernel.find_task(p.pid).mm
    vma = mm.vma_lookup(addr)
    set_test_fault_hook(vma, blocking_fault)
    try:
        async with p.pin(addr, 2, write=True, api="remote", locked=True) as pages:
            assert (pages.count, pages.lock_dropped) == (2, True)
        assert retries == [addr]
        assert not mm.mmap_lock.is_locked()
        async with p.pin(addr + 2 * PAGE_SIZE, 2, write=True, api="remote", locked=False) as pages:
            assert (pages.count, pages.lock_dropped) == (2, False)
        assert retries == [addr]
        assert not mm.mmap_lock.is_locked()
    finally:
        set_test_fault_hook(vma, None)
