"""The ModelServer client and a session's model credential, against the fake agentserver."""

from __future__ import annotations

import datetime as dt
import stat
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import structlog
import trio

from gateway.codex_home.config_toml import CodexConfig, render_config_toml
from gateway.config import Config, Secret, load_config
from gateway.credentials import (
    ModelServerClient,
    ModelServerProtocolError,
    ModelServerUnavailable,
    SessionModelCredentials,
)
from gateway.credentials.modelserver import parse_expires_at
from gateway.credentials.session import MIN_REFRESH_DELAY, refresh_delay
from gateway_tests.fakes.fake_agentserver import FakeAgentserver

SECRET = "agentserver-internal-secret"
STATIC_KEY = "sk-static-fallback-key"


def make_config(
    agentserver_url: str | None,
    *,
    static_key: str | None = None,
    refresh_interval: str = "5m",
) -> Config:
    environ = {
        "CXG_INBOUND_HMAC_SECRET": "dev",
        "CXG_MODEL_PROVIDER_BASE_URL": "http://127.0.0.1:9/v1",
        "CXG_MODEL_TOKEN_REFRESH_INTERVAL": refresh_interval,
    }
    if agentserver_url is not None:
        environ["CXG_AGENTSERVER_INTERNAL_URL"] = agentserver_url
        environ["CXG_AGENTSERVER_INTERNAL_SECRET"] = SECRET
    if static_key is not None:
        environ["CXG_CODEX_API_KEY"] = static_key
    return load_config(environ)


@pytest.fixture
async def agentserver(nursery: trio.Nursery) -> AsyncIterator[FakeAgentserver]:
    fake = FakeAgentserver(internal_secret=SECRET)
    await nursery.start(fake.serve)
    yield fake


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


# -- ModelServer client ------------------------------------------------------------------------


async def test_client_fetches_token_with_secret_and_escaped_id(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient
) -> None:
    agentserver.connect_modelserver("ws/1 ä", ttl=600.0)
    client = ModelServerClient(http, agentserver.base_url + "/", Secret(SECRET))
    token = await client.fetch("ws/1 ä")
    assert token is not None
    assert token.access_token.reveal() == agentserver.current_token("ws/1 ä")
    assert token.expires_at is not None
    remaining = (token.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
    assert 590 < remaining <= 600
    (request,) = agentserver.token_requests()
    assert request.path == "/internal/workspaces/ws%2F1%20%C3%A4/modelserver-token"
    assert request.headers["x-internal-secret"] == SECRET
    assert token.access_token.reveal() not in repr(token)


async def test_client_no_connection_is_none(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient
) -> None:
    client = ModelServerClient(http, agentserver.base_url, Secret(SECRET))
    assert await client.fetch("ws-without-modelserver") is None
    agentserver.connect_modelserver("ws-empty", empty=True)
    assert await client.fetch("ws-empty") is None


async def test_client_errors_are_typed(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient
) -> None:
    agentserver.connect_modelserver("ws1")
    agentserver.outage = True
    with pytest.raises(ModelServerUnavailable, match="status=503"):
        await ModelServerClient(http, agentserver.base_url, Secret(SECRET)).fetch("ws1")
    agentserver.outage = False
    with pytest.raises(ModelServerProtocolError, match="status=401") as rejected:
        await ModelServerClient(http, agentserver.base_url, Secret("wrong")).fetch("ws1")
    assert "wrong" not in str(rejected.value) and SECRET not in str(rejected.value)

    # Nothing listens on the discard port of loopback.
    with pytest.raises(ModelServerUnavailable, match="ConnectError"):
        await ModelServerClient(http, "http://127.0.0.1:9", Secret(SECRET)).fetch("ws1")


async def test_client_timeout_is_unavailable(http: httpx2.AsyncClient) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = ModelServerClient(http, f"http://127.0.0.1:{port}", Secret(SECRET), timeout=0.2)
    with trio.fail_after(5), pytest.raises(ModelServerUnavailable, match="timed out"):
        await client.fetch("ws1")  # accepted by the kernel, never answered
    await listener.aclose()


def test_parse_expires_at() -> None:
    nanos = parse_expires_at("2026-11-24T10:00:00.123456789Z")
    assert nanos == dt.datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=dt.UTC)
    offset = parse_expires_at("2026-11-24T12:00:00+02:00")
    assert offset == dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)
    assert parse_expires_at("") is None
    assert parse_expires_at(None) is None
    assert parse_expires_at("tomorrow") is None


