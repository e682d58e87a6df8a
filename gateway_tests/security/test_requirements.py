"""codex's requirements file in the image: its content matches the default policy, and the real
codex 0.169.0 enforces it.

codex reads only ``/etc/codex/requirements.toml`` (no variable or flag moves it), and tests never
write the machine's ``/etc``: the enforcement test runs the app-server in a private mount
namespace whose ``/etc`` is an overlay holding the file, so the machine's ``/etc`` is untouched.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import load_config
from gateway.policy.checks import SANDBOX_RANK
from gateway_tests.harness import connect_url
from gateway_tests.real_app_server import AppServer, run_app_server

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "tools" / "codex" / "requirements.toml"


def requirements() -> dict[str, Any]:
    return tomllib.loads(REQUIREMENTS.read_text())


def test_the_requirements_match_the_default_policy() -> None:
    policy = load_config({"CXG_INBOUND_HMAC_SECRET": "x"}).policy
    allowed = [m for m, rank in SANDBOX_RANK.items() if rank <= SANDBOX_RANK[policy.max_sandbox]]
    assert requirements()["allowed_sandbox_modes"] == allowed
    # The policy's "granular" has no requirements counterpart in 0.169.0: the file lists the
    # named policies, and granular prompts are bounded by the gateway alone.
    named = [name for name in policy.approval_policies if name != "granular"]
    assert requirements()["allowed_approval_policies"] == named


def test_the_image_installs_them_root_owned_and_read_only() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(
        r"COPY --chown=0:0 --chmod=0444 tools/codex/requirements.toml "
        r"/etc/codex/requirements.toml",
        dockerfile,
    )


def _overlay_wrapper(tmp_path: Path, codex_bin: Path) -> Path:
    """A launcher that runs codex with ``/etc`` overlaid by the requirements (own namespace)."""
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    (upper / "codex").mkdir(parents=True)
    work.mkdir()
    shutil.copy(REQUIREMENTS, upper / "codex" / "requirements.toml")
    wrapper = tmp_path / "codex-with-requirements"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare -rm sh -c 'mount -t overlay overlay "
        f'-o lowerdir=/etc,upperdir={upper},workdir={work} /etc && exec "$0" "$@"\' '
        f'{codex_bin} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False, timeout=10)
    return probe.returncode == 0


@pytest.fixture
async def app_server(
    nursery: trio.Nursery, tmp_path: Path, real_codex_bin: Path
) -> AsyncIterator[AppServer]:
    if shutil.which("unshare") is None or not _namespaces_work():
        pytest.skip("needs mount namespaces (unshare -rm) to overlay /etc")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model_provider = "m"\nmodel = "x"\n[model_providers.m]\nname = "m"\n'
        'base_url = "http://127.0.0.1:9/v1"\nwire_api = "responses"\n'
    )
    server: AppServer = await nursery.start(
        run_app_server, _overlay_wrapper(tmp_path, real_codex_bin), home, {}
    )
    yield server


async def test_the_real_codex_enforces_the_requirements(app_server: AppServer) -> None:
    async with connect_url(app_server.url) as rpc:
        read = await rpc.result("configRequirements/read", {})
        assert "workspace-write" in json.dumps(read), read
        full = await rpc.call(
            "command/exec",
            {"command": ["true"], "sandboxPolicy": {"type": "dangerFullAccess"}},
        )
        assert full.get("error", {}).get("code") == -32600, full
        assert "allowed" in full["error"]["message"], full
        ok = await rpc.call(
            "command/exec", {"command": ["true"], "sandboxPolicy": {"type": "readOnly"}}
        )
        assert "error" not in ok or "allowed" not in ok["error"]["message"], ok
