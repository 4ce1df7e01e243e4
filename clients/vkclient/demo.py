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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import vkclient
from vkclient._kernel import Kernel

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

        step("2. errors come back as Linux errno")
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

        step("3. signals and wait")
        await monitor.kill(signal.SIGTERM)
        result = await monitor.wait()
        out.print(
            f"  kill({monitor.pid}, SIGTERM); waitpid → status {result.status:#x} "
            f"(WIFSIGNALED, WTERMSIG = {signal.Signals(result.signal).name})"
        )
        await ps_table(k, "ps after the monitor was reaped")

        step("4. /proc/vmstat")
        counters = await k.vmstat()
        table = Table(show_header=True, title=f"{len(counters)} counters (excerpt)")
        table.add_column("counter")
        table.add_column("value", justify="right")
        for name, value in list(counters.items())[:12]:
            table.add_row(name, str(value))
        out.print(table)

        step("5. closing the session")
        out.print(
            "  the session ends → its processes exit with it (close semantics), "
            "nothing is left behind"
        )
    async with vkclient.connect(addr, token_file=token_file, client_name="check") as k:
        left = await k.ps(all_sessions=True)
        out.print(f"  processes left after the session closed: [bold]{len(left)}[/]")
        if left:
            return 1
    out.print("\n[bold green]demo finished[/]")
    return 0


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited early with status {proc.returncode}")
        if path.exists():
            return
        time.sleep(0.05)
    raise RuntimeError("daemon did not start in time")


def run_with_private_daemon() -> int:
    """Start a daemon in a temp folder, run the tour, stop it with SIGTERM (must exit 0)."""
    with tempfile.TemporaryDirectory(prefix="vkernel-demo-") as tmp:
        sock = Path(tmp) / "vkernel.sock"
        log_path = Path(tmp) / "daemon.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vkernel",
                    "serve",
                    "--listen",
                    f"unix://{sock}",
                    "--memory",
                    "256M",
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_for_socket(sock, proc)
                out.print(f"[dim]daemon pid {proc.pid} listening on unix://{sock}[/]")
                status = asyncio.run(tour(f"unix://{sock}", None))
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=30)
        lines = log_path.read_text().splitlines()
        out.print(
            f"[dim]daemon stopped on SIGTERM with exit status {rc}; "
            f"it wrote {len(lines)} JSON log lines[/]"
        )
        if rc != 0:
            out.print("\n".join(lines[-20:]))
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
