"""vkctl: inspect a running vkernel (health, info, ps, vmstat, maps, pagemap, page, devices,
files, audit …).

Tables for people, --json for programs. vkctl runs in a session of its own, so the
per-process views (maps, smaps, pagemap) read other sessions' processes: the daemon allows
read-only introspection of any process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from vkclient._address import grpc_target, resolve_address, resolve_token
from vkclient._kernel import Kernel, connect
from vkclient._spawn import private_daemon
from vkclient.constants import (
    PAGE_SIZE,
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
    pagemap_pfn,
)
from vkclient.errors import VkernelError

_CAP_NAMES = {14: "CAP_IPC_LOCK", 19: "CAP_SYS_PTRACE"}
_STATE = {1: "R", 2: "Z"}

Command = Callable[[argparse.Namespace, Console], Coroutine[Any, Any, int]]


def _emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


async def cmd_health(args: argparse.Namespace, out: Console) -> int:
    """grpc.health.v1 Check against the daemon; exit 0 only when SERVING."""
    target = grpc_target(resolve_address(args.addr))
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            status = f"UNREACHABLE ({e.code().name})"
    if args.json:
        _emit_json({"status": status})
    else:
        out.print(status)
    return 0 if status == "SERVING" else 1


async def _session(args: argparse.Namespace) -> Kernel:
    return await connect(args.addr, token=None, token_file=args.token_file, client_name="vkctl")


async def cmd_info(args: argparse.Namespace, out: Console) -> int:
    """Version, arch, memory and uptime."""
    async with await _session(args) as k:
        info = await k.info()
    if args.json:
        _emit_json(MessageToDict(info, preserving_proto_field_name=True))
        return 0
    table = Table(title="vkernel", show_header=False)
    table.add_row("version", info.version)
    table.add_row("arch", info.arch)
    table.add_row("memory", f"{info.memory_bytes >> 20} MiB ({info.page_size}-byte pages)")
    table.add_row("free", f"{info.free_bytes >> 20} MiB")
    prefault = " (prefault running)" if info.prefault_running else ""
    table.add_row("host-backed", f"{info.host_populated_bytes >> 20} MiB{prefault}")
    table.add_row("uptime", f"{info.uptime_seconds:.1f} s")
    table.add_row("sessions", str(info.sessions))
    table.add_row("processes", str(info.processes))
    out.print(table)
    return 0


async def cmd_ps(args: argparse.Namespace, out: Console) -> int:
    """Every session's processes, like ps -e."""
    async with await _session(args) as k:
        procs = await k.ps(all_sessions=True)
    if args.json:
        _emit_json([MessageToDict(p, preserving_proto_field_name=True) for p in procs])
        return 0
    table = Table(title=f"{len(procs)} processes")
    for col in ("PID", "PPID", "S", "UID", "RSS KiB", "VSZ KiB", "MINFLT", "MAJFLT"):
        table.add_column(col, justify="right")
    table.add_column("SESSION")
    table.add_column("CAPS")
    table.add_column("COMMAND")
    for p in procs:
        caps = ",".join(_CAP_NAMES.get(c, str(c)) for c in p.credentials.capabilities) or "-"
        table.add_row(
            str(p.pid),
            str(p.ppid),
            _STATE.get(p.state, "?"),
            str(p.credentials.uid),
            str(p.rss_bytes >> 10),
            str(p.vsize_bytes >> 10),
            str(p.min_flt),
            str(p.maj_flt),
            p.session_id,
            caps,
            p.name,
        )
    out.print(table)
    return 0


async def cmd_vmstat(args: argparse.Namespace, out: Console) -> int:
    """/proc/vmstat: ``name value`` lines, exactly as Linux prints them."""
    async with await _session(args) as k:
        counters = await k.vmstat()
    if args.json:
        _emit_json(counters)
        return 0
    sys.stdout.write("".join(f"{name} {value}\n" for name, value in counters.items()))
    return 0


async def cmd_maps(args: argparse.Namespace, out: Console) -> int:
    """/proc/PID/maps, exactly as Linux prints it."""
    async with await _session(args) as k:
        text = await k.process(args.pid).maps()
    if args.json:
        _emit_json({"pid": args.pid, "maps": text.splitlines()})
        return 0
    sys.stdout.write(text)
    return 0


