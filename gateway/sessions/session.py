"""One workspace's session: a nursery that owns its codex child and everything around it.

::

    Session.run
    ├── prepare: private 0700 directories, restore CODEX_HOME, model credentials, config.toml
    └── nursery (cancelling it stops the session)
        ├── run_codex_child        the child process and its stdout/stderr relay
        ├── _watch_idle            stops the session after CXG_IDLE_SHUTDOWN without frames
        ├── _checkpoints           periodic consistent snapshots to the store
        ├── credentials.keep_fresh the model token, refreshed in place
        └── ClientRelay.run (N)    one per attached client (started by attach_client)
    then: clients closed with the stop reason's code, child stopped (SIGTERM, grace, SIGKILL),
    final save; the local directory is deleted only after the save succeeded.
"""

from __future__ import annotations

import enum
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import trio

from gateway import metrics
from gateway.codex_home.config_toml import CodexConfig, McpServer, ModelProvider, render_config_toml
from gateway.codex_home.persistence import (
    Generation,
    HostileArchive,
    Persistence,
    StaleSnapshot,
)
from gateway.codex_home.relocate import relocate_codex_home
from gateway.config import Config
from gateway.policy import ClientPolicy
from gateway.sessions.child import ChildSpec, CodexChild, build_child_env, run_codex_child
from gateway.sessions.relay import AsgiReceive, AsgiSend, ClientRelay

log = structlog.get_logger(__name__)


class StopReason(enum.Enum):
    """Why a session ended, and what its clients are told (close code, reason)."""

    IDLE = (1001, "session idle")
    RESTART = (1012, "session restarted by request")
    DRAIN = (1001, "gateway shutting down")
    CHILD_EXITED = (1011, "codex app-server exited")
    START_FAILED = (1011, "session failed to start")
    SUPERSEDED = (1012, "a newer snapshot of this workspace exists elsewhere")

    @property
    def close_code(self) -> int:
        """The WebSocket close code attached clients receive."""
        return self.value[0]

    @property
    def close_reason(self) -> str:
        """The close reason attached clients receive."""
        return self.value[1]


class SessionState(enum.Enum):
    """Where a session is in its life (shown by ``GET /admin/sessions``)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SAVING = "saving"
    STOPPED = "stopped"


class SessionStartError(Exception):
    """The session could not start; ``status`` is the HTTP status the connect gets."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class ModelCredentials(Protocol):
    """What a session needs from its model-credentials keeper."""

    async def prime(self) -> None:
        """Obtain the first credential before the child starts."""

    def provider(self) -> ModelProvider:
        """The provider block for config.toml."""
        ...

    def child_env(self) -> dict[str, str]:
        """Environment variables the child needs for credentials (ideally none)."""
        ...

    async def keep_fresh(self) -> None:
        """Keep the credential fresh for the life of the session."""


CredentialsFactory = Callable[[str, Path], ModelCredentials]
ExecutorsFactory = Callable[[str], Awaitable[tuple[McpServer, ...]]]


@attrs.define
class SessionServices:
    """What the daemon gives every session."""

    config: Config
    persistence: Persistence
    credentials: CredentialsFactory
    executors: ExecutorsFactory
    inherited_env: dict[str, str] = attrs.field(repr=False)


@attrs.define
class SessionDirectories:
    """A session's private directories under ``CXG_TMP_ROOT/<workspace>``."""

    root: Path
    codex_home: Path
    runtime: Path
    home: Path

    @classmethod
    def for_workspace(cls, tmp_root: Path, workspace_id: str) -> SessionDirectories:
        """The layout for ``workspace_id``."""
        root = tmp_root / workspace_id
        return cls(
            root=root, codex_home=root / "codex-home", runtime=root / "run", home=root / "home"
        )

    def create(self) -> None:
        """Create the directories 0700 whatever the umask (codex and its tools run as us)."""
        for path in (self.root, self.codex_home, self.runtime, self.home):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)

    def remove(self) -> None:
        """Delete everything (only after a successful save)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def set_aside(self) -> Path:
        """Move the directory to ``<tmp root>/.orphaned/`` for an operator; never delete it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.root.parent / ".orphaned" / f"{self.root.name}-{stamp}-{time.time_ns()}"
        aside.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.rename(aside)
        return aside


