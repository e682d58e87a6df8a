"""The daemon as a real process: ``python -m gateway …`` with signals, exit codes and its log.

These tests run the command line exactly as an operator (or Kubernetes) does, with the fake
codex as the child: SIGTERM drains with 1001 and saves every session within the drain budget,
configuration and usage errors exit 2 with one line, ``mint-token`` mints what ``serve`` accepts,
and no secret ever reaches the daemon's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway.cli import build_parser
from gateway_tests.conftest import REPO
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    ADMIN_SECRET,
    HMAC_SECRET,
    MAX_MESSAGE,
    Rpc,
    gateway_env,
    token_for,
)

# How long a daemon may take to start listening (interpreter start-up and imports included).
START_TIMEOUT = 30.0
# Slack on top of CXG_DRAIN_BUDGET for the interpreter to exit after the drain.
EXIT_MARGIN = 3.0
# A one-shot command (help, mint-token, a refused start) ends well within this.
CLI_TIMEOUT = 30.0


def base_env(**extra: str) -> dict[str, str]:
    """A clean process environment: nothing inherited but what a shell needs."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "TZ") if name in os.environ}
    env["HOME"] = os.environ.get("HOME", "/")
    env.update(extra)
    return env


def gateway_command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """``python -m gateway ARGS…`` with this interpreter (the repository's virtualenv).

    ``prefix`` runs it through a wrapper (``setpriv …``, to bound its capabilities).
    """
    return [*prefix, sys.executable, "-m", "gateway", *args]


