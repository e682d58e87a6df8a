"""The daemon: one ``trio.run``, one root nursery, and the order in which things stop.

::

    run_daemon
    ├── httpx2.AsyncClient            internal API calls (verifier, agentserver, exec gateway)
    ├── object store                  CODEX_HOME archives
    └── root nursery
        ├── run_heartbeat             replica mode only: this pod's heartbeat, the peers' liveness
        │                             and self-fencing (gateway/replicas/heartbeat.py)
        ├── SessionManager.run        owns every session's nursery (see gateway/sessions/)
        ├── serve_http (Hypercorn)    the ASGI app; per-connection tasks are Hypercorn's;
        │                             a connect owned by another pod is forwarded from its task
        ├── serve_http (metrics)      only when CXG_METRICS_LISTEN_ADDR is set
        └── serve_peer_listener       replica mode only: forwarded connects from peer pods

On SIGTERM/SIGINT: /readyz turns 503, new connects get 503, clients forwarded to other pods
are closed with 1001, every session closes its clients with 1001, stops its child and saves
within CXG_DRAIN_BUDGET; then Hypercorn (and the internal listener) stop; exit 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
from gateway.replicas.deadman import Deadman, open_deadman
from gateway.replicas.forward import HOP_ANSWER_MARGIN, Forwarder
from gateway.replicas.heartbeat import (
    DuplicatePodName,
    HeartbeatState,
    PeerLiveness,
    check_pod_name_free,
    run_heartbeat,
)
from gateway.replicas.ownership import StorePlacement
from gateway.replicas.peer_listener import PeerListener, serve_peer_listener
from gateway.replicas.placement import ChildWatch, Placement, SolePlacement, Unwatched
from gateway.replicas.records import Records, new_write_id
from gateway.sessions.budget import InflightBudget
from gateway.sessions.isolation import ChildIsolation, IsolationMode, UidRange, harden_process
from gateway.sessions.manager import SessionManager
from gateway.sessions.reactor import Reactor
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
    if config.replicas is not None:
        await _require_fenced_store_for_replicas(store, probe)
        metrics.STORE_UNFENCED.set(0)
        log.info("store.fenced", store=store.describe())
        return
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


# Replica mode asks a store that does not answer the start-up probe this many times, with a
# doubling pause between (1 s, 2 s, 4 s), before it refuses to start.
REPLICA_PROBE_ATTEMPTS = 4
REPLICA_PROBE_FIRST_RETRY_SECONDS = 1.0


async def _require_fenced_store_for_replicas(
    store: ObjectStore, probe: Callable[[], Awaitable[list[str]]]
) -> None:
    """Replica mode: the store must be seen to honour conditional writes before anything runs.

    Ownership records and the fencing of saves *are* conditional writes, so no opt-in lifts
    this (``CXG_S3_ALLOW_UNFENCED`` is for a single pod). A store that cannot be asked is
    asked again a few times, then the start is refused as well.
    """
    delay = REPLICA_PROBE_FIRST_RETRY_SECONDS
    for attempt in range(1, REPLICA_PROBE_ATTEMPTS + 1):
        try:
            ignored = await probe()
            break
        except StoreUnavailable as exc:
            log.warning("store.probe_failed", store=store.describe(), error=str(exc))
            if attempt == REPLICA_PROBE_ATTEMPTS:
                raise StoreNotFenced(
                    f"replica mode (CXG_PEER_ADDR) needs to confirm that the object store "
                    f"{store.describe()} honours conditional writes before it serves, and the "
                    f"store could not be asked ({exc}); check the CXG_S3_* settings and the "
                    "store's reachability"
                ) from None
            await trio.sleep(delay)
            delay *= 2
    if ignored:
        raise StoreNotFenced(
            f"replica mode (CXG_PEER_ADDR) needs an object store that honours conditional "
            f"writes, and {store.describe()} ignores them ({'; '.join(ignored)}), which "
            "CXG_S3_ALLOW_UNFENCED cannot lift: use a store that honours them, or run one "
            "replica without CXG_PEER_ADDR"
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
    manager: SessionManager,
    keeper: Deadman | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run_heartbeat(
            replica.records,
            replica.heartbeat,
            replica.liveness,
            fence=manager.fence_all,
            unfence=manager.lift_fence,
            keeper=keeper,
            task_status=task_status,
        )


async def run_daemon(
    config: Config,
    *,
    stop: trio.Event | None = None,
    policy_for: PolicyFactory | None = None,
    placement: Placement | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or, without one, until SIGTERM/SIGINT); then drain.

    ``policy_for`` builds each client's access policy from its session (default: the
    operator's ``CXG_POLICY_*`` settings, bounded to that session's own home). ``placement``
    decides which pod serves each workspace (default: this one, for every workspace).
    """
    try:
        await _run_daemon(config, stop, policy_for, placement, task_status)
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


