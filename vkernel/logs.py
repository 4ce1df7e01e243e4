"""structlog set-up: JSON lines (or a console renderer), stdlib logging routed through it.

vkernel's own events go straight from structlog to stdout (no stdlib logging machinery on the
hot path: one ``rpc_finished`` line per call must stay cheap); third-party stdlib logging
(grpc, anyio, asyncio) is rendered by the same processors via ProcessorFormatter.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Configure structlog and the stdlib root logger once, at daemon start."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
