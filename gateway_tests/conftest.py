"""Shared fixtures: where the real codex and the fake codex live; temp dirs children can reach."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
