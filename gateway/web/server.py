"""Hypercorn (trio worker) run programmatically inside the daemon's own ``trio.run``."""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from gateway.config import Config, split_listen_addr

# How long Hypercorn lets in-flight HTTP requests finish after the shutdown trigger. WebSocket
# clients are already closed by the drain by then.
GRACEFUL_TIMEOUT_SECONDS = 3.0


def hypercorn_config(config: Config, listen_addr: str) -> HypercornConfig:
    """Hypercorn settings derived from ours: message size, pings, dead-client detection."""
    host, port = split_listen_addr(listen_addr)
    settings = HypercornConfig()
    settings.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    settings.websocket_max_message_size = config.ws_max_message_size
    settings.graceful_timeout = GRACEFUL_TIMEOUT_SECONDS
    settings.accesslog = logging.getLogger("hypercorn.access")
    settings.errorlog = logging.getLogger("hypercorn.error")
    if config.ws_ping_interval > 0:
        settings.websocket_ping_interval = config.ws_ping_interval
        # Hypercorn's pings have no pong timeout; a live client answers every ping, so a
        # connection from which nothing arrives for two and a half intervals is dead.
        settings.read_timeout = math.ceil(config.ws_ping_interval * 2.5)
    return settings


class BindError(Exception):
    """The listen address cannot be bound (in use, not local, not permitted)."""


class _ReportStarted:
    """Passes Hypercorn's ``started`` on and remembers that it came (the bind worked)."""

    def __init__(self, task_status: trio.TaskStatus[list[str]]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: list[str]) -> None:
        self.done = True
        self._task_status.started(value)


async def serve_http(
    app: Any,
    settings: HypercornConfig,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set; reports the bound URLs when listening.

    A failure to bind is a ``BindError`` with one sentence naming the address, so the command
    line can say it in one line instead of a traceback.
    """
    reporter = _ReportStarted(task_status)
    try:
        await serve(app, settings, shutdown_trigger=shutdown.wait, task_status=reporter)  # type: ignore[arg-type]
    except (OSError, BaseExceptionGroup) as exc:
        # Hypercorn binds inside its own nurseries, so the OSError may arrive in a group.
        error: BaseException = exc
        if isinstance(exc, BaseExceptionGroup):
            bind_errors, _ = exc.split(OSError)
            error = first_leaf(bind_errors) if bind_errors is not None else exc
        if reporter.done or not isinstance(error, OSError):
            raise
        address = ", ".join(settings.bind)
        raise BindError(f"cannot listen on {address}: {error.strerror or error}") from None


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) group that is not itself a group."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
