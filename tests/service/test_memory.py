"""MemoryService through the real SDK: the mmap family, streamed user memory, COW, /proc views.

Section references (A.10 …) are to reference/kernel-semantics.md; every test ends with the
audit clean (the ``daemon`` fixture's teardown).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import anyio
import grpc
import pytest
import structlog

import vkclient
from tests.service.conftest import Daemon
from vkclient import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PROT_NONE,
    PROT_READ,
    pagemap_pfn,
    vkctl,
)
from vkclient.errors import from_rpc_error
from vkernel.v1 import memory_service_pb2 as pb

MiB = 1 << 20


async def test_mmap_write_read_round_trip(k: vkclient.Kernel) -> None:
    """Anonymous private memory reads back what was written; untouched bytes read as zero
    (the zero page, A.10)."""
    p = await k.spawn("rt")
    addr = await p.mmap(4 * PAGE_SIZE)
    assert addr % PAGE_SIZE == 0
    assert await p.read(addr, 16) == bytes(16)
    assert await p.write(addr + 100, b"hello, vkernel") == 14
    assert await p.read(addr + 100, 14) == b"hello, vkernel"
    # A write straddling a page boundary lands in two frames.
    await p.write(addr + PAGE_SIZE - 3, b"abcdef")
    assert await p.read(addr + PAGE_SIZE - 3, 6) == b"abcdef"


async def test_multi_mib_write_and_read_stream(k: vkclient.Kernel) -> None:
    """8 MiB goes both ways in ≤1 MiB messages: no message limit is hit, every byte arrives."""
    p = await k.spawn("bulk")
    size = 8 * MiB
    addr = await p.mmap(size)
    data = os.urandom(size)
    assert await p.write(addr, data) == size
    assert await p.read(addr, size) == data
    # The raw stream: chunks of at most 1 MiB, in address order, covering the range.
    call = k._memory.ReadMemory(
        pb.ReadMemoryRequest(pid=p.pid, addr=addr, length=size), metadata=k._metadata
    )
    chunks = [(r.addr, len(r.data)) async for r in call]
    assert len(chunks) >= 8
    assert all(n <= MiB for _, n in chunks)
    assert chunks[0][0] == addr
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(chunks))
    assert sum(n for _, n in chunks) == size


async def test_unaligned_munmap_is_einval(k: vkclient.Kernel) -> None:
    """munmap(2): addr not page-aligned → EINVAL."""
    p = await k.spawn("e")
    addr = await p.mmap(2 * PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        await p.munmap(addr + 1, PAGE_SIZE)
    assert ei.value.errno == errno.EINVAL


async def test_zero_length_mmap_is_einval(k: vkclient.Kernel) -> None:
    """mmap(2): length 0 → EINVAL."""
    p = await k.spawn("e")
    with pytest.raises(OSError) as ei:
        await p.mmap(0)
    assert ei.value.errno == errno.EINVAL


async def test_negative_munmap_length_is_einval(k: vkclient.Kernel) -> None:
    """A negative length travels as C's (size_t)-1: munmap(2) answers EINVAL, the range
    check of the API names the field."""
    p = await k.spawn("e")
    addr = await p.mmap(PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        await p.munmap(addr, -1)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.metadata["field"] == "length"  # type: ignore[attr-defined]


async def test_mprotect_over_a_hole_is_enomem(k: vkclient.Kernel) -> None:
    """mprotect(2): a range with an unmapped hole → ENOMEM."""
    p = await k.spawn("e")
    addr = await p.mmap(3 * PAGE_SIZE)
    await p.munmap(addr + PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        await p.mprotect(addr, 3 * PAGE_SIZE, PROT_READ)
    assert ei.value.errno == errno.ENOMEM


async def test_map_fixed_noreplace_over_a_mapping_is_eexist(k: vkclient.Kernel) -> None:
    """mmap(2): MAP_FIXED_NOREPLACE onto an existing mapping → EEXIST; MAP_FIXED replaces."""
    p = await k.spawn("e")
    addr = await p.mmap(2 * PAGE_SIZE)
    flags = MAP_PRIVATE | MAP_ANONYMOUS
    with pytest.raises(FileExistsError) as ei:
        await p.mmap(PAGE_SIZE, flags=flags | MAP_FIXED_NOREPLACE, addr=addr)
    assert ei.value.errno == errno.EEXIST
    await p.write(addr, b"x")
    assert await p.mmap(PAGE_SIZE, flags=flags | MAP_FIXED, addr=addr) == addr
    assert await p.read(addr, 1) == b"\0"  # a fresh mapping, the old page is gone


async def test_read_unmapped_is_sigsegv_and_process_survives(k: vkclient.Kernel) -> None:
    """A read of unmapped memory faults with SIGSEGV at the first bad address (A.9: no VMA
    → VM_FAULT_SIGSEGV); the process lives on and the next call works."""
    p = await k.spawn("segv")
    addr = await p.mmap(2 * PAGE_SIZE)
    await p.munmap(addr + PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(vkclient.UserFaultError) as ei:
        await p.read(addr, 2 * PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT
    assert ei.value.signal == "SIGSEGV"
    assert ei.value.address == addr + PAGE_SIZE
    await p.write(addr, b"alive")
    assert await p.read(addr, 5) == b"alive"
    assert [x.pid for x in await k.ps()] == [p.pid]


async def test_write_to_read_only_mapping_is_sigsegv(k: vkclient.Kernel) -> None:
    """A write to a PROT_READ mapping faults with SIGSEGV (access error, A.9); data unchanged."""
    p = await k.spawn("ro")
    addr = await p.mmap(PAGE_SIZE)
    await p.write(addr, b"before")
    await p.mprotect(addr, PAGE_SIZE, PROT_READ)
    with pytest.raises(vkclient.UserFaultError) as ei:
        await p.write(addr, b"after!")
    assert (ei.value.signal, ei.value.address) == ("SIGSEGV", addr)
    assert await p.read(addr, 6) == b"before"
    await p.mprotect(addr, PAGE_SIZE, PROT_NONE)
    with pytest.raises(vkclient.UserFaultError):
        await p.read(addr, 1)


async def test_mremap_moves_contents(k: vkclient.Kernel) -> None:
    """mremap(2) with MREMAP_MAYMOVE grows a mapping; the contents move with it."""
    p = await k.spawn("mremap")
    addr = await p.mmap(PAGE_SIZE)
    await p.write(addr, b"payload")
    await p.mmap(PAGE_SIZE, addr=addr + PAGE_SIZE, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    new = await p.mremap(addr, PAGE_SIZE, 4 * PAGE_SIZE, MREMAP_MAYMOVE)
    assert await p.read(new, 7) == b"payload"
    await p.write(new + 3 * PAGE_SIZE, b"end")


async def test_madvise_dontneed_drops_private_anon_contents(k: vkclient.Kernel) -> None:
    """madvise(MADV_DONTNEED) on private anonymous memory: the next read sees zeroes."""
    p = await k.spawn("madv")
    addr = await p.mmap(2 * PAGE_SIZE)
    await p.write(addr, b"x" * 2 * PAGE_SIZE)
    await p.madvise(addr, PAGE_SIZE, vkclient.MADV_DONTNEED)
    assert await p.read(addr, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert await p.read(addr + PAGE_SIZE, 1) == b"x"


async def test_other_sessions_process_mutations_are_eperm(
    daemon: Daemon, k: vkclient.Kernel
) -> None:
    """Mutating calls on another session's process → EPERM; introspection is allowed."""
    p = await k.spawn("mine")
    addr = await p.mmap(PAGE_SIZE)
    await p.write(addr, b"secret")
    async with vkclient.connect(daemon.addr, client_name="other") as other:
        q = other.process(p.pid)
        calls: list[Any] = [
            lambda: q.mmap(PAGE_SIZE),
            lambda: q.munmap(addr, PAGE_SIZE),
            lambda: q.mprotect(addr, PAGE_SIZE, PROT_READ),
            lambda: q.mremap(addr, PAGE_SIZE, 2 * PAGE_SIZE, MREMAP_MAYMOVE),
            lambda: q.madvise(addr, PAGE_SIZE, vkclient.MADV_DONTNEED),
            lambda: q.read(addr, 6),
            lambda: q.write(addr, b"stolen"),
        ]
        for call in calls:
            with pytest.raises(PermissionError) as ei:
                await call()
            assert ei.value.errno == errno.EPERM
        assert "rw-p" in await q.maps()
        assert (await q.pagemap(addr, 1))[0] & PM_PRESENT
        assert (await q.status())["VmRSS"] > 0
        assert "read_acquired" in await q.mmap_lock_stats()
        assert "Rss:" in await q.smaps()
    assert await p.read(addr, 6) == b"secret"