def test_refresh_delay() -> None:
    # An hour-long token is refreshed 12 minutes ahead of its expiry, or at the interval.
    assert refresh_delay(3600, 86400, 30) == pytest.approx(2880)
    assert refresh_delay(3600, 300, 30) == 300
    # Short tokens (tests) are refreshed half-way.
    assert refresh_delay(4, 300, 0.5) == pytest.approx(2)
    # No expiry: the fixed interval; expired or nearly so: soon, but not in a hot loop.
    assert refresh_delay(None, 300, 30) == 300
    assert refresh_delay(-50, 300, 30) == MIN_REFRESH_DELAY


# -- SessionModelCredentials -------------------------------------------------------------------


async def test_prime_writes_modelserver_token_file(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    agentserver.connect_modelserver("ws1")
    config = make_config(agentserver.base_url, static_key=STATIC_KEY)
    creds = SessionModelCredentials(config, http, "ws1", runtime_dir(tmp_path))
    with structlog.testing.capture_logs() as logs:
        await creds.prime()
    token = agentserver.current_token("ws1")
    assert creds.source == "modelserver"
    assert creds.token_file.read_text() == token
    assert stat.S_IMODE(creds.token_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in creds.token_file.parent.iterdir()) == ["model-token"]
    assert creds.child_env() == {}
    assert [e["event"] for e in logs] == ["model_token.primed"]
    assert token not in repr(logs)

    provider = creds.provider()
    assert provider.env_key is None
    assert provider.auth is not None and provider.auth.args == (str(creds.token_file),)
    rendered = render_config_toml(CodexConfig(model=config.model.model, provider=provider))
    assert token not in rendered
    block = tomllib.loads(rendered)["model_providers"][config.model.provider]
    assert "env_key" not in block
    assert block["auth"]["command"].endswith("cat")
    assert block["base_url"] == config.model.base_url


async def test_prime_falls_back_to_static_key(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    config = make_config(agentserver.base_url, static_key=STATIC_KEY)
    creds = SessionModelCredentials(config, http, "ws-without", runtime_dir(tmp_path))
    await creds.prime()
    assert creds.source == "static"
    assert creds.token_file.read_text() == STATIC_KEY


async def test_without_agentserver_static_key_for_the_whole_session(
    http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    creds = SessionModelCredentials(
        make_config(None, static_key=STATIC_KEY), http, "ws1", runtime_dir(tmp_path)
    )
    await creds.prime()
    assert creds.source == "static" and creds.token_file.read_text() == STATIC_KEY
    with trio.move_on_after(0.05) as scope:
        await creds.keep_fresh()
    assert scope.cancelled_caught


async def test_no_token_at_all_starts_and_warns(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    creds = SessionModelCredentials(
        make_config(agentserver.base_url), http, "ws1", runtime_dir(tmp_path)
    )
    with structlog.testing.capture_logs() as logs:
        await creds.prime()
    assert creds.source == "none"
    assert creds.token_file.read_text() == ""
    warning = next(e for e in logs if e["event"] == "model_token.none")
    assert warning["log_level"] == "warning" and "will fail" in warning["detail"]
    assert warning["workspace_id"] == "ws1"


async def test_prime_fails_when_agentserver_is_down(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    agentserver.connect_modelserver("ws1")
    agentserver.outage = True
    creds = SessionModelCredentials(
        make_config(agentserver.base_url, static_key=STATIC_KEY), http, "ws1", runtime_dir(tmp_path)
    )
    with pytest.raises(ModelServerUnavailable):
        await creds.prime()
    assert not creds.token_file.exists()


async def test_keep_fresh_follows_rotation_and_connection_changes(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path, nursery: trio.Nursery
) -> None:
    agentserver.connect_modelserver("ws1", rotate_every=0.0, ttl=None)
    config = make_config(agentserver.base_url, static_key=STATIC_KEY, refresh_interval="1s")
    creds = SessionModelCredentials(config, http, "ws1", runtime_dir(tmp_path))
    await creds.prime()
    first = creds.token_file.read_text()
    nursery.start_soon(creds.keep_fresh)
    with trio.fail_after(10):
        await creds.wait_for_version(2)
        second = creds.token_file.read_text()
        assert second != first and second == agentserver.current_token("ws1")

        # The workspace loses its ModelServer connection: the static key takes over.
        agentserver.disconnect_modelserver("ws1")
        await creds.wait_for_version(3)
        assert creds.source == "static" and creds.token_file.read_text() == STATIC_KEY

        # And gets one again.
        agentserver.connect_modelserver("ws1", ttl=None)
        await creds.wait_for_version(4)
        assert creds.source == "modelserver"
        assert creds.token_file.read_text() == agentserver.current_token("ws1")


async def test_keep_fresh_keeps_token_and_backs_off_during_outage(
    agentserver: FakeAgentserver, http: httpx2.AsyncClient, tmp_path: Path, nursery: trio.Nursery
) -> None:
    agentserver.connect_modelserver("ws1", rotate_every=0.0, ttl=None)
    config = make_config(agentserver.base_url, refresh_interval="1s")
    creds = SessionModelCredentials(
        config, http, "ws1", runtime_dir(tmp_path), retry_initial=0.05, retry_max=0.2
    )
    await creds.prime()
    token = creds.token_file.read_text()
    agentserver.outage = True
    with structlog.testing.capture_logs() as logs:
        nursery.start_soon(creds.keep_fresh)
        with trio.fail_after(10):
            await agentserver.wait_until(
                lambda: sum(r.status == 503 for r in agentserver.token_requests()) >= 4
            )
        assert creds.token_file.read_text() == token and creds.version == 1
        agentserver.outage = False
        with trio.fail_after(10):
            await creds.wait_for_version(2)
    assert creds.token_file.read_text() == agentserver.current_token("ws1") != token
    failures = [e for e in logs if e["event"] == "model_token.refresh_failed"]
    assert len(failures) >= 4
    assert [f["attempt"] for f in failures[:4]] == [1, 2, 3, 4]
    assert all(f["retry_in_seconds"] <= 0.2 for f in failures)
    assert any(e["event"] == "model_token.refresh_recovered" for e in logs)
    shown: Any = repr(logs)
    assert all(t not in shown for t in agentserver.issued_tokens("ws1"))


async def test_keep_fresh_survives_a_failed_write(
    agentserver: FakeAgentserver,
    http: httpx2.AsyncClient,
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agentserver.connect_modelserver("ws1", rotate_every=0.0, ttl=None)
    config = make_config(agentserver.base_url, refresh_interval="1s")
    creds = SessionModelCredentials(
        config, http, "ws1", runtime_dir(tmp_path), retry_initial=0.05, retry_max=0.1
    )
    await creds.prime()
    first = creds.token_file.read_text()
    real_write = creds._write
    attempts: list[int] = []

    def failing_write(value: Secret | None) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(28, "No space left on device")
        real_write(value)

    monkeypatch.setattr(creds, "_write", failing_write)
    with structlog.testing.capture_logs() as logs:
        nursery.start_soon(creds.keep_fresh)
        with trio.fail_after(10):
            await creds.wait_for_version(2)
    assert len(attempts) == 2
    assert creds.token_file.read_text() == agentserver.current_token("ws1") != first
    failed = next(e for e in logs if e["event"] == "model_token.write_failed")
    assert "No space left" in failed["error"]