async def cmd_smaps(args: argparse.Namespace, out: Console) -> int:
    """/proc/PID/smaps, exactly as Linux prints it."""
    async with await _session(args) as k:
        text = await k.process(args.pid).smaps()
    if args.json:
        _emit_json({"pid": args.pid, "smaps": text.splitlines()})
        return 0
    sys.stdout.write(text)
    return 0


def pagemap_rows(addr: int, entries: list[int]) -> list[dict[str, Any]]:
    """One decoded row per pagemap entry, from ``addr``'s page on."""
    base = addr & ~(PAGE_SIZE - 1)
    return [
        {
            "vaddr": f"{base + i * PAGE_SIZE:#x}",
            "present": bool(e & PM_PRESENT),
            "swap": bool(e & PM_SWAP),
            "file": bool(e & PM_FILE),
            "exclusive": bool(e & PM_MMAP_EXCLUSIVE),
            "uffd_wp": bool(e & PM_UFFD_WP),
            "soft_dirty": bool(e & PM_SOFT_DIRTY),
            "pfn": pagemap_pfn(e),
            "entry": f"{e:#018x}",
        }
        for i, e in enumerate(entries)
    ]


async def cmd_pagemap(args: argparse.Namespace, out: Console) -> int:
    """/proc/PID/pagemap entries for N pages from ADDR, decoded."""
    async with await _session(args) as k:
        entries = await k.process(args.pid).pagemap(args.address, args.npages)
    rows = pagemap_rows(args.address, entries)
    if args.json:
        _emit_json(rows)
        return 0
    table = Table(title=f"pagemap of pid {args.pid}")
    # Addresses and pfns must never be cut short, whatever the terminal's width.
    table.add_column("VADDR", justify="right", no_wrap=True, min_width=14)
    for col in ("PRESENT", "EXCL", "UFFD-WP", "SOFT-DIRTY", "SWAP", "FILE"):
        table.add_column(col, justify="center")
    table.add_column("PFN", justify="right", no_wrap=True, min_width=8)
    mark = {True: "y", False: "-"}
    for r in rows:
        table.add_row(
            r["vaddr"],
            mark[r["present"]],
            mark[r["exclusive"]],
            mark[r["uffd_wp"]],
            mark[r["soft_dirty"]],
            mark[r["swap"]],
            mark[r["file"]],
            f"{r['pfn']:#x}" if r["present"] else "-",
        )
    out.print(table)
    return 0


async def cmd_page(args: argparse.Namespace, out: Console) -> int:
    """dump_page() of one frame: counts, flags, compound and mapping."""
    async with await _session(args) as k:
        page = await k.dump_page(args.pfn)
    if args.json:
        _emit_json(page)
        return 0
    table = Table(title=f"page {page['pfn']:#x}", show_header=False)
    table.add_row("refcount", str(page["refcount"]))
    table.add_row("mapcount", f"{page['mapcount']} ({page['entire_mapcount']} PMD)")
    table.add_row("pincount", str(page["pincount"]))
    table.add_row("maybe_dma_pinned", "yes" if page["maybe_dma_pinned"] else "no")
    table.add_row("flags", f"{page['flag_bits']:#x} ({'|'.join(page['flags']) or '-'})")
    table.add_row("compound", f"head {page['compound_head']:#x}, order {page['compound_order']}")
    table.add_row("mapping", page["mapping"] or "-")
    table.add_row("index", f"{page['index']:#x}")
    table.add_row("zone", page["zone"] or "-")
    out.print(table)
    return 0


async def cmd_gup_test(args: argparse.Namespace, out: Console) -> int:
    """The kernel's gup_test selftest, ported: GUP benchmarks and tests with Linux's output."""
    from vkclient import gup_test

    async with await _session(args) as k:
        return await gup_test.run_args(k, args)


async def cmd_uffd_unit_tests(args: argparse.Namespace, out: Console) -> int:
    """The kernel's uffd-unit-tests selftest over gRPC (anon, shmem, shmem-private)."""
    from vkclient import uffd_unit_tests

    if args.list:
        for test in uffd_unit_tests.TESTS:
            if args.filter is None or args.filter in test.name:
                print(test.name)
        return 0
    async with await _session(args) as k:
        failed = await uffd_unit_tests.run(
            k, lambda line: print(line, flush=True), name_filter=args.filter
        )
    return 1 if failed else 0