async def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Run a one-shot command (``mint-token``, ``--help``, a failing ``serve``) to its end."""
    with trio.fail_after(CLI_TIMEOUT):
        return await trio.run_process(
            gateway_command(*args, prefix=prefix),
            env=dict(env),
            cwd=REPO,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class DaemonProcess:
    """A ``serve`` process whose stderr (JSON log lines) is read continuously.

    The pipe is always drained (a daemon blocked on a full pipe would hang the test), every line
    is kept, and waiters are woken on each new line or when the process exits.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.exited = trio.Event()
        self._changed = trio.Event()

    @property
    def output(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return "\n".join(self.lines)

    async def pump(self) -> None:
        """Read stderr to EOF, then reap the process."""
        assert self.process.stderr is not None
        buffer = b""
        while chunk := await self.process.stderr.receive_some(65536):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self._add(raw)
        if buffer:
            self._add(buffer)
        await self.process.wait()
        self.exited.set()
        self._wake()

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            self.records.append(record)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_log(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first log record named ``event`` whose fields include ``fields``."""
        while True:
            for record in self.records:
                if record.get("event") == event and all(
                    record.get(key) == value for key, value in fields.items()
                ):
                    return record
            if self.exited.is_set():
                raise AssertionError(f"daemon exited before logging {event}:\n{self.output}")
            await self._changed.wait()

    async def wait_exit(self) -> int:
        """The exit status, once the process has exited and its output is read."""
        await self.exited.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def serve_process(
    env: Mapping[str, str], *args: str, prefix: Sequence[str] = ()
) -> AsyncIterator[tuple[DaemonProcess, str]]:
    """Run ``python -m gateway serve ARGS…`` and yield it with its base HTTP URL.

    The URL comes from the ``daemon.serving`` log line (the daemon listens on port 0). On the
    way out a still-running daemon is killed, so a failing test never leaves one behind.
    """
    process = await trio.lowlevel.open_process(
        gateway_command("serve", *args, prefix=prefix),
        env=dict(env),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon = DaemonProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.pump)
            with trio.fail_after(START_TIMEOUT):
                serving = await daemon.wait_for_log("daemon.serving")
            yield daemon, serving["urls"][0]
            if process.returncode is None:
                process.kill()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def daemon_env(tmp_path: Path, codex_bin: Path, **overrides: str) -> dict[str, str]:
    """The harness's daemon environment, logging JSON, on top of a clean process environment."""
    return base_env(**gateway_env(tmp_path, codex_bin, CXG_LOG_FORMAT="json", **overrides))


def ws_url(http_url: str) -> str:
    """The WebSocket URL of a daemon serving at ``http_url``."""
    return "ws://" + http_url.removeprefix("http://") + "/"


@asynccontextmanager
async def client(http_url: str, token: str) -> AsyncIterator[Rpc]:
    """An initialized JSON-RPC client connected through the daemon with ``token``."""
    async with open_websocket_url(
        ws_url(http_url),
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
        max_message_size=MAX_MESSAGE,
        connect_timeout=30,
    ) as ws:
        rpc = Rpc(ws)
        await rpc.initialize()
        yield rpc


async def closed_with(rpc: Rpc) -> int:
    """Read until the connection closes; return the close code."""
    try:
        while True:
            await rpc.ws.get_message()
    except ConnectionClosed as closed:
        assert closed.reason is not None
        return closed.reason.code


def one_line(stream: bytes) -> str:
    """The single line a usage or configuration error must consist of."""
    lines = stream.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- SIGTERM ------------------------------------------------------------------------------------


async def test_sigterm_closes_clients_with_1001_saves_every_session_and_exits_0(
    tmp_path: Path,
) -> None:
    # A child that ignores SIGTERM holds the drain open for the whole stop grace, so the
    # draining state is observable; the session is still saved after the SIGKILL.
    launcher = make_fake_codex_launcher(tmp_path / "bin", IGNORE_SIGTERM="1")
    budget = 15.0
    env = daemon_env(tmp_path, launcher, CXG_CHILD_STOP_GRACE="2s", CXG_DRAIN_BUDGET=f"{budget:g}s")
    store = tmp_path / "store" / "codex-app-gateway"
    async with (
        serve_process(env) as (daemon, url),
        client(url, token_for("ws_term_a")) as one,
        client(url, token_for("ws_term_b")) as two,
        httpx2.AsyncClient(timeout=10) as http,
    ):
        threads = [(await rpc.result("thread/start", {}))["thread"]["id"] for rpc in (one, two)]
        assert (await http.get(f"{url}/readyz")).status_code == 200

        daemon.process.send_signal(signal.SIGTERM)
        signalled = trio.current_time()
        with trio.fail_after(5):
            codes = [await closed_with(one), await closed_with(two)]
        assert codes == [1001, 1001]

        # The children ignore SIGTERM for the 2 s grace: the drain is still under way.
        readyz = await http.get(f"{url}/readyz")
        assert readyz.status_code == 503
        with pytest.raises(ConnectionRejected) as rejected:
            async with client(url, token_for("ws_term_c")):
                pass
        assert rejected.value.status_code == 503

        with trio.fail_after(budget + EXIT_MARGIN):
            status = await daemon.wait_exit()
        assert status == 0, daemon.output
        assert trio.current_time() - signalled < budget + EXIT_MARGIN

    for workspace_id, thread_id in zip(("ws_term_a", "ws_term_b"), threads, strict=True):
        with tarfile.open(store / f"{workspace_id}.tar.gz") as archive:
            assert any(thread_id in name for name in archive.getnames()), workspace_id
    finished = await daemon.wait_for_log("drain.finished")
    assert (finished["saved"], finished["total"]) == (2, 2)


# -- configuration and usage errors -------------------------------------------------------------


async def test_serve_with_a_bad_duration_exits_2_naming_the_variable_and_value(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    env = daemon_env(tmp_path, fake_codex_bin, CXG_IDLE_SHUTDOWN="soon")
    result = await run_cli(["serve"], env)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "CXG_IDLE_SHUTDOWN" in line
    assert "soon" in line


async def test_serve_without_any_authenticator_exits_2_naming_what_to_set(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    env = daemon_env(tmp_path, fake_codex_bin)
    del env["CXG_INBOUND_HMAC_SECRET"]
    result = await run_cli(["serve"], env)
    assert result.returncode == 2
    line = one_line(result.stderr)
    for variable in (
        "CXG_INBOUND_HMAC_SECRET",
        "CXG_AGENTSERVER_INTERNAL_URL",
        "CXG_AGENTSERVER_INTERNAL_SECRET",
    ):
        assert variable in line


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            {"CXG_S3_BUCKET": "bucket", "CXG_S3_ENDPOINT": "ftp://store.example"}, id="s3-endpoint"
        ),
        pytest.param({"CXG_EXEC_GATEWAY_INTERNAL_SECRET": "s3cr3t-exec"}, id="partial-group"),
    ],
)
async def test_configuration_errors_never_echo_a_secret(
    tmp_path: Path, fake_codex_bin: Path, bad: dict[str, str]
) -> None:
    secrets = {
        "CXG_INBOUND_HMAC_SECRET": "s3cr3t-hmac",
        "CXG_ADMIN_SECRET": "s3cr3t-admin",
        "CXG_S3_SECRET_ACCESS_KEY": "s3cr3t-s3",
        "CXG_CODEX_API_KEY": "s3cr3t-model",
    }
    env = daemon_env(tmp_path, fake_codex_bin, **secrets, **bad)
    result = await run_cli(["serve"], env)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("codex-app-gateway serve: config:")
    assert b"s3cr3t" not in result.stderr + result.stdout


async def test_unknown_subcommand_exits_2_with_one_line() -> None:
    result = await run_cli(["frobnicate"], base_env())
    assert result.returncode == 2
    assert "frobnicate" in one_line(result.stderr)


async def test_unknown_flag_exits_2_with_one_line(tmp_path: Path, fake_codex_bin: Path) -> None:
    result = await run_cli(["serve", "--no-such-flag"], daemon_env(tmp_path, fake_codex_bin))
    assert result.returncode == 2
    assert "--no-such-flag" in one_line(result.stderr)


def subcommands() -> list[str]:
    """Every subcommand the command line registers."""
    parser = build_parser()
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            return sorted(choices)
    raise AssertionError("the parser has no subcommands")


async def test_help_works_on_the_command_and_every_subcommand() -> None:
    names = subcommands()
    assert {"serve", "mint-token"} <= set(names)
    for args in ([], *([name] for name in names)):
        result = await run_cli([*args, "--help"], base_env())
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.startswith(b"usage: codex-app-gateway"), args
        assert result.stderr == b""


# -- mint-token ---------------------------------------------------------------------------------


async def test_minted_token_is_accepted_by_the_daemon(tmp_path: Path, fake_codex_bin: Path) -> None:
    env = daemon_env(tmp_path, fake_codex_bin)
    minted = await run_cli(["mint-token", "--workspace", "ws_minted"], env)
    assert minted.returncode == 0, minted.stderr
    token = one_line(minted.stdout)
    assert token.startswith("ws_minted.")
    async with serve_process(env) as (daemon, url):
        async with client(url, token) as rpc:
            assert (await rpc.result("thread/start", {}))["thread"]["id"]
        async with httpx2.AsyncClient(timeout=10) as http:
            listing = await http.get(
                f"{url}/admin/sessions", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}
            )
        assert [s["workspaceId"] for s in listing.json()["sessions"]] == ["ws_minted"]
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await daemon.wait_exit() == 0


