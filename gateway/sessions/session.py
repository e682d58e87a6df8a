"""One workspace's session: a nursery that owns its codex child and everything around it.

::

    Session.run                    started with nursery.start(); started(session) once ready,
    │                              started(SessionStartError) if it cannot start
    ├── prepare: private 0700 directories, restore CODEX_HOME, model credentials, config.toml
    └── nursery (cancelling it stops the session)
        ├── serve_executor_channel env-mcp's private socket: live executors, per-call tokens
        │                          (multiplexed layout only; started before the child)
        ├── run_codex_child        the child process and its stdout/stderr relay
        ├── _watch_idle            stops it after CXG_IDLE_SHUTDOWN without clients or turns
        ├── _checkpoints           periodic consistent snapshots to the store
        ├── credentials.keep_fresh the model token, refreshed in place
        └── ClientRelay.run (N)    one per attached client (opened by the caller of
                                   attach_client, then started by it)
    then: clients closed with the stop reason's code, child stopped (SIGTERM, grace, SIGKILL),
    final save (``Saver``); the local directory is deleted only after the save succeeded.

The session's life ends with one frozen ``Outcome`` (``gateway.sessions.outcome``): why it
stopped, and whether its home is ``Saved``, ``Superseded`` (set aside), ``Fenced`` (stopped at
once without a save, set aside) or ``Unsaved`` (kept for the workspace's next session to
adopt). The manager decides from that alone.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import trio

from gateway import metrics
from gateway.codex_home.config_toml import CodexConfig, ModelProvider, render_config_toml
from gateway.codex_home.persistence import HostileArchive, Persistence, ReadAs
from gateway.config import Config
from gateway.envmcp.channel import SOCKET_NAME
from gateway.executor_directory import ExecutorDirectory, ExecutorSetup
from gateway.replicas.placement import (
    ChildWatch,
    OwnedElsewhere,
    Placement,
    SolePlacement,
    Unwatched,
)
from gateway.sessions.child import ChildSpec, CodexChild, build_child_env, run_codex_child
from gateway.sessions.directories import SessionDirectories
from gateway.sessions.executor_channel import descends_from, serve_executor_channel
from gateway.sessions.isolation import ChildIdentity, ChildIsolation, IsolationError, UidRange
from gateway.sessions.outcome import (
    Fenced,
    Outcome,
    Saved,
    SaveResult,
    SessionStartError,
    SessionState,
    StopReason,
    Superseded,
    Unsaved,
)
from gateway.sessions.process_tree import SessionTree
from gateway.sessions.relay import ClientRelay, spare_connection
from gateway.sessions.saver import FinalSave, Saver
from gateway.sessions.sockets import close_socket
from gateway.sessions.turns import child_is_busy

log = structlog.get_logger(__name__)

# How long the idle watch waits for the child to say whether a turn is running.
IDLE_CHECK_SECONDS = 10.0


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
# (workspace id, the executor channel's socket path) → the session's executors.
ExecutorsFactory = Callable[[str, Path], Awaitable[ExecutorSetup]]


@attrs.define
class SessionServices:
    """What the daemon gives every session."""

    config: Config
    persistence: Persistence
    credentials: CredentialsFactory
    executors: ExecutorsFactory
    inherited_env: dict[str, str] = attrs.field(repr=False)
    isolation: ChildIsolation = attrs.field(factory=lambda: ChildIsolation(False, UidRange(1, 1)))
    # Which pod serves each workspace (replica mode); one pod owns everything otherwise.
    placement: Placement = attrs.field(factory=SolePlacement)
    # Replica mode's self-fencing keeper, told about every child (nothing on a single pod).
    child_watch: ChildWatch = attrs.field(factory=Unwatched)


class Session:
    """One workspace's child and everything its nursery owns; see the module docstring."""

    def __init__(
        self,
        workspace_id: str,
        services: SessionServices,
        directories: SessionDirectories,
        *,
        adopted: Unsaved | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self._services = services
        self._config = services.config
        self.directories = directories
        # A home adopted from a stopped, unsaved session is used as is instead of restored.
        self._saver = Saver(
            workspace_id,
            services.persistence,
            directories.codex_home,
            adopted,
            recorded_home=directories.go_codex_home,
        )
        #: The uid/gid this session's child runs under (None: the gateway's own).
        self.identity: ChildIdentity | None = None
        #: The ownership epoch this session runs under (always 0 on a single pod).
        self.epoch: int | None = None
        self.started_at = time.time()
        self.child: CodexChild | None = None
        # Served on the executor channel in the multiplexed layout (None otherwise).
        self._executor_directory: ExecutorDirectory | None = None
        self.last_activity = trio.current_time()
        self._clients: set[ClientRelay] = set()
        # A TCP connection to the child opened after an attach, for the next one to take: the
        # connect (its system calls, the child's accept) is then off that client's way.
        self._spare: socket.socket | None = None
        self._nursery: trio.Nursery | None = None
        # What the admin listing shows; nothing decides from it.
        self._state = SessionState.STARTING
        self._stop_reason: StopReason | None = None
        self._outcome: Outcome | None = None
        self._ended = trio.Event()
        # Set by fence(): no final save, the home is set aside.
        self._fenced = False

    # -- what the manager and the web layer call ------------------------------------------

    @property
    def client_count(self) -> int:
        """Clients currently attached."""
        return len(self._clients)

    @property
    def stopping(self) -> bool:
        """Whether the session was asked to stop (or has ended): it takes no new clients."""
        return self._stop_reason is not None

    @property
    def outcome(self) -> Outcome | None:
        """How the session ended; ``None`` while it runs, stops or saves."""
        return self._outcome

    async def ended(self) -> Outcome:
        """Wait for the session's end and return its outcome."""
        await self._ended.wait()
        assert self._outcome is not None
        return self._outcome

    def touch(self) -> None:
        """Record activity (a frame in either direction)."""
        self.last_activity = trio.current_time()

    def stop(self, reason: StopReason) -> None:
        """Ask the session to stop; it closes clients, stops the child and saves."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._state is SessionState.RUNNING:
            self._state = SessionState.STOPPING
        for relay in self._clients:
            relay.close_code, relay.close_reason = reason.close_code, reason.close_reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def fence(self) -> None:
        """Stop now without a final save: this pod may no longer own the workspace.

        The child's process tree is SIGKILLed at once (no SIGTERM grace: a peer may start the
        workspace elsewhere soon), clients are closed with 1012, a save under way is abandoned
        and the home is set aside for an operator (``Fenced``), never adopted or uploaded.
        """
        self._fenced = True
        self._saver.abandon()
        self._stop_reason = StopReason.FENCED
        self._kill_child_now()
        self.stop(StopReason.FENCED)

    def _kill_child_now(self) -> None:
        child = self.child
        if child is None or child.process.returncode is not None:
            # Not started yet: its stop skips the grace (ChildSpec.kill_at_once). Or reaped.
            return
        # While the leader lives its whole tree is below it (it is a subreaper): kill that
        # first, then the leader and its group; stop_process_tree then finds the stragglers.
        tree = SessionTree(child.process, None)
        tree.refresh()
        tree.signal_members(signal.SIGKILL)
        child.process.kill()
        tree.signal_group(signal.SIGKILL)

    def hand_over(self) -> None:
        """A new session needs this home: give up a final save that has already failed."""
        self._saver.hand_over()

    def abandon_final_save(self) -> None:
        """Stop the final save now; the directory is kept on disk as it is."""
        self._saver.abandon()

    async def attach_client(self, relay: ClientRelay) -> None:
        """Open ``relay`` to the child, then run it in this session's nursery.

        The child's side is opened in the caller's task; once the child has answered, the
        relay's task is started and the ``101`` passed on in one step, with no scheduling
        point in between, so a session that began stopping meanwhile refuses the client
        instead. Returns once the relay is the session's.
        """
        self._check_takes_client()
        child = self.child
        assert child is not None
        self._clients.add(relay)
        metrics.CLIENTS_ATTACHED.inc()
        spare, self._spare = self._spare, None
        try:
            await relay.open(child.ws_url, child.authorization_header()[1], spare)
            nursery = self._nursery
            if nursery is None or self._stop_reason is not None:
                raise SessionStartError("session is stopping; reconnect in a moment")
            try:
                nursery.start_soon(self._run_client, relay)
            except RuntimeError:  # closed to new arrivals: its last task just ended
                raise SessionStartError("session is stopping; reconnect in a moment") from None
            relay.started = True
            relay.pass_on_upgrade()
        except BaseException:
            if not relay.started:
                relay.abandon()
                self._forget_client(relay)
            raise
        self.touch()
        if self._spare is None:
            # For the next client; no wait here: the relay is running and must not lose
            # its caller to a cancellation.
            self._spare = spare_connection(child.ws_url)

    def _close_spare(self) -> None:
        spare, self._spare = self._spare, None
        close_socket(spare)

    def _check_takes_client(self) -> None:
        if self._nursery is None or self.child is None or self._stop_reason is not None:
            raise SessionStartError("session is stopping; reconnect in a moment")
        cap = self._config.max_clients_per_workspace
        if cap and len(self._clients) >= cap:
            raise SessionStartError(
                f"this workspace already has {cap} connections (CXG_MAX_CLIENTS_PER_WORKSPACE); "
                "close one and retry",
                status=429,
            )

    def _forget_client(self, relay: ClientRelay) -> None:
        if relay in self._clients:
            self._clients.discard(relay)
            metrics.CLIENTS_ATTACHED.dec()

    async def _run_client(self, relay: ClientRelay) -> None:
        # This task's context is copied from the web handler's: name the workspace in its logs.
        structlog.contextvars.bind_contextvars(workspace_id=self.workspace_id)
        try:
            await relay.run()
        finally:
            self._forget_client(relay)
            # The idle time of a session counts from its last client's leaving.
            self.touch()

    def describe(self) -> dict[str, Any]:
        """The admin listing's view of this session."""
        saver = self._saver
        return {
            "workspaceId": self.workspace_id,
            "pid": self.child.pid if self.child else None,
            "state": self._state.value,
            "startedAt": _iso(self.started_at),
            "lastActivityAt": _iso(time.time() - (trio.current_time() - self.last_activity)),
            "clients": self.client_count,
            "lastCheckpointAt": _iso(saver.last_checkpoint) if saver.last_checkpoint else None,
            "lastSaveError": saver.last_error,
        }

    # -- the session's life -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Session | SessionStartError]) -> None:
        """Run the session to its end; start it with ``nursery.start(session.run)``.

        The started value is the session itself once its child is ready (or once it is
        stopping, if asked to stop while starting), or the ``SessionStartError`` the connect
        gets. Either way the session then ends with its ``outcome``.
        """
        structlog.contextvars.bind_contextvars(workspace_id=self.workspace_id)
        started = trio.current_time()
        child_ran = False
        try:
            try:
                # First of all: is this pod the workspace's owner? Nothing is touched if not.
                placement = self._services.placement
                # Until the claim succeeds this session holds nothing it may save.
                self._saver.may_write = False
                self.epoch = await placement.claim(self.workspace_id)
                self._saver.may_write = True
                self._saver.snapshots = placement.snapshots(
                    self.workspace_id, self.epoch, self._services.persistence
                )
                self.identity = self._services.isolation.allocate()
                self._saver.read_as = self._read_as()
                credentials = await self._prepare()
            except SessionStartError as exc:
                self._fail_start(exc, task_status)
            except IsolationError as exc:
                self._fail_start(SessionStartError(str(exc)), task_status)
            except Exception as exc:
                log.exception("session.prepare_failed")
                self._fail_start(
                    SessionStartError(f"session preparation failed: {exc}"), task_status
                )
            else:
                child_ran = await self._run_nursery(credentials, started, task_status)
        finally:
            try:
                self._outcome = await self._finish(child_ran)
            finally:
                # Normally done by _finish already; here for a _finish that failed.
                await self._release_identity()
                if self._outcome is None:
                    # _finish itself failed: the home stays where it is, for the next session.
                    reason = self._stop_reason or StopReason.CHILD_EXITED
                    self._outcome = Outcome(reason=reason, save=self._saver.unsaved())
                self._state = SessionState.STOPPED
                self._ended.set()

    def _fail_start(
        self, error: SessionStartError, task_status: trio.TaskStatus[Session | SessionStartError]
    ) -> None:
        """The one start-failure path, before or after the restore: the connect gets ``error``."""
        # The detail is logged by the connect it fails, under that request id.
        if isinstance(error, OwnedElsewhere):
            # Not a failure: the connect goes to the owner, and no crash is counted.
            log.info("session.owned_elsewhere", pod=error.owner.pod, epoch=error.owner.epoch)
            self._stop_reason = StopReason.OWNED_ELSEWHERE
        else:
            log.warning("session.start_failed", status=error.status)
            metrics.SESSION_STARTS.labels(result="failed").inc()
            self._stop_reason = StopReason.START_FAILED
        task_status.started(error)

    async def _prepare(self) -> ModelCredentials:
        services = self._services
        await trio.to_thread.run_sync(self.directories.create)
        try:
            await self._saver.restore()
        except Exception as exc:
            raise _restore_error(exc) from None
        credentials = services.credentials(self.workspace_id, self.directories.runtime)
        await credentials.prime()
        executors = await services.executors(self.workspace_id, self._channel_path)
        self._executor_directory = executors.directory
        config_path = self.directories.codex_home / "config.toml"
        existing = config_path.read_text() if config_path.exists() else None
        rendered = render_config_toml(
            CodexConfig(
                model=self._config.model.model,
                provider=credentials.provider(),
                trusted_paths=self._config.project_trusted_paths,
                mcp_servers=executors.mcp_servers,
            ),
            existing,
        )
        config_path.write_text(rendered)
        config_path.chmod(0o600)
        directories = self.directories
        await trio.to_thread.run_sync(
            services.isolation.hand_over,
            self.identity,
            directories.root,
            [directories.codex_home, directories.home, directories.runtime],
        )
        return credentials

    async def _run_nursery(
        self,
        credentials: ModelCredentials,
        started: float,
        task_status: trio.TaskStatus[Session | SessionStartError],
    ) -> bool:
        """Run the child and its companions until stopped; returns whether the child ran."""
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
            identity=self.identity,
            kill_at_once=lambda: self._fenced,
        )
        if self._stop_reason is not None:
            # Stopped while preparing: no child; the manager sees a stopping session.
            task_status.started(self)
            return False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_executor_channel(nursery)
                try:
                    self.child = await nursery.start(self._supervise_child, spec)
                except Exception as exc:
                    self._fail_start(
                        SessionStartError(f"codex app-server failed to start: {exc}"), task_status
                    )
                    nursery.cancel_scope.cancel()
                    return False
                watched = f"{self.workspace_id}:{self.child.pid}"
                self._services.child_watch.watch(
                    watched,
                    pgid=self.child.pid,
                    uid=self.identity.uid if self.identity is not None else None,
                )
                self._state = SessionState.RUNNING
                self.touch()
                metrics.SESSION_STARTS.labels(result="started").inc()
                metrics.SESSION_START_SECONDS.observe(trio.current_time() - started)
                metrics.SESSIONS_ACTIVE.inc()
                log.info("session.started", pid=self.child.pid)
                task_status.started(self)
                nursery.start_soon(self._watch_idle)
                nursery.start_soon(credentials.keep_fresh)
                if config.checkpoint_interval > 0:
                    nursery.start_soon(self._checkpoints)
            if self.child is None:
                # Stopped while its child was starting (the stop cancelled the start): the
                # connect sees a stopping session, as for a stop while preparing.
                task_status.started(self)
        finally:
            if self._state in (SessionState.RUNNING, SessionState.STOPPING):
                metrics.SESSIONS_ACTIVE.dec()
                # The nursery is over: the child's process tree is stopped.
                assert self.child is not None
                self._services.child_watch.unwatch(f"{self.workspace_id}:{self.child.pid}")
            self._nursery = None
            self._close_spare()
        return True

    @property
    def _channel_path(self) -> Path:
        return self.directories.runtime / SOCKET_NAME

    async def _start_executor_channel(self, nursery: trio.Nursery) -> None:
        """Serve env-mcp's channel before the child starts; without it only executors are lost."""
        directory = self._executor_directory
        if directory is None:
            return
        try:
            await nursery.start(
                serve_executor_channel,
                self._channel_path,
                directory,
                self.identity,
                self._admits_channel_peer,
            )
        except OSError as exc:
            log.error("session.executor_channel_failed", error=str(exc))

    def _admits_channel_peer(self, pid: int, uid: int) -> str | None:
        """Only this session's own processes (its uid, below its child) use the channel."""
        expected = self.identity.uid if self.identity is not None else os.geteuid()
        if uid != expected:
            return "the peer does not run under this session's uid"
        child = self.child
        if child is None or not descends_from(pid, child.pid):
            return "the peer is not a process of this session"
        return None

    async def _supervise_child(
        self, spec: ChildSpec, *, task_status: trio.TaskStatus[CodexChild]
    ) -> None:
        status = await run_codex_child(spec, task_status=task_status)
        # Reaching here means the child exited on its own: the session ends with it.
        log.warning("session.child_exited", status=status)
        self.stop(StopReason.CHILD_EXITED)

    async def _watch_idle(self) -> None:
        """Stop the session once it has been idle for ``CXG_IDLE_SHUTDOWN``.

        Idle means no client attached and no turn running. An attached client keeps the
        session however quiet it is; the time counts from the last activity (a frame, an
        attach, the last detach). When it is up with no client attached, the child is asked
        whether a turn runs (``turns.child_is_busy``: no frame parsing in the relay); a
        running turn counts as activity and the wait starts again.
        """
        idle = self._config.idle_shutdown
        while True:
            deadline = self.last_activity + idle
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            if self.client_count:
                # Its frames and its leaving move last_activity on; look again after that.
                await trio.sleep(idle)
                continue
            assert self.child is not None
            if await child_is_busy(self.child, within=IDLE_CHECK_SECONDS):
                log.info("session.idle_but_turn_running", idle_seconds=idle)
                self.touch()
                continue
            log.info("session.idle", idle_seconds=idle)
            self.stop(StopReason.IDLE)
            return

    async def _checkpoints(self) -> None:
        while True:
            await trio.sleep(self._config.checkpoint_interval)
            if not await self._saver.checkpoint():
                self.stop(StopReason.SUPERSEDED)
                return

    async def _finish(self, child_ran: bool) -> Outcome:
        """Save the stopped home and settle the directory; returns the session's outcome.

        The save runs in the saver's own shielded scope: cancelling the session does not
        abandon it. Only ``hand_over`` (after a failed attempt) or ``abandon_final_save`` (drain
        budget exhausted) ends the retries, and then the directory stays on disk.
        """
        reason = self._stop_reason or StopReason.CHILD_EXITED
        self._stop_reason = reason
        self._state = SessionState.SAVING
        metrics.SESSION_STOPS.labels(reason=reason.name.lower()).inc()
        stop_started = trio.current_time()
        if self._fenced:
            final = FinalSave.UNSAVED
        else:
            log.info("session.final_save", reason=reason.name.lower())
            final = await self._saver.final_save(child_ran=child_ran)
        metrics.SESSION_STOP_SECONDS.observe(trio.current_time() - stop_started)
        if final is FinalSave.SAVED and self.epoch is not None:
            # Saved: any pod may take the workspace at once (never after a failed save).
            with trio.CancelScope(shield=True):
                await self._services.placement.release(self.workspace_id, self.epoch)
        # A saved home is deleted next: closing its root is enough. A kept one is taken back whole.
        await self._release_identity(whole=final is not FinalSave.SAVED)
        save: SaveResult
        with trio.CancelScope(shield=True):
            if self._fenced and final is not FinalSave.SAVED:
                # Fenced (maybe while its final save ran): never adopted, never uploaded.
                reason = self._stop_reason = StopReason.FENCED
                kept = await trio.to_thread.run_sync(self._set_aside)
                log.error("session.stopped_fenced", kept_at=str(kept) if kept else None)
                save = Fenced(kept_at=kept)
            elif final is FinalSave.SAVED:
                await trio.to_thread.run_sync(self.directories.remove)
                log.info("session.stopped", reason=reason.name.lower())
                save = Saved()
            elif final is FinalSave.SUPERSEDED:
                kept = await trio.to_thread.run_sync(self.directories.set_aside)
                log.error("session.stopped_superseded", kept_at=str(kept))
                save = Superseded(kept_at=kept)
            else:
                save = self._saver.unsaved()
                log.error(
                    "session.stopped_unsaved",
                    reason=reason.name.lower(),
                    kept_at=str(save.codex_home),
                    error=self._saver.last_error,
                )
        return Outcome(reason=reason, save=save)

    def _set_aside(self) -> Path | None:
        if not self.directories.root.exists():
            return None
        return self.directories.set_aside()

    def _read_as(self) -> ReadAs | None:
        """Read the home for a snapshot with the child's file ids (isolation.reading_as)."""
        if self.identity is None:
            return None
        return functools.partial(self._services.isolation.reading_as, self.identity)

    async def _release_identity(self, *, whole: bool = True) -> None:
        """Hand the directory back to the gateway, reap the uid's processes, free the uid.

        Runs before the session's end is reported, so a session adopting the kept home never
        races it. ``whole`` False closes only the session root (a home about to be deleted).
        """
        identity, self.identity = self.identity, None
        if identity is None:
            return
        with trio.CancelScope(shield=True):
            await self._services.isolation.release(identity, self.directories.root, whole=whole)


def _restore_error(exc: Exception) -> SessionStartError:
    if isinstance(exc, HostileArchive):
        return SessionStartError(str(exc), status=500)
    return SessionStartError(f"cannot restore the workspace's CODEX_HOME: {exc}")


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
