"""Shared fixtures: where the real codex and the fake codex live; gateways; S3; fakes;
temp directories the children's uids can reach.

Fixtures every module may use are defined (or imported) here, never imported from one test
module into another: the in-process ``gateway`` (fake codex, test defaults) and
``launch_gateway`` for gateways with other variables or another codex; ``real_gateway`` and
``launch_real_gateway`` for the real codex as the child, no model reachable; the moto server and a
fresh bucket (``gateway_tests.s3_server``); a versioned ``bucket`` view and an ``outage`` proxy
in front of moto (``gateway_tests.s3_control``); the fake model server and exec gateway of the
executor tests (``gateway_tests.executor_fixtures``); the TUI tests' gateway and fake model
(``gateway_tests.tui``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from gateway.config import S3Settings
from gateway.web.websocket import PolicyFactory
from gateway_tests.executor_fixtures import exec_gateway, model
from gateway_tests.harness import (
    LaunchGateway,
    RunningGateway,
    gateway_env,
    real_codex_vars,
    start_gateway,
)
from gateway_tests.s3_control import BucketView, S3Outage
from gateway_tests.s3_server import (
    MotoServer,
    atomic_moto,
    atomic_s3_settings,
    closed_port_settings,
    moto_server,
    s3_settings,
)
from gateway_tests.tui import tui_gateway, tui_model

__all__ = [
    "atomic_moto",
    "atomic_s3_settings",
    "bucket",
    "closed_port_settings",
    "exec_gateway",
    "fake_codex_bin",
    "gateway",
    "launch_gateway",
    "launch_real_gateway",
    "model",
    "moto_server",
    "outage",
    "real_codex_bin",
    "real_gateway",
    "s3_settings",
    "tui_gateway",
    "tui_model",
]

REPO = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"


def find_real_codex() -> Path:
    """The native binary of the pinned real codex that `make test` installs from npm."""
    base = REPO / "tools" / "codex" / "node_modules" / "@openai"
    found = sorted(base.glob("codex-linux-*/vendor/*/bin/codex"))
    if not found:
        raise RuntimeError(
            "the pinned real codex is not installed; run `make test` (npm ci in tools/codex)"
        )
    return found[0]


@pytest.fixture(scope="session")
def real_codex_bin() -> Path:
    """Path of the real codex binary (never skipped: missing means the set-up is broken)."""
    return find_real_codex()


@pytest.fixture(scope="session")
def fake_codex_bin() -> Path:
    """Path of the fake codex launcher used by most session tests and by `make run`."""
    return FAKES / "codex"


# Run as root, the daemon under test runs every child under its own uid (gateway/sessions/
# isolation.py), and those uids must be able to pass through the directories above
# CXG_TMP_ROOT. pytest's default base (/tmp/pytest-of-<user>, reset to 0700 by every run on
# the machine) is not passable, so root runs get their own base with o+x on the way down.
_OWN_BASETEMP: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Give root runs a base temp directory that child uids can pass through (not list)."""
    global _OWN_BASETEMP
    if os.geteuid() != 0 or config.option.basetemp:
        return
    parent = Path(tempfile.mkdtemp(prefix="cxg-tests-"))
    parent.chmod(0o711)
    _OWN_BASETEMP = parent
    config.option.basetemp = str(parent / "t")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the base after a green run; keep it (and say where) after a red one."""
    if _OWN_BASETEMP is None:
        return
    if exitstatus == 0:
        shutil.rmtree(_OWN_BASETEMP, ignore_errors=True)
    else:
        print(f"\ntest directories kept in {_OWN_BASETEMP}")


CHILD_PYTHON = REPO / ".venv-child" / "bin" / "python"


@pytest.fixture(autouse=True)
def _child_reachable_self_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """env-mcp, which the children spawn, runs with an interpreter their uids can reach."""
    if CHILD_PYTHON.exists():
        monkeypatch.setattr(
            "gateway.daemon.self_command", lambda: (str(CHILD_PYTHON), "-m", "gateway")
        )


@pytest.fixture(autouse=True)
def _passable_tmp_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Make the test's tmp_path (and the base above it) passable for child uids."""
    if _OWN_BASETEMP is not None and "tmp_path" in request.fixturenames:
        tmp_path: Path = request.getfixturevalue("tmp_path")
        tmp_path.parent.chmod(0o711)
        tmp_path.chmod(0o711)
    yield


@pytest.fixture
def bucket(moto_server: MotoServer, s3_settings: S3Settings) -> BucketView:
    """A fresh, versioned bucket on the moto server."""
    view = BucketView(moto_server, s3_settings.bucket)
    view.enable_versioning()
    return view


@pytest.fixture
async def outage(nursery: trio.Nursery, moto_server: MotoServer) -> S3Outage:
    """A proxy in front of the moto server that the test can take down, hold and bring back."""
    proxy: S3Outage = await nursery.start(S3Outage(moto_server.endpoint).serve)
    return proxy


@pytest.fixture
async def launch_gateway(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> AsyncIterator[LaunchGateway]:
    """Start in-process gateways (``await launch_gateway(codex_bin=..., CXG_X="...")``).

    Each uses ``gateway_env`` under ``tmp_path`` (the fake codex unless ``codex_bin`` is
    given) with the variables given, and ``policy_for`` if given, and is drained and stopped
    when the test ends.
    """
    started: list[RunningGateway] = []

    async def launch(
        codex_bin: Path | str | None = None,
        *,
        policy_for: PolicyFactory | None = None,
        **env: str,
    ) -> RunningGateway:
        running = await start_gateway(
            nursery,
            gateway_env(tmp_path, codex_bin or fake_codex_bin, **env),
            policy_for=policy_for,
        )
        started.append(running)
        return running

    yield launch
    for running in started:
        await running.shutdown()


@pytest.fixture
async def gateway(launch_gateway: LaunchGateway) -> RunningGateway:
    """An in-process gateway with the fake codex as its child and the test defaults."""
    return await launch_gateway()


@pytest.fixture
def launch_real_gateway(launch_gateway: LaunchGateway, real_codex_bin: Path) -> LaunchGateway:
    """``launch_gateway`` with the real codex as the child and ``real_codex_vars``.

    ``await launch_real_gateway(CXG_X="...")``; the variables given win over those defaults.
    """

    async def launch(**env: str) -> RunningGateway:
        return await launch_gateway(real_codex_bin, **await real_codex_vars(**env))

    return launch


@pytest.fixture
async def real_gateway(launch_real_gateway: LaunchGateway) -> RunningGateway:
    """An in-process gateway whose sessions run the real codex, with an unreachable model."""
    return await launch_real_gateway()
