"""What an operator meets at start: checks that gate readiness, versions, bind failures.

The daemon runs as a real process (``python -m gateway serve``); the S3 store is moto on
loopback, reached with credentials from the standard AWS chain only (no ``CXG_S3_*`` keys), as
with IRSA or an instance profile.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import trio

from gateway.version import package_version
from gateway_tests.daemon_process import (
    START_TIMEOUT,
    base_env,
    client,
    daemon_env,
    run_cli,
    serve_process,
)
from gateway_tests.harness import token_for
from gateway_tests.s3_server import MotoServer

CHECK_TIMEOUT = 30.0


async def _get(url: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.get(url)


async def test_version_prints_the_package_version() -> None:
    done = await run_cli(["--version"], base_env())
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"codex-app-gateway {package_version()}"


async def test_missing_codex_binary_keeps_readiness_failing_with_one_clear_line(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-codex"
    env = daemon_env(tmp_path, missing)
    async with serve_process(env) as (daemon, url):
        with trio.fail_after(CHECK_TIMEOUT):
            failed = await daemon.wait_for_log("startup.check_failed")
        assert str(missing) in failed["error"] and "CXG_CODEX_BIN" in failed["error"]
        ready = await _get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.text == "start-up checks failing (see the gateway's log)\n"
        # The detail is for the log, not for anyone who can reach /readyz.
        assert str(missing) not in ready.text
        assert (await _get(f"{url}/healthz")).status_code == 200
        # One line per distinct failure, not one per retry.
        await daemon.wait_for_log("daemon.serving")
        assert sum(r.get("event") == "startup.check_failed" for r in daemon.records) == 1


async def test_missing_bucket_fails_readiness_until_it_is_created(
    tmp_path: Path, moto_server: MotoServer, fake_codex_bin: Path
) -> None:
    moto_server.reset()
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = chain\naws_secret_access_key = chain\n")
    env = daemon_env(
        tmp_path,
        fake_codex_bin,
        CXG_S3_BUCKET="created-later",
        CXG_S3_ENDPOINT=moto_server.endpoint,
        CXG_S3_REGION="us-east-1",
        CXG_S3_PATH_STYLE="true",
        # No CXG_S3_ACCESS_KEY_ID: the default chain finds the shared credentials file.
        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    assert not any(
        name.startswith("CXG_S3_ACCESS") or name.startswith("CXG_S3_SECRET") for name in env
    )
    async with serve_process(env) as (daemon, url):
        with trio.fail_after(CHECK_TIMEOUT):
            failed = await daemon.wait_for_log("startup.check_failed")
        assert failed["error"] == "bucket 'created-later' does not exist (CXG_S3_BUCKET)"
        assert (await _get(f"{url}/readyz")).status_code == 503

        moto_server.boto_client().create_bucket(Bucket="created-later")
        with trio.fail_after(CHECK_TIMEOUT):
            passed = await daemon.wait_for_log("startup.checks_passed")
        assert passed["codex_version"] == "codex-cli 0.0.0-fake"
        ready = await _get(f"{url}/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        metrics = (await _get(f"{url}/metrics")).text
        assert (
            f'cxg_build_info{{codex_version="codex-cli 0.0.0-fake",version="{package_version()}"}}'
            " 1.0" in metrics
        )


async def test_no_credentials_anywhere_is_a_failed_store_check(
    tmp_path: Path, moto_server: MotoServer, fake_codex_bin: Path
) -> None:
    env = daemon_env(
        tmp_path,
        fake_codex_bin,
        CXG_S3_BUCKET="any-bucket",
        CXG_S3_ENDPOINT=moto_server.endpoint,
        CXG_S3_PATH_STYLE="true",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    async with serve_process(env) as (daemon, url):
        with trio.fail_after(CHECK_TIMEOUT):
            failed = await daemon.wait_for_log("startup.check_failed")
        assert "any-bucket" in failed["error"]
        assert "credentials" in failed["error"].lower()
        assert (await _get(f"{url}/readyz")).status_code == 503


async def test_a_port_already_in_use_is_one_line_and_exit_2(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = daemon_env(tmp_path, fake_codex_bin, CXG_LISTEN_ADDR=f"127.0.0.1:{port}")
        with trio.fail_after(START_TIMEOUT):
            done = await run_cli(["serve"], env)
    assert done.returncode == 2
    errors = [
        line
        for line in done.stderr.decode().splitlines()
        if line.startswith("codex-app-gateway serve:")
    ]
    assert errors == [
        f"codex-app-gateway serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "Traceback" not in done.stderr.decode()
    assert b"daemon.serving" not in done.stderr


async def test_attach_detach_and_session_start_are_logged(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    async with serve_process(daemon_env(tmp_path, fake_codex_bin)) as (daemon, url):
        with trio.fail_after(CHECK_TIMEOUT):
            # An initialized client: the gateway's first ping has been answered by then.
            async with client(url, token_for("ws_logs")) as rpc:
                started = await daemon.wait_for_log("session.started", workspace_id="ws_logs")
                attached = await daemon.wait_for_log("client.attached", workspace_id="ws_logs")
                await rpc.ws.aclose(4005, "leaving now")
            detached = await daemon.wait_for_log("client.detached", workspace_id="ws_logs")
    assert isinstance(started["pid"], int)
    assert attached["clients"] == 1
    assert (detached["closed_by"], detached["code"], detached["reason"]) == (
        "client",
        4005,
        "leaving now",
    )
    # One line for the upgrade, not two: the tunnel's own attach line (Hypercorn never sees a
    # relay upgrade, so it writes no access line for it).
    upgrades = [r for r in daemon.records if r.get("logger") == "hypercorn.access"]
    assert upgrades == [], upgrades
    assert [r["event"] for r in daemon.records].count("client.attached") == 1
