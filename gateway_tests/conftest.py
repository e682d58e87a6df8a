"""Shared fixtures: where the real codex and the fake codex live; S3 on loopback; fakes.

Fixtures every module may use are defined (or imported) here, never imported from one test
module into another: the moto server and a fresh bucket (``gateway_tests.s3_server``), a
versioned ``bucket`` view and an ``outage`` proxy in front of moto (``gateway_tests.s3_control``),
and the fake model server and exec gateway of the executor tests
(``gateway_tests.executor_fixtures``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from gateway.config import S3Settings
from gateway_tests.executor_fixtures import exec_gateway, model
from gateway_tests.s3_control import BucketView, S3Outage
from gateway_tests.s3_server import MotoServer, closed_port_settings, moto_server, s3_settings

__all__ = [
    "bucket",
    "closed_port_settings",
    "exec_gateway",
    "fake_codex_bin",
    "model",
    "moto_server",
    "outage",
    "real_codex_bin",
    "s3_settings",
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