async def cmd_uffd_stress(args: argparse.Namespace, out: Console) -> int:
    """uffd-stress.c's bounce test over gRPC, one run per TYPE MiB BOUNCES triple; each run
    must also leave the page accounting audit clean."""
    from vkclient import uffd_stress

    try:
        runs = uffd_stress.parse_runs(args.runs)
    except ValueError as e:
        print(f"vkctl: uffd-stress: {e}", file=sys.stderr)
        return 1

    def emit(line: str) -> None:
        print(line, flush=True)  # progress per bounce, as the C test fflush()es

    status = 0
    async with await _session(args) as k:
        for kind, mib, bounces in runs:
            rc = await uffd_stress.run(
                k,
                kind,
                mib,
                bounces,
                emit,
                nr_cpus=args.cpus,
                locker_ops=args.locker_ops,
                seed=args.seed,
            )
            problems = await k.audit()
            for p in problems:
                emit(f"ERROR: audit: {p}")
            status |= rc or bool(problems)
    return 1 if status else 0


async def cmd_audit(args: argparse.Namespace, out: Console) -> int:
    """Recompute every frame's counts; exit 1 and list the problems when not clean."""
    async with await _session(args) as k:
        problems = await k.audit()
    if args.json:
        _emit_json({"clean": not problems, "problems": problems})
    elif problems:
        out.print(f"audit found {len(problems)} problem(s):", highlight=False)
        for p in problems:
            out.print(f"  {p}", highlight=False, markup=False)
    else:
        out.print("audit clean")
    return 1 if problems else 0


def _ns(ns: int) -> str:
    """A duration in ns as the shortest of ms/us."""
    if ns >= 1_000_000:
        return f"{ns / 1e6:g}ms"
    return f"{ns / 1e3:g}us" if ns else "0"