async def _fence_when_the_keeper_fires(
    scope: trio.CancelScope, deadman: Deadman, manager: SessionManager, interval: float
) -> None:
    """The keeper killed this pod's children (the daemon was frozen past its deadline): fence.

    ``deadman.fired`` is replaced by a fresh event at the first pet after a firing, so the
    watch looks for the next one only once the heartbeat has been renewed since.
    """
    with scope:
        while True:
            fired = deadman.fired
            await fired.wait()
            manager.fence_all("the keeper killed this pod's children: its heartbeat was late")
            while deadman.fired is fired:  # noqa: ASYNC110 - the next pet replaces the event
                await trio.sleep(interval / 4)


@asynccontextmanager
async def _keeper(config: Config, replica: _Replica | None) -> AsyncIterator[Deadman | None]:
    """Replica mode's keeper process (``None`` on a single pod), for as long as the daemon."""
    if replica is None or config.replicas is None:
        yield None
        return
    first_deadline = trio.current_time() + config.replicas.fence_after
    async with open_deadman(
        first_deadline=first_deadline, uid_range=UidRange(*config.child_uid_range)
    ) as deadman:
        yield deadman


@attrs.frozen
class _ServingParts:
    """What ``_run_daemon`` built before the root nursery opens."""

    http: httpx2.AsyncClient
    store: ObjectStore
    preflight: PreflightState
    readiness: Readiness
    replica: _Replica | None
    keeper: Deadman | None


async def _serve(
    config: Config,
    stop: trio.Event | None,
    policy_for: PolicyFactory | None,
    services: SessionServices,
    parts: _ServingParts,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """The root nursery: sessions, the heartbeat, the listeners, the checks; then the drain."""
    replicas, replica, keeper = config.replicas, parts.replica, parts.keeper
    preflight, readiness, store = parts.preflight, parts.readiness, parts.store
    placement = services.placement
    # Every tunnel's and every hop's sockets are served from the reactor's one epoll set.
    reactor = Reactor()
    forwarder = (
        None
        if replicas is None
        else Forwarder(
            replicas,
            answer_timeout=config.child_ready_timeout + HOP_ANSWER_MARGIN,
            reactor=reactor,
            owner_gone=placement.owner_gone,
        )
    )
    async with trio.open_nursery() as root:
        await root.start(reactor.run)
        manager = SessionManager(services)
        heartbeat_scope, keeper_scope = trio.CancelScope(), trio.CancelScope()
        if replica is not None:
            # Before anything is claimed: the first heartbeat and a look at the peers.
            await root.start(_heartbeat_in_scope, heartbeat_scope, replica, manager, keeper)
            if keeper is not None and replicas is not None:
                root.start_soon(
                    _fence_when_the_keeper_fires,
                    keeper_scope,
                    keeper,
                    manager,
                    replicas.heartbeat_interval,
                )
        await root.start(manager.run)
        authenticator = build_authenticator(config, parts.http)
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
            reactor=reactor,
            policy_for=policy_for,
            forwarder=forwarder,
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
        if replicas is not None:
            await root.start(
                serve_peer_listener,
                PeerListener(replicas, manager, endpoint),
                replicas.peer_listen_addr,
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
        # The checks retry until they pass; a store still failing at shutdown must not keep
        # the root nursery open, so they end with the signal watcher.
        checks_scope = trio.CancelScope()
        await root.start(_checks_in_scope, checks_scope, config.codex_bin, store, preflight)
        task_status.started(urls)
        signal_scope = trio.CancelScope()
        if stop is None:
            stop = trio.Event()
            root.start_soon(_in_scope, signal_scope, watch_stop_signals, stop)
        await stop.wait()
        readiness.draining = True
        if forwarder is not None:
            await forwarder.drain()
        await manager.drain()
        # After the drain: the last heartbeat says "stopped", so peers take whatever could
        # not be released at once.
        heartbeat_scope.cancel()
        keeper_scope.cancel()
        http_stopped.set()
        signal_scope.cancel()
        checks_scope.cancel()
        # Last: whatever still relays after the drain falls back to Trio's own waits.
        reactor.close()


async def _run_daemon(
    config: Config,
    stop: trio.Event | None,
    policy_for: PolicyFactory | None,
    placement: Placement | None,
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
            if placement is None:
                placement = replica.placement if replica is not None else SolePlacement()
            # Outside the root nursery: the keeper outlives every session whose child it
            # watches, and ends with the daemon.
            async with _keeper(config, replica) as keeper:
                child_watch: ChildWatch = keeper if keeper is not None else Unwatched()
                await _serve(
                    config,
                    stop,
                    policy_for,
                    SessionServices(
                        config=config,
                        persistence=persistence,
                        credentials=credentials_factory(config, http),
                        executors=executors_factory(config, http, self_command()),
                        inherited_env=dict(os.environ),
                        isolation=isolation,
                        placement=placement,
                        child_watch=child_watch,
                    ),
                    _ServingParts(http, store, preflight, readiness, replica, keeper),
                    task_status,
                )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await store.aclose()
    log.info("daemon.stopped")
