"""Daemon options: command line first, then VKERNEL_* environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vkernel.kernel.blockdev import DeviceSpec

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
PAGE_SIZE = 4096
DEFAULT_DEVICE = "ram0=ram:256M"
"""The block device the daemon gets when none is configured."""
DIO_GUP_MODES = ("fast", "slow")
DIO_FOLL_MODES = ("pin", "get")


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64K``, ``512M``, ``1G`` or ``1GiB`` into bytes (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M or 1G)")
    return int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]


def default_socket_path() -> Path:
    """The per-user default socket: $XDG_RUNTIME_DIR/vkernel/vkernel.sock, else /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "vkernel" if runtime else Path(f"/tmp/vkernel-{os.getuid()}")
    return base / "vkernel.sock"


def default_address() -> str:
    """The address clients use when neither --addr nor VKERNEL_ADDR is given."""
    return f"unix://{default_socket_path()}"


@dataclass(frozen=True)
class Listen:
    """One listening address: a UNIX socket path or a TCP host:port."""

    scheme: str
    """``unix`` or ``tcp``."""
    target: str
    """The socket path (unix) or ``host:port`` (tcp)."""

    @classmethod
    def parse(cls, text: str) -> Listen:
        """Parse ``unix:///abs/path`` or ``tcp://host:port``."""
        if text.startswith("unix://"):
            path = text[len("unix://") :]
            if not path.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {text!r}")
            return cls("unix", path)
        if text.startswith("tcp://"):
            hostport = text[len("tcp://") :]
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"expected tcp://host:port, got {text!r}")
            return cls("tcp", hostport)
        raise ValueError(f"listen address must be unix:///path or tcp://host:port, got {text!r}")

    def grpc_address(self) -> str:
        """The address string grpc's add_insecure_port takes."""
        return f"unix:{self.target}" if self.scheme == "unix" else self.target

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}"


@dataclass(frozen=True)
class ServeConfig:
    """Everything `vkernel serve` is configured with."""

    listen: tuple[Listen, ...]
    """Addresses to listen on (--listen, repeatable)."""
    token: str | None
    """The bearer token TCP clients must present (read from --token-file)."""
    memory_bytes: int = 1 << 30
    """Physical memory size (--memory)."""
    movable_bytes: int = 0
    """Movable region size (--movable)."""
    arch: str = "x86_64"
    """Page-table-freeing rules to model (--arch)."""
    thp: str = "madvise"
    """Transparent hugepage policy (--thp)."""
    log_format: str = "json"
    """json or console (--log-format)."""
    grace: float = 5.0
    """Seconds in-flight calls get on shutdown (--grace)."""
    session_timeout: float = 1.0
    """Seconds of keepalive silence after which a session ends (--session-timeout)."""
    prefault: bool = True
    """Back physical memory with host pages at boot, in the background (--no-prefault)."""
    devices: tuple[DeviceSpec, ...] = ()
    """Block devices (--device, repeatable); empty means the default RAM device."""
    readahead: bool = True
    """Page-cache readahead on file reads (--no-readahead)."""
    fault_retry: bool = True
    """Faults may drop mmap_lock to sleep (FAULT_FLAG_ALLOW_RETRY; --no-fault-retry)."""
    unprivileged_userfaultfd: bool = False
    """vm.unprivileged_userfaultfd (--unprivileged-userfaultfd): userfaultfd(0) without
    CAP_SYS_PTRACE."""
    dio_gup: str = "fast"
    """O_DIRECT page extraction (--dio-gup): ``fast`` (pin_user_pages_fast) or ``slow``
    (the *_user_pages_unlocked path under mmap_lock; seed 000's switch)."""
    dio_foll: str = "pin"
    """O_DIRECT page references (--dio-foll): ``pin`` (FOLL_PIN) or ``get`` (FOLL_GET;
    seed 004's switch)."""


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(f"VKERNEL_{name}")
    return value if value else None


