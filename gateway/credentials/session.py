"""One session's model credential: fetched before spawn, kept fresh for the life of the child.

The Go service put a ~1 h ModelServer token into the child's environment at spawn, so every
session older than the token failed its model calls until someone restarted it. Here codex
reads the token through a command-backed provider token (codex 0.169.0,
``[model_providers.<id>.auth]``): it runs ``cat <runtime_dir>/model-token`` at start, every
``refresh_interval_ms`` and after a 401, and sends the output as ``Authorization: Bearer``.
The session's refresh task (:meth:`SessionModelCredentials.keep_fresh`) rewrites that file
atomically ahead of ``expires_at``, so the running child picks up each new token without a
respawn.

Where the token is, and is not:

* in this process and in the 0600 file inside the session's private 0700 runtime directory
  (owned, like the file, by the session's own uid when children are isolated), which lives
  outside CODEX_HOME (so it never reaches a CODEX_HOME archive);
* never in argv (the command's only argument is the file's path), never in any process
  environment (the provider block has no ``env_key``; :meth:`child_env` is empty), never in a
  log line (tokens are :class:`~gateway.config.Secret` and logs name only the source).

Sources, in order: the workspace's ModelServer token; when agentserver says the workspace has
no ModelServer connection (404 or an empty token), ``CXG_CODEX_API_KEY``; when neither exists
the session still starts and a warning says that model calls will fail.

agentserver unreachable *at start* fails :meth:`prime` with
:class:`~gateway.credentials.modelserver.ModelServerUnavailable` (the connect gets 503) rather
than silently running a ModelServer workspace on the shared static key; agentserver unreachable
*later* keeps the current token and retries with back-off.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Literal

import httpx2
import structlog
import trio

from gateway import metrics
from gateway.codex_home.config_toml import ModelProvider, ProviderAuth
from gateway.config import Config, Secret
from gateway.credentials.modelserver import (
    ModelServerClient,
    ModelServerError,
    ModelServerToken,
)

TOKEN_FILE_NAME = "model-token"
# How often codex re-reads the token file. ``cat`` costs about a millisecond, and the refresh
# task replaces the file well before the old token expires (see ``refresh_delay``), so 30 s is
# ample; a 401 makes codex re-read it at once anyway.
DEFAULT_COMMAND_REFRESH_SECONDS = 30.0
AUTH_COMMAND_TIMEOUT_MS = 5000
# Never re-fetch more often than this, even when agentserver hands out an expired token.
MIN_REFRESH_DELAY = 1.0
DEFAULT_RETRY_INITIAL = 1.0
DEFAULT_RETRY_MAX = 60.0

Source = Literal["modelserver", "static", "none"]


def refresh_delay(expires_in: float | None, interval: float, command_interval: float) -> float:
    """Seconds to wait before fetching the next token.

    With an expiry: refresh a good while ahead of it, so the new token is in the file and codex
    has re-read it before the old one expires — a fifth of the lifetime, at least two command
    intervals plus a minute, and never more than half of it. Never wait longer than the
    configured ``interval``, so a token revoked and replaced early is still picked up; without an
    expiry that interval is the schedule.
    """
    if expires_in is None:
        return max(interval, MIN_REFRESH_DELAY)
    lead = min(expires_in / 2, max(expires_in / 5, 2 * command_interval + 60.0))
    return max(MIN_REFRESH_DELAY, min(expires_in - lead, interval))


class SessionModelCredentials:
    """The model credential of one session; see the module docstring.

    Call order for a session: ``await prime()`` before spawning the child; render
    ``provider()`` into config.toml; merge ``child_env()`` into the child's environment;
    ``nursery.start_soon(keep_fresh)`` in the session's nursery for as long as the child runs.
    The runtime directory is created (0700) and deleted by the session.
    """

    def __init__(
        self,
        config: Config,
        http: httpx2.AsyncClient,
        workspace_id: str,
        runtime_dir: Path,
        *,
        command_refresh_interval: float = DEFAULT_COMMAND_REFRESH_SECONDS,
        retry_initial: float = DEFAULT_RETRY_INITIAL,
        retry_max: float = DEFAULT_RETRY_MAX,
    ) -> None:
        self._model = config.model
        self._workspace_id = workspace_id
        self._client = (
            ModelServerClient(
                http, config.agentserver.internal_url, config.agentserver.internal_secret
            )
            if config.agentserver is not None
            else None
        )
        self.token_file = runtime_dir / TOKEN_FILE_NAME
        self._command_refresh_interval = command_refresh_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        # Resolved once: codex runs the command with the child's PATH, which is ours anyway,
        # but an absolute path cannot be shadowed by anything in the workspace.
        self._cat = shutil.which("cat") or "/bin/cat"
        self._token: Secret | None = None
        self._expires_at: dt.datetime | None = None
        self._next_delay = max(config.model.token_refresh_interval, MIN_REFRESH_DELAY)
        self.source: Source = "none"
        #: Bumped each time the token file is rewritten; see :meth:`wait_for_version`.
        self.version = 0
        self._written = trio.Event()
        # A fresh logger per session (not a module-level one bound once) so the workspace id is
        # on every line even when the caller has not bound it in the context.
        self._log = structlog.get_logger(__name__).bind(workspace_id=workspace_id)

    # -- what the session renders ------------------------------------------------------------

    def provider(self) -> ModelProvider:
        """The ``[model_providers.<id>]`` block: command-backed auth, no ``env_key``.

        Checked against codex 0.169.0: with both ``env_key`` and ``auth`` set, codex rejects
        the whole config.toml ("provider auth cannot be combined with env_key") and runs on its
        defaults, so ``env_key`` is left out (``CXG_MODEL_PROVIDER_ENV_KEY`` has no use here).
        """
        return ModelProvider(
            id=self._model.provider,
            base_url=self._model.base_url,
            wire_api=self._model.wire_api,
            env_key=None,
            auth=ProviderAuth(
                command=self._cat,
                args=(str(self.token_file),),
                timeout_ms=AUTH_COMMAND_TIMEOUT_MS,
                refresh_interval_ms=max(1, round(self._command_refresh_interval * 1000)),
            ),
        )

    def child_env(self) -> dict[str, str]:
        """Environment the child needs for its model credential: nothing (it reads the file)."""
        return {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def prime(self) -> None:
        """Fetch the first token and write the token file, before the child is spawned.

        Raises :class:`~gateway.credentials.modelserver.ModelServerError` when agentserver is
        configured but unreachable or answers nonsense; the session should then fail to start.
        """
        token: ModelServerToken | None = None
        if self._client is not None:
            token = await self._client.fetch(self._workspace_id)
        await self._apply(token, initial=True)

    async def keep_fresh(self) -> None:
        """Keep the token file current for as long as the session lives (never returns).

        Runs in the session's nursery; cancel it with the session. Failures keep the current
        token and retry with exponential back-off (jittered, at most ``retry_max`` and at most
        the configured refresh interval).
        """
        if self._client is None:
            # No agentserver: the static key (or nothing) for the whole session.
            await trio.sleep_forever()
        client = self._client
        assert client is not None
        delay = self._next_delay
        failures = 0
        while True:
            await trio.sleep(delay)
            try:
                token = await client.fetch(self._workspace_id)
            except ModelServerError as exc:
                failures += 1
                delay = self._backoff(failures)
                metrics.MODEL_TOKEN_REFRESHES.labels(result="failed").inc()
                self._log.warning(
                    "model_token.refresh_failed",
                    error=str(exc),
                    attempt=failures,
                    retry_in_seconds=round(delay, 2),
                    source=self.source,
                    current_expires_in_seconds=self._expires_in(),
                )
                continue
            try:
                await self._apply(token, initial=False)
            except OSError as exc:
                # The runtime directory is local and private; if it cannot be written (disk
                # full), keep the session and the file codex already has, and try again.
                metrics.MODEL_TOKEN_REFRESHES.labels(result="write_failed").inc()
                failures += 1
                delay = self._backoff(failures)
                self._log.error(
                    "model_token.write_failed",
                    error=f"{type(exc).__name__}: {exc.strerror or exc}",
                    attempt=failures,
                    retry_in_seconds=round(delay, 2),
                )
                continue
            metrics.MODEL_TOKEN_REFRESHES.labels(result="ok").inc()
            if failures:
                self._log.info("model_token.refresh_recovered", attempts=failures + 1)
            failures = 0
            delay = self._next_delay

    async def wait_for_version(self, version: int) -> None:
        """Return once the token file has been written ``version`` times or more."""
        while self.version < version:
            written = self._written
            await written.wait()

    # -- internals ---------------------------------------------------------------------------

    def _expires_in(self) -> float | None:
        if self._expires_at is None:
            return None
        return round((self._expires_at - dt.datetime.now(dt.UTC)).total_seconds(), 1)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._retry_max, max(self._model.token_refresh_interval, MIN_REFRESH_DELAY))
        raw = min(self._retry_initial * 2.0 ** (failures - 1), ceiling)
        # Jitter so that the sessions of a pod do not all retry in the same instant.
        return raw * random.uniform(0.8, 1.0)

    async def _apply(self, token: ModelServerToken | None, *, initial: bool) -> None:
        """Adopt ``token`` (None: no ModelServer connection) and rewrite the file if it changed.

        State changes only after the file is written, so a failed write leaves everything as
        it was (the caller retries).
        """
        interval = self._model.token_refresh_interval
        previous = self.source
        source: Source
        value: Secret | None
        if token is not None:
            source, value, expires_at = "modelserver", token.access_token, token.expires_at
        else:
            static = self._model.static_api_key
            source = "static" if static else "none"
            value, expires_at = (static or None), None

        changed = value != self._token
        if changed or initial:
            await trio.to_thread.run_sync(self._write, value)
            self._token = value
            self.version += 1
            written, self._written = self._written, trio.Event()
            written.set()
        self.source = source
        self._expires_at = expires_at
        expires_in = self._expires_in()
        self._next_delay = refresh_delay(expires_in, interval, self._command_refresh_interval)

        fields = {
            "source": self.source,
            "expires_in_seconds": expires_in,
            "next_refresh_in_seconds": round(self._next_delay, 2),
            "token_changed": changed,
        }
        if initial:
            self._log.info("model_token.primed", **fields)
        elif changed or previous != self.source:
            self._log.info("model_token.refreshed", **fields)
        else:
            self._log.debug("model_token.unchanged", **fields)
        if self.source == "none" and (initial or previous != "none"):
            self._log.warning(
                "model_token.none",
                detail=(
                    "no ModelServer token for this workspace (agentserver not configured or "
                    "no ModelServer connection) and CXG_CODEX_API_KEY is not set: the session "
                    "starts, but its model calls will fail"
                ),
            )

    def _write(self, value: Secret | None) -> None:
        """Replace the token file atomically (0600), so codex never reads a half-written token.

        With no token the file is left empty: codex then fails each model call with "provider
        auth command ... produced an empty token", which says plainly what is missing.
        """
        temporary = self.token_file.with_name(f".{TOKEN_FILE_NAME}.{secrets.token_hex(6)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                # In the isolated mode the runtime directory belongs to the child's uid, which
                # must be the only one able to read the token (gateway/sessions/isolation.py).
                owner = os.stat(self.token_file.parent)
                if owner.st_uid != os.geteuid():
                    os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
                handle.write(value.reveal() if value is not None else "")
            os.replace(temporary, self.token_file)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
