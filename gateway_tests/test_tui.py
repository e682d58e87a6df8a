"""The real ``codex --remote`` TUI connects through the gateway and reaches its composer prompt.

The TUI runs in a pseudo-terminal (``gateway_tests.tui``), so the test reads the screen a person
would see. Both sides are the pinned real codex
0.169.0: the TUI as the client, ``codex app-server`` as the session's child.
"""

from __future__ import annotations

from pathlib import Path

import trio

from gateway_tests.harness import POLL_INTERVAL, LaunchGateway, RunningGateway
from gateway_tests.tui import EXIT_TIMEOUT, MODEL, READY, READY_TIMEOUT, spawn_tui


async def client_count(gateway: RunningGateway, workspace_id: str) -> int | None:
    """How many clients the admin listing shows for the workspace (None: no session)."""
    entry = await gateway.session(workspace_id)
    return None if entry is None else int(entry["clients"])


async def test_real_tui_connects_through_the_gateway_and_reaches_its_prompt(
    launch_real_gateway: LaunchGateway, tmp_path: Path, real_codex_bin: Path
) -> None:
    # No model is reachable: the TUI learns the model's name only from the child.
    gateway = await launch_real_gateway(CXG_MODEL=MODEL)
    terminal = spawn_tui(gateway, tmp_path, real_codex_bin, "ws_tui")
    try:
        screen = await trio.to_thread.run_sync(terminal.wait_for_screen, READY, READY_TIMEOUT)
        # The working directory shown is the session's, on the gateway's side.
        assert "/ws_tui/home" in screen
        entry = await gateway.session("ws_tui")
        assert entry is not None and entry["state"] == "running", entry
        assert entry["clients"] == 1

        status = await trio.to_thread.run_sync(terminal.quit, EXIT_TIMEOUT)
        assert status == 0, terminal.text
    finally:
        terminal.kill()

    # The gateway notices the TUI has gone (no event reaches the test: poll the listing).
    with trio.fail_after(10):
        while await client_count(gateway, "ws_tui") != 0:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(POLL_INTERVAL)
