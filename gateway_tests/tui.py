"""The real ``codex --remote`` TUI in a pseudo-terminal, and the gateway it talks to.

The TUI runs in a pseudo-terminal (pexpect) and its output is rendered by a terminal emulator
(pyte), so a test reads the screen a person would see. ``tui_gateway`` is a gateway whose child
is the real codex under the default policy, answered by the fake model server ``tui_model``
(both registered for every module by ``conftest.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import pexpect
import pyte
import pytest
import trio
from prometheus_client import REGISTRY

from gateway_tests.fakes.fake_model_server import FakeModelServer
from gateway_tests.harness import LaunchGateway, RunningGateway, token_for

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
# How long one step on screen (a reply, a popup) may take.
STEP_TIMEOUT = 30.0


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

    def quit(self, timeout: float) -> int | None:
        """Ctrl-C, as a user quits; the exit status (None if killed by a signal).

        One Ctrl-C quits an idle TUI; while the TUI counts work as in flight, a Ctrl-C
        interrupts that work and only arms the quit (codex's exit flow). So when the first has
        not ended the program within 3 s, a second one follows.
        """
        self.process.sendcontrol("c")
        try:
            return self.wait_exit(min(timeout, 3.0))
        except AssertionError:
            if timeout <= 3.0:
                raise
        self.process.sendcontrol("c")
        return self.wait_exit(timeout - 3.0)

    def kill(self) -> None:
        """Make sure the program is gone."""
        if self.process.isalive():
            self.process.close(force=True)


def spawn_tui(
    gateway: RunningGateway, tmp_path: Path, real_codex_bin: Path, workspace: str
) -> Terminal:
    """The real TUI connected to ``gateway`` as ``workspace``, in its own HOME and CODEX_HOME.

    The TUI never reads or writes the machine's own; its project directory is ``project``
    under ``tmp_path``.
    """
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
    """Wait (in a worker thread) until the screen shows every needle; return the screen."""
    return await trio.to_thread.run_sync(terminal.wait_for_screen, needles, STEP_TIMEOUT)


async def type_line(terminal: Terminal, text: str) -> None:
    """Type ``text`` into the composer, wait until the screen shows it, then press Enter."""
    terminal.process.send(text)
    # The composer shows a leading "!" as its shell-mode marker, not as typed text.
    await screen_shows(terminal, text.removeprefix("!"))
    terminal.process.send("\r")


@pytest.fixture
async def tui_model(nursery: trio.Nursery) -> FakeModelServer:
    """The fake model server the TUI's turns reach (through the gateway's child)."""
    server = FakeModelServer(default_text="Reply from the fake model.")
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def tui_gateway(
    launch_gateway: LaunchGateway, real_codex_bin: Path, tui_model: FakeModelServer
) -> RunningGateway:
    """The real codex as the child, the default policy (nothing beyond it), ``tui_model``."""
    return await launch_gateway(
        real_codex_bin,
        CXG_MODEL_PROVIDER_BASE_URL=f"{tui_model.base_url}/v1",
        CXG_CODEX_API_KEY="sk-test",
        CXG_CHILD_READY_TIMEOUT="60s",
        CXG_MODEL=MODEL,
        CXG_POLICY_EXTRA_METHODS="",
    )
