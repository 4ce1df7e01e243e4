"""`vkernel serve`: the daemon's command line."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Sequence

import anyio

from vkernel.config import build_parser, config_from_args
from vkernel.logs import configure_logging

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Keep glibc from mmap-ing and unmapping every MiB-sized buffer.

    Page data streams in 1 MiB messages; by default each buffer is a fresh mmap that is
    returned to the OS when freed, costing ~250 minor faults per MiB on this kind of machine.
    Both thresholds must be set: setting one disables glibc's dynamic tuning of both.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: keep the allocator's defaults


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options (flags, then VKERNEL_* env), run the daemon, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, os.environ, sys.stdout.isatty())
    except ValueError as e:
        parser.error(str(e))
    configure_logging(cfg.log_format)
    tune_malloc()
    from vkernel.server import serve  # grpc is imported only once the options are good

    return anyio.run(functools.partial(serve, cfg, freeze_gc=True))


if __name__ == "__main__":
    sys.exit(main())
