"""mmap of files (issue 5 part 2): shmem, disk and dax; read, shared and private write faults,
/proc maps and RSS, major faults, SIGBUS past EOF and on I/O errors, errno rules."""

from __future__ import annotations

import errno
import signal

import pytest

from tests.unit.fs.fshelp import P, make_file, pattern, raises
from vkernel.kernel.audit import audit
from vkernel.kernel.errors import UserFault
from vkernel.kernel.fs import O_CREAT, O_RDONLY, O_RDWR, O_WRONLY
from vkernel.kernel.kernel import Kernel
from vkernel.kernel.mm_api import proc_maps, proc_status_mm, sys_mmap, sys_munmap
from vkernel.kernel.task import Task
from vkernel.kernel.uaccess import read_user_bytes, write_user
from vkernel.kernel.uapi import MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE

RW = PROT_READ | PROT_WRITE


def vmstat(k: Kernel, name: str) -> int:
    """A /proc/vmstat event counter."""
    return int(k.vmstat[name])


@pytest.mark.parametrize("kind", ["disk", "shmem", "dax"])
async def test_shared_mapping_reads_and_writes_the_file(
    kernel: Kernel, task: Task, kind: str
) -> None:
    """MAP_SHARED: the mapping shows the file; stores through it are what read(2) returns;
    RSS counts file (or shmem) pages; munmap leaves the data in the file."""
    data = pattern(3 * P)
    dev = "pmem0" if kind == "dax" else ""
    fd = await make_file(kernel, task, f"f-{kind}", data, kind, dev)
    a = await sys_mmap(task, 0, 3 * P, RW, MAP_SHARED, fd, 0)
    assert await read_user_bytes(task, a, 3 * P) == data
    await write_user(task, a + P + 10, b"hello")
    got = await kernel.vfs.read(task, fd, 3 * P, 0)
    assert got[P + 10 : P + 15] == b"hello"
    st = proc_status_mm(task)
    key = "RssShmem" if kind == "shmem" else "RssFile"
    assert st[key] == 3 * 4
    assert audit(kernel) == []
    await sys_munmap(task, a, 3 * P)
    assert (await kernel.vfs.read(task, fd, 3 * P, 0))[P + 10 : P + 15] == b"hello"
    assert proc_status_mm(task)[key] == 0


@pytest.mark.parametrize("kind", ["disk", "shmem", "dax"])
async def test_private_cow_leaves_the_file_unchanged(kernel: Kernel, task: Task, kind: str) -> None:
    """B.35(a): writing a MAP_PRIVATE mapping changes neither the file nor a shared mapping
    of it; the private copy is anonymous memory."""
    data = pattern(2 * P, seed=3)
    dev = "pmem0" if kind == "dax" else ""
    fd = await make_file(kernel, task, f"p-{kind}", data, kind, dev)
    priv = await sys_mmap(task, 0, 2 * P, RW, MAP_PRIVATE, fd, 0)
    smem = await sys_mmap(task, 0, 2 * P, PROT_READ, MAP_SHARED, fd, 0)
    assert await read_user_bytes(task, priv, 2 * P) == data
    await write_user(task, priv + 5, b"XYZ")
    await write_user(task, priv + P, b"Q")  # a write fault with no read before (do_cow_fault)
    assert (await read_user_bytes(task, priv, 8))[5:8] == b"XYZ"
    assert await read_user_bytes(task, smem, 2 * P) == data
    assert await kernel.vfs.read(task, fd, 2 * P, 0) == data
    assert proc_status_mm(task)["RssAnon"] == 2 * 4
    assert audit(kernel) == []
    await sys_munmap(task, smem, 2 * P)  # dax frames go with the device at shutdown