def build_parser() -> argparse.ArgumentParser:
    """The `vkernel` command line."""
    parser = argparse.ArgumentParser(prog="vkernel", description="a virtual Linux mm kernel")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon", description="run the vkernel daemon")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="unix:///path or tcp://host:port; repeatable (env VKERNEL_LISTEN, comma-separated; "
        "default: a per-user UNIX socket)",
    )
    serve.add_argument(
        "--token-file", help="file holding the TCP bearer token (VKERNEL_TOKEN_FILE)"
    )
    serve.add_argument("--memory", help="physical memory size, e.g. 1G (VKERNEL_MEMORY)")
    serve.add_argument("--movable", help="movable region size, e.g. 256M (VKERNEL_MOVABLE)")
    serve.add_argument("--arch", choices=["x86_64", "arm64", "generic"], help="(VKERNEL_ARCH)")
    serve.add_argument("--thp", choices=["always", "madvise", "never"], help="(VKERNEL_THP)")
    serve.add_argument("--log-format", choices=["json", "console"], help="(VKERNEL_LOG_FORMAT)")
    serve.add_argument("--grace", type=float, help="shutdown grace in seconds (VKERNEL_GRACE)")
    serve.add_argument(
        "--session-timeout", type=float, help="keepalive silence that ends a session, seconds"
    )
    serve.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not populate physical memory at boot (VKERNEL_NO_PREFAULT=1)",
    )
    serve.add_argument(
        "--device",
        action="append",
        metavar="SPEC",
        help="a block device, repeatable: NAME=ram:SIZE[,OPTS] or NAME=file:PATH:SIZE[,OPTS]; "
        "OPTS latency=2ms+10us/KiB,jitter=0.5ms,qd=32,dax=1,eio=SECTOR+COUNT "
        f"(env VKERNEL_DEVICE, ';'-separated; default {DEFAULT_DEVICE})",
    )
    serve.add_argument(
        "--readahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="page-cache readahead on file reads (VKERNEL_READAHEAD=0 to disable; default on)",
    )
    serve.add_argument(
        "--fault-retry",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="faults drop mmap_lock while they sleep on I/O (FAULT_FLAG_ALLOW_RETRY; "
        "VKERNEL_FAULT_RETRY=0 or --no-fault-retry to hold it; default on)",
    )
    serve.add_argument(
        "--unprivileged-userfaultfd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vm.unprivileged_userfaultfd: userfaultfd without CAP_SYS_PTRACE or "
        "UFFD_USER_MODE_ONLY (VKERNEL_UNPRIVILEGED_USERFAULTFD=1; default off)",
    )
    serve.add_argument(
        "--dio-gup",
        choices=DIO_GUP_MODES,
        help="O_DIRECT/AIO page extraction daemon-wide: fast = pin_user_pages_fast, slow = "
        "GUP under mmap_lock (VKERNEL_DIO_GUP; default fast)",
    )
    serve.add_argument(
        "--dio-foll",
        choices=DIO_FOLL_MODES,
        help="O_DIRECT/AIO page references daemon-wide: pin = FOLL_PIN, get = FOLL_GET "
        "(VKERNEL_DIO_FOLL; default pin)",
    )
    return parser


def parse_devices(texts: Sequence[str]) -> tuple[DeviceSpec, ...]:
    """Parse device specs; names must be unique."""
    specs = tuple(DeviceSpec.parse(t) for t in texts)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate device name in {names}")
    return specs


