"""``make run`` as a new user meets it: the printed command opens the real TUI, and a prompt
typed there gets the fake codex's answer on screen.

The set-up is ``make run``'s own (``python -m gateway_tests.devrun --codex fake``, as the
Makefile runs it), and the TUI is started from the exact line it prints, so the test fails if
that line would not work when typed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from gateway_tests.conftest import REPO
from gateway_tests.devrun import PINNED_CODEX
from gateway_tests.tui import READY_TIMEOUT, Terminal

PROMPT = "hello from the devrun test"
# What the fake answers (its deltas: "This is a fake answer to: <prompt>").
ANSWER = f"fake answer to: {PROMPT}"
COMPOSER = "\u203a Ask Codex to do anything"


@attrs.define
class DevRun:
    """A running ``devrun`` and the command line it printed."""

    process: trio.Process
    command: str
    output: list[str]


async def _read_until_command(process: trio.Process, output: list[str]) -> str:
    assert process.stdout is not None
    buffer = b""
    while True:
        chunk = await process.stdout.receive_some(65536)
        if not chunk:
            raise AssertionError(f"devrun exited before printing a command: {output}")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            text = line.decode()
            output.append(text)
            if "--remote ws://" in text:
                return text.strip()


@pytest.fixture
async def devrun(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[DevRun]:
    """``make run``'s daemon (fake child) on a free loopback port, in its own run directory."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "user-home"),
        "LANG": "C.UTF-8",
        "CXG_INBOUND_HMAC_SECRET": "devrun-test-secret",
    }
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "gateway_tests.devrun",
            "--listen-addr",
            "127.0.0.1:0",
            "--run-dir",
            str(tmp_path / "run"),
            "--codex",
            "fake",
        ],
        cwd=str(REPO),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    output: list[str] = []
    try:
        with trio.fail_after(30):
            command = await _read_until_command(process, output)
        yield DevRun(process, command, output)
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def test_printed_command_names_the_pinned_codex_and_sets_the_token() -> None:
    from gateway_tests.devrun import connect_command

    words = shlex.split(connect_command("http://127.0.0.1:8086", "dev.dev.abc"))
    assert words[0] == "CODEX_GATEWAY_TOKEN=dev.dev.abc"
    assert words[1] == str(PINNED_CODEX)
    assert words[2:] == [
        "--remote",
        "ws://127.0.0.1:8086",
        "--remote-auth-token-env",
        "CODEX_GATEWAY_TOKEN",
    ]


async def test_the_printed_command_holds_a_conversation_with_the_fake(
    devrun: DevRun, tmp_path: Path
) -> None:
    assert PINNED_CODEX.exists(), "make run installs the pinned codex (tools/codex)"
    # Run the line as a shell would: VAR=value assignments first, then the program.
    words = shlex.split(devrun.command)
    assignments = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    home = tmp_path / "tui-home"
    (home / ".codex").mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        **assignments,
    }
    project = tmp_path / "project"
    project.mkdir()
    terminal = Terminal.spawn(words, env, project)
    try:
        await trio.to_thread.run_sync(
            terminal.wait_for_screen, ("OpenAI Codex (v0.169.0)", COMPOSER), READY_TIMEOUT
        )
        # The workspace's session directory on the gateway's side is the one shown.
        await trio.to_thread.run_sync(terminal.wait_for_screen, ("/dev/home",), READY_TIMEOUT)
        terminal.process.send(PROMPT)
        await trio.to_thread.run_sync(terminal.wait_for_screen, (PROMPT,), 10)
        terminal.process.send("\r")
        screen = await trio.to_thread.run_sync(terminal.wait_for_screen, (ANSWER,), 30)
        assert "not supported by the fake" not in screen
        assert "failed" not in screen.lower(), screen
        status = await trio.to_thread.run_sync(terminal.quit, 15)
        assert status == 0, terminal.text
    finally:
        terminal.kill()


async def test_a_taken_port_is_one_line_and_no_command(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(60):
            done = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "gateway_tests.devrun",
                    "--listen-addr",
                    f"127.0.0.1:{port}",
                    "--run-dir",
                    str(tmp_path / "run"),
                ],
                cwd=str(REPO),
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(tmp_path),
                    "CXG_INBOUND_HMAC_SECRET": "devrun-test-secret",
                },
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 2
    assert b"--remote" not in done.stdout
    stderr = done.stderr.decode()
    assert f"make run: cannot listen on 127.0.0.1:{port}: Address already in use" in stderr
    assert "Traceback" not in stderr