async def test_maps_shows_name_and_offset(kernel: Kernel, task: Task) -> None:
    """/proc/PID/maps: file name and offset of a file mapping."""
    fd = await make_file(kernel, task, "named", pattern(4 * P))
    a = await sys_mmap(task, 0, 2 * P, PROT_READ, MAP_PRIVATE, fd, 2 * P)
    line = next(ln for ln in proc_maps(task).splitlines() if ln.startswith(f"{a:08x}"))
    assert line.split()[1] == "r--p"
    assert line.split()[2] == f"{2 * P:08x}"
    assert line.endswith("/named")
    assert await read_user_bytes(task, a, 4) == pattern(4 * P)[2 * P : 2 * P + 4]


async def test_mmap_errnos(kernel: Kernel, task: Task) -> None:
    """EBADF for an unknown fd, EINVAL for an unaligned offset, EACCES for O_WRONLY, and for
    PROT_WRITE|MAP_SHARED of an O_RDONLY file (MAP_PRIVATE of it is fine)."""
    await make_file(kernel, task, "e", pattern(P))
    await raises(errno.EBADF, sys_mmap(task, 0, P, PROT_READ, MAP_SHARED, 77, 0))
    ro, _ = kernel.vfs.do_sys_open(task, "e", O_RDONLY)
    wo, _ = kernel.vfs.do_sys_open(task, "e", O_WRONLY)
    await raises(errno.EINVAL, sys_mmap(task, 0, P, PROT_READ, MAP_SHARED, ro, 100))
    await raises(errno.EACCES, sys_mmap(task, 0, P, PROT_READ, MAP_SHARED, wo, 0))
    await raises(errno.EACCES, sys_mmap(task, 0, P, PROT_READ, MAP_PRIVATE, wo, 0))
    await raises(errno.EACCES, sys_mmap(task, 0, P, RW, MAP_SHARED, ro, 0))
    a = await sys_mmap(task, 0, P, RW, MAP_PRIVATE, ro, 0)
    await write_user(task, a, b"ok")
    b = await sys_mmap(task, 0, P, PROT_READ, MAP_SHARED, ro, 0)
    assert await read_user_bytes(task, b, 2) == pattern(P)[:2]


@pytest.mark.parametrize("kind", ["disk", "shmem", "dax"])
async def test_sigbus_past_eof(kernel: Kernel, task: Task, kind: str) -> None:
    """A page wholly past i_size is SIGBUS; the partial last page reads zeros after EOF."""
    dev = "pmem0" if kind == "dax" else ""
    fd = await make_file(kernel, task, f"eof-{kind}", b"x" * 100, kind, dev)
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    got = await read_user_bytes(task, a, P)
    assert got[:100] == b"x" * 100
    assert got[100:] == bytes(P - 100)
    with pytest.raises(UserFault) as ei:
        await read_user_bytes(task, a + P, 1)
    assert ei.value.signo == signal.SIGBUS
    assert ei.value.address == a + P


