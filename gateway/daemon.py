"""The daemon: one ``trio.run``, one root nursery, and the order in which things stop.

::

    run_daemon
    ├── httpx2.AsyncClient            internal API calls (verifier, agentserver, exec gateway)
    ├── object store                  CODEX_HOME archives
    └── root nursery
        ├── SessionManager.run        owns every session's nursery (see gateway/sessions/)
        ├── serve_http (Hypercorn)    the ASGI app; per-connection tasks are Hypercorn's
        └── serve_http (metrics)      only when CXG_METRICS_LISTEN_ADDR is set

On SIGTERM/SIGINT: /readyz turns 503, new connects get 503, every session closes its clients
with 1001, stops its child and saves within CXG_DRAIN_BUDGET; then Hypercorn stops; exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import structlog
import trio

from gateway.auth.authenticators import build_authenticator
from gateway.config import Config
from gateway.preflight import PreflightState, package_version, run_preflight
from gateway.sessions.manager import SessionManager
from gateway.sessions.session import SessionServices
from gateway.sessions.wiring import credentials_factory, executors_factory, open_persistence
from gateway.web.admin import AdminRoutes
from gateway.web.app import Readiness, build_app, build_metrics_app
from gateway.web.hypercorn_fixes import install_hypercorn_fixes
from gateway.web.server import BindError, first_leaf, hypercorn_config, serve_http
from gateway.web.websocket import WebSocketEndpoint

log = structlog.get_logger(__name__)


def self_command() -> tuple[str, ...]:
    """How codex runs this gateway's own subcommands (env-mcp): this interpreter, this package."""
    return (sys.executable, "-m", "gateway")


async def watch_stop_signals(stop: trio.Event) -> None:
    """Set ``stop`` on SIGTERM/SIGINT; later signals are logged, not fatal, while draining."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.warning("daemon.signal_while_draining", signal=name)
            else:
                log.info("daemon.stop_signal", signal=name)
                stop.set()


def _warn_about_placement(config: Config) -> None:
    if Path(config.tmp_root).resolve().is_relative_to("/tmp"):
        log.warning(
            "config.tmp_root_under_tmp",
            tmp_root=config.tmp_root,
            hint="codex refuses helper aliases under /tmp; mount an emptyDir elsewhere "
            "(e.g. /var/lib/codex-app-gateway) and point CXG_TMP_ROOT at it",
        )
    if config.s3 is None:
        log.warning(
            "config.local_store",
            directory=config.local_store_dir,
            hint="CODEX_HOME archives are kept on this pod's disk only; set CXG_S3_BUCKET",
        )


async def _in_scope(
    scope: trio.CancelScope, func: Callable[[trio.Event], Awaitable[None]], stop: trio.Event
) -> None:
    with scope:
        await func(stop)


async def run_daemon(
    config: Config,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or, without one, until SIGTERM/SIGINT); then drain."""
    try:
        await _run_daemon(config, stop, task_status)
    except BaseExceptionGroup as group:
        # A bind failure is the operator's to fix: one sentence, not a group of tracebacks.
        bind_errors, _ = group.split(BindError)
        if bind_errors is not None:
            raise first_leaf(bind_errors) from None
        raise


async def _run_daemon(
    config: Config, stop: trio.Event | None, task_status: trio.TaskStatus[list[str]]
) -> None:
    install_hypercorn_fixes()
    _warn_about_placement(config)
    preflight = PreflightState()
    readiness = Readiness(preflight=preflight)
    async with httpx2.AsyncClient() as http:
        persistence = open_persistence(config)
        store = persistence.store
        try:
            services = SessionServices(
                config=config,
                persistence=persistence,
                credentials=credentials_factory(config, http),
                executors=executors_factory(config, http, self_command()),
                inherited_env=dict(os.environ),
            )
            async with trio.open_nursery() as root:
                manager: SessionManager = await root.start(SessionManager(services).run)
                authenticator = build_authenticator(config, http)
                app = build_app(
                    WebSocketEndpoint(manager, authenticator, config.allowed_origins),
                    AdminRoutes(
                        manager,
                        authenticator,
                        config.admin_secret,
                        versions=lambda: {
                            "gateway": package_version(),
                            "codex": preflight.codex_version,
                        },
                    ),
                    readiness,
                    metrics=config.metrics_listen_addr is None,
                )
                http_stopped = trio.Event()
                urls: list[str] = await root.start(
                    serve_http, app, hypercorn_config(config, config.listen_addr), http_stopped
                )
                if config.metrics_listen_addr:
                    await root.start(
                        serve_http,
                        build_metrics_app(),
                        hypercorn_config(config, config.metrics_listen_addr),
                        http_stopped,
                    )
                readiness.serving = True
                log.info(
                    "daemon.serving",
                    urls=urls,
                    version=package_version(),
                    codex_bin=config.codex_bin,
                    store=store.describe(),
                )
                await root.start(run_preflight, config.codex_bin, store, preflight)
                task_status.started(urls)
                signal_scope = trio.CancelScope()
                if stop is None:
                    stop = trio.Event()
                    root.start_soon(_in_scope, signal_scope, watch_stop_signals, stop)
                await stop.wait()
                readiness.draining = True
                await manager.drain()
                http_stopped.set()
                signal_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await store.aclose()
    log.info("daemon.stopped")
