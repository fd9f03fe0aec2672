"""structlog set-up: JSON lines to a file for services, readable console output."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def configure(level: str = "INFO", json_file: Path | None = None, console: bool = True) -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if json_file else getattr(logging, level))
    if console:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(getattr(logging, level))
        h.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                ],
            )
        )
        root.addHandler(h)
    if json_file:
        f = logging.FileHandler(json_file)
        f.setLevel(logging.INFO)
        f.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        root.addHandler(f)
    # nats-py logs every reconnect attempt at error level; ours say enough.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