async def test_unknown_pid_is_esrch_for_introspection(k: vkclient.Kernel) -> None:
    """Introspection of a pid nobody has → ESRCH → ProcessLookupError."""
    with pytest.raises(ProcessLookupError):
        await k.process(3_999_999).maps()
    with pytest.raises(ProcessLookupError):
        await k.process(3_999_999).mmap(PAGE_SIZE)


async def test_fork_cow_child_diverges_parent_keeps_data(k: vkclient.Kernel) -> None:
    """Basic COW after fork (B.4 #28, A.11): both map the same frame, write-protected and no
    longer anon-exclusive; the child's write copies (A.10 wp_page_copy) and the parent keeps
    its data and frame, whose refcount drops back to 1."""
    parent = await k.spawn("parent")
    addr = await parent.mmap(PAGE_SIZE)
    await parent.write(addr, b"original")
    [before] = await parent.pagemap(addr, 1)
    assert before & PM_PRESENT
    assert before & PM_MMAP_EXCLUSIVE
    pfn = pagemap_pfn(before)
    page = await k.dump_page(pfn)
    assert (page["refcount"], page["mapcount"]) == (1, 1)
    assert {"anon", "anon_exclusive"} <= set(page["flags"])

    child = await parent.fork()
    [shared] = await child.pagemap(addr, 1)
    assert pagemap_pfn(shared) == pfn
    assert not shared & PM_MMAP_EXCLUSIVE
    page = await k.dump_page(pfn)
    assert (page["refcount"], page["mapcount"]) == (2, 2)
    assert "anon_exclusive" not in page["flags"]
    assert await child.read(addr, 8) == b"original"

    await child.write(addr, b"child!!!")
    [copied] = await child.pagemap(addr, 1)
    assert copied & PM_PRESENT
    assert pagemap_pfn(copied) != pfn
    assert await child.read(addr, 8) == b"child!!!"
    assert await parent.read(addr, 8) == b"original"
    [still] = await parent.pagemap(addr, 1)
    assert pagemap_pfn(still) == pfn
    page = await k.dump_page(pfn)
    assert (page["refcount"], page["mapcount"]) == (1, 1)
    new_page = await k.dump_page(pagemap_pfn(copied))
    assert {"anon", "anon_exclusive"} <= set(new_page["flags"])