async def cmd_devices(args: argparse.Namespace, out: Console) -> int:
    """Block devices: kind, size, latency model, queue depth, I/O counters, EIO ranges."""
    async with await _session(args) as k:
        devs = await k.devices()
    if args.json:
        _emit_json([dataclasses.asdict(d) for d in devs])
        return 0
    table = Table(title=f"{len(devs)} block devices")
    table.add_column("NAME", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("MiB", justify="right")
    table.add_column("LATENCY", overflow="fold")
    for col in ("QD", "DAX", "FILES", "READS", "WRITES", "ERR"):
        table.add_column(col, justify="right")
    table.add_column("EIO", overflow="fold")
    for d in devs:
        lat = _ns(d.latency_fixed_ns)
        if d.latency_per_kib_ns:
            lat += f"+{_ns(d.latency_per_kib_ns)}/KiB"
        if d.jitter_ns:
            lat += f"±{_ns(d.jitter_ns)}"
        table.add_row(
            d.name,
            d.kind + (f" {d.path}" if d.path else ""),
            str(d.size >> 20),
            lat,
            str(d.queue_depth),
            "y" if d.dax else "n",
            str(d.files),
            f"{d.reads} ({d.read_bytes >> 10}K)",
            f"{d.writes} ({d.write_bytes >> 10}K)",
            str(d.errors),
            ",".join(f"{s}+{c}" for s, c in d.bad_ranges) or "-",
        )
    out.print(table)
    return 0


async def cmd_files(args: argparse.Namespace, out: Console) -> int:
    """Files: kind, device, size, allocated blocks, page cache, opens, links."""
    async with await _session(args) as k:
        files = await k.files()
    if args.json:
        _emit_json([dataclasses.asdict(f) for f in files])
        return 0
    table = Table(title=f"{len(files)} files")
    table.add_column("NAME", no_wrap=True)
    table.add_column("KIND")
    table.add_column("DEVICE")
    for col in ("INO", "SIZE", "BLOCKS", "CACHE", "DIRTY", "OPENS", "LINKS"):
        table.add_column(col, justify="right")
    for f in files:
        table.add_row(
            f.name,
            f.kind,
            f.device or "-",
            str(f.ino),
            str(f.size),
            str(f.blocks),
            str(f.cached_pages),
            str(f.dirty_pages),
            str(f.opens),
            str(f.nlink),
        )
    out.print(table)
    return 0


def _int(text: str) -> int:
    """An integer in decimal, or hex with 0x (addresses, pfns)."""
    return int(text, 0)


COMMANDS: dict[str, tuple[Command, str]] = {
    "health": (cmd_health, "gRPC health of the daemon (exit 0 when SERVING)"),
    "info": (cmd_info, "version, arch, memory, uptime"),
    "ps": (cmd_ps, "list processes"),
    "vmstat": (cmd_vmstat, "print /proc/vmstat"),
    "maps": (cmd_maps, "print /proc/PID/maps"),
    "smaps": (cmd_smaps, "print /proc/PID/smaps"),
    "pagemap": (cmd_pagemap, "decode /proc/PID/pagemap for N pages from ADDR"),
    "page": (cmd_page, "dump one physical page (refcount, mapcount, flags …)"),
    "devices": (cmd_devices, "list block devices (latency model, queue depth, I/O, EIO ranges)"),
    "files": (cmd_files, "list files (kind, device, size, page cache)"),
    "audit": (cmd_audit, "check every frame's counts (exit 1 when not clean)"),
    "gup-test": (cmd_gup_test, "port of the kernel's gup_test selftest (-a -b -c -L -u -U …)"),
    "uffd-unit-tests": (cmd_uffd_unit_tests, "the kernel's uffd-unit-tests selftest (-f NAME, -l)"),
    "uffd-stress": (cmd_uffd_stress, "the kernel's uffd-stress bounce test (TYPE MiB BOUNCES)"),
}


def build_parser() -> argparse.ArgumentParser:
    """vkctl's command line."""
    parser = argparse.ArgumentParser(prog="vkctl", description="inspect a running vkernel")
    parser.add_argument("--addr", help="unix:///path or tcp://host:port (env VKERNEL_ADDR)")
    parser.add_argument("--token-file", help="bearer token for tcp:// (env VKERNEL_TOKEN_FILE)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--spawn-daemon",
        action="store_true",
        help="run the command against a private daemon started (and stopped) for it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "health":
            p.add_argument("--service", default="", help="service name (default: the server)")
            p.add_argument("--timeout", type=float, default=5.0)
        if name in ("maps", "smaps", "pagemap"):
            p.add_argument("pid", type=int, help="process id (any session's)")
        if name == "pagemap":
            p.add_argument("address", type=_int, metavar="ADDR", help="virtual address (0x…)")
            p.add_argument("npages", type=_int, metavar="N", help="number of pages")
        if name == "page":
            p.add_argument("pfn", type=_int, metavar="PFN", help="page frame number (0x…)")
        if name == "gup-test":
            from vkclient.gup_test import add_arguments

            add_arguments(p)
        if name == "uffd-unit-tests":
            p.add_argument(
                "-f", dest="filter", metavar="TESTNAME", help="only tests whose name contains this"
            )
            p.add_argument("-l", dest="list", action="store_true", help="list the tests only")
        if name == "uffd-stress":
            from vkclient.uffd_stress import LOCKER_OPS

            p.add_argument(
                "runs",
                nargs="+",
                metavar="TYPE MiB BOUNCES",
                help="anon|shmem|shmem-private, area size, bounces; repeat for more runs",
            )
            p.add_argument("--cpus", type=int, help="lockers/readers/copiers (default: nproc)")
            p.add_argument(
                "--locker-ops",
                type=int,
                default=LOCKER_OPS,
                help=f"operations per locker per bounce at least (default {LOCKER_OPS})",
            )
            p.add_argument("--seed", type=int, help="seed of the random page picks")
    return parser


SPAWN_MEMORY = "512M"
"""Physical memory of a ``--spawn-daemon`` daemon (uffd-stress shmem 20 MiB needs ~100 MiB)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one vkctl command; errors print like a Linux tool's and exit non-zero."""
    args = build_parser().parse_args(argv)
    out = Console()
    command, _ = COMMANDS[args.command]
    try:
        resolve_token(None, args.token_file)  # fail early on an unreadable token file
        if args.spawn_daemon:
            with private_daemon("vkctl-", ["--memory", SPAWN_MEMORY], check=True) as d:
                args.addr = d.addr
                rc = asyncio.run(command(args, out))
            return rc
        return asyncio.run(command(args, out))
    except OSError as e:
        print(f"vkctl: {args.command}: {e.strerror or e}", file=sys.stderr)
        return 1
    except VkernelError as e:
        print(f"vkctl: {args.command}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # the private daemon failed to start or to stop cleanly
        print(f"vkctl: --spawn-daemon: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
