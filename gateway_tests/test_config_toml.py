"""The session's config.toml: upstream shape, secrets out of argv, merge over what codex wrote."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.codex_home.config_toml import (
    DISABLED_LOCAL_TOOLS,
    MCP_STARTUP_GRACE_MS,
    CodexConfig,
    McpServer,
    ModelProvider,
    ProviderAuth,
    managed_document,
    merge_with_existing,
    render_config_toml,
)

CAP_TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkNYRyJ9.cGF5bG9hZA.c2lnbmF0dXJl"
GATEWAY = ("/usr/bin/python3", "-m", "gateway")


def executor(exe_id: str, token: str = CAP_TOKEN) -> McpServer:
    """One executor's env-mcp entry, shaped as the gateway builds it."""
    token_env = "CXG_BRIDGE_TOKEN_" + exe_id.upper().replace("-", "_")
    return McpServer(
        name=exe_id,
        command=GATEWAY[0],
        args=(
            *GATEWAY[1:],
            "env-mcp",
            "--exe-id",
            exe_id,
            "--bridge-url",
            f"ws://exec-gw:6060/bridge/{exe_id}",
            "--token-env",
            token_env,
            "--exe-desc",
            "Daisy's MacBook",
            "--turn-id",
            "trn_ab12cd34",
        ),
        env={token_env: token},
        startup_timeout_sec=10.0,
    )


PROVIDER = ModelProvider(
    id="modelserver",
    base_url="http://llmproxy:8085/v1",
    auth=ProviderAuth(command="/bin/cat", args=("/run/cxg/ws_a/model-token",)),
)
CONFIG = CodexConfig(
    model="gpt-5.5",
    provider=PROVIDER,
    mcp_servers=(executor("exe_alpha"), executor("exe_beta", "another-cap-token")),
)


def parsed(config: CodexConfig = CONFIG, existing: str | None = None) -> dict[str, Any]:
    return tomllib.loads(render_config_toml(config, existing))


# -- the rendered document ---------------------------------------------------------------------


def test_the_rendered_document_is_valid_toml_with_the_model_settings() -> None:
    document = parsed()
    assert document["model_provider"] == "modelserver"
    assert document["model"] == "gpt-5.5"


def test_the_provider_block_reads_the_token_through_a_command() -> None:
    provider = parsed()["model_providers"]["modelserver"]
    assert provider == {
        "name": "modelserver",
        "base_url": "http://llmproxy:8085/v1",
        "wire_api": "responses",
        "auth": {
            "command": "/bin/cat",
            "args": ["/run/cxg/ws_a/model-token"],
            "timeout_ms": 5000,
            "refresh_interval_ms": 60000,
        },
    }


def test_a_command_backed_provider_has_no_env_key() -> None:
    # codex 0.169.0 refuses `env_key` together with `[model_providers.<id>.auth]`.
    assert "env_key" not in parsed()["model_providers"]["modelserver"]


def test_an_env_key_provider_renders_like_upstream() -> None:
    config = CodexConfig(
        model="m",
        provider=ModelProvider(id="modelserver", base_url="http://x/v1", env_key="CODEX_API_KEY"),
    )
    provider = parsed(config)["model_providers"]["modelserver"]
    assert provider == {
        "name": "modelserver",
        "base_url": "http://x/v1",
        "env_key": "CODEX_API_KEY",
        "wire_api": "responses",
    }


def test_a_provider_name_may_differ_from_its_id() -> None:
    config = CodexConfig(model="m", provider=ModelProvider(id="p", base_url="u", name="Proxy"))
    assert parsed(config)["model_providers"]["p"]["name"] == "Proxy"


def test_tmp_is_trusted_by_default() -> None:
    text = render_config_toml(CONFIG)
    assert '[projects."/tmp"]' in text
    assert 'trust_level = "trusted"' in text
    assert parsed()["projects"] == {"/tmp": {"trust_level": "trusted"}}


def test_configured_trusted_paths_replace_the_default() -> None:
    config = CodexConfig(model="m", provider=PROVIDER, trusted_paths=("/workspace", "/data"))
    assert parsed(config)["projects"] == {
        "/workspace": {"trust_level": "trusted"},
        "/data": {"trust_level": "trusted"},
    }


def test_codex_local_shell_and_patch_tools_are_switched_off() -> None:
    assert parsed()["features"] == {
        "shell_tool": False,
        "unified_exec": False,
        "apply_patch_freeform": False,
    }
    assert parsed()["features"] == DISABLED_LOCAL_TOOLS