async def test_major_fault_when_read_from_the_device(make_fs_kernel: object) -> None:
    """A page read from the device is a major fault (pgmajfault, maj_flt); a cached one is
    minor; RssFile counts the mapped pages."""
    from collections.abc import Callable

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:16M,latency=1ms", readahead=False)
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "maj", pattern(4 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    a = await sys_mmap(t, 0, 4 * P, PROT_READ, MAP_SHARED, fd, 0)
    maj, majfault = t.maj_flt, vmstat(k, "pgmajfault")
    assert await read_user_bytes(t, a, 4) == pattern(4 * P)[:4]
    assert vmstat(k, "pgmajfault") == majfault + 1
    assert t.maj_flt >= maj + 1
    minf = t.min_flt
    await k.vfs.read(t, fd, P, P)  # now cached
    assert await read_user_bytes(t, a + P, 4) == pattern(4 * P)[P : P + 4]
    assert t.min_flt == minf + 1
    assert proc_status_mm(t)["RssFile"] == 2 * 4


async def test_device_eio_is_sigbus_on_fault(make_fs_kernel: object) -> None:
    """A read that fails with EIO: read(2) gets EIO, a fault gets SIGBUS."""
    from collections.abc import Callable

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:16M", readahead=False)
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "bad", pattern(2 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    ino = k.vfs.lookup("bad")
    block = int(ino.bmap_range(1, 1)[0])
    k.vfs.device("ram0").set_bad_ranges([(block * 8, 8)])
    a = await sys_mmap(t, 0, 2 * P, PROT_READ, MAP_SHARED, fd, 0)
    assert await read_user_bytes(t, a, 4) == pattern(2 * P)[:4]
    with pytest.raises(UserFault) as ei:
        await read_user_bytes(t, a + P, 4)
    assert ei.value.signo == signal.SIGBUS
    await raises(errno.EIO, k.vfs.read(t, fd, 4, P))
    k.vfs.device("ram0").set_bad_ranges([])
    assert await read_user_bytes(t, a + P, 4) == pattern(2 * P)[P : P + 4]


async def test_shared_write_reaches_the_device_after_fsync(make_fs_kernel: object) -> None:
    """A store through a MAP_SHARED mapping dirties the page; fsync writes it; after dropping
    the cache a new read comes from the device and sees it."""
    from collections.abc import Callable

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:16M")
    t = k.spawn("t", "s")
    fd, _ = k.vfs.do_sys_open(t, "sw", O_CREAT | O_RDWR)
    await k.vfs.ftruncate(t, fd, 2 * P)
    a = await sys_mmap(t, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await write_user(t, a + P + 1, b"persist")
    await k.vfs.fsync(t, fd)
    await sys_munmap(t, a, 2 * P)
    k.vfs.drop_caches()
    assert k.vfs.lookup("sw").mapping is not None
    assert not k.vfs.lookup("sw").mapping.pages  # type: ignore[union-attr]
    assert (await k.vfs.read(t, fd, 8, P + 1))[:7] == b"persist"


async def test_fault_around_maps_cached_neighbours(kernel: Kernel, task: Task) -> None:
    """do_fault_around(): a read fault maps up to 16 cached pages at once (one pgfault per
    64 KiB of a warm file); a write fault does not (each page is its own page_mkwrite)."""
    fd = await make_file(kernel, task, "around", pattern(32 * P))
    a = await sys_mmap(task, 0, 32 * P, RW, MAP_SHARED, fd, 0)
    pgfault = vmstat(kernel, "pgfault")
    assert await read_user_bytes(task, a, 32 * P) == pattern(32 * P)
    assert vmstat(kernel, "pgfault") == pgfault + 2
    assert proc_status_mm(task)["RssFile"] == 32 * 4
    await write_user(task, a, b"w" * 3 * P)
    assert vmstat(kernel, "pgfault") == pgfault + 5  # write-protected: mkwrite per page
    assert audit(kernel) == []


async def test_sequential_mapping_read_ramps_readahead(make_fs_kernel: object) -> None:
    """Reading a cold mapping sequentially: the trigger page of each window starts the next,
    twice as large (up to 1 MiB bios): far fewer bios and sleeping faults than pages."""
    from collections.abc import Callable

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:32M,latency=100us")
    t = k.spawn("t", "s")
    n = 1024
    fd = await make_file(k, t, "seq", pattern(n * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    a = await sys_mmap(t, 0, n * P, PROT_READ, MAP_SHARED, fd, 0)
    dev = k.vfs.device("ram0")
    reads = dev.stats.reads
    assert await read_user_bytes(t, a, n * P) == pattern(n * P)
    assert dev.stats.reads - reads <= 10
    assert t.maj_flt < n // 8  # faults that slept (TRIED counts as major)


async def test_mprotect_keeps_dirty_tracking(kernel: Kernel, task: Task) -> None:
    """mprotect(PROT_READ) then (RW) of a shared disk mapping: clean PTEs stay
    write-protected (writenotify), so a store after writeback still dirties the page."""
    from vkernel.kernel.mm_api import lookup_pte, sys_mprotect
    from vkernel.kernel.uapi import _PAGE_RW

    fd = await make_file(kernel, task, "mprot", pattern(2 * P))
    a = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await write_user(task, a, b"d")  # dirty PTE
    await read_user_bytes(task, a + P, 1)  # clean PTE
    await sys_mprotect(task, a, 2 * P, PROT_READ)
    await sys_mprotect(task, a, 2 * P, RW)
    assert lookup_pte(task, a) & _PAGE_RW
    assert not lookup_pte(task, a + P) & _PAGE_RW
    await kernel.vfs.fsync(task, fd)
    mapping = kernel.vfs.lookup("mprot").mapping
    assert mapping is not None
    await write_user(task, a + P, b"e")
    assert mapping.nr_dirty() == 1


async def test_mremap_of_a_file_mapping_does_not_grow_the_file(kernel: Kernel, task: Task) -> None:
    """mremap of a file mapping to a larger size: the file keeps its size, the new tail is
    SIGBUS (past EOF), for shmem and disk files alike."""
    from vkernel.kernel.mm_api import sys_mremap
    from vkernel.kernel.uapi import MREMAP_MAYMOVE

    for kind in ("shmem", "disk"):
        fd = await make_file(kernel, task, f"mr-{kind}", pattern(P), kind)
        a = await sys_mmap(task, 0, P, RW, MAP_SHARED, fd, 0)
        b = await sys_mremap(task, a, P, 3 * P, MREMAP_MAYMOVE)
        assert await read_user_bytes(task, b, 4) == pattern(P)[:4]
        with pytest.raises(UserFault) as ei:
            await read_user_bytes(task, b + P, 1)
        assert ei.value.signo == signal.SIGBUS
        assert kernel.vfs.lookup(f"mr-{kind}").size == P


async def test_fork_with_file_mappings(kernel: Kernel, task: Task) -> None:
    """fork: the child sees the shared file mapping (same page cache) and a copy of the
    parent's private COW pages; later private writes stay private to each side."""
    from vkernel.kernel.mm_api import fork

    fd = await make_file(kernel, task, "fk", pattern(2 * P))
    s = await sys_mmap(task, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    p = await sys_mmap(task, 0, 2 * P, RW, MAP_PRIVATE, fd, 0)
    await write_user(task, p, b"parent")
    await read_user_bytes(task, p + P, 1)
    child = await fork(task)
    await write_user(child, s, b"from child")
    assert await read_user_bytes(task, s, 10) == b"from child"
    assert await read_user_bytes(child, p, 6) == b"parent"
    await write_user(child, p, b"child!")
    assert await read_user_bytes(task, p, 6) == b"parent"
    assert await read_user_bytes(child, p + P, 4) == pattern(2 * P)[P : P + 4]
    assert audit(kernel) == []
    kernel.do_exit(child)
    assert audit(kernel) == []


async def test_gup_fast_falls_back_and_sleeps_on_a_cold_file(make_fs_kernel: object) -> None:
    """pin_user_pages_fast() on a cold file mapping: nothing present, the fallback faults
    with ALLOW_RETRY (the reads happen without mmap_lock) and pins every page."""
    from collections.abc import Callable

    from tests.unit.gup.guphelp import mm_of, page_array
    from vkernel.kernel import gup
    from vkernel.kernel.gup_fast import pin_user_pages_fast

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:16M,latency=5ms")
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "gf", pattern(8 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    a = await sys_mmap(t, 0, 8 * P, PROT_READ, MAP_SHARED, fd, 0)
    pages = page_array(8)
    assert await pin_user_pages_fast(mm_of(t), a, 8, 0, pages, current=t) == 8
    mapping = k.vfs.lookup("gf").mapping
    assert mapping is not None
    assert [int(x) for x in pages] == [mapping.pages[i] for i in range(8)]
    assert audit(k) == []
    gup.unpin_user_pages(k, pages, 8)
    assert not mm_of(t).mmap_lock.is_locked()


async def test_cow_fault_on_a_locked_page_retries_without_leaking(
    kernel: Kernel, task: Task
) -> None:
    """B.38: a private write fault whose file page is locked returns RETRY (the lock is
    dropped, nothing allocated is left behind); after the unlock the COW completes."""
    import asyncio

    from vkernel.kernel.pagecache import folio_trylock, folio_unlock

    fd = await make_file(kernel, task, "cl", pattern(P))
    a = await sys_mmap(task, 0, P, RW, MAP_PRIVATE, fd, 0)
    mapping = kernel.vfs.lookup("cl").mapping
    assert mapping is not None
    pfn = mapping.pages[0]
    assert folio_trylock(kernel.mem, pfn)
    free = kernel.mem.nr_free_pages
    w = asyncio.create_task(write_user(task, a, b"cow"))
    await asyncio.sleep(0.005)
    assert not w.done()
    assert kernel.mem.nr_free_pages >= free - 4  # at most page tables; no cow page parked
    assert audit(kernel) == []
    folio_unlock(kernel.mem, pfn)
    await w
    assert await read_user_bytes(task, a, 3) == b"cow"
    assert (await kernel.vfs.read(task, fd, 3, 0)) == pattern(P)[:3]


async def test_major_faults_are_counted_per_page(make_fs_kernel: object) -> None:
    """One access over cached and cold pages: only faults that read from the device (or
    slept and retried) are major; the state of one fault does not leak into the next."""
    from collections.abc import Callable

    assert callable(make_fs_kernel)
    mk: Callable[..., Kernel] = make_fs_kernel
    k = mk("ram0=ram:16M,latency=1ms", readahead=False, fault_retry=False)
    t = k.spawn("t", "s")
    fd = await make_file(k, t, "mj", pattern(40 * P))
    await k.vfs.fsync(t, fd)
    k.vfs.drop_caches()
    await k.vfs.read(t, fd, 16 * P, 24 * P)  # pages 0..23 cold, 24..39 cached
    a = await sys_mmap(t, 0, 40 * P, PROT_READ, MAP_SHARED, fd, 0)
    maj, minf = t.maj_flt, t.min_flt
    assert await read_user_bytes(t, a, 40 * P) == pattern(40 * P)
    assert t.maj_flt - maj == 24  # every cold page (no readahead: one read each)
    assert t.min_flt - minf == 1  # page 24 (after 23 cold ones), fault-around maps 25..39


async def test_warm_run_with_a_locked_page(kernel: Kernel, task: Task) -> None:
    """A warm mapping read in one access while one page is held locked: the windows around
    it are mapped at once, the locked page's own fault sleeps (mmap_lock dropped) until the
    unlock; one counted fault per 16-page window plus one for the locked page."""
    import asyncio

    from tests.unit.gup.guphelp import mm_of
    from vkernel.kernel.pagecache import folio_trylock, folio_unlock

    fd = await make_file(kernel, task, "lk", pattern(64 * P))
    a = await sys_mmap(task, 0, 64 * P, PROT_READ, MAP_SHARED, fd, 0)
    mapping = kernel.vfs.lookup("lk").mapping
    assert mapping is not None
    pfn = mapping.pages[20]
    assert folio_trylock(kernel.mem, pfn)
    pgfault = vmstat(kernel, "pgfault")
    r = asyncio.create_task(read_user_bytes(task, a, 64 * P))
    await asyncio.sleep(0.005)
    assert not r.done()
    assert not mm_of(task).mmap_lock.is_locked()
    folio_unlock(kernel.mem, pfn)
    assert await r == pattern(64 * P)
    assert vmstat(kernel, "pgfault") == pgfault + 5
    assert proc_status_mm(task)["RssFile"] == 64 * 4
    assert audit(kernel) == []
