"""The daemon: one ``trio.run``, one root nursery, and the order in which things stop.

::

    run_daemon
    ├── httpx2.AsyncClient            internal API calls (verifier, agentserver, exec gateway)
    ├── object store                  CODEX_HOME archives
    └── root nursery
        ├── run_heartbeat             replica mode only: this pod's heartbeat, the peers' liveness
        │                             and self-fencing (gateway/replicas/heartbeat.py)
        ├── SessionManager.run        owns every session's nursery (see gateway/sessions/)
        ├── serve_http (Hypercorn)    the ASGI app; per-connection tasks are Hypercorn's
        └── serve_http (metrics)      only when CXG_METRICS_LISTEN_ADDR is set

On SIGTERM/SIGINT: /readyz turns 503, new connects get 503, every session closes its clients
with 1001, stops its child and saves within CXG_DRAIN_BUDGET; then Hypercorn stops; exit 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import cast

import attrs
import httpx2
import structlog
import trio

from gateway import metrics
from gateway.auth.authenticators import build_authenticator
from gateway.config import Config
from gateway.preflight import PreflightState, run_preflight
from gateway.replicas.heartbeat import (
    DuplicatePodName,
    HeartbeatState,
    PeerLiveness,
    check_pod_name_free,
    run_heartbeat,
)
from gateway.replicas.ownership import StorePlacement
from gateway.replicas.placement import Placement, SolePlacement
from gateway.replicas.records import Records, new_write_id
from gateway.sessions.budget import InflightBudget
from gateway.sessions.isolation import ChildIsolation, IsolationMode, UidRange, harden_process
from gateway.sessions.manager import SessionManager
from gateway.sessions.session import SessionServices
from gateway.sessions.wiring import credentials_factory, executors_factory, open_persistence
from gateway.store.base import ObjectStore, ReplicaStore, StoreNotFenced, StoreUnavailable
from gateway.version import package_version
from gateway.web.admin import AdminRoutes
from gateway.web.app import Readiness, build_app, build_metrics_app
from gateway.web.server import (
    BindError,
    check_hypercorn_version,
    first_leaf,
    hypercorn_config,
    serve_http,
)
from gateway.web.websocket import PolicyFactory, WebSocketEndpoint

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


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (before, after).

    Every client holds two descriptors (its own and its connection to the child) and every
    session a child's pipes: the common soft default of 1024 (or 256) is reached by one tenant's
    connections long before memory or CPU are, and then other workspaces' starts fail.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("daemon.open_files_limit_unchanged", soft=soft, hard=hard, error=str(exc))
            return soft, soft
        log.info("daemon.open_files_limit", soft_before=soft, soft=target)
        return soft, target
    return soft, soft


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Buffers at least this large get their own mapping, returned to the kernel when freed.
_MMAP_THRESHOLD_BYTES = 256 * 1024


def keep_large_buffers_out_of_the_heap() -> bool:
    """Make glibc map every large allocation on its own, so freed frames leave RSS at once.

    By default glibc raises its mmap threshold each time a mapped block is freed, after which
    1 MiB frame buffers come from the heap, whose freed space is kept: a burst of large client
    frames would leave the daemon hundreds of MiB larger for good. Returns whether it applied
    (not on a libc without ``mallopt``).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    fixed: bool = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    trimmed: bool = mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    return fixed and trimmed


def _warn_about_placement(config: Config) -> None:
    if os.getpid() == 1:
        # Orphans of ended sessions reparent to PID 1; the daemon does not reap them.
        log.warning(
            "daemon.running_as_pid_1",
            hint="run under an init that reaps orphans (the image's tini, or docker run --init)",
        )
    if Path(config.tmp_root).resolve().is_relative_to("/tmp"):
        log.warning(
            "config.tmp_root_under_tmp",
            tmp_root=config.tmp_root,
            hint="codex refuses helper aliases under /tmp; mount an emptyDir elsewhere "
            "(e.g. /var/lib/codex-app-gateway) and point CXG_TMP_ROOT at it",
        )
    if config.exec_gateway is None:
        log.warning(
            "config.no_executors",
            hint="the CXG_EXEC_GATEWAY_* variables and CXG_CAPTOKEN_HMAC_SECRET are unset: every "
            "session starts without executors (no remote shell tools)",
        )
    if config.s3 is None:
        log.warning(
            "config.local_store",
            directory=config.local_store_dir,
            hint="CODEX_HOME archives are kept on this pod's disk only; set CXG_S3_BUCKET",
        )