def test_one_mcp_server_per_executor() -> None:
    servers = parsed()["mcp_servers"]
    assert sorted(servers) == ["exe_alpha", "exe_beta"]
    alpha = servers["exe_alpha"]
    assert alpha["command"] == "/usr/bin/python3"
    args = alpha["args"]
    assert args[:3] == ["-m", "gateway", "env-mcp"]
    assert args[args.index("--exe-id") + 1] == "exe_alpha"
    assert args[args.index("--bridge-url") + 1] == "ws://exec-gw:6060/bridge/exe_alpha"
    assert args[args.index("--token-env") + 1] == "CXG_BRIDGE_TOKEN_EXE_ALPHA"
    assert args[args.index("--turn-id") + 1] == "trn_ab12cd34"
    assert alpha["default_tools_approval_mode"] == "approve"


def test_the_cap_token_is_in_env_and_never_in_args() -> None:
    servers = parsed()["mcp_servers"]
    assert servers["exe_alpha"]["env"] == {"CXG_BRIDGE_TOKEN_EXE_ALPHA": CAP_TOKEN}
    assert servers["exe_beta"]["env"] == {"CXG_BRIDGE_TOKEN_EXE_BETA": "another-cap-token"}
    for server in servers.values():
        assert not any(CAP_TOKEN in arg or "another-cap-token" in arg for arg in server["args"])
        assert CAP_TOKEN not in server["command"]


def test_the_token_is_not_in_an_mcp_server_repr() -> None:
    assert CAP_TOKEN not in repr(executor("exe_alpha"))


def test_codex_is_told_not_to_start_a_turn_before_its_mcp_servers() -> None:
    # codex's default (1000 ms from the first turn) leaves a slow executor out of that turn.
    assert MCP_STARTUP_GRACE_MS == 0
    assert parsed()["mcp_optional_startup_grace_ms"] == 0
    assert parsed(CodexConfig(model="m", provider=PROVIDER))["mcp_optional_startup_grace_ms"] == 0


def test_each_executor_has_an_explicit_startup_timeout() -> None:
    # Without it a hung env-mcp holds the first turn for codex's 30 s default.
    for server in parsed()["mcp_servers"].values():
        assert server["startup_timeout_sec"] == 10.0


def test_a_server_without_a_startup_timeout_leaves_it_to_codex() -> None:
    server = McpServer(name="s", command="c", args=())
    document = parsed(CodexConfig(model="m", provider=PROVIDER, mcp_servers=(server,)))
    assert "startup_timeout_sec" not in document["mcp_servers"]["s"]
    assert "required" not in document["mcp_servers"]["s"]


def test_no_mcp_servers_table_without_executors() -> None:
    assert "mcp_servers" not in parsed(CodexConfig(model="m", provider=PROVIDER))


def test_approval_mode_can_be_left_to_codex() -> None:
    server = McpServer(name="s", command="c", args=(), default_tools_approval_mode=None)
    document = parsed(CodexConfig(model="m", provider=PROVIDER, mcp_servers=(server,)))
    assert "default_tools_approval_mode" not in document["mcp_servers"]["s"]
    assert "env" not in document["mcp_servers"]["s"]


@pytest.mark.parametrize(
    "name", ["exe-dashy-id", "exe.dotted", "exe with spaces", "exé", 'q"uote', "", "a]b", "1"]
)
def test_server_ids_that_need_quoting_render_valid_toml(name: str) -> None:
    server = McpServer(name=name, command="c", args=("--exe-id", name), env={"T": "v"})
    document = parsed(CodexConfig(model="m", provider=PROVIDER, mcp_servers=(server,)))
    assert document["mcp_servers"] == {
        name: {
            "command": "c",
            "args": ["--exe-id", name],
            "env": {"T": "v"},
            "default_tools_approval_mode": "approve",
        }
    }


@given(
    names=st.lists(st.text(max_size=20), min_size=1, max_size=4, unique=True),
    arg=st.text(),
    token=st.text(),
    model=st.text(),
    path=st.text(),
)
def test_any_strings_render_and_parse_back(
    names: list[str], arg: str, token: str, model: str, path: str
) -> None:
    servers = tuple(McpServer(name=n, command="c", args=(arg,), env={"T": token}) for n in names)
    config = CodexConfig(model=model, provider=PROVIDER, trusted_paths=(path,), mcp_servers=servers)
    document = parsed(config)
    assert document == managed_document(config)


# -- merging over what codex wrote -------------------------------------------------------------

