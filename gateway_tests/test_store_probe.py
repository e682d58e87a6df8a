"""The start-up probe of S3 conditional writes: moto honours them; a stripping store does not."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

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
from gateway_tests.faultproxy import FaultProxy
from gateway_tests.harness import (
    LaunchGateway,
    RunningGateway,
    closed_port,
    eventually,
    gateway_env,
    start_gateway,
)
from gateway_tests.s3_control import StrippingStore, s3_env
from gateway_tests.s3_server import MotoServer, settings_for


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


# -- replica mode: conditional writes are the ownership protocol itself -----------------------

PEER_SECRET = "test-peer-secret-never-logged"


async def replica_vars() -> dict[str, str]:
    return {
        "CXG_PEER_ADDR": f"127.0.0.1:{await closed_port()}",
        "CXG_PEER_LISTEN_ADDR": "127.0.0.1:0",
        "CXG_PEER_SECRET": PEER_SECRET,
        "CXG_POD_NAME": "probe-pod",
    }


@pytest.mark.parametrize("allow_unfenced", ["false", "true"])
async def test_replica_mode_refuses_a_store_that_ignores_conditions_whatever_the_opt_in(
    stripping_settings: tuple[S3Settings, StrippingStore],
    tmp_path: Path,
    fake_codex_bin: Path,
    allow_unfenced: str,
) -> None:
    settings, proxy = stripping_settings
    env = {
        **os.environ,
        **gateway_env(tmp_path, fake_codex_bin),
        **s3_env(settings),
        **await replica_vars(),
        "CXG_S3_ALLOW_UNFENCED": allow_unfenced,
    }
    result = await run_cli(["serve"], env)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    message = stderr.strip().splitlines()[-1]
    assert "replica mode (CXG_PEER_ADDR) needs an object store that honours conditional" in message
    assert "CXG_S3_ALLOW_UNFENCED cannot lift" in message
    assert "If-Match with a wrong ETag" in message and settings.bucket in message
    assert proxy.stripped >= 3
    assert PEER_SECRET not in stderr + result.stdout.decode()
    # Nothing was served: the refusal comes before the listener.
    assert "daemon.serving" not in stderr + result.stdout.decode()


async def test_replica_mode_refuses_a_store_it_cannot_ask(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    settings = settings_for(f"http://127.0.0.1:{await closed_port()}")
    env = {
        **os.environ,
        **gateway_env(tmp_path, fake_codex_bin),
        **s3_env(settings),
        **await replica_vars(),
        "CXG_S3_TIMEOUT": "1s",
    }
    result = await run_cli(["serve"], env)
    assert result.returncode == 1
    message = result.stderr.decode().strip().splitlines()[-1]
    assert "needs to confirm that the object store" in message
    assert "could not be asked" in message


async def test_replica_mode_asks_a_store_again_until_it_answers(
    nursery: trio.Nursery, moto_server: MotoServer, tmp_path: Path, fake_codex_bin: Path
) -> None:
    target = urlsplit(moto_server.endpoint)
    assert target.hostname is not None and target.port is not None
    link: FaultProxy = await nursery.start(FaultProxy((target.hostname, target.port)).serve)
    link.refuse_new()
    env = {
        **gateway_env(tmp_path, fake_codex_bin),
        **s3_env(settings_for(link.url())),
        **await replica_vars(),
    }
    started: list[RunningGateway] = []
    ready = trio.Event()

    async def start() -> None:
        started.append(await start_gateway(nursery, env))
        ready.set()

    with capture_logs() as logs:
        nursery.start_soon(start)
        await eventually(
            lambda: any(entry["event"] == "store.probe_failed" for entry in logs), within=30
        )
        assert not ready.is_set()
        link.pass_through()
        with trio.fail_after(30):
            await ready.wait()
    try:
        assert [entry for entry in logs if entry["event"] == "store.fenced"]
    finally:
        await started[0].shutdown()
