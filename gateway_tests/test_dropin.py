"""Moving a Go deployment over: what the start-up log tells the operator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from gateway.auth.tokens import workspace_id_of_dir
from gateway.config import S3Settings
from gateway_tests.config_samples import EXEC_GATEWAY
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.harness import (
    LaunchGateway,
    bearer,
    connect,
    rejected_connect,
    token_for,
)
from gateway_tests.s3_control import archive_files, s3_env
from gateway_tests.s3_server import MotoServer


async def test_no_exec_gateway_is_said_once_at_start(launch_gateway: LaunchGateway) -> None:
    with capture_logs() as logs:
        running = await launch_gateway()
        async with connect(running, "ws_a"), connect(running, "ws_b"):
            pass
        await running.shutdown()
    warnings = [entry for entry in logs if entry["event"] == "config.no_executors"]
    assert len(warnings) == 1
    assert "without executors" in warnings[0]["hint"]


async def test_a_configured_exec_gateway_is_not_reported_missing(
    launch_gateway: LaunchGateway,
) -> None:
    with capture_logs() as logs:
        running = await launch_gateway(**EXEC_GATEWAY)
        await running.shutdown()
    assert not [entry for entry in logs if entry["event"] == "config.no_executors"]
    assert [entry for entry in logs if entry["event"] == "daemon.serving"]


# -- workspace ids as wide as the Go service's -------------------------------------------------

GO_TYPICAL_ID = "team a@corp:ws 日本 #1"


async def test_a_go_typical_id_keeps_the_go_object_key_and_gets_a_safe_directory(
    launch_gateway: LaunchGateway,
    s3_settings: S3Settings,
    moto_server: MotoServer,
) -> None:
    running = await launch_gateway(**s3_env(s3_settings))
    root = Path(running.config.tmp_root)
    try:
        with trio.fail_after(30):
            async with connect(running, GO_TYPICAL_ID) as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                [directory] = [p for p in root.iterdir() if not p.name.startswith(".")]
                assert re.fullmatch(r"_[a-z2-7]+", directory.name)
                assert workspace_id_of_dir(directory.name) == GO_TYPICAL_ID
                entry = await running.session(GO_TYPICAL_ID)
                assert entry is not None and entry["state"] == "running"
                assert (await running.restart(GO_TYPICAL_ID)).status_code == 204
            listed = moto_server.boto_client().list_objects_v2(Bucket=s3_settings.bucket)
            keys = [item["Key"] for item in listed.get("Contents", [])]
            # Exactly the Go service's key, byte for byte.
            assert keys == [f"codex-app-gateway/{GO_TYPICAL_ID}.tar.gz"]
            members = archive_files(
                moto_server.boto_client()
                .get_object(Bucket=s3_settings.bucket, Key=keys[0])["Body"]
                .read()
            )
            assert any(thread_id in name for name in members)
            assert not directory.exists()
            async with connect(running, GO_TYPICAL_ID) as rpc:
                listed_threads = (await rpc.result("thread/list", {}))["data"]
                assert thread_id in {thread["id"] for thread in listed_threads}
    finally:
        await running.shutdown()


# -- the Go chart's HMAC secret next to the verifier --------------------------------------------

AGENTSERVER_SECRET = "agentserver-internal-secret"
AST_TOKEN = "ast_0a1b2c3d_s3cr3tpart"


@pytest.mark.parametrize("opt_in", ["", "true"])
async def test_hmac_tokens_through_the_gateway_need_the_opt_in_next_to_the_verifier(
    launch_gateway: LaunchGateway, nursery: trio.Nursery, opt_in: str
) -> None:
    agentserver = FakeAgentserver(internal_secret=AGENTSERVER_SECRET)
    agentserver.add_verify_token(AST_TOKEN, user_id="u", workspace_id="ws_ast")
    agentserver_url = await nursery.start(agentserver.serve)
    with capture_logs() as logs:
        running = await launch_gateway(
            CXG_AGENTSERVER_INTERNAL_URL=agentserver_url,
            CXG_AGENTSERVER_INTERNAL_SECRET=AGENTSERVER_SECRET,
            CXG_ALLOW_HMAC_TOKENS=opt_in,
        )
    try:
        [line] = [entry for entry in logs if entry["event"] == "auth.authenticators"]
        assert line["live"] == (["agentserver", "hmac"] if opt_in else ["agentserver"])
        with trio.fail_after(30):
            if opt_in:
                async with connect(running, "ws_hmac") as rpc:
                    assert (await rpc.result("fake/pid"))["pid"] > 0
            else:
                rejected = await rejected_connect(running.ws_url, bearer(token_for("ws_hmac")))
                assert rejected.status_code == 401
            # agentserver's own tokens work either way.
            headers = [(b"authorization", f"Bearer {AST_TOKEN}".encode())]
            async with open_websocket_url(running.ws_url, extra_headers=headers):
                pass
        # Refused before any session started for the HMAC token's workspace.
        assert (await running.session("ws_hmac") is None) is not bool(opt_in)
    finally:
        await running.shutdown()
