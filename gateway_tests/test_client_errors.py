"""What a client sees when its connect fails on our side: a fixed sentence and a request id.

For each cause of a 503 (verifier unreachable, store unreachable, child failing to start) the
body names no URL, endpoint or bucket; the same request id is in the body and in the
``X-Request-Id`` header; the detail is in the daemon's log once, under that request id.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected

from gateway_tests.daemon_process import daemon_env, serve_process, ws_url
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import bearer, closed_port, rejected_connect, token_for

CONNECT_TIMEOUT = 30.0


async def _rejected(url: str, token: str) -> ConnectionRejected:
    return await rejected_connect(ws_url(url), bearer(token), within=CONNECT_TIMEOUT)


def _header(rejected: ConnectionRejected, name: bytes) -> str | None:
    for key, value in rejected.headers or ():
        if key.lower() == name:
            return value.decode()
    return None


@pytest.mark.parametrize("cause", ["verifier", "store", "child"])
async def test_a_503_names_nothing_internal_and_carries_a_request_id(
    cause: str, tmp_path: Path, fake_codex_bin: Path
) -> None:
    port = await closed_port()
    secrets_in_detail: list[str] = []
    token = token_for("ws_err")
    overrides: dict[str, str] = {}
    codex_bin = fake_codex_bin
    if cause == "verifier":
        url = f"http://127.0.0.1:{port}/private-verifier"
        overrides = {
            "CXG_AGENTSERVER_INTERNAL_URL": url,
            "CXG_AGENTSERVER_INTERNAL_SECRET": "internal-secret",
        }
        token = "ast_some_agentserver_token"
        secrets_in_detail = [f"127.0.0.1:{port}"]
        event = "auth.verifier_unavailable"
    elif cause == "store":
        overrides = {
            "CXG_S3_BUCKET": "private-bucket-name",
            "CXG_S3_ENDPOINT": f"http://127.0.0.1:{port}",
            "CXG_S3_PATH_STYLE": "true",
            "CXG_S3_ACCESS_KEY_ID": "key-id",
            "CXG_S3_SECRET_ACCESS_KEY": "key-secret",
        }
        secrets_in_detail = ["private-bucket-name"]
        event = "connect.session_start_failed"
    else:
        codex_bin = make_fake_codex_launcher(tmp_path / "bin", EXIT_AT_START="7")
        secrets_in_detail = ["codex app-server exited before printing its listening address"]
        event = "connect.session_start_failed"
    env = daemon_env(tmp_path, codex_bin, **overrides)
    if cause == "verifier":
        del env["CXG_INBOUND_HMAC_SECRET"]

    async with serve_process(env) as (daemon, url):
        with trio.fail_after(CONNECT_TIMEOUT * 2):
            rejected = await _rejected(url, token)
            record = await daemon.wait_for_log(event)
    body = (rejected.body or b"").decode()
    request_id = _header(rejected, b"x-request-id")
    assert rejected.status_code == 503
    assert request_id is not None and len(request_id) == 16
    assert body.endswith(f"(request id {request_id})\n")
    for secret in [*secrets_in_detail, "http://", "s3://", "Error"]:
        assert secret not in body, body
    # The detail is in the log, once, with the request id the client got.
    assert record["request_id"] == request_id
    logged = str(record.get("error", "")) + str(record.get("verifier_url", ""))
    assert any(secret in logged for secret in secrets_in_detail), record
    carrying = [r for r in daemon.records if r.get("request_id") == request_id]
    assert len(carrying) == 1
    assert not any("Traceback" in line for line in daemon.lines)
