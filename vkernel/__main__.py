"""`vkernel serve`: the daemon's command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import anyio

from vkernel.config import build_parser, config_from_args
from vkernel.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options (flags, then VKERNEL_* env), run the daemon, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, os.environ, sys.stdout.isatty())
    except ValueError as e:
        parser.error(str(e))
    configure_logging(cfg.log_format)
    from vkernel.server import serve  # grpc is imported only once the options are good

    return anyio.run(serve, cfg)


if __name__ == "__main__":
    sys.exit(main())
