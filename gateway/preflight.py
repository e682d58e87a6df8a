"""Start-up checks: the codex binary runs and the object store is usable, before ``/readyz``.

Without them the daemon reports ready with a missing binary or bucket and the first user finds
out. ``run_preflight`` is started in the daemon's nursery: it runs the checks, keeps readiness
failing with one clear log line per failure, re-checks with a bounded back-off until they
pass, and then records the versions in the build-info metric. It never stops the daemon:
liveness stays up, so an operator can fix the bucket or the image without a restart loop.
"""

from __future__ import annotations

import subprocess

import attrs
import structlog
import trio

from gateway import metrics
from gateway.store.base import ObjectStore, StoreError
from gateway.version import package_version

log = structlog.get_logger(__name__)

CODEX_VERSION_TIMEOUT = 10.0
STORE_CHECK_TIMEOUT = 15.0
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
# What `codex --version` may print that we keep (the first line, bounded).
_VERSION_MAX_CHARS = 200


class CheckFailed(Exception):
    """A start-up check failed; the message is one sentence naming what to fix."""


@attrs.define
class PreflightState:
    """What readiness needs to know: whether every check has passed, and the last failure."""

    passed: bool = False
    failure: str | None = None
    codex_version: str | None = None


async def codex_version(codex_bin: str) -> str:
    """Run ``codex --version``; its first line (``codex-cli 0.169.0``), or ``CheckFailed``."""
    try:
        with trio.fail_after(CODEX_VERSION_TIMEOUT):
            done = await trio.run_process(
                [codex_bin, "--version"],
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise CheckFailed(
            f"codex binary {codex_bin!r} did not answer --version within "
            f"{CODEX_VERSION_TIMEOUT:.0f}s (CXG_CODEX_BIN)"
        ) from None
    except OSError as exc:
        raise CheckFailed(
            f"codex binary {codex_bin!r} cannot be run (CXG_CODEX_BIN): {exc.strerror or exc}"
        ) from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise CheckFailed(
            f"codex binary {codex_bin!r} --version exited with status {done.returncode} "
            "(CXG_CODEX_BIN)"
        )
    return lines[0][:_VERSION_MAX_CHARS]


async def check_store(store: ObjectStore) -> None:
    """The store answers (HeadBucket for S3), within a bound; else ``CheckFailed``."""
    try:
        with trio.fail_after(STORE_CHECK_TIMEOUT):
            await store.check()
    except trio.TooSlowError:
        raise CheckFailed(
            f"object store {store.describe()} did not answer within {STORE_CHECK_TIMEOUT:.0f}s"
        ) from None
    except StoreError as exc:
        raise CheckFailed(str(exc)) from None


async def run_preflight(
    codex_bin: str,
    store: ObjectStore,
    state: PreflightState,
    *,
    first_retry: float = RETRY_FIRST_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check until everything passes; reports started after the first round, pass or fail.

    Each new failure is logged once (``startup.check_failed``); the checks are then retried
    with a back-off doubling from ``first_retry`` to ``RETRY_MAX_SECONDS``.
    """
    delay = first_retry
    while True:
        try:
            version = await codex_version(codex_bin)
            await check_store(store)
        except CheckFailed as exc:
            failure = str(exc)
            if failure != state.failure:
                log.error("startup.check_failed", error=failure, retry_seconds=delay)
            state.failure = failure
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            continue
        state.codex_version = version
        state.failure = None
        state.passed = True
        metrics.BUILD_INFO.labels(version=package_version(), codex_version=version).set(1)
        log.info("startup.checks_passed", codex_version=version, store=store.describe())
        task_status.started()
        return