def split_device_env(text: str) -> list[str]:
    """VKERNEL_DEVICE: specs separated by ';', or by ',' before a NAME= that starts a spec."""
    out: list[str] = []
    for part in text.split(";"):
        cur = ""
        for piece in part.split(","):
            if cur and "=" in piece and piece.split("=", 1)[1][:5] in ("ram:", "file:"):
                out.append(cur)
                cur = piece
            elif cur:
                cur += "," + piece
            else:
                cur = piece
        if cur.strip():
            out.append(cur.strip())
    return out


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], stdout_isatty: bool
) -> ServeConfig:
    """Merge parsed arguments with the environment; raise ValueError on bad values."""
    listen_texts: Sequence[str]
    if args.listen:
        listen_texts = args.listen
    elif env_listen := _env(environ, "LISTEN"):
        listen_texts = [t.strip() for t in env_listen.split(",") if t.strip()]
    else:
        listen_texts = [f"unix://{default_socket_path()}"]
    listen = tuple(Listen.parse(t) for t in listen_texts)

    token_file = args.token_file or _env(environ, "TOKEN_FILE")
    token = None
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read token file {token_file}: {e.strerror}") from e
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    if any(item.scheme == "tcp" for item in listen) and token is None:
        raise ValueError("a tcp:// listener requires --token-file")

    def pick(flag: object, env_name: str, default: str) -> str:
        return str(flag) if flag is not None else (_env(environ, env_name) or default)

    memory = parse_size(pick(args.memory, "MEMORY", "1G"))
    movable = parse_size(pick(args.movable, "MOVABLE", "0"))
    if memory < 16 * PAGE_SIZE or memory % PAGE_SIZE:
        raise ValueError("--memory must be a multiple of 4 KiB and at least 64 KiB")
    if movable % PAGE_SIZE or movable >= memory:
        raise ValueError("--movable must be a multiple of 4 KiB and smaller than --memory")
    arch = pick(args.arch, "ARCH", "x86_64")
    if arch not in ("x86_64", "arm64", "generic"):
        raise ValueError(f"unknown arch {arch!r}")
    thp = pick(args.thp, "THP", "madvise")
    if thp not in ("always", "madvise", "never"):
        raise ValueError(f"unknown thp policy {thp!r}")
    log_format = pick(args.log_format, "LOG_FORMAT", "console" if stdout_isatty else "json")
    if log_format not in ("json", "console"):
        raise ValueError(f"unknown log format {log_format!r}")
    grace = float(pick(args.grace, "GRACE", "5"))
    session_timeout = float(pick(args.session_timeout, "SESSION_TIMEOUT", "1.0"))
    if grace < 0 or session_timeout <= 0:
        raise ValueError("--grace must be >= 0 and --session-timeout > 0")
    device_texts = args.device or split_device_env(_env(environ, "DEVICE") or "")
    devices = parse_devices(device_texts or [DEFAULT_DEVICE])
    if args.readahead is not None:
        readahead = bool(args.readahead)
    else:
        readahead = (_env(environ, "READAHEAD") or "1").lower() not in ("0", "false", "no", "off")
    if args.fault_retry is not None:
        fault_retry = bool(args.fault_retry)
    else:
        fault_retry = (_env(environ, "FAULT_RETRY") or "1").lower() not in (
            "0",
            "false",
            "no",
            "off",
        )
    if args.unprivileged_userfaultfd is not None:
        unpriv_uffd = bool(args.unprivileged_userfaultfd)
    else:
        unpriv_uffd = (_env(environ, "UNPRIVILEGED_USERFAULTFD") or "0").lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
    dio_gup = pick(args.dio_gup, "DIO_GUP", "fast")
    if dio_gup not in DIO_GUP_MODES:
        raise ValueError(f"unknown O_DIRECT GUP mode {dio_gup!r} (fast or slow)")
    dio_foll = pick(args.dio_foll, "DIO_FOLL", "pin")
    if dio_foll not in DIO_FOLL_MODES:
        raise ValueError(f"unknown O_DIRECT FOLL mode {dio_foll!r} (pin or get)")
    return ServeConfig(
        unprivileged_userfaultfd=unpriv_uffd,
        dio_gup=dio_gup,
        dio_foll=dio_foll,
        devices=devices,
        readahead=readahead,
        fault_retry=fault_retry,
        listen=listen,
        token=token,
        memory_bytes=memory,
        movable_bytes=movable,
        arch=arch,
        thp=thp,
        log_format=log_format,
        grace=grace,
        session_timeout=session_timeout,
        prefault=not (args.no_prefault or _env(environ, "NO_PREFAULT") in ("1", "true", "yes")),
    )