async def test_maps_text_is_proc_format(k: vkclient.Kernel) -> None:
    """/proc/PID/maps lines: start-end perms offset dev inode, one per VMA."""
    p = await k.spawn("maps")
    addr = await p.mmap(2 * PAGE_SIZE)
    await p.mprotect(addr, PAGE_SIZE, PROT_READ)
    lines = (await p.maps()).splitlines()
    mine = [ln for ln in lines if int(ln.split("-")[0], 16) in (addr, addr + PAGE_SIZE)]
    assert len(mine) == 2
    first = mine[0].split()
    assert first[0] == f"{addr:08x}-{addr + PAGE_SIZE:08x}"
    assert first[1:5] == ["r--p", "00000000", "00:00", "0"]
    assert mine[1].split()[1] == "rw-p"


async def test_pagemap_bits(k: vkclient.Kernel) -> None:
    """pagemap: untouched pages are not present; written ones are present, exclusively mapped
    and soft-dirty (a new VMA is soft-dirty); a read of an untouched page maps the zero page."""
    p = await k.spawn("pm")
    addr = await p.mmap(3 * PAGE_SIZE)
    await p.write(addr, b"x")
    await p.read(addr + PAGE_SIZE, 1)
    written, zero, untouched = await p.pagemap(addr, 3)
    assert written & PM_PRESENT
    assert written & PM_MMAP_EXCLUSIVE
    assert written & PM_SOFT_DIRTY
    assert pagemap_pfn(written) > 0
    assert not untouched & PM_PRESENT
    assert pagemap_pfn(untouched) == 0
    if zero & PM_PRESENT:
        assert "zero" in (await k.dump_page(pagemap_pfn(zero)))["flags"]
    assert await p.pagemap(addr, 0) == []