async def check_store_fencing(store: ObjectStore, config: Config) -> None:
    """Refuse to serve on a store that ignores conditional writes, unless opted in.

    Fencing (a stale session never overwrites a newer snapshot) rests on the store applying
    ``If-None-Match``/``If-Match``; some S3-compatible servers silently ignore them.
    """
    probe = getattr(store, "probe_conditional_writes", None)
    if probe is None or config.s3 is None:
        return  # the local store fences under its own lock
    try:
        ignored: list[str] = await probe()
    except StoreUnavailable as exc:
        # Sessions answer 503 until the store is back; refusing to start would only add a
        # crash loop. The probe runs again at the next start.
        log.warning("store.probe_failed", store=store.describe(), error=str(exc))
        return
    if not ignored:
        metrics.STORE_UNFENCED.set(0)
        log.info("store.fenced", store=store.describe())
        return
    what = "; ".join(ignored)
    if not config.s3.allow_unfenced:
        raise StoreNotFenced(
            f"the object store {store.describe()} ignores conditional writes ({what}), so a "
            "stale session could overwrite newer history; use a store that honours them, or "
            "set CXG_S3_ALLOW_UNFENCED=true to run without fencing"
        )
    metrics.STORE_UNFENCED.set(1)
    log.warning(
        "store.unfenced",
        store=store.describe(),
        ignored=ignored,
        hint="CXG_S3_ALLOW_UNFENCED=true: saves are not fenced; run one replica only",
    )


async def _in_scope(
    scope: trio.CancelScope, func: Callable[[trio.Event], Awaitable[None]], stop: trio.Event
) -> None:
    with scope:
        await func(stop)


