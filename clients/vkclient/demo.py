"""vkernel-demo: a guided tour of a running vkernel, printed for people.

``--spawn-daemon`` starts a private daemon on a UNIX socket in a temporary folder first and
stops it (SIGTERM, expecting exit 0) at the end: that is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

import vkclient
from vkclient._kernel import Kernel
from vkclient._spawn import private_daemon

out = Console(highlight=False)


def step(title: str) -> None:
    """A section heading."""
    out.print()
    out.rule(f"[bold cyan]{title}")


def show_errno(what: str, e: OSError) -> None:
    """Print an error the way a Linux developer reads one."""
    name = errno.errorcode.get(e.errno or 0, "?")
    out.print(
        f"  {what}\n    → [bold red]{type(e).__name__}[/] errno={e.errno} "
        f"([bold]{name}[/]): {e.strerror}"
    )


async def ps_table(k: Kernel, title: str) -> None:
    """The process table as a rich table."""
    table = Table(title=title, title_justify="left")
    for col in ("PID", "PPID", "STATE", "UID", "CAPS", "SESSION", "COMMAND"):
        table.add_column(col)
    for p in await k.ps(all_sessions=True):
        caps = (
            ",".join(
                {14: "IPC_LOCK", 19: "SYS_PTRACE"}.get(c, str(c))
                for c in p.credentials.capabilities
            )
            or "-"
        )
        state = {1: "running", 2: "zombie"}.get(p.state, "?")
        table.add_row(
            str(p.pid),
            str(p.ppid),
            state,
            str(p.credentials.uid),
            caps,
            p.session_id,
            p.name,
        )
    out.print(table)


def page_table(title: str, rows: list[tuple[str, int, dict[str, Any]]]) -> Table:
    """Pages side by side: who maps them, their pfn, counts and flags."""
    table = Table(title=title, title_justify="left")
    for col in ("mapped by", "pfn", "refcount", "mapcount", "anon-exclusive", "pagemap"):
        table.add_column(col, justify="right" if col in ("refcount", "mapcount") else "left")
    table.add_column("other flags")
    for who, entry, page in rows:
        exclusive = "anon_exclusive" in page["flags"]
        table.add_row(
            who,
            f"{page['pfn']:#x}",
            str(page["refcount"]),
            str(page["mapcount"]),
            "[bold green]yes[/]" if exclusive else "[bold yellow]no[/]",
            " ".join(f for f in vkclient.pagemap_flags(entry) if f != "soft-dirty"),
            ", ".join(f for f in page["flags"] if f != "anon_exclusive"),
        )
    return table


async def cow_tour(k: Kernel, parent: vkclient.Process) -> bool:
    """mmap, write, fork, write in the child: show the page being shared, then copied."""
    addr = await parent.mmap(4 * vkclient.PAGE_SIZE)
    await parent.write(addr, b"hello from the parent")
    out.print(
        f"  pid {parent.pid}: mmap(NULL, 16384, PROT_READ|PROT_WRITE, "
        f"MAP_PRIVATE|MAP_ANONYMOUS) = [bold]{addr:#x}[/]"
    )
    out.print(f"  pid {parent.pid}: write({addr:#x}, 'hello from the parent')")
    out.print("  /proc/PID/maps of the parent:")
    for line in (await parent.maps()).splitlines():
        out.print(f"    [dim]{escape(line)}[/]")

    async def look(p: vkclient.Process, who: str) -> tuple[str, int, dict[str, Any]]:
        [entry] = await p.pagemap(addr, 1)
        return who, entry, await k.dump_page(vkclient.pagemap_pfn(entry))

    before = await look(parent, f"parent {parent.pid}")
    out.print(page_table("after the write: a private, exclusive anonymous page", [before]))
    ok = before[2]["refcount"] == 1 and "anon_exclusive" in before[2]["flags"]

    child = await parent.fork()
    shared = [await look(parent, f"parent {parent.pid}"), await look(child, f"child {child.pid}")]
    out.print(
        f"  fork() = {child.pid}: both now map the [bold]same frame[/], write-protected; "
        "it is no longer exclusive to either"
    )
    out.print(page_table("after fork", shared))
    ok = ok and shared[0][2]["pfn"] == shared[1][2]["pfn"] == before[2]["pfn"]
    ok = ok and shared[0][2]["refcount"] == 2 and shared[0][2]["mapcount"] == 2

    await child.write(addr, b"HELLO FROM THE CHILD!")
    after = [await look(parent, f"parent {parent.pid}"), await look(child, f"child {child.pid}")]
    out.print(
        "  the child writes → write fault on a shared page → [bold]wp_page_copy[/]: "
        "the child gets a new frame"
    )
    out.print(page_table("after the child's write", after))
    parent_sees = await parent.read(addr, 21)
    child_sees = await child.read(addr, 21)
    out.print(f"  parent reads {parent_sees.decode()!r}, child reads {child_sees.decode()!r}")
    ok = ok and after[0][2]["pfn"] == before[2]["pfn"] != after[1][2]["pfn"]
    ok = ok and after[0][2]["refcount"] == 1 and parent_sees == b"hello from the parent"
    ok = ok and child_sees == b"HELLO FROM THE CHILD!"

    await parent.write(addr, b"parent writes again!!")
    [entry] = await parent.pagemap(addr, 1)
    page = await k.dump_page(vkclient.pagemap_pfn(entry))
    out.print(
        f"  the parent writes: its page has refcount 1, so the fault [bold]reuses[/] it "
        f"(no copy): pfn {page['pfn']:#x}, anon-exclusive again: "
        f"{'yes' if 'anon_exclusive' in page['flags'] else 'no'}"
    )
    ok = ok and page["pfn"] == before[2]["pfn"] and "anon_exclusive" in page["flags"]
    if not ok:
        out.print("  [bold red]copy-on-write did not behave as Linux does[/]")
    await child.kill()
    await child.wait()
    return ok


async def pin_fork_tour(k: Kernel, proc: vkclient.Process) -> bool:
    """A long-term pin (an RDMA registration, an io_uring fixed buffer) across fork (B.34)."""
    addr = await proc.mmap(2 * vkclient.PAGE_SIZE)
    await proc.write(addr, b"registered buffer")
    vm0 = await k.vmstat()
    async with proc.pin(addr, 2, write=True, longterm=True) as pages:
        pfn = int(pages.pfns[0])
        page = await k.dump_page(pfn)
        out.print(
            f"  pin_user_pages_fast({addr:#x}, 2, FOLL_WRITE|FOLL_LONGTERM) → handle "
            f"[bold]{pages.handle}[/] owned by this session, pfns "
            f"{', '.join(hex(int(p)) for p in pages.pfns)}"
        )
        out.print(
            f"  pfn {pfn:#x}: refcount [bold]{page['refcount']}[/] (1 mapping + 1024 per pin, "
            f"GUP_PIN_COUNTING_BIAS), maybe_dma_pinned={page['maybe_dma_pinned']}; "
            f"VmPin {(await proc.status())['VmPin']} kB"
        )
        child = await proc.fork()
        [entry] = await child.pagemap(addr, 1)
        child_pfn = vkclient.pagemap_pfn(entry)
        [entry] = await proc.pagemap(addr, 1)
        parent_pfn = vkclient.pagemap_pfn(entry)
        out.print(
            f"  fork() = {child.pid}: the page may be DMA-pinned, so the child gets "
            f"[bold]its own copy[/] at once (pfn {child_pfn:#x}); the parent keeps the pinned "
            f"frame {parent_pfn:#x}, still writable"
        )
        await proc.write(addr, b"parent after fork")
        seen = await pages.dma_read(0, 17)
        await pages.dma_write(vkclient.PAGE_SIZE, b"from the device")
        out.print(
            f"  the parent writes; the device reads through the pin: {seen.decode()!r} "
            "(coherent, no COW in the parent)"
        )
        device = await proc.read(addr + vkclient.PAGE_SIZE, 15)
        child_sees = await child.read(addr, 17)
        out.print(
            f"  the device writes page 1; the parent reads {device.decode()!r}; "
            f"the child still reads {child_sees.decode()!r}"
        )
        ok = child_pfn != pfn and parent_pfn == pfn and seen == b"parent after fork"
        ok = ok and device == b"from the device" and child_sees == b"registered buffer"
        await child.kill()
        await child.wait()
    vm1 = await k.vmstat()
    acquired = vm1["nr_foll_pin_acquired"] - vm0["nr_foll_pin_acquired"]
    released = vm1["nr_foll_pin_released"] - vm0["nr_foll_pin_released"]
    out.print(
        f"  unpin_user_pages_dirty_lock on leaving the block: nr_foll_pin_acquired "
        f"+{acquired}, nr_foll_pin_released +{released} → "
        f"nr_foll_pin_acquired {vm1['nr_foll_pin_acquired']} == nr_foll_pin_released "
        f"{vm1['nr_foll_pin_released']}: [bold green]balanced[/]"
    )
    ok = ok and acquired == released == 2
    ok = ok and vm1["nr_foll_pin_acquired"] == vm1["nr_foll_pin_released"]
    if not ok:
        out.print("  [bold red]the pinned page did not behave as Linux does[/]")
    return ok


async def files_tour(k: Kernel, writer: vkclient.Process, reader: vkclient.Process) -> bool:
    """File mappings: a MAP_SHARED file written by one process and read by another, msync'd
    to the device; a MAP_PRIVATE dax mapping COWed in one fault (seed 002)."""
    P = vkclient.PAGE_SIZE
    name = f"demo-shared-{writer.pid}"
    wfd = await writer.open(name, vkclient.O_CREAT | vkclient.O_RDWR, "disk")
    await writer.ftruncate(wfd, 4 * P)
    waddr = await writer.mmap(4 * P, flags=vkclient.MAP_SHARED, fd=wfd)
    rfd = await reader.open(name, vkclient.O_RDONLY)
    raddr = await reader.mmap(4 * P, prot=vkclient.PROT_READ, flags=vkclient.MAP_SHARED, fd=rfd)
    await writer.write(waddr + P, b"written through a mapping")
    seen = await reader.read(raddr + P, 25)
    dev0 = {d.name: d.writes for d in await k.devices()}
    await writer.msync(waddr, 4 * P, vkclient.MS_SYNC)
    dev1 = {d.name: d.writes for d in await k.devices()}
    bios = sum(dev1[n] - dev0.get(n, 0) for n in dev1)
    maps = [ln for ln in (await writer.maps()).splitlines() if name in ln]
    out.print(f"  pid {writer.pid} mmap(MAP_SHARED, fd {wfd}): {maps[0] if maps else '?'}")
    out.print(
        f"  pid {writer.pid} stores {b'written through a mapping'.decode()!r}; pid "
        f"{reader.pid} reads [bold]{seen.decode()!r}[/] through its own mapping (one page "
        f"cache); msync(MS_SYNC) → {bios} write bio(s) to the device"
    )
    rss = (await writer.status())["RssFile"]
    out.print(f"  RssFile of pid {writer.pid}: {rss} kB (MM_FILEPAGES)")
    ok = seen == b"written through a mapping" and bios >= 1 and rss > 0
    dax = [d.name for d in await k.devices() if d.dax]
    if not dax:
        out.print("  (no dax device on this daemon: the dax COW step is skipped)")
        return ok
    dname = f"demo-dax-{writer.pid}"
    dfd = await writer.open(dname, vkclient.O_CREAT | vkclient.O_RDWR, "dax", dax[0])
    await writer.pwrite(dfd, b"persistent memory" + bytes(P - 17), 0)
    daddr = await writer.mmap(P, flags=vkclient.MAP_PRIVATE, fd=dfd)
    before = (await k.vmstat())["pgfault"]
    await writer.write(daddr, b"PRIVATE")
    faults = (await k.vmstat())["pgfault"] - before
    mine = await writer.read(daddr, 17)
    file_now = await writer.pread(dfd, 17, 0)
    out.print(
        f"  dax file on {dax[0]}, mmap(MAP_PRIVATE): a first store is a write fault; the dax "
        f"handler fills the preallocated cow_page and maps it (VM_FAULT_DONE_COW): "
        f"pgfault +[bold]{faults}[/]"
    )
    out.print(f"  the mapping reads {mine.decode()!r}, the file still {file_now.decode()!r}")
    ok = ok and faults == 1 and mine == b"PRIVATE" + b"persistent memory"[7:]
    ok = ok and file_now == b"persistent memory"
    if not ok:
        out.print("  [bold red]the file mappings did not behave as Linux does[/]")
    return ok


async def uffd_tour(
    k: Kernel, addr: str | None, token_file: str | None, proc: vkclient.Process
) -> bool:
    """userfaultfd: a process faults on missing pages while a monitor in a second session
    (the SDK's UffdMonitor) reads the fault messages and resolves them with UFFDIO_COPY."""
    from vkclient import uffd

    P = vkclient.PAGE_SIZE
    n = 8
    area = await proc.mmap(n * P)
    u = await k.userfaultfd(proc, uffd.UFFD_USER_MODE_ONLY)
    await u.register(area, n * P, uffd.UFFDIO_REGISTER_MODE_MISSING)
    asked: list[int] = []

    def pages(start: int, length: int) -> bytes:
        """The monitor's page source: what a postcopy agent would fetch from the source."""
        first = (start - area) // P
        asked.extend(range(first, first + length // P))
        return b"".join(
            f"page {first + i} from the monitor".encode().ljust(P, b"\0")
            for i in range(length // P)
        )

    async with vkclient.connect(addr, token_file=token_file, client_name="uffd-monitor") as mk:
        await u.grant(mk.session_id)
        mon = mk.attach_userfaultfd(u.handle).monitor(pages)
        out.print(
            f"  pid {proc.pid}: userfaultfd(UFFD_USER_MODE_ONLY), UFFDIO_REGISTER(MISSING) over "
            f"{n} pages; the handle is passed to session [bold]{mk.session_id}[/] (the monitor)"
        )
        server = asyncio.ensure_future(mon.run())
        try:
            async with proc.access_stream() as cpu:
                seen: list[bytes] = []
                times: list[float] = []
                for i in range(n):
                    t0 = time.perf_counter()
                    seen.append(await asyncio.wait_for(cpu.load(area + i * P, 26), 30))
                    times.append(time.perf_counter() - t0)
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
    await u.close()
    first = seen[0].rstrip(b"\0").decode()
    out.print(
        f"  pid {proc.pid} loads 26 bytes from each of the {n} pages (an Access stream): each "
        f"load blocks, the monitor (UffdMonitor) reads the PAGEFAULT message, asks its page "
        f"source, answers with UFFDIO_COPY, the load goes on — {mon.faults} faults served in {sum(times) * 1e3:.1f} ms: the "
        f"first {times[0] * 1e3:.1f} ms (it opens the streams), then [bold]"
        f"{statistics.median(times[1:]) * 1e3:.2f} ms per fault[/] (median)"
    )
    out.print(f"  page 0 now reads [bold]{first!r}[/]")
    ok = asked == list(range(n)) and mon.faults == n and first == "page 0 from the monitor"
    ok = ok and all(
        s.rstrip(b"\0") == f"page {i} from the monitor".encode() for i, s in enumerate(seen)
    )
    if not ok:
        out.print("  [bold red]userfaultfd did not behave as Linux does[/]")
    return ok


async def tour(addr: str | None, token_file: str | None) -> int:
    """Run the demo against the daemon at ``addr``; returns 0 when every step behaved."""
    async with vkclient.connect(addr, token_file=token_file, client_name="demo") as k:
        info = await k.info()
        out.print(
            Panel.fit(
                f"[bold]vkernel {info.version}[/] · arch {info.arch} · "
                f"{info.memory_bytes >> 20} MiB of physical memory in {info.page_size}-byte "
                f"frames\nsession [bold]{k.session_id}[/] · keepalive round trip "
                f"{await k.ping() * 1e6:.0f} µs",
                title="connected",
            )
        )

        step("1. spawning processes")
        db = await k.spawn("postgres")
        vm = await k.spawn(
            "qemu-kvm", capabilities=[vkclient.CAP_IPC_LOCK], rlimit_memlock=64 << 20
        )
        monitor = await k.spawn("criu", uid=0, capabilities=[vkclient.CAP_SYS_PTRACE])
        for p, why in (
            (db, "an ordinary process"),
            (vm, "a guest, allowed to lock memory (CAP_IPC_LOCK, RLIMIT_MEMLOCK 64 MiB)"),
            (monitor, "a userfaultfd monitor (CAP_SYS_PTRACE)"),
        ):
            out.print(f"  spawned pid [bold]{p.pid}[/] {p.info.name:<10} {why}")
        await ps_table(k, "ps")

        step("2. fork and copy-on-write")
        if not await cow_tour(k, db):
            return 1

        step("3. a long-term pin survives fork")
        if not await pin_fork_tour(k, vm):
            return 1

        step("4. file mappings")
        if not await files_tour(k, db, vm):
            return 1

        step("5. userfaultfd: a monitor in another session serves page faults")
        if not await uffd_tour(k, addr, token_file, db):
            return 1

        step("6. errors come back as Linux errno")
        try:
            await k.process(4_000_000).kill()
        except ProcessLookupError as e:
            show_errno("kill(4000000, SIGKILL) — no such process:", e)
        try:
            await db.kill(99)
        except OSError as e:
            show_errno(f"kill({db.pid}, 99) — not a signal:", e)
        async with vkclient.connect(addr, token_file=token_file, client_name="intruder") as other:
            try:
                await other.process(db.pid).kill()
            except PermissionError as e:
                show_errno(f"another session: kill({db.pid}, SIGKILL) — not its process:", e)

        step("7. signals and wait")
        await monitor.kill(signal.SIGTERM)
        result = await monitor.wait()
        out.print(
            f"  kill({monitor.pid}, SIGTERM); waitpid → status {result.status:#x} "
            f"(WIFSIGNALED, WTERMSIG = {signal.Signals(result.signal).name})"
        )
        await ps_table(k, "ps after the monitor was reaped")

        step("8. /proc/vmstat")
        counters = await k.vmstat()
        table = Table(show_header=True, title=f"{len(counters)} counters (excerpt)")
        table.add_column("counter")
        table.add_column("value", justify="right")
        for name, value in list(counters.items())[:12]:
            table.add_row(name, str(value))
        out.print(table)

        step("9. closing the session")
        out.print(
            "  the session ends → its processes exit with it (close semantics), "
            "nothing is left behind"
        )
    async with vkclient.connect(addr, token_file=token_file, client_name="check") as k:
        left = await k.ps(all_sessions=True)
        out.print(f"  processes left after the session closed: [bold]{len(left)}[/]")
        if left:
            return 1
        step("10. the audit")
        problems = await k.audit()
        if problems:
            out.print(f"  [bold red]audit found {len(problems)} problem(s)[/]")
            for problem in problems:
                out.print(f"    {problem}", markup=False)
            return 1
        out.print(
            "  every frame's refcount, mapcount and pincount recomputed from page tables "
            "and handles:"
        )
        out.print("  [bold green]audit clean[/]")
    out.print("\n[bold green]demo finished[/]")
    return 0


def run_with_private_daemon() -> int:
    """Start a daemon in a temp folder, run the tour, stop it with SIGTERM (must exit 0)."""
    devices = ["--device", "ram0=ram:64M", "--device", "pmem0=ram:16M,dax=1"]
    with private_daemon("vkernel-demo-", ["--memory", "256M", *devices]) as d:
        out.print(f"[dim]daemon pid {d.pid} listening on {d.addr}[/]")
        status = asyncio.run(tour(d.addr, None))
    out.print(
        f"[dim]daemon stopped on SIGTERM with exit status {d.returncode}; "
        f"it wrote {len(d.log_lines)} JSON log lines[/]"
    )
    if d.returncode != 0:
        out.print("\n".join(d.log_lines[-20:]))
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """vkernel-demo's command line."""
    parser = argparse.ArgumentParser(prog="vkernel-demo", description=__doc__)
    parser.add_argument("--addr", help="daemon address (env VKERNEL_ADDR)")
    parser.add_argument("--token-file", help="bearer token file for tcp:// addresses")
    parser.add_argument(
        "--spawn-daemon", action="store_true", help="run a private daemon for the demo"
    )
    args = parser.parse_args(argv)
    if args.spawn_daemon:
        return run_with_private_daemon()
    return asyncio.run(tour(args.addr, args.token_file or os.environ.get("VKERNEL_TOKEN_FILE")))


if __name__ == "__main__":
    sys.exit(main())
