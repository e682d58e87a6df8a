"""Shared fixtures: where the real codex and the fake codex live."""

from __future__ import annotations

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