async def _checks_in_scope(
    scope: trio.CancelScope,
    codex_bin: str,
    store: ObjectStore,
    state: PreflightState,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run_preflight(codex_bin, store, state, task_status=task_status)


async def _heartbeat_in_scope(
    scope: trio.CancelScope,
    replica: _Replica,
    fence: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run_heartbeat(
            replica.records,
            replica.heartbeat,
            replica.liveness,
            fence=fence,
            task_status=task_status,
        )


async def run_daemon(
    config: Config,
    *,
    stop: trio.Event | None = None,
    policy_for: PolicyFactory | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or, without one, until SIGTERM/SIGINT); then drain.

    ``policy_for`` builds each client's access policy from its session (default: the
    operator's ``CXG_POLICY_*`` settings, bounded to that session's own home).
    """
    try:
        await _run_daemon(config, stop, policy_for, task_status)
    except BaseExceptionGroup as group:
        # A bind failure is the operator's to fix: one sentence, not a group of tracebacks.
        bind_errors, _ = group.split(BindError)
        if bind_errors is not None:
            raise first_leaf(bind_errors) from None
        # Another process serves this pod's name: one sentence, exit non-zero.
        duplicates, _ = group.split(DuplicatePodName)
        if duplicates is not None:
            raise first_leaf(duplicates) from None
        raise


@attrs.define
class _Replica:
    """Replica mode's parts, built before the root nursery opens."""

    records: Records
    heartbeat: HeartbeatState
    liveness: PeerLiveness
    placement: StorePlacement


async def _open_replica(config: Config, store: ObjectStore) -> _Replica | None:
    """Replica mode's parts (``None`` without ``CXG_PEER_ADDR``); refuses a taken pod name."""
    settings = config.replicas
    if settings is None:
        return None
    if not hasattr(store, "write_small"):
        # Config refuses this already; the local directory store is one pod's disk.
        raise StoreNotFenced("replica mode (CXG_PEER_ADDR) needs the S3 store: set CXG_S3_BUCKET")
    replica_store = cast(ReplicaStore, store)
    records = Records(replica_store)
    # A process that finds its pod's heartbeat still live refuses to start.
    etag = await check_pod_name_free(records, settings)
    heartbeat = HeartbeatState(settings, incarnation=new_write_id(), etag=etag)
    liveness = PeerLiveness(settings.takeover_after)
    placement = StorePlacement(settings, replica_store, liveness, heartbeat)
    log.info(
        "replica.mode",
        pod=settings.pod_name,
        peer_addr=settings.peer_addr,
        incarnation=heartbeat.incarnation,
        takeover_after_seconds=settings.takeover_after,
    )
    return _Replica(records, heartbeat, liveness, placement)


def _fence_sessions(manager: SessionManager, root: trio.Nursery, reason: str) -> None:
    """Self-fencing: this pod may no longer own anything; stop every session now.

    ``SessionManager.fence_all`` (children killed, clients closed 1012, no final save) is the
    intended call; until it exists, every session is stopped through ``restart`` — its final
    save is still safe, as a commit is refused once another pod holds the workspace.
    """
    fence_all: Callable[[str], None] | None = getattr(manager, "fence_all", None)
    if fence_all is not None:
        fence_all(reason)
        return
    log.error("replica.fencing_sessions", reason=reason, sessions=len(manager.describe()))
    for session in manager.describe():
        root.start_soon(manager.restart, session["workspaceId"])


async def _run_daemon(
    config: Config,
    stop: trio.Event | None,
    policy_for: PolicyFactory | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    check_hypercorn_version()
    raise_open_files_limit()
    keep_large_buffers_out_of_the_heap()
    harden_process()
    _warn_about_placement(config)
    isolation = ChildIsolation.from_settings(
        IsolationMode(config.child_isolation), UidRange(*config.child_uid_range)
    )
    isolation.prepare_roots(
        Path(config.tmp_root), Path(config.local_store_dir) if config.s3 is None else None
    )
    preflight = PreflightState()
    readiness = Readiness(preflight=preflight)
    async with httpx2.AsyncClient() as http:
        persistence = open_persistence(config)
        store = persistence.store
        try:
            await check_store_fencing(store, config)
            replica = await _open_replica(config, store)
            placement: Placement = replica.placement if replica is not None else SolePlacement()
            services = SessionServices(
                config=config,
                persistence=persistence,
                credentials=credentials_factory(config, http),
                executors=executors_factory(config, http, self_command()),
                inherited_env=dict(os.environ),
                isolation=isolation,
                placement=placement,
            )
            async with trio.open_nursery() as root:
                manager = SessionManager(services)
                heartbeat_scope = trio.CancelScope()
                if replica is not None:
                    # Before anything is claimed: the first heartbeat and look at the peers.
                    await root.start(
                        _heartbeat_in_scope,
                        heartbeat_scope,
                        replica,
                        partial(_fence_sessions, manager, root),
                    )
                await root.start(manager.run)
                authenticator = build_authenticator(config, http)
                app = build_app(
                    AdminRoutes(
                        manager,
                        authenticator,
                        config.admin_secret,
                        versions=lambda: {
                            "gateway": package_version(),
                            "codex": preflight.codex_version,
                        },
                        placement=placement,
                    ),
                    readiness,
                    metrics=config.metrics_listen_addr is None,
                )
                endpoint = WebSocketEndpoint(
                    manager,
                    authenticator,
                    config,
                    budget=InflightBudget(config.ws_inflight_budget),
                    policy_for=policy_for,
                )
                http_stopped = trio.Event()
                urls: list[str] = await root.start(
                    partial(serve_http, upgrades=endpoint.serve),
                    app,
                    hypercorn_config(config, config.listen_addr),
                    config.listen_addr,
                    http_stopped,
                )
                if config.metrics_listen_addr:
                    await root.start(
                        serve_http,
                        build_metrics_app(),
                        hypercorn_config(config, config.metrics_listen_addr),
                        config.metrics_listen_addr,
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
                # The checks retry until they pass; a store still failing at shutdown must not
                # keep the root nursery open, so they end with the signal watcher.
                checks_scope = trio.CancelScope()
                await root.start(_checks_in_scope, checks_scope, config.codex_bin, store, preflight)
                task_status.started(urls)
                signal_scope = trio.CancelScope()
                if stop is None:
                    stop = trio.Event()
                    root.start_soon(_in_scope, signal_scope, watch_stop_signals, stop)
                await stop.wait()
                readiness.draining = True
                placement.set_draining()
                await manager.drain()
                # After the drain: the last heartbeat says "stopped", so peers take whatever
                # could not be released at once.
                heartbeat_scope.cancel()
                http_stopped.set()
                signal_scope.cancel()
                checks_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await store.aclose()
    log.info("daemon.stopped")
