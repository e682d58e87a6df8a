"""The real TUI's ``/diff``, ``/model`` and ``/resume`` work through the gateway's default policy.

Each is a normal action of the TUI that reaches the child through the policy: ``/diff`` has the
child run git (``command/exec``), ``/model`` lists the child's models and saves the choice,
``/resume`` lists the saved threads and resumes one. The test reads what a person would see on
the screen, checks the model requests that follow, and checks that the gateway refused nothing:
no ``policy.refused`` log line and no change to ``cxg_policy_refusals_total``.

Slash commands are typed, the popup is waited for until it shows the matching entry, then Tab
completes it and Enter runs it (Enter alone while the popup filters is taken by the popup).
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from structlog.testing import capture_logs

from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.harness import RunningGateway
from gateway_tests.tui import (
    EXIT_TIMEOUT,
    READY,
    READY_TIMEOUT,
    Terminal,
    refusals,
    screen_shows,
    spawn_tui,
    type_line,
)


async def slash(terminal: Terminal, command: str, description: str) -> None:
    """Run ``command`` from the slash popup once the popup lists it with ``description``."""
    terminal.process.send(command)
    await screen_shows(terminal, f"{command}  {description}")
    terminal.process.send("\t\r")


async def test_diff_model_and_resume_work_under_the_default_policy(
    tui_gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path, tui_model: FakeModelServer
) -> None:
    terminal = spawn_tui(tui_gateway, tmp_path, real_codex_bin, "ws_tui_slash")
    try:
        before = refusals()
        with capture_logs() as logs:
            await trio.to_thread.run_sync(terminal.wait_for_screen, READY, READY_TIMEOUT)
            pid = (await tui_gateway.session("ws_tui_slash") or {})["pid"]
            # A first thread, for /resume to find later.
            await type_line(terminal, "the earlier thread")
            await screen_shows(terminal, "Reply from the fake model.")

            # /diff: the session's home becomes a git repository with one new file, and the
            # diff pager shows that file's diff, which only git run by the child can produce.
            await type_line(terminal, "!git init -q && echo diff-me > note.txt && echo made-it")
            await screen_shows(terminal, "\u2514 made-it")
            await slash(terminal, "/diff", "show git diff")
            await screen_shows(terminal, "/ D I F F", "+++ b/note.txt", "+diff-me")
            terminal.process.send("q")

            # /model: the list comes from the child; the choice is written and shown.
            await slash(terminal, "/model", "choose what model")
            await screen_shows(terminal, "Select Model and Effort", "4. GPT-6-Luna")
            terminal.process.send("4")
            await screen_shows(terminal, "Select Reasoning Level for GPT-6-Luna")
            terminal.process.send("1")
            await screen_shows(terminal, "Model changed to gpt-6-luna low", "GPT-6-Luna low")

            # /resume: a new thread, then the picker lists the earlier one and resumes it.
            await slash(terminal, "/new", "start")
            await slash(terminal, "/resume", "resume a saved chat")
            await screen_shows(terminal, "Resume a previous session", "the earlier thread")
            terminal.process.send("\r")
            await screen_shows(terminal, "the earlier thread", "Reply from the fake model.")
            # The resumed thread takes a new turn.
            tui_model.default_text = "Answer in the resumed thread."
            await type_line(terminal, "carry on")
            await screen_shows(terminal, "Answer in the resumed thread.")
        # That turn carried the earlier thread's history, with the model /model chose. (The
        # child may also send a title request of its own for the new prompt: not the turn.)
        turns = [
            request.body
            for request in tui_model.responses_requests()
            if "carry on" in json.dumps(request.body["input"])
            and "the earlier thread" in json.dumps(request.body["input"])
        ]
        assert [body["model"] for body in turns] == ["gpt-6-luna"], turns
        assert (await tui_gateway.session("ws_tui_slash") or {})["pid"] == pid
        # The capture sees the gateway's log (so the empty list below means something)...
        assert any(entry.get("workspace_id") == "ws_tui_slash" for entry in logs), logs
        # ...and none of these normal actions was refused.
        assert [entry for entry in logs if entry["event"] == "policy.refused"] == []
        assert refusals() == before
        assert await trio.to_thread.run_sync(terminal.quit, EXIT_TIMEOUT) == 0
    finally:
        terminal.kill()
