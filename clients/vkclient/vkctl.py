"""vkctl: inspect a running vkernel (health, info, ps, vmstat …). Tables for people, --json."""

from __future__ import annotations

import argparse
import asyncio
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


COMMANDS: dict[str, tuple[Command, str]] = {
    "health": (cmd_health, "gRPC health of the daemon (exit 0 when SERVING)"),
    "info": (cmd_info, "version, arch, memory, uptime"),
    "ps": (cmd_ps, "list processes"),
    "vmstat": (cmd_vmstat, "print /proc/vmstat"),
}


def build_parser() -> argparse.ArgumentParser:
    """vkctl's command line."""
    parser = argparse.ArgumentParser(prog="vkctl", description="inspect a running vkernel")
    parser.add_argument("--addr", help="unix:///path or tcp://host:port (env VKERNEL_ADDR)")
    parser.add_argument("--token-file", help="bearer token for tcp:// (env VKERNEL_TOKEN_FILE)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "health":
            p.add_argument("--service", default="", help="service name (default: the server)")
            p.add_argument("--timeout", type=float, default=5.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one vkctl command; errors print like a Linux tool's and exit non-zero."""
    args = build_parser().parse_args(argv)
    out = Console()
    command, _ = COMMANDS[args.command]
    try:
        resolve_token(None, args.token_file)  # fail early on an unreadable token file
        return asyncio.run(command(args, out))
    except OSError as e:
        print(f"vkctl: {args.command}: {e.strerror or e}", file=sys.stderr)
        return 1
    except VkernelError as e:
        print(f"vkctl: {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
