"""Per-spawn executor entries: names, tokens, bridge URLs; none when the exec gateway is down."""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import attrs
import httpx2
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.captoken import verify_cap_token
from gateway.clients.execgateway import ConnectedExecutor
from gateway.codex_home.config_toml import CodexConfig, McpServer, ModelProvider, render_config_toml
from gateway.config import ExecGatewaySettings, Secret
from gateway.executor_directory import executor_setup
from gateway.executors import (
    executor_mcp_servers,
    executor_servers_for,
    multiplexed_server,
    new_turn_id,
    upstream_token_env,
)
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway

CAP_SECRET = b"cap-s3cret"
SELF = ("/usr/local/bin/codex-app-gateway",)


def settings(
    internal_url: str = "http://exec-gw:6061", ws_url: str = "ws://exec-gw:6060"
) -> ExecGatewaySettings:
    return ExecGatewaySettings(
        ws_url=ws_url,
        internal_url=internal_url,
        internal_secret=Secret("in-s3cret"),
        captoken_secret=Secret(CAP_SECRET.decode()),
        captoken_ttl=3600.0,
        startup_timeout=7.5,
    )


def build(*exe_ids: str, description: str = "") -> dict[str, McpServer]:
    servers = executor_servers_for(
        [ConnectedExecutor(exe_id, description=description) for exe_id in exe_ids],
        settings=settings(),
        workspace_id="ws_a",
        turn_id="trn_ab12cd34",
        self_command=SELF,
    )
    return {server.name: server for server in servers}


