"""The start-up probe of S3 conditional writes: moto honours them; a stripping store does not."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx2
import pytest
import trio
from structlog.testing import capture_logs

from gateway import metrics
from gateway.config import S3Settings
from gateway.store.base import KEY_PREFIX
from gateway.store.s3 import S3ObjectStore
from gateway_tests.daemon_process import run_cli
from gateway_tests.fakes.serving import serve_on_loopback
from gateway_tests.harness import LaunchGateway, closed_port, gateway_env
from gateway_tests.s3_control import s3_env
from gateway_tests.s3_server import MotoServer, settings_for

CONDITIONAL_HEADERS = frozenset({b"if-match", b"if-none-match"})


@attrs.define
class StrippingStore:
    """An HTTP proxy on loopback in front of moto that drops If-Match / If-None-Match.

    It behaves like an S3-compatible server that ignores conditional writes: every request
    reaches moto, just without its conditions. ``stripped`` counts the headers removed.
    """

    upstream: str
    stripped: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = []
        for name, value in scope["headers"]:
            if name.lower() in CONDITIONAL_HEADERS:
                self.stripped += 1
            elif name.lower() != b"host":
                headers.append((name.decode(), value.decode()))
        # The S3 client sends absolute-form targets (http://host/path); keep the path only.
        target = urlsplit(scope["raw_path"].decode())
        url = self.upstream + target.path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode()
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.request(scope["method"], url, headers=headers, content=body)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode())
                    for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})


@pytest.fixture
async def stripping_settings(
    s3_settings: S3Settings, moto_server: MotoServer
) -> AsyncIterator[tuple[S3Settings, StrippingStore]]:
    store = StrippingStore(upstream=moto_server.endpoint)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_on_loopback, store)
        yield settings_for(url), store
        nursery.cancel_scope.cancel()


def probe_objects(moto: MotoServer, bucket: str) -> list[str]:
    listed = moto.boto_client().list_objects_v2(Bucket=bucket, Prefix=f"{KEY_PREFIX}.probe")
    return [entry["Key"] for entry in listed.get("Contents", [])]


async def test_moto_honours_conditional_puts_and_the_probe_cleans_up(
    s3_settings: S3Settings, moto_server: MotoServer
) -> None:
    store = S3ObjectStore(s3_settings)
    try:
        assert await store.probe_conditional_writes() == []
    finally:
        await store.aclose()
    assert probe_objects(moto_server, s3_settings.bucket) == []


async def test_a_store_that_strips_conditions_is_detected(
    stripping_settings: tuple[S3Settings, StrippingStore], moto_server: MotoServer
) -> None:
    settings, proxy = stripping_settings
    store = S3ObjectStore(settings)
    try:
        ignored = await store.probe_conditional_writes()
    finally:
        await store.aclose()
    assert ignored == ["If-None-Match: * on an existing object", "If-Match with a wrong ETag"]
    assert proxy.stripped >= 3
    assert probe_objects(moto_server, settings.bucket) == []


async def test_serve_refuses_to_start_on_a_store_that_ignores_conditions(
    stripping_settings: tuple[S3Settings, StrippingStore], tmp_path: Path, fake_codex_bin: Path
) -> None:
    settings, _ = stripping_settings
    env = {**os.environ, **gateway_env(tmp_path, fake_codex_bin), **s3_env(settings)}
    result = await run_cli(["serve"], env)
    assert result.returncode == 1
    message = result.stderr.decode().strip().splitlines()[-1]
    assert "ignores conditional writes" in message
    assert "CXG_S3_ALLOW_UNFENCED=true" in message
    assert settings.bucket in message


async def test_with_the_opt_in_it_starts_unfenced_and_says_so(
    launch_gateway: LaunchGateway, stripping_settings: tuple[S3Settings, StrippingStore]
) -> None:
    settings, _ = stripping_settings
    with capture_logs() as logs:
        running = await launch_gateway(**s3_env(settings), CXG_S3_ALLOW_UNFENCED="true")
    try:
        [line] = [entry for entry in logs if entry["event"] == "store.unfenced"]
        assert line["log_level"] == "warning"
        assert "If-Match with a wrong ETag" in line["ignored"]
        async with httpx2.AsyncClient() as http:
            exported = (await http.get(f"{running.http_url}/metrics")).text
        assert "cxg_store_unfenced 1.0" in exported
    finally:
        await running.shutdown()
        metrics.STORE_UNFENCED.set(0)


async def test_a_fenced_store_starts_and_reports_fenced(
    launch_gateway: LaunchGateway, s3_settings: S3Settings
) -> None:
    with capture_logs() as logs:
        running = await launch_gateway(**s3_env(s3_settings))
    await running.shutdown()
    assert [entry for entry in logs if entry["event"] == "store.fenced"]
    assert metrics.STORE_UNFENCED._value.get() == 0


async def test_a_store_unreachable_at_start_is_logged_and_the_gateway_still_starts(
    launch_gateway: LaunchGateway,
) -> None:
    settings = settings_for(f"http://127.0.0.1:{await closed_port()}")
    with capture_logs() as logs:
        running = await launch_gateway(**s3_env(settings))
    await running.shutdown()
    [line] = [entry for entry in logs if entry["event"] == "store.probe_failed"]
    assert "unreachable" in line["error"]
    assert not [entry for entry in logs if entry["event"] in ("store.fenced", "store.unfenced")]
