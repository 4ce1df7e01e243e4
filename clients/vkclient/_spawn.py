"""A private daemon for one command: ``vkctl --spawn-daemon`` and ``vkernel-demo --spawn-daemon``.

``python -m vkernel serve`` on a UNIX socket in a temporary folder, JSON logs to a file there;
SIGTERM on exit, after which a healthy daemon exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 30.0


@dataclass
class PrivateDaemon:
    """The running daemon; ``returncode`` and ``log_lines`` are set once it stopped."""

    addr: str
    pid: int
    returncode: int | None = None
    log_lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def private_daemon(
    prefix: str, serve_args: Sequence[str], *, check: bool = False
) -> Iterator[PrivateDaemon]:
    """Start a daemon (extra ``serve_args``), yield it once its socket exists, stop it with
    SIGTERM. ``check``: a non-zero exit status raises RuntimeError with the log's tail."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        sock = Path(tmp) / "vkernel.sock"
        log_path = Path(tmp) / "daemon.log"
        with log_path.open("wb") as log:
            argv = [sys.executable, "-m", "vkernel", "serve", "--listen", f"unix://{sock}"]
            proc = subprocess.Popen(
                [*argv, "--log-format", "json", *serve_args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            daemon = PrivateDaemon(f"unix://{sock}", proc.pid)
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while not sock.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
                    time.sleep(0.05)
                yield daemon
            finally:
                proc.send_signal(signal.SIGTERM)
                daemon.returncode = proc.wait(timeout=30)
                daemon.log_lines = log_path.read_text().splitlines()
        if check and daemon.returncode != 0:
            tail = "\n".join(daemon.log_lines)[-2000:]
            raise RuntimeError(f"daemon exited {daemon.returncode}: {tail}")