async def test_pagemap_limits_are_einval(k: vkclient.Kernel) -> None:
    """npages beyond the per-call limit, or wrapping the address space → EINVAL naming it."""
    p = await k.spawn("pm")
    for addr, npages in ((0, (1 << 22) + 1), ((1 << 64) - PAGE_SIZE, 2)):
        with pytest.raises(OSError) as ei:
            await p.pagemap(addr, npages)
        assert ei.value.errno == errno.EINVAL
        assert ei.value.metadata["field"] == "npages"  # type: ignore[attr-defined]


async def test_status_and_mmap_lock_stats(k: vkclient.Kernel) -> None:
    """/proc/PID/status memory fields (kB, as the file prints them) follow the mappings;
    mmap_lock counts acquisitions."""
    p = await k.spawn("st")
    before = await p.status()
    addr = await p.mmap(16 * PAGE_SIZE)
    await p.write(addr, b"x" * 4 * PAGE_SIZE)
    after = await p.status()
    assert after["VmSize"] - before["VmSize"] == 16 * PAGE_SIZE >> 10
    assert after["VmRSS"] - before["VmRSS"] == 4 * PAGE_SIZE >> 10
    assert after["RssAnon"] == after["VmRSS"]
    stats = await p.mmap_lock_stats()
    assert stats["write_acquired"] >= 1
    assert stats["read_acquired"] + stats["write_acquired"] >= 2


