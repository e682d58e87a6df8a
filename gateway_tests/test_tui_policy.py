"""The real TUI's normal use under the default protocol policy, through the gateway.

A turn against a fake model, ``!cmd``, ``/status`` and ``/permissions`` within the
allowed set work; choosing "Full Access" in ``/permissions`` is refused with a visible error and
the session goes on (the next turn is answered by the same child).
"""

from __future__ import annotations

from pathlib import Path

import trio

from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.harness import RunningGateway
from gateway_tests.tui import (
    EXIT_TIMEOUT,
    READY,
    READY_TIMEOUT,
    refusals,
    screen_shows,
    spawn_tui,
    type_line,
)


async def test_the_tuis_normal_use_works_and_full_access_is_refused_visibly(
    tui_gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path, tui_model: FakeModelServer
) -> None:
    terminal = spawn_tui(tui_gateway, tmp_path, real_codex_bin, "ws_tui_policy")
    try:
        await trio.to_thread.run_sync(terminal.wait_for_screen, READY, READY_TIMEOUT)
        pid = (await tui_gateway.session("ws_tui_policy") or {})["pid"]
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
        tui_model.default_text = "Second reply after the refusal."
        await type_line(terminal, "and again")
        await screen_shows(terminal, "Second reply after the refusal.")
        await type_line(terminal, "/status")
        await screen_shows(terminal, "Permissions:         Workspace (Ask for approval)")
        assert (await tui_gateway.session("ws_tui_policy") or {})["pid"] == pid
        # The one refusal of the whole session was the Full Access choice.
        assert refusals() == {
            **before,
            "sandbox_beyond_max": before.get("sandbox_beyond_max", 0) + 1,
        }
        assert await trio.to_thread.run_sync(terminal.quit, EXIT_TIMEOUT) == 0
    finally:
        terminal.kill()