def flag(args: tuple[str, ...], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture
async def fake() -> AsyncIterator[FakeExecGateway]:
    gateway = FakeExecGateway(internal_secret="in-s3cret", captoken_secret=CAP_SECRET)
    gateway.add_executor("exe_alpha", workspace_id="ws_a", backend_url=None, description="Mac")
    gateway.add_executor("exe-dashy-id", workspace_id="ws_a", backend_url=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        yield gateway
        nursery.cancel_scope.cancel()


def test_turn_ids_are_trn_and_eight_base36() -> None:
    ids = {new_turn_id() for _ in range(50)}
    assert all(re.fullmatch(r"trn_[0-9a-z]{8}", turn) for turn in ids)
    assert len(ids) > 1


def test_entry_has_the_upstream_shape() -> None:
    server = build("exe_alpha", description="Daisy's MacBook")["exe_alpha"]
    assert server.command == SELF[0]
    assert server.args == (
        "env-mcp",
        "--exe-id",
        "exe_alpha",
        "--bridge-url",
        "ws://exec-gw:6060/bridge/exe_alpha",
        "--token-env",
        "CXG_BRIDGE_TOKEN_EXE_ALPHA",
        "--exe-desc",
        "Daisy's MacBook",
        "--turn-id",
        "trn_ab12cd34",
        "--timeout",
        "600",
    )
    assert list(server.env) == ["CXG_BRIDGE_TOKEN_EXE_ALPHA"]
    assert server.default_tools_approval_mode == "approve"
    # codex waits longer than env-mcp's own limit, so env-mcp's kill-and-answer comes first.
    assert server.tool_timeout_sec is not None and server.tool_timeout_sec > 600
    # Explicit, from the settings: not codex's 30 s default, and never ``required``.
    assert server.startup_timeout_sec == 7.5
    token = server.env["CXG_BRIDGE_TOKEN_EXE_ALPHA"]
    assert token not in " ".join(server.args)
    payload = verify_cap_token(token, CAP_SECRET)
    assert (payload.turn_id, payload.workspace_id, payload.exe_ids) == (
        "trn_ab12cd34",
        "ws_a",
        ("exe_alpha",),
    )


def test_self_command_with_arguments_is_kept_in_front() -> None:
    servers = executor_servers_for(
        [ConnectedExecutor("exe_alpha")],
        settings=settings(),
        workspace_id="ws_a",
        turn_id="trn_1",
        self_command=("/venv/bin/python", "-m", "gateway"),
    )
    assert servers[0].command == "/venv/bin/python"
    assert servers[0].args[:3] == ("-m", "gateway", "env-mcp")


def test_dashes_give_the_upstream_env_var_names() -> None:
    assert upstream_token_env("exe-a-b") == "CXG_BRIDGE_TOKEN_EXE_A_B"
    server = build("exe-dashy-id")["exe-dashy-id"]
    assert flag(server.args, "--token-env") == "CXG_BRIDGE_TOKEN_EXE_DASHY_ID"
    assert list(server.env) == ["CXG_BRIDGE_TOKEN_EXE_DASHY_ID"]


def test_empty_description_falls_back_to_the_id() -> None:
    assert flag(build("exe_alpha")["exe_alpha"].args, "--exe-desc") == "exe_alpha"


def test_control_characters_in_descriptions_are_flattened() -> None:
    server = build("exe_alpha", description="line1\nline2\x00\tend")["exe_alpha"]
    assert flag(server.args, "--exe-desc") == "line1 line2 end"


def test_unsafe_ids_get_derived_names_and_escaped_urls() -> None:
    servers = build("exe.a/b", "exe a", "ünï")
    assert len(servers) == 3
    for name, server in servers.items():
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,48}", name)
        env_name = flag(server.args, "--token-env")
        assert re.fullmatch(r"[A-Z0-9_]+", env_name)
        assert list(server.env) == [env_name]
        exe_id = flag(server.args, "--exe-id")
        url = flag(server.args, "--bridge-url")
        segment = url.removeprefix("ws://exec-gw:6060/bridge/")
        assert "/" not in segment and " " not in segment
        assert unquote(segment) == exe_id


def test_ids_that_sanitise_alike_do_not_collide() -> None:
    servers = build("exe-a", "exe_a", "EXE_A", "exe.a", "exe/a")
    assert len(servers) == 5
    env_names = [flag(server.args, "--token-env") for server in servers.values()]
    assert len(set(env_names)) == 5
    # No upstream name is handed to one of several ids that would share it.
    assert "CXG_BRIDGE_TOKEN_EXE_A" not in env_names


def test_unusable_ids_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        servers = build("ok", "nul\x00id", "x" * 300, "ok")
    assert list(servers) == ["ok"]
    assert "contains control characters" in caplog.text
    assert "longer than" in caplog.text
    assert "listed twice" in caplog.text


def test_rendered_config_toml_round_trips_for_awkward_ids() -> None:
    servers = executor_servers_for(
        [ConnectedExecutor(i) for i in ("exe_alpha", "exe-b", 'we"ird]', "a.b")],
        settings=settings(),
        workspace_id="ws_a",
        turn_id="trn_1",
        self_command=SELF,
    )
    config = CodexConfig(
        model="m", provider=ModelProvider(id="p", base_url="http://m"), mcp_servers=servers
    )
    document = tomllib.loads(render_config_toml(config))
    assert set(document["mcp_servers"]) == {server.name for server in servers}
    for server in servers:
        entry = document["mcp_servers"][server.name]
        assert entry["args"] == list(server.args)
        assert entry["env"] == dict(server.env)
        assert entry["default_tools_approval_mode"] == "approve"


@given(st.lists(st.text(min_size=1, max_size=60), max_size=8))
def test_any_ids_give_distinct_safe_names(exe_ids: list[str]) -> None:
    servers = executor_servers_for(
        [ConnectedExecutor(i) for i in exe_ids],
        settings=settings(),
        workspace_id="ws",
        turn_id="trn_1",
        self_command=SELF,
        now=1_700_000_000,
    )
    names = [s.name for s in servers]
    env_names = [next(iter(s.env)) for s in servers]
    assert len(set(names)) == len(names)
    assert len(set(env_names)) == len(env_names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,48}", n) for n in names)
    assert all(re.fullmatch(r"CXG_BRIDGE_TOKEN_[A-Z0-9_]+", n) for n in env_names)


async def test_executors_come_from_the_exec_gateway(fake: FakeExecGateway) -> None:
    async with httpx2.AsyncClient() as http:
        servers = await executor_mcp_servers(
            settings(internal_url=fake.base_url), http, "ws_a", SELF
        )
    assert [s.name for s in servers] == ["exe_alpha", "exe-dashy-id"]
    turn_ids = {flag(s.args, "--turn-id") for s in servers}
    assert len(turn_ids) == 1
    assert re.fullmatch(r"trn_[0-9a-z]{8}", turn_ids.pop())
    for server in servers:
        token = next(iter(server.env.values()))
        payload = verify_cap_token(token, CAP_SECRET)
        assert payload.workspace_id == "ws_a"
        assert payload.allows_exe_id(flag(server.args, "--exe-id"))
        assert 3590 <= payload.exp - payload.iat <= 3600


async def test_each_spawn_gets_a_new_turn_id(fake: FakeExecGateway) -> None:
    async with httpx2.AsyncClient() as http:
        first = await executor_mcp_servers(settings(fake.base_url), http, "ws_a", SELF)
        second = await executor_mcp_servers(settings(fake.base_url), http, "ws_a", SELF)
    assert flag(first[0].args, "--turn-id") != flag(second[0].args, "--turn-id")


async def test_exec_gateway_down_gives_no_entries_and_a_warning(
    fake: FakeExecGateway, caplog: pytest.LogCaptureFixture
) -> None:
    fake.outage = True
    with caplog.at_level(logging.WARNING, logger="gateway.executors"):
        async with httpx2.AsyncClient() as http:
            servers = await executor_mcp_servers(settings(fake.base_url), http, "ws_a", SELF)
    assert servers == ()
    assert "spawning with no executors" in caplog.text
    assert "status=503" in caplog.text
    assert "in-s3cret" not in caplog.text


async def test_exec_gateway_unreachable_gives_no_entries(caplog: pytest.LogCaptureFixture) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with caplog.at_level(logging.WARNING, logger="gateway.executors"):
            async with httpx2.AsyncClient() as http:
                assert await executor_mcp_servers(settings(url), http, "ws_a", SELF) == ()
    assert "spawning with no executors" in caplog.text


async def test_no_exec_gateway_configured_gives_no_entries() -> None:
    async with httpx2.AsyncClient() as http:
        assert await executor_mcp_servers(None, http, "ws_a", SELF) == ()


async def test_rendered_config_with_no_executors_is_still_valid(fake: FakeExecGateway) -> None:
    fake.outage = True
    async with httpx2.AsyncClient() as http:
        servers = await executor_mcp_servers(settings(fake.base_url), http, "ws_a", SELF)
    config = CodexConfig(
        model="m", provider=ModelProvider(id="p", base_url="http://m"), mcp_servers=servers
    )
    document = tomllib.loads(render_config_toml(config))
    assert "mcp_servers" not in document
    assert document["model"] == "m"


def test_the_multiplexed_entry_carries_the_channel_path_and_no_secret(tmp_path: Path) -> None:
    channel = tmp_path / "run" / "executors.sock"
    server = multiplexed_server(settings(), (*SELF, "-m", "gateway"), channel)
    assert (server.name, server.command) == ("executors", SELF[0])
    assert server.args == (
        "-m",
        "gateway",
        "env-mcp",
        "--channel-env",
        "CXG_ENVMCP_CHANNEL",
        "--timeout",
        "600",
    )
    assert server.env == {"CXG_ENVMCP_CHANNEL": str(channel)}
    assert server.startup_timeout_sec == 7.5
    assert server.tool_timeout_sec is not None and server.tool_timeout_sec > 600
    rendered = render_config_toml(
        CodexConfig(
            model="m", provider=ModelProvider(id="p", base_url="http://x"), mcp_servers=(server,)
        )
    )
    assert CAP_SECRET.decode() not in rendered and "in-s3cret" not in rendered
    assert tomllib.loads(rendered)["mcp_servers"]["executors"]["env"] == server.env


async def test_the_multiplexed_layout_asks_nothing_at_spawn(
    fake: FakeExecGateway, tmp_path: Path
) -> None:
    async with httpx2.AsyncClient() as http:
        setup = await executor_setup(
            settings(fake.base_url), http, "ws_a", SELF, tmp_path / "executors.sock"
        )
        seed = await executor_setup(
            attrs.evolve(settings(fake.base_url), layout="per-executor"),
            http,
            "ws_a",
            SELF,
            tmp_path / "executors.sock",
        )
    assert [s.name for s in setup.mcp_servers] == ["executors"]
    assert setup.directory is not None and setup.directory.workspace_id == "ws_a"
    assert seed.directory is None
    # Only the per-executor layout asked the exec gateway, once, at spawn.
    assert len(fake.connected_requests) == 1