async def test_dump_page_of_a_free_frame(k: vkclient.Kernel) -> None:
    """dump_page of a frame nobody uses: refcount 0, no mappings."""
    info = await k.info()
    page = await k.dump_page(info.memory_bytes // PAGE_SIZE - 1)
    assert page["refcount"] == 0
    assert page["mapcount"] in (0, -1)


async def test_dump_page_out_of_range_is_an_error(k: vkclient.Kernel) -> None:
    """A pfn beyond physical memory is refused with an errno, not a crash."""
    with pytest.raises(OSError):
        await k.dump_page(1 << 40)


async def test_audit_is_clean_after_work(k: vkclient.Kernel) -> None:
    """The audit recomputes every count: after mmap, COW, munmap and exit it finds nothing."""
    p = await k.spawn("audit")
    addr = await p.mmap(8 * PAGE_SIZE)
    await p.write(addr, b"y" * 8 * PAGE_SIZE)
    child = await p.fork()
    await child.write(addr, b"z")
    await p.munmap(addr, 4 * PAGE_SIZE)
    assert await k.audit() == []
    await child.kill()
    await child.wait()
    assert await k.audit() == []


async def _raw_write(k: vkclient.Kernel, messages: list[pb.WriteMemoryRequest]) -> None:
    """WriteMemory with exactly these messages, errors mapped as the SDK maps them."""
    try:
        await k._memory.WriteMemory(iter(messages), metadata=k._metadata)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


async def test_write_stream_validation(k: vkclient.Kernel) -> None:
    """WriteMemory: an empty stream or a pid that changes mid-stream → EINVAL naming pid."""
    p = await k.spawn("w")
    q = await k.spawn("w2")
    addr = await p.mmap(PAGE_SIZE)
    for messages in (
        [],
        [
            pb.WriteMemoryRequest(pid=p.pid, addr=addr, data=b"a"),
            pb.WriteMemoryRequest(pid=q.pid, data=b"b"),
        ],
    ):
        with pytest.raises(OSError) as ei:
            await _raw_write(k, messages)
        assert ei.value.errno == errno.EINVAL
        assert ei.value.metadata["field"] == "pid"  # type: ignore[attr-defined]


async def test_sync_facade_memory_calls(daemon: Daemon) -> None:
    """vkclient.sync forwards the memory methods of Process and Kernel."""

    def work() -> tuple[bytes, list[str], int]:
        from vkclient import sync

        with sync.connect(daemon.addr, client_name="sync") as k, k.spawn("s") as p:
            addr = p.mmap(PAGE_SIZE)
            p.write(addr, b"sync")
            [entry] = p.pagemap(addr, 1)
            page = k.dump_page(pagemap_pfn(entry))
            return p.read(addr, 4), k.audit(), page["refcount"]

    data, problems, refcount = await anyio.to_thread.run_sync(work)
    assert (data, problems, refcount) == (b"sync", [], 1)


# ---- vkctl ---------------------------------------------------------------------------------


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """The in-process daemon logs to stdout too: keep its lines out of vkctl's output."""
    with structlog.testing.capture_logs():
        yield


async def _vkctl(daemon: Daemon, *argv: str) -> int:
    """vkctl.main runs its own asyncio loop: call it from a worker thread."""
    return await anyio.to_thread.run_sync(lambda: vkctl.main(["--addr", daemon.addr, *argv]))


async def test_vkctl_maps_smaps_of_another_sessions_process(
    daemon: Daemon,
    k: vkclient.Kernel,
    capsys: pytest.CaptureFixture[str],
    quiet_logs: None,
) -> None:
    """vkctl (its own session) prints maps and smaps of our process in /proc format."""
    p = await k.spawn("shown")
    addr = await p.mmap(2 * PAGE_SIZE)
    await p.write(addr, b"x")
    assert await _vkctl(daemon, "maps", str(p.pid)) == 0
    out = capsys.readouterr().out
    assert f"{addr:08x}-{addr + 2 * PAGE_SIZE:08x} rw-p" in out
    assert await _vkctl(daemon, "smaps", str(p.pid)) == 0
    assert "Rss:" in capsys.readouterr().out
    assert await _vkctl(daemon, "--json", "maps", str(p.pid)) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == p.pid


async def test_vkctl_pagemap_and_page(
    daemon: Daemon,
    k: vkclient.Kernel,
    capsys: pytest.CaptureFixture[str],
    quiet_logs: None,
) -> None:
    """vkctl pagemap decodes the entries (table and --json); vkctl page dumps the frame."""
    p = await k.spawn("pm")
    addr = await p.mmap(2 * PAGE_SIZE)
    await p.write(addr, b"x")
    assert await _vkctl(daemon, "--json", "pagemap", str(p.pid), hex(addr), "2") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["present"] for r in rows] == [True, False]
    assert rows[0]["exclusive"]
    assert rows[0]["vaddr"] == hex(addr)
    pfn = rows[0]["pfn"]
    assert await _vkctl(daemon, "pagemap", str(p.pid), hex(addr), "2") == 0
    table = capsys.readouterr().out
    assert hex(addr) in table
    assert hex(pfn) in table
    assert await _vkctl(daemon, "page", hex(pfn)) == 0
    text = capsys.readouterr().out
    assert "refcount" in text
    assert "anon_exclusive" in text
    assert await _vkctl(daemon, "--json", "page", str(pfn)) == 0
    page = json.loads(capsys.readouterr().out)
    assert (page["pfn"], page["refcount"], page["mapcount"]) == (pfn, 1, 1)