class Session:
    """One workspace's child and everything its nursery owns; see the module docstring."""

    def __init__(
        self,
        workspace_id: str,
        services: SessionServices,
        directories: SessionDirectories,
        *,
        adopted_generation: Generation | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self._services = services
        self._config = services.config
        self.directories = directories
        # A home adopted from a stopped, unsaved session is used as is instead of restored.
        self._adopted = adopted_generation
        self.generation = adopted_generation or Generation(stored=None)
        self.state = SessionState.STARTING
        self.started_at = time.time()
        self.ready = trio.Event()
        self.finished = trio.Event()
        self.start_error: SessionStartError | None = None
        self.stop_reason: StopReason | None = None
        self.child: CodexChild | None = None
        self.last_activity = trio.current_time()
        self.last_checkpoint: float | None = None
        self.last_save_error: str | None = None
        self.saved = False
        self.superseded = False
        self._clients: set[ClientRelay] = set()
        self._nursery: trio.Nursery | None = None
        self._save_lock = trio.Lock()
        self._final_save_scope = trio.CancelScope(shield=True)

    # -- what the manager and the web layer call ------------------------------------------

    @property
    def client_count(self) -> int:
        """Clients currently attached."""
        return len(self._clients)

    def touch(self) -> None:
        """Record activity (a frame in either direction)."""
        self.last_activity = trio.current_time()

    def stop(self, reason: StopReason) -> None:
        """Ask the session to stop; it closes clients, stops the child and saves."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.state is SessionState.RUNNING:
            self.state = SessionState.STOPPING
        for relay in self._clients:
            relay.close_code, relay.close_reason = reason.close_code, reason.close_reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def attach_client(self, receive: AsgiReceive, send: AsgiSend) -> ClientRelay:
        """Start relaying a client; returns once the client's WebSocket is accepted."""
        if self._nursery is None or self.child is None or self.stop_reason is not None:
            raise SessionStartError("session is stopping; reconnect in a moment")
        relay = ClientRelay(
            receive,
            send,
            on_activity=self.touch,
            max_message_size=self._config.ws_max_message_size,
            policy=ClientPolicy.for_session(
                self._config,
                home=str(self.directories.home),
                codex_home=str(self.directories.codex_home),
            ),
        )
        self._clients.add(relay)
        metrics.CLIENTS_ATTACHED.inc()
        try:
            await self._nursery.start(
                self._run_client, relay, self.child.ws_url, [self.child.authorization_header()]
            )
        except BaseException:
            # _run_client's own cleanup may already have forgotten it.
            if relay in self._clients:
                self._clients.discard(relay)
                metrics.CLIENTS_ATTACHED.dec()
            raise
        self.touch()
        return relay

    async def _run_client(
        self,
        relay: ClientRelay,
        url: str,
        headers: list[tuple[str, str]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # This task's context is copied from the web handler's: name the workspace in its logs.
        structlog.contextvars.bind_contextvars(workspace_id=self.workspace_id)
        try:
            await relay.run(url, headers, task_status=task_status)
        finally:
            if relay in self._clients:
                self._clients.discard(relay)
                metrics.CLIENTS_ATTACHED.dec()

    def describe(self) -> dict[str, Any]:
        """The admin listing's view of this session."""
        return {
            "workspaceId": self.workspace_id,
            "pid": self.child.pid if self.child else None,
            "state": self.state.value,
            "startedAt": _iso(self.started_at),
            "lastActivityAt": _iso(time.time() - (trio.current_time() - self.last_activity)),
            "clients": self.client_count,
            "lastCheckpointAt": _iso(self.last_checkpoint) if self.last_checkpoint else None,
            "lastSaveError": self.last_save_error,
        }

    # -- the session's life -----------------------------------------------------------------

    async def run(self) -> None:
        """Run the session to its end (started by the manager in its nursery)."""
        structlog.contextvars.bind_contextvars(workspace_id=self.workspace_id)
        started = trio.current_time()
        try:
            credentials = await self._prepare()
        except SessionStartError as exc:
            self._fail_start(exc)
            return
        except Exception as exc:
            log.exception("session.prepare_failed")
            self._fail_start(SessionStartError(f"session preparation failed: {exc}"))
            return
        try:
            await self._run_nursery(credentials, started)
        finally:
            await self._finish()

    def _fail_start(self, error: SessionStartError) -> None:
        log.warning("session.start_failed", error=str(error))
        metrics.SESSION_STARTS.labels(result="failed").inc()
        self.start_error = error
        self.stop_reason = self.stop_reason or StopReason.START_FAILED
        self.state = SessionState.STOPPED
        self.ready.set()
        # Nothing was restored into the directory that is not still in the store.
        if self._adopted is None:
            self.directories.remove()
        self.saved = self._adopted is None
        self.finished.set()

    async def _prepare(self) -> ModelCredentials:
        services = self._services
        await trio.to_thread.run_sync(self.directories.create)
        if self._adopted is None:
            try:
                self.generation = await services.persistence.restore(
                    self.workspace_id, self.directories.codex_home
                )
            except Exception as exc:
                raise _restore_error(exc) from None
            await trio.to_thread.run_sync(relocate_codex_home, self.directories.codex_home)
        credentials = services.credentials(self.workspace_id, self.directories.runtime)
        await credentials.prime()
        mcp_servers = await services.executors(self.workspace_id)
        config_path = self.directories.codex_home / "config.toml"
        existing = config_path.read_text() if config_path.exists() else None
        rendered = render_config_toml(
            CodexConfig(
                model=self._config.model.model,
                provider=credentials.provider(),
                trusted_paths=self._config.project_trusted_paths,
                mcp_servers=mcp_servers,
            ),
            existing,
        )
        config_path.write_text(rendered)
        config_path.chmod(0o600)
        return credentials

    async def _run_nursery(self, credentials: ModelCredentials, started: float) -> None:
        config = self._config
        env = build_child_env(
            self._services.inherited_env,
            codex_home=self.directories.codex_home,
            home=self.directories.home,
            extra=credentials.child_env(),
        )
        spec = ChildSpec(
            codex_bin=config.codex_bin,
            codex_home=self.directories.codex_home,
            env=env,
            cwd=self.directories.home,
            ready_timeout=config.child_ready_timeout,
            stop_grace=config.child_stop_grace,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.stop_reason is not None:
                    nursery.cancel_scope.cancel()
                try:
                    self.child = await nursery.start(self._supervise_child, spec)
                except Exception as exc:
                    self._fail_start_after_restore(
                        SessionStartError(f"codex app-server failed to start: {exc}")
                    )
                    nursery.cancel_scope.cancel()
                    return
                self.state = SessionState.RUNNING
                self.touch()
                metrics.SESSION_STARTS.labels(result="started").inc()
                metrics.SESSION_START_SECONDS.observe(trio.current_time() - started)
                metrics.SESSIONS_ACTIVE.inc()
                log.info("session.started", pid=self.child.pid)
                self.ready.set()
                nursery.start_soon(self._watch_idle)
                nursery.start_soon(credentials.keep_fresh)
                if config.checkpoint_interval > 0:
                    nursery.start_soon(self._checkpoints)
        finally:
            if self.state in (SessionState.RUNNING, SessionState.STOPPING):
                metrics.SESSIONS_ACTIVE.dec()
            self._nursery = None

    def _fail_start_after_restore(self, error: SessionStartError) -> None:
        log.warning("session.start_failed", error=str(error))
        metrics.SESSION_STARTS.labels(result="failed").inc()
        self.start_error = error
        self.stop_reason = StopReason.START_FAILED
        self.ready.set()

    async def _supervise_child(
        self, spec: ChildSpec, *, task_status: trio.TaskStatus[CodexChild]
    ) -> None:
        status = await run_codex_child(spec, task_status=task_status)
        # Reaching here means the child exited on its own: the session ends with it.
        log.warning("session.child_exited", status=status)
        self.stop(StopReason.CHILD_EXITED)

    async def _watch_idle(self) -> None:
        idle = self._config.idle_shutdown
        while True:
            deadline = self.last_activity + idle
            if trio.current_time() >= deadline:
                log.info("session.idle", idle_seconds=idle)
                self.stop(StopReason.IDLE)
                return
            await trio.sleep_until(max(deadline, trio.current_time() + 0.05))

    async def _checkpoints(self) -> None:
        while True:
            await trio.sleep(self._config.checkpoint_interval)
            await self.save(kind="checkpoint")
            if self.superseded:
                self.stop(StopReason.SUPERSEDED)
                return

    async def save(self, *, kind: str) -> bool:
        """Save CODEX_HOME now; returns whether it succeeded (failures are recorded, not raised)."""
        async with self._save_lock:
            start = trio.current_time()
            previous = self.generation
            try:
                self.generation = await self._services.persistence.save(
                    self.workspace_id, self.directories.codex_home, self.generation
                )
            except StaleSnapshot as exc:
                # Another writer (a newer session elsewhere) owns the workspace now; writing
                # again can never succeed and must not be tried.
                self.superseded = True
                self.last_save_error = f"superseded: {exc}"
                metrics.SAVES.labels(kind=kind, result="stale").inc()
                log.error("session.superseded", kind=kind, error=str(exc))
                return False
            except Exception as exc:
                self.last_save_error = f"{type(exc).__name__}: {exc}"
                metrics.SAVES.labels(kind=kind, result="failed").inc()
                log.error("session.save_failed", kind=kind, error=self.last_save_error)
                return False
            uploaded = self.generation.stored != previous.stored
            metrics.SAVES.labels(kind=kind, result="ok" if uploaded else "unchanged").inc()
            if uploaded and self.generation.size:
                metrics.SAVE_BYTES.labels(kind=kind).inc(self.generation.size)
            metrics.SAVE_SECONDS.labels(kind=kind).observe(trio.current_time() - start)
            self.last_checkpoint = time.time()
            self.last_save_error = None
            return True

    async def _finish(self) -> None:
        """Make sure the child is gone and save; retried until it succeeds or is given up.

        The save runs in its own shielded scope: cancelling the session does not abandon it.
        Only ``abandon_final_save`` (drain budget exhausted, or a new session adopting this
        home) ends the retries, and then the directory stays on disk.
        """
        reason = self.stop_reason or StopReason.CHILD_EXITED
        self.stop_reason = reason
        self.state = SessionState.SAVING
        metrics.SESSION_STOPS.labels(reason=reason.name.lower()).inc()
        stop_started = trio.current_time()
        if reason is StopReason.START_FAILED and self._adopted is None:
            # The child never ran: the store still holds exactly what was restored.
            self.saved = True
        else:
            with self._final_save_scope:
                delay = 1.0
                while not self.superseded and not await self.save(kind="final"):
                    metrics.UNSAVED_HOMES.inc()
                    try:
                        await trio.sleep(delay)
                    finally:
                        metrics.UNSAVED_HOMES.dec()
                    delay = min(delay * 2, 60.0)
                self.saved = not self.superseded
        metrics.SESSION_STOP_SECONDS.observe(trio.current_time() - stop_started)
        if self.saved:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.directories.remove)
            log.info("session.stopped", reason=reason.name.lower())
        elif self.superseded:
            with trio.CancelScope(shield=True):
                kept = await trio.to_thread.run_sync(self.directories.set_aside)
            log.error("session.stopped_superseded", kept_at=str(kept))
        else:
            log.error(
                "session.stopped_unsaved",
                reason=reason.name.lower(),
                kept_at=str(self.directories.codex_home),
                error=self.last_save_error,
            )
        self.state = SessionState.STOPPED
        self.ready.set()
        self.finished.set()

    @property
    def unsaved(self) -> bool:
        """Stopped, but the final save has not succeeded yet (retries under way)."""
        return self.state is SessionState.SAVING and self.last_save_error is not None

    def abandon_final_save(self) -> None:
        """Stop retrying the final save; the directory is kept on disk as it is."""
        self._final_save_scope.cancel()


def _restore_error(exc: Exception) -> SessionStartError:
    if isinstance(exc, HostileArchive):
        return SessionStartError(str(exc), status=500)
    return SessionStartError(f"cannot restore the workspace's CODEX_HOME: {exc}")


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
