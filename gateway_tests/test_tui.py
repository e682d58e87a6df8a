"""The real ``codex --remote`` TUI connects through the gateway and reaches its composer prompt.

The TUI runs in a pseudo-terminal (pexpect) and its output is rendered by a terminal emulator
(pyte), so the test reads the screen a person would see. Both sides are the pinned real codex
0.169.0: the TUI as the client, ``codex app-server`` as the session's child.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs
import pexpect
import pyte
import pytest
import trio

from gateway_tests.harness import (
    POLL_INTERVAL,
    RunningGateway,
    real_codex_env,
    start_gateway,
    token_for,
)

COLUMNS, ROWS = 120, 40
TOKEN_VAR = "CXG_TEST_REMOTE_TOKEN"
# The model the gateway renders into the child's config.toml; the TUI learns it only from the
# remote app-server, so seeing it on screen proves the TUI talks to the child.
MODEL = "gateway-test-model"
# What codex 0.169.0 shows once its remote thread is started and it is ready for input. The
# composer alone is not enough: the TUI draws it before it has even connected. (U+203A is the
# composer's prompt marker.)
READY = ("OpenAI Codex (v0.169.0)", "To get started", "\u203a Ask Codex to do anything", MODEL)
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 15.0


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, tmp_path: Path, real_codex_bin: Path
) -> AsyncIterator[RunningGateway]:
    """A gateway with the real codex as its child and an unreachable model provider."""
    env = await real_codex_env(
        tmp_path,
        real_codex_bin,
        CXG_MODEL=MODEL,
    )
    running = await start_gateway(nursery, env)
    yield running
    await running.shutdown()


@attrs.define
class Terminal:
    """A program in a pseudo-terminal, with a pyte screen fed from its output."""

    process: pexpect.spawn
    screen: pyte.Screen
    stream: pyte.ByteStream

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], cwd: Path) -> Terminal:
        """Start ``argv`` in a ``COLUMNS``x``ROWS`` pseudo-terminal."""
        screen = pyte.Screen(COLUMNS, ROWS)
        process = pexpect.spawn(
            argv[0], argv[1:], env=env, cwd=str(cwd), dimensions=(ROWS, COLUMNS)
        )
        return cls(process=process, screen=screen, stream=pyte.ByteStream(screen))

    @property
    def text(self) -> str:
        """The screen as text, one line per row."""
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for_screen(self, needles: Sequence[str], timeout: float) -> str:
        """Feed output into the screen until it shows every needle; return it (blocking)."""
        deadline = time.monotonic() + timeout
        while not all(needle in self.text for needle in needles):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needles!r} never all appeared; the screen:\n{self.text}")
            try:
                self.stream.feed(self.process.read_nonblocking(65536, timeout=min(remaining, 1)))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                raise AssertionError(
                    f"the program exited before showing {needles!r}; the screen:\n{self.text}"
                ) from None
        return self.text

    def wait_exit(self, timeout: float) -> int | None:
        """Read until the program exits; return its exit status (None if killed by a signal)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the program did not exit; the screen shows:\n{self.text}")
            try:
                self.stream.feed(self.process.read_nonblocking(65536, timeout=min(remaining, 1)))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                break
        self.process.close()
        status: int | None = self.process.exitstatus
        return status

    def kill(self) -> None:
        """Make sure the program is gone."""
        if self.process.isalive():
            self.process.close(force=True)


async def client_count(gateway: RunningGateway, workspace_id: str) -> int | None:
    """How many clients the admin listing shows for the workspace (None: no session)."""
    entry = await gateway.session(workspace_id)
    return None if entry is None else int(entry["clients"])


async def test_real_tui_connects_through_the_gateway_and_reaches_its_prompt(
    gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path
) -> None:
    # The TUI gets its own HOME and CODEX_HOME, so it never reads or writes the machine's.
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
        TOKEN_VAR: token_for("ws_tui"),
    }
    url = gateway.ws_url.removesuffix("/")
    argv = [str(real_codex_bin), "--remote", url, "--remote-auth-token-env", TOKEN_VAR]
    terminal = Terminal.spawn(argv, env, project)
    try:
        screen = await trio.to_thread.run_sync(terminal.wait_for_screen, READY, READY_TIMEOUT)
        # The working directory shown is the session's, on the gateway's side.
        assert "/ws_tui/home" in screen
        entry = await gateway.session("ws_tui")
        assert entry is not None and entry["state"] == "running", entry
        assert entry["clients"] == 1

        terminal.process.sendcontrol("c")
        status = await trio.to_thread.run_sync(terminal.wait_exit, EXIT_TIMEOUT)
        assert status == 0, terminal.text
    finally:
        terminal.kill()

    # The gateway notices the TUI has gone (no event reaches the test: poll the listing).
    with trio.fail_after(10):
        while await client_count(gateway, "ws_tui") != 0:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(POLL_INTERVAL)