async def test_vkctl_audit_and_errors(
    daemon: Daemon,
    k: vkclient.Kernel,
    capsys: pytest.CaptureFixture[str],
    quiet_logs: None,
) -> None:
    """vkctl audit exits 0 and says so when clean; an unknown pid is a Linux-style error."""
    assert await _vkctl(daemon, "audit") == 0
    assert "audit clean" in capsys.readouterr().out
    assert await _vkctl(daemon, "--json", "audit") == 0
    assert json.loads(capsys.readouterr().out) == {"clean": True, "problems": []}
    assert await _vkctl(daemon, "maps", "3999999") == 1
    assert "vkctl: maps:" in capsys.readouterr().err


async def test_vkctl_audit_reports_problems(
    daemon: Daemon,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    quiet_logs: None,
) -> None:
    """vkctl audit exits 1 and lists each problem when the audit is not clean."""
    from vkernel.kernel import mm_api

    monkeypatch.setattr(mm_api, "audit", lambda kernel: ["pfn 0x42: refcount 3, expected 2"])
    assert await _vkctl(daemon, "audit") == 1
    out = capsys.readouterr().out
    assert "1 problem" in out
    assert "pfn 0x42: refcount 3, expected 2" in out


async def test_cancelled_read_stream_releases_the_mm(k: vkclient.Kernel) -> None:
    """A client that cancels a long ReadMemory stream after one chunk leaves no reader on the
    mmap_lock: munmap (a writer) goes through and the audit stays clean."""
    p = await k.spawn("cancel")
    size = 32 * MiB
    addr = await p.mmap(size)
    call = k._memory.ReadMemory(
        pb.ReadMemoryRequest(pid=p.pid, addr=addr, length=size), metadata=k._metadata
    )
    first = await call.read()
    assert isinstance(first, pb.ReadMemoryResponse)
    assert first.addr == addr
    call.cancel()
    with anyio.fail_after(5):
        while (await p.mmap_lock_stats())["readers"]:
            await anyio.sleep(0.01)
        await p.munmap(addr, size)
    assert await k.audit() == []


async def test_demo_tour_runs_clean(daemon: Daemon, quiet_logs: None) -> None:
    """The demo's tour (COW step included) succeeds against a daemon and ends audit-clean."""
    from vkclient import demo

    assert await demo.tour(daemon.addr, None) == 0


async def test_file_mapping_and_msync(k: vkclient.Kernel) -> None:
    """mmap(fd) through the SDK: a MAP_SHARED store is what pread returns, msync(MS_SYNC)
    sends it to the device, /proc/PID/maps names the file; msync errno rules (EINVAL, ENOMEM)."""
    p = await k.spawn("filemap")
    fd = await p.open("svc-map", vkclient.O_CREAT | vkclient.O_RDWR)
    await p.ftruncate(fd, 2 * PAGE_SIZE)
    addr = await p.mmap(2 * PAGE_SIZE, flags=vkclient.MAP_SHARED, fd=fd)
    await p.write(addr + 5, b"mapped")
    assert await p.pread(fd, 6, 5) == b"mapped"
    writes = sum(d.writes for d in await k.devices())
    await p.msync(addr, 2 * PAGE_SIZE, vkclient.MS_SYNC)
    assert sum(d.writes for d in await k.devices()) > writes
    assert any(line.endswith("/svc-map") for line in (await p.maps()).splitlines())
    with pytest.raises(OSError) as ei:
        await p.msync(addr, PAGE_SIZE, vkclient.MS_SYNC | vkclient.MS_ASYNC)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        await p.msync(addr, 8 * PAGE_SIZE, vkclient.MS_SYNC)
    assert ei.value.errno == errno.ENOMEM
    with pytest.raises(OSError) as ei:
        await p.mmap(PAGE_SIZE, flags=vkclient.MAP_SHARED, fd=99)
    assert ei.value.errno == errno.EBADF
