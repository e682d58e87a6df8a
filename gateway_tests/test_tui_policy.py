"""The real TUI's normal use under the default protocol policy, through the gateway.

A turn against a fake model, ``!cmd``, ``/status`` and ``/permissions`` within the
allowed set work; choosing "Full Access" in ``/permissions`` is refused with a visible error and
the session goes on (the next turn is answered by the same child).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.harness import RunningGateway, gateway_env, start_gateway, token_for
from gateway_tests.test_tui import EXIT_TIMEOUT, MODEL, READY, READY_TIMEOUT, TOKEN_VAR, Terminal

STEP = 30.0


@pytest.fixture
async def model(nursery: trio.Nursery) -> FakeModelServer:
    server = FakeModelServer(default_text="Reply from the fake model.")
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, tmp_path: Path, real_codex_bin: Path, model: FakeModelServer
) -> AsyncIterator[RunningGateway]:
    env = gateway_env(
        tmp_path,
        real_codex_bin,
        CXG_MODEL_PROVIDER_BASE_URL=f"{model.base_url}/v1",
        CXG_CODEX_API_KEY="sk-test",
        CXG_CHILD_READY_TIMEOUT="60s",
        CXG_MODEL=MODEL,
    )
    env.pop("CXG_POLICY_EXTRA_METHODS")
    running = await start_gateway(nursery, env)
    yield running
    await running.shutdown()


def tui(gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path, workspace: str) -> Terminal:
    home = tmp_path / "tui-home"
    (home / ".codex").mkdir(parents=True)
    project = tmp_path / "project"
    project.mkdir()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        TOKEN_VAR: token_for(workspace),
    }
    url = gateway.ws_url.removesuffix("/")
    argv = [str(real_codex_bin), "--remote", url, "--remote-auth-token-env", TOKEN_VAR]
    return Terminal.spawn(argv, env, project)


def refusals() -> dict[str, float]:
    """``cxg_policy_refusals_total`` by rule, as the daemon (in this process) counts them."""
    found: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "cxg_policy_refusals":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["rule"]] = sample.value
    return found


async def screen_shows(terminal: Terminal, *needles: str) -> str:
    return await trio.to_thread.run_sync(terminal.wait_for_screen, needles, STEP)


async def type_line(terminal: Terminal, text: str) -> None:
    """Type ``text`` into the composer, wait until the screen shows it, then press Enter."""
    terminal.process.send(text)
    # The composer shows a leading "!" as its shell-mode marker, not as typed text.
    await screen_shows(terminal, text.removeprefix("!"))
    terminal.process.send("\r")


async def test_the_tuis_normal_use_works_and_full_access_is_refused_visibly(
    gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path, model: FakeModelServer
) -> None:
    terminal = tui(gateway, tmp_path, real_codex_bin, "ws_tui_policy")
    try:
        await trio.to_thread.run_sync(terminal.wait_for_screen, READY, READY_TIMEOUT)
        pid = (await gateway.session("ws_tui_policy") or {})["pid"]
        before = refusals()
        await type_line(terminal, "hello there")
        await screen_shows(terminal, "Reply from the fake model.")
        await type_line(terminal, "!echo policy-check")
        await screen_shows(terminal, "You ran echo policy-check", "\u2514 policy-check")
        await type_line(terminal, "/permissions")
        await screen_shows(terminal, "Update Model Permissions", "Full Access")
        terminal.process.send("3")
        await screen_shows(terminal, "Enable full access?", "Yes, continue anyway")
        terminal.process.send("1")
        # Refused, visibly, naming the setting; the composer is back.
        await screen_shows(terminal, "Failed to select permissions", "CXG_POLICY_MAX_SANDBOX")
        # Within the allowed set, /permissions works.
        await type_line(terminal, "/permissions")
        await screen_shows(terminal, "Update Model Permissions")
        terminal.process.send("1")
        # The session goes on: another turn is answered by the same child.
        model.default_text = "Second reply after the refusal."
        await type_line(terminal, "and again")
        await screen_shows(terminal, "Second reply after the refusal.")
        await type_line(terminal, "/status")
        await screen_shows(terminal, "Permissions:         Workspace (Ask for approval)")
        assert (await gateway.session("ws_tui_policy") or {})["pid"] == pid
        # The one refusal of the whole session was the Full Access choice.
        assert refusals() == {
            **before,
            "sandbox_beyond_max": before.get("sandbox_beyond_max", 0) + 1,
        }
        terminal.process.sendcontrol("c")
        assert await trio.to_thread.run_sync(terminal.wait_exit, EXIT_TIMEOUT) == 0
    finally:
        terminal.kill()