EXISTING = """
model = "old-model"
model_provider = "openai"
approval_policy = "never"
model_reasoning_effort = "high"
mcp_optional_startup_grace_ms = 30000

[model_providers.modelserver]
name = "modelserver"
base_url = "http://old-proxy/v1"
env_key = "CODEX_API_KEY"
wire_api = "responses"

[model_providers.other]
name = "other"
base_url = "http://other/v1"

[projects."/home/user/repo"]
trust_level = "trusted"

[projects."/tmp"]
trust_level = "untrusted"

[features]
shell_tool = true
web_search_request = true

[mcp_servers.exe_gone]
command = "/old/gateway"
args = ["env-mcp"]
env = { CXG_BRIDGE_TOKEN_EXE_GONE = "expired-token" }

[mcp_servers.user_added]
command = "npx"

[tui]
notifications = true
"""


def test_merge_keeps_what_codex_and_the_user_wrote() -> None:
    document = parsed(CONFIG, EXISTING)
    assert document["approval_policy"] == "never"
    assert document["model_reasoning_effort"] == "high"
    assert document["tui"] == {"notifications": True}
    assert document["projects"]["/home/user/repo"] == {"trust_level": "trusted"}
    assert document["model_providers"]["other"] == {"name": "other", "base_url": "http://other/v1"}
    assert document["features"]["web_search_request"] is True


def test_merge_forces_the_managed_keys() -> None:
    document = parsed(CONFIG, EXISTING)
    assert document["model"] == "gpt-5.5"
    assert document["model_provider"] == "modelserver"
    assert document["projects"]["/tmp"] == {"trust_level": "trusted"}
    assert document["features"]["shell_tool"] is False
    assert document["features"]["unified_exec"] is False
    assert document["features"]["apply_patch_freeform"] is False
    assert document["mcp_optional_startup_grace_ms"] == 0


@pytest.mark.parametrize("grace", ["1000", "-1", '"0"', "{ ms = 5 }"])
def test_a_restored_startup_grace_is_overwritten(grace: str) -> None:
    document = parsed(CONFIG, f"mcp_optional_startup_grace_ms = {grace}\nkeep = 1\n")
    assert document["mcp_optional_startup_grace_ms"] == 0
    assert document["keep"] == 1


def test_merge_replaces_the_active_provider_block_whole() -> None:
    # A leftover env_key next to the auth command would make codex 0.169.0 refuse the file.
    provider = parsed(CONFIG, EXISTING)["model_providers"]["modelserver"]
    assert provider == managed_document(CONFIG)["model_providers"]["modelserver"]
    assert "env_key" not in provider


def test_merge_replaces_mcp_servers_wholesale() -> None:
    text = render_config_toml(CONFIG, EXISTING)
    assert sorted(tomllib.loads(text)["mcp_servers"]) == ["exe_alpha", "exe_beta"]
    assert "expired-token" not in text
    assert "user_added" not in text


def test_merge_drops_stale_mcp_servers_when_there_are_no_executors_now() -> None:
    document = parsed(CodexConfig(model="m", provider=PROVIDER), EXISTING)
    assert "mcp_servers" not in document


def test_rendering_twice_is_stable() -> None:
    once = render_config_toml(CONFIG, EXISTING)
    assert render_config_toml(CONFIG, once) == once


@pytest.mark.parametrize(
    "existing", ["this is [not toml", "model = ", "\x00\x01", '[projects."/tmp"\n']
)
def test_an_unparseable_existing_file_is_replaced(existing: str) -> None:
    assert render_config_toml(CONFIG, existing) == render_config_toml(CONFIG)


@pytest.mark.parametrize("existing", [None, ""])
def test_no_existing_file_renders_the_managed_document(existing: str | None) -> None:
    assert parsed(CONFIG, existing) == managed_document(CONFIG)


@pytest.mark.parametrize("table", ["projects", "features", "model_providers", "mcp_servers"])
def test_a_managed_table_of_the_wrong_type_is_overwritten(table: str) -> None:
    document = parsed(CONFIG, f'{table} = "not a table"\nkeep = 1\n')
    assert document[table] == managed_document(CONFIG)[table]
    assert document["keep"] == 1


def test_merge_does_not_modify_its_inputs() -> None:
    existing = tomllib.loads(EXISTING)
    snapshot = tomllib.loads(EXISTING)
    managed = managed_document(CONFIG)
    merge_with_existing(existing, managed)
    assert existing == snapshot
    assert managed == managed_document(CONFIG)
