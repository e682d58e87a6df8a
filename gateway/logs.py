"""Structured logging: JSON lines (or readable text) on stderr, ours and libraries' alike.

Every line logged inside a session carries ``workspace_id`` (bound with structlog's
contextvars, which Trio copies into the tasks a session starts).

The gateway's own events are rendered by structlog and written straight to stderr: going
through the stdlib handler as well (a ``LogRecord``, the handler's lock, the formatter's copy
of the event) cost 50 µs a line against 16 µs, and an attach logs two lines on the path of the
client's first message. Libraries' stdlib records get the same processors and renderer through
the root handler, so both kinds of line look alike.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route structlog and stdlib logging to stderr in the chosen format."""
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Library chatter at info level is noise for operators (every S3 request, every HTTP call).
    for noisy in ("botocore", "aiobotocore", "httpx2", "httpcore2", "hpack"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
