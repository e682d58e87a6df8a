"""Serving a fake's ASGI app on a loopback port, the same way for every in-process fake."""

from __future__ import annotations

from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio


async def serve_on_loopback(app: Any, *, task_status: trio.TaskStatus[str]) -> None:
    """Serve ``app`` on ``127.0.0.1:<free port>`` until cancelled; report the base URL."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
        task_status.started(binds[0])