async def test_mint_token_without_the_secret_exits_2() -> None:
    result = await run_cli(["mint-token", "--workspace", "ws_any"], base_env())
    assert result.returncode == 2
    assert "CXG_INBOUND_HMAC_SECRET" in one_line(result.stderr)
    assert result.stdout == b""


# -- secrets and the log ------------------------------------------------------------------------


async def test_no_secret_reaches_the_log_over_a_whole_session(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    internal_secret = "s3cr3t-agentserver-internal"
    agentserver = FakeAgentserver(internal_secret=internal_secret)
    remote_token = "ast_abcdefgh_s3cr3tremotetoken"
    agentserver.add_verify_token(remote_token, user_id="u1", workspace_id="ws_secret")
    agentserver.connect_modelserver("ws_secret")
    agentserver_url: str = await nursery.start(agentserver.serve)
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    secrets = {
        "CXG_AGENTSERVER_INTERNAL_SECRET": internal_secret,
        "CXG_INBOUND_HMAC_SECRET": HMAC_SECRET,
        "CXG_ADMIN_SECRET": ADMIN_SECRET,
        "CXG_CODEX_API_KEY": "s3cr3t-static-model-key",
        "CXG_S3_SECRET_ACCESS_KEY": "s3cr3t-s3-key",
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "s3cr3t-exec-internal",
        "CXG_CAPTOKEN_HMAC_SECRET": "s3cr3t-captoken",
    }
    env = daemon_env(
        tmp_path,
        fake_codex_bin,
        CXG_AGENTSERVER_INTERNAL_URL=agentserver_url,
        CXG_EXEC_GATEWAY_URL=f"ws://127.0.0.1:{dead_port}",
        CXG_EXEC_GATEWAY_INTERNAL_URL=f"http://127.0.0.1:{dead_port}",
        CXG_LOG_LEVEL="debug",
        **secrets,
    )
    hmac_token = token_for("ws_secret")
    async with serve_process(env) as (daemon, url):
        async with client(url, remote_token) as rpc:
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            await rpc.result(
                "turn/start",
                {"threadId": thread_id, "input": [{"type": "text", "text": "hello"}]},
            )
            with trio.fail_after(10):
                await rpc.wait_for("turn/completed")
        async with client(url, hmac_token) as rpc:
            await rpc.result("thread/list", {})
        async with httpx2.AsyncClient(timeout=30) as http:
            restarted = await http.post(
                f"{url}/admin/sessions/restart",
                json={"workspaceId": "ws_secret"},
                headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
            )
        assert restarted.status_code == 204
        async with client(url, remote_token) as rpc:
            await rpc.result("thread/list", {})
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await daemon.wait_exit() == 0
    model_tokens = agentserver.issued_tokens("ws_secret")
    assert model_tokens, "the session never fetched its model token"
    output = daemon.output
    assert "session.stopped" in output
    for value in [*secrets.values(), remote_token, hmac_token, *model_tokens]:
        assert value not in output, f"a secret ({value[:6]}…) is in the daemon's log"
