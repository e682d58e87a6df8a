"""Configuration from the environment: upstream names and defaults, one clear error, no secrets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import (
    VARIABLES,
    Config,
    ConfigError,
    Secret,
    load_config,
    require_authenticator,
    split_listen_addr,
)
from gateway_tests.config_samples import EXEC_GATEWAY

AGENTSERVER = {
    "CXG_AGENTSERVER_INTERNAL_URL": "http://agentserver.ns.svc:8080/",
    "CXG_AGENTSERVER_INTERNAL_SECRET": "agentserver-internal-secret",
}
S3 = {
    "CXG_S3_BUCKET": "codex-homes",
    "CXG_S3_ENDPOINT": "http://minio:9000",
    "CXG_S3_ACCESS_KEY_ID": "minio",
    "CXG_S3_SECRET_ACCESS_KEY": "s3-secret-access-key",
}
OTHER_SECRETS = {
    "CXG_INBOUND_HMAC_SECRET": "inbound-hmac-secret",
    "CXG_CODEX_API_KEY": "sk-static-codex-api-key",
    "CXG_ADMIN_SECRET": "admin-secret",
}
REPLICAS = {
    "CXG_PEER_ADDR": "10.0.0.7:8087",
    "CXG_POD_NAME": "codex-app-gateway-0",
    "CXG_PEER_SECRET": "peer-secret-of-at-least-thirty-two-bytes",
}
FULL = {**AGENTSERVER, **EXEC_GATEWAY, **S3, **OTHER_SECRETS, **REPLICAS}
SECRET_NAMES = sorted(var.name for var in VARIABLES if var.secret)


def config_error(environ: dict[str, str]) -> str:
    """The message of the ``ConfigError`` that ``environ`` must cause."""
    with pytest.raises(ConfigError) as caught:
        load_config(environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- defaults ----------------------------------------------------------------------------------


def test_nothing_is_required_for_a_local_run() -> None:
    config = load_config({})
    assert config.agentserver is None
    assert config.exec_gateway is None
    assert config.s3 is None
    assert config.inbound_hmac_secret is None
    assert config.admin_secret is None


def test_upstream_variables_keep_their_defaults() -> None:
    config = load_config({})
    assert config.listen_addr == ":8086"
    assert config.codex_bin == "codex"
    assert config.tmp_root == "/tmp/codex-app-gateway"
    assert config.idle_shutdown == 30 * 60
    assert config.captoken_ttl == 24 * 3600
    assert config.log_level == "info"
    assert config.model.provider == "modelserver"
    assert config.model.model == "gpt-5.5"
    assert config.model.base_url == "http://llmproxy:8085/v1"
    assert config.model.wire_api == "responses"
    assert config.model.static_api_key is None
    assert config.project_trusted_paths == ("/tmp",)


def test_new_variables_have_their_documented_defaults() -> None:
    config = load_config({})
    assert config.log_format == "json"
    assert config.local_store_dir == "/tmp/codex-app-gateway-store"
    assert config.model.token_refresh_interval == 300
    assert config.checkpoint_interval == 300
    assert config.max_sessions == 100
    assert config.ws_max_message_size == 64 * 1024 * 1024
    assert config.ws_ping_interval == 30
    assert config.child_ready_timeout == 60
    assert config.child_stop_grace == 10
    assert config.drain_budget == 30
    assert config.allowed_origins == ()
    assert config.restore_limits.max_total_bytes == 8 * 1024**3
    assert config.restore_limits.max_entries == 200_000
    assert config.metrics_listen_addr is None


def test_s3_region_defaults_to_us_east_1() -> None:
    config = load_config({"CXG_S3_BUCKET": "b"})
    assert config.s3 is not None
    assert config.s3.region == "us-east-1"
    assert config.s3.endpoint is None
    assert config.s3.path_style is False
    assert config.s3.access_key_id == ""
    assert not config.s3.secret_access_key


def test_every_variable_is_named_cxg_and_listed_once() -> None:
    names = [var.name for var in VARIABLES]
    assert len(names) == len(set(names))
    assert all(name.startswith("CXG_") for name in names)


@pytest.mark.parametrize("name", [var.name for var in VARIABLES if var.default is not None])
def test_an_empty_value_means_the_default(name: str) -> None:
    assert load_config({name: ""}) == load_config({})


def test_an_empty_required_group_member_counts_as_unset() -> None:
    assert load_config({"CXG_AGENTSERVER_INTERNAL_URL": "", "CXG_S3_BUCKET": ""}).s3 is None


# -- values ------------------------------------------------------------------------------------


def test_trusted_paths_are_trimmed_and_empties_dropped() -> None:
    config = load_config({"CXG_PROJECT_TRUSTED_PATHS": "/workspace, /data, "})
    assert config.project_trusted_paths == ("/workspace", "/data")


def test_trusted_paths_of_only_separators_fall_back_to_tmp() -> None:
    assert load_config({"CXG_PROJECT_TRUSTED_PATHS": " , ,"}).project_trusted_paths == ("/tmp",)


def test_idle_shutdown_is_a_go_duration() -> None:
    assert load_config({"CXG_IDLE_SHUTDOWN": "5m"}).idle_shutdown == 300
    assert load_config({"CXG_IDLE_SHUTDOWN": "1h30m"}).idle_shutdown == 5400


def test_captoken_ttl_is_a_go_duration() -> None:
    assert load_config({"CXG_CAPTOKEN_TTL": "90m"}).captoken_ttl == 5400


# -- values the Go service read differently: its meaning, or exit 2 -----------------------------

# Every spelling an operator may have in a Go deployment, including odd ones.
PATH_STYLE_VALUES = [
    "true",
    "TRUE",
    "True",
    "tRuE",
    "false",
    "FALSE",
    "False",
    "0",
    "1",
    "t",
    "T",
    "f",
    "F",
    "yes",
    "YES",
    "no",
    "NO",
    "on",
    "ON",
    "off",
    "OFF",
    "y",
    "n",
    "2",
    "-1",
    "enable",
    "enabled",
    "truee",
    " true",
    "true ",
    "\ttrue",
    "true\n",
    " false",
    "\uff54\uff52\uff55\uff45",
    "nil",
    "",
]
LOG_LEVEL_VALUES = [
    "debug",
    "DEBUG",
    "Debug",
    "dEbUg",
    "info",
    "INFO",
    "Info",
    "warn",
    "WARN",
    "Warn",
    "warning",
    "WARNING",
    "Warning",
    "error",
    "ERROR",
    "Error",
    "err",
    "fatal",
    "panic",
    "trace",
    "verbose",
    "notice",
    "critical",
    "0",
    "-4",
    " debug",
    "debug ",
    "warn\n",
    "\u0130nfo",
    "\uff44\uff45\uff42\uff55\uff47",
    "",
]


def go_path_style(value: str) -> bool:
    """What the Go service made of CXG_S3_PATH_STYLE: true only for "true", any case."""
    return value.lower() == "true"


def go_log_level(value: str) -> str:
    """What the Go service made of CXG_LOG_LEVEL: debug, warn, error; anything else info."""
    level = value.lower()
    return level if level in ("debug", "warn", "error") else "info"


def serve_exit_status(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> int:
    """The exit status of ``serve`` for a configuration that ``load_config`` refuses."""
    from gateway import cli

    monkeypatch.setattr(os, "environ", {**FULL, **environ})
    return cli.main(["serve"])


@pytest.mark.parametrize("value", PATH_STYLE_VALUES)
def test_every_go_path_style_value_means_what_it_meant_in_go_or_exits_2(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"CXG_S3_BUCKET": "b", "CXG_S3_PATH_STYLE": value}
    try:
        config = load_config(environ)
    except ConfigError:
        assert serve_exit_status(monkeypatch, environ) == 2
        assert "CXG_S3_PATH_STYLE" in capsys.readouterr().err
        return
    assert config.s3 is not None
    assert config.s3.path_style is go_path_style(value)


@pytest.mark.parametrize("value", LOG_LEVEL_VALUES)
def test_every_go_log_level_means_what_it_meant_in_go_or_exits_2(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"CXG_LOG_LEVEL": value}
    try:
        config = load_config(environ)
    except ConfigError:
        assert serve_exit_status(monkeypatch, environ) == 2
        assert "CXG_LOG_LEVEL" in capsys.readouterr().err
        return
    assert config.log_level == go_log_level(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("True", True), ("false", False), ("0", False), ("", False)],
)
def test_the_plain_path_style_spellings_are_accepted(value: str, expected: bool) -> None:
    config = load_config({"CXG_S3_BUCKET": "b", "CXG_S3_PATH_STYLE": value})
    assert config.s3 is not None
    assert config.s3.path_style is expected


@pytest.mark.parametrize("value", ["1", "yes", "on", "t", "T", " true"])
def test_path_style_spellings_go_read_as_false_but_look_true_are_refused(value: str) -> None:
    message = config_error({"CXG_S3_BUCKET": "b", "CXG_S3_PATH_STYLE": value})
    assert "CXG_S3_PATH_STYLE" in message
    assert "Go service" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("debug", "debug"), ("INFO", "info"), ("Warn", "warn"), ("error", "error"), ("", "info")],
)
def test_log_levels_are_case_insensitive(value: str, expected: str) -> None:
    assert load_config({"CXG_LOG_LEVEL": value}).log_level == expected


def test_warning_is_refused_with_a_hint_rather_than_read_as_warn_or_info() -> None:
    message = config_error({"CXG_LOG_LEVEL": "warning"})
    assert "use warn" in message


@pytest.mark.parametrize(
    "value", ["1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"]
)
def test_new_booleans_take_exactly_go_parsebool_spellings(value: str) -> None:
    config = load_config({"CXG_ALLOW_HMAC_TOKENS": value})
    assert config.allow_hmac_tokens is (value in ("1", "t", "T", "TRUE", "true", "True"))


@pytest.mark.parametrize("value", ["yes", "on", "tRuE", " true", "2", "y"])
def test_new_booleans_refuse_what_go_parsebool_refuses(value: str) -> None:
    assert "CXG_ALLOW_HMAC_TOKENS" in config_error({"CXG_ALLOW_HMAC_TOKENS": value})


@pytest.mark.parametrize("value", ["1_000", "١٢", "0x10", "1e3", "10.0"])
def test_whole_numbers_take_go_atoi_spellings_only(value: str) -> None:
    assert "CXG_MAX_SESSIONS" in config_error({"CXG_MAX_SESSIONS": value})


def test_a_signed_whole_number_is_accepted_as_go_atoi_does() -> None:
    assert load_config({"CXG_MAX_SESSIONS": "+7"}).max_sessions == 7


def test_surrounding_whitespace_is_ignored() -> None:
    config = load_config({"CXG_MODEL": "  gpt-x ", "CXG_IDLE_SHUTDOWN": " 10m "})
    assert config.model.model == "gpt-x"
    assert config.idle_shutdown == 600


def test_full_configuration_is_structured_into_groups() -> None:
    config = load_config(FULL)
    assert config.agentserver is not None
    assert config.agentserver.internal_url == "http://agentserver.ns.svc:8080"
    assert config.agentserver.internal_secret.reveal() == "agentserver-internal-secret"
    assert config.exec_gateway is not None
    assert config.exec_gateway.ws_url == "ws://exec-gw:6060"
    assert config.exec_gateway.internal_url == "http://exec-gw:6060"
    assert config.exec_gateway.captoken_secret.reveal() == "captoken-hmac-secret"
    assert config.exec_gateway.captoken_ttl == 24 * 3600
    assert config.exec_gateway.startup_timeout == 10
    assert config.s3 is not None
    assert config.s3.endpoint == "http://minio:9000"
    assert config.s3.secret_access_key.reveal() == "s3-secret-access-key"
    assert config.inbound_hmac_secret == Secret("inbound-hmac-secret")
    assert config.model.static_api_key == Secret("sk-static-codex-api-key")
    assert config.admin_secret == Secret("admin-secret")


@pytest.mark.parametrize("value", [":8086", "127.0.0.1:9000", "[::1]:8086", "0.0.0.0:0", "h:65535"])
def test_listen_addresses_are_host_and_port(value: str) -> None:
    assert load_config({"CXG_LISTEN_ADDR": value}).listen_addr == value


@pytest.mark.parametrize(
    ("value", "split"),
    [(":8086", ("0.0.0.0", 8086)), ("127.0.0.1:9", ("127.0.0.1", 9)), ("[::]:80", ("::", 80))],
)
def test_split_listen_addr(value: str, split: tuple[str, int]) -> None:
    assert split_listen_addr(value) == split


# -- bad values: one message naming the variable and the value ---------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CXG_IDLE_SHUTDOWN", "soon"),
        ("CXG_IDLE_SHUTDOWN", "30"),
        ("CXG_CAPTOKEN_TTL", "1day"),
        ("CXG_CHECKPOINT_INTERVAL", "often"),
        ("CXG_MODEL_TOKEN_REFRESH_INTERVAL", "5 minutes"),
        ("CXG_WS_PING_INTERVAL", "-30s"),
        ("CXG_S3_PATH_STYLE", "maybe"),
        ("CXG_S3_ALLOW_UNFENCED", "yes"),
        ("CXG_WS_MAX_MESSAGE_SIZE", "lots"),
        ("CXG_RESTORE_MAX_BYTES", "1.5GiB"),
        ("CXG_MAX_SESSIONS", "ten"),
        ("CXG_MAX_SESSIONS", "-1"),
        ("CXG_RESTORE_MAX_ENTRIES", "many"),
        ("CXG_RESTORE_MAX_RATIO", "-1"),
        ("CXG_RESTORE_MAX_RATIO", "lots"),
        ("CXG_S3_TIMEOUT", "fast"),
        ("CXG_LISTEN_ADDR", "nowhere"),
        ("CXG_LISTEN_ADDR", "localhost:99999"),
        ("CXG_METRICS_LISTEN_ADDR", "http://0.0.0.0:9090"),
        ("CXG_LOG_LEVEL", "verbose"),
        ("CXG_LOG_FORMAT", "xml"),
        ("CXG_MODEL_PROVIDER_WIRE_API", "chat"),
    ],
)
def test_a_bad_value_fails_naming_the_variable_and_the_value(name: str, value: str) -> None:
    message = config_error({name: value})
    assert name in message
    assert value in message


def test_a_bad_s3_endpoint_scheme_is_refused() -> None:
    message = config_error({"CXG_S3_BUCKET": "b", "CXG_S3_ENDPOINT": "no-scheme.example.com"})
    assert "CXG_S3_ENDPOINT" in message
    assert "scheme" in message
    assert "no-scheme.example.com" in message


def test_an_ftp_s3_endpoint_is_refused() -> None:
    assert "scheme" in config_error({"CXG_S3_BUCKET": "b", "CXG_S3_ENDPOINT": "ftp://x"})


def test_an_s3_endpoint_without_a_bucket_asks_for_the_bucket() -> None:
    message = config_error({"CXG_S3_ENDPOINT": "http://minio:9000"})
    assert "CXG_S3_BUCKET" in message


@pytest.mark.parametrize(
    "name",
    [
        "CXG_IDLE_SHUTDOWN",
        "CXG_CHILD_READY_TIMEOUT",
        "CXG_DRAIN_BUDGET",
        "CXG_S3_TIMEOUT",
        "CXG_EXECUTOR_STARTUP_TIMEOUT",
    ],
)
def test_durations_that_must_be_positive_refuse_zero(name: str) -> None:
    assert name in config_error({name: "0s"})


@pytest.mark.parametrize("name", ["CXG_IDLE_SHUTDOWN", "CXG_CAPTOKEN_TTL", "CXG_DRAIN_BUDGET"])
def test_negative_durations_are_refused(name: str) -> None:
    message = config_error({name: "-5m"})
    assert name in message
    assert "-5m" in message


def test_the_executor_startup_timeout_is_a_go_duration() -> None:
    config = load_config({**FULL, "CXG_EXECUTOR_STARTUP_TIMEOUT": "2500ms"})
    assert config.exec_gateway is not None
    assert config.exec_gateway.startup_timeout == 2.5


def test_a_tiny_message_size_is_refused() -> None:
    assert "CXG_WS_MAX_MESSAGE_SIZE" in config_error({"CXG_WS_MAX_MESSAGE_SIZE": "512"})


@pytest.mark.parametrize("name", ["CXG_MODEL_PROVIDER", "CXG_MODEL", "CXG_MODEL_PROVIDER_ENV_KEY"])
def test_model_settings_of_only_spaces_are_refused(name: str) -> None:
    assert name in config_error({name: "   "})


def test_an_agentserver_url_must_be_http() -> None:
    message = config_error({**AGENTSERVER, "CXG_AGENTSERVER_INTERNAL_URL": "agentserver:8080"})
    assert "CXG_AGENTSERVER_INTERNAL_URL" in message


def test_the_exec_gateway_bridge_url_must_be_a_websocket_url() -> None:
    message = config_error({**EXEC_GATEWAY, "CXG_EXEC_GATEWAY_URL": "http://exec-gw:6060"})
    assert "CXG_EXEC_GATEWAY_URL" in message
    assert "ws://" in message


# -- groups: all or none -----------------------------------------------------------------------


@pytest.mark.parametrize("missing", sorted(EXEC_GATEWAY))
def test_the_exec_gateway_group_needs_all_four(missing: str) -> None:
    environ = {name: value for name, value in EXEC_GATEWAY.items() if name != missing}
    message = config_error(environ)
    assert f"missing {missing}" in message


def test_a_lone_exec_gateway_variable_names_the_three_missing() -> None:
    message = config_error({"CXG_EXEC_GATEWAY_URL": "ws://exec-gw:6060"})
    missing = message.split("missing", 1)[1]
    for name in sorted(set(EXEC_GATEWAY) - {"CXG_EXEC_GATEWAY_URL"}):
        assert name in missing
    assert "CXG_EXEC_GATEWAY_URL" not in missing


@pytest.mark.parametrize("missing", sorted(AGENTSERVER))
def test_the_agentserver_pair_needs_both(missing: str) -> None:
    environ = {name: value for name, value in AGENTSERVER.items() if name != missing}
    assert f"missing {missing}" in config_error(environ)


# -- require_authenticator ---------------------------------------------------------------------


def test_serving_without_any_authenticator_says_what_to_set() -> None:
    with pytest.raises(ConfigError) as caught:
        require_authenticator(load_config({}))
    message = str(caught.value)
    for name in (
        "CXG_AGENTSERVER_INTERNAL_URL",
        "CXG_AGENTSERVER_INTERNAL_SECRET",
        "CXG_INBOUND_HMAC_SECRET",
    ):
        assert name in message


@pytest.mark.parametrize(
    "environ", [AGENTSERVER, {"CXG_INBOUND_HMAC_SECRET": "dev"}], ids=["agentserver", "hmac"]
)
def test_either_authenticator_is_enough(environ: dict[str, str]) -> None:
    require_authenticator(load_config(environ))


# -- secrets -----------------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2"
    assert secret
    assert not Secret("")


def test_the_full_configuration_repr_holds_no_secret() -> None:
    shown = repr(load_config(FULL))
    for name in SECRET_NAMES:
        assert FULL[name] not in shown


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_an_invalid_secret_group_never_echoes_the_secret(name: str) -> None:
    # Break the rest of the secret's group so the error is about that group.
    environ = {name: "do-not-echo-me", "CXG_S3_ENDPOINT": "http://minio:9000"}
    message = config_error(environ)
    assert "do-not-echo-me" not in message


def _with_secret(name: str, value: str, *, complete: bool) -> dict[str, str]:
    """An environment with the secret ``name`` set; with its group complete or broken."""
    environ = dict(FULL) if complete else {}
    environ[name] = value
    if not complete:
        # A second, unrelated fault that is only reached when the secret's group is fine.
        environ["CXG_S3_ENDPOINT"] = "http://minio:9000"
    return environ


def _outcome(environ: dict[str, str]) -> str:
    try:
        config = load_config(environ)
    except ConfigError as exc:
        return f"error: {exc}"
    return f"config: {config!r} {config.agentserver} {config.exec_gateway} {config.s3}"


SECRET_TEXT = st.text(min_size=1)


@given(name=st.sampled_from(SECRET_NAMES), value=SECRET_TEXT, complete=st.booleans())
def test_no_secret_value_reaches_an_error_or_a_repr(name: str, value: str, complete: bool) -> None:
    # The outcome must not depend on the secret at all (beyond it being set), which rules out
    # any echo of it, even a partial or escaped one.
    reference = _outcome(_with_secret(name, "reference-secret", complete=complete))
    assert _outcome(_with_secret(name, value, complete=complete)) == reference


@given(name=st.sampled_from(SECRET_NAMES), value=st.text(min_size=12))
def test_a_distinctive_secret_is_never_in_the_repr(name: str, value: str) -> None:
    marked = f"SECRET-{value}"
    config = load_config({**FULL, name: marked})
    assert marked not in repr(config)
    assert marked not in str(config)


def test_config_is_immutable() -> None:
    config = load_config({})
    with pytest.raises(AttributeError):
        config.tmp_root = "/elsewhere"  # type: ignore[misc]
    assert isinstance(config, Config)


# -- replica mode ----------------------------------------------------------------------------


def test_replica_mode_is_off_without_a_peer_address() -> None:
    assert load_config({**S3, **OTHER_SECRETS}).replicas is None


def test_replica_mode_reads_its_variables_and_derives_its_timings() -> None:
    replicas = load_config({**FULL, "CXG_OWNER_TAKEOVER_AFTER": "10s"}).replicas
    assert replicas is not None
    assert replicas.pod_name == "codex-app-gateway-0"
    assert replicas.peer_addr == "10.0.0.7:8087"
    assert replicas.peer_listen_addr == ":8087"
    assert replicas.takeover_after == 10.0
    assert replicas.heartbeat_interval == 2.0
    assert replicas.fence_after == 6.0
    assert replicas.fence_after + replicas.heartbeat_interval < replicas.takeover_after


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"CXG_PEER_ADDR": ":8087"}, "CXG_PEER_ADDR must be the HOST:PORT"),
        ({"CXG_PEER_ADDR": "10.0.0.7"}, "CXG_PEER_ADDR must be the HOST:PORT"),
        ({"CXG_PEER_LISTEN_ADDR": "8087"}, "CXG_PEER_LISTEN_ADDR"),
        ({"CXG_PEER_SECRET": ""}, "needs CXG_PEER_SECRET"),
        ({"CXG_POD_NAME": "Pod_0"}, "CXG_POD_NAME must be a Kubernetes pod name"),
        ({"CXG_POD_NAME": "../etc"}, "CXG_POD_NAME must be a Kubernetes pod name"),
        ({"CXG_OWNER_TAKEOVER_AFTER": "2s"}, "CXG_OWNER_TAKEOVER_AFTER must be at least 5s"),
        ({"CXG_S3_BUCKET": "", "CXG_S3_ENDPOINT": ""}, "needs the S3 store"),
    ],
)
def test_replica_mode_refuses_what_it_cannot_run_with(change: dict[str, str], named: str) -> None:
    message = config_error({**FULL, **change})
    assert named in message
    assert FULL["CXG_PEER_SECRET"] not in message


def test_executor_layout_defaults_to_multiplexed_and_takes_per_executor() -> None:
    default = load_config(EXEC_GATEWAY).exec_gateway
    seed = load_config({**EXEC_GATEWAY, "CXG_EXECUTOR_MCP_LAYOUT": "Per-Executor"}).exec_gateway
    assert default is not None and default.layout == "multiplexed"
    assert seed is not None and seed.layout == "per-executor"


def test_an_unknown_executor_layout_is_refused() -> None:
    message = config_error({**EXEC_GATEWAY, "CXG_EXECUTOR_MCP_LAYOUT": "both"})
    assert "CXG_EXECUTOR_MCP_LAYOUT must be multiplexed or per-executor" in message


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("fd00::1:8087", "[fd00::1]:8087"),
        ("[fd00::1]:8087", "[fd00::1]:8087"),
        ("10.0.0.7:8087", "10.0.0.7:8087"),
        ("gw-0.gw.ns.svc:8087", "gw-0.gw.ns.svc:8087"),
    ],
)
def test_the_peer_address_of_an_ipv6_pod_is_read_as_the_chart_writes_it(
    given: str, kept: str
) -> None:
    # The chart writes $(POD_IP):8087; on an IPv6 pod that is an address without brackets.
    replicas = load_config({**FULL, "CXG_PEER_ADDR": given}).replicas
    assert replicas is not None and replicas.peer_addr == kept
