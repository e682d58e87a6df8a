"""The daemon as a real process: ``python -m gateway …`` with signals, exit codes and its log.

These tests run the command line exactly as an operator (or Kubernetes) does, with the fake
codex as the child: SIGTERM drains with 1001 and saves every session within the drain budget,
configuration and usage errors exit 2 with one line, ``mint-token`` mints what ``serve`` accepts,
and no secret ever reaches the daemon's output.
"""

from __future__ import annotations

import signal
import tarfile
from pathlib import Path

import httpx2
import pytest
import trio

from gateway.cli import build_parser
from gateway_tests.daemon_process import (
    EXIT_MARGIN,
    base_env,
    client,
    daemon_env,
    one_line,
    run_cli,
    serve_process,
    ws_url,
)
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    ADMIN_SECRET,
    HMAC_SECRET,
    admin_restart,
    admin_sessions,
    bearer,
    closed_port,
    rejected_connect,
    token_for,
)

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
            codes = [(await one.closed()).code, (await two.closed()).code]
        assert codes == [1001, 1001]

        # The children ignore SIGTERM for the 2 s grace: the drain is still under way.
        readyz = await http.get(f"{url}/readyz")
        assert readyz.status_code == 503
        rejected = await rejected_connect(ws_url(url), bearer(token_for("ws_term_c")))
        assert rejected.status_code == 503

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
        assert [s["workspaceId"] for s in await admin_sessions(url)] == ["ws_minted"]
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
    dead_port = await closed_port()
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
        restarted = await admin_restart(url, "ws_secret")
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
