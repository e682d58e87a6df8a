"""What a session's codex child is given: its environment, its argv, restart pacing, close codes."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sessions.child import app_server_argv, build_child_env
from gateway.sessions.manager import CRASH_BACKOFF_MAX_SECONDS, crash_backoff
from gateway.sessions.relay import sendable_close

CODEX_HOME = Path("/var/lib/codex-app-gateway/ws_a/codex-home")
HOME = Path("/var/lib/codex-app-gateway/ws_a/home")

ALLOWED = {
    "PATH": "/opt/bin:/usr/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_CTYPE": "C.UTF-8",
    "TZ": "UTC",
    "RUST_LOG": "info",
    "RUST_BACKTRACE": "1",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "SSL_CERT_DIR": "/etc/ssl/certs",
}
# What a gateway pod's environment holds besides: its own secrets, cloud credentials, noise.
REFUSED = {
    "CXG_INBOUND_HMAC_SECRET": "hmac-secret",
    "CXG_AGENTSERVER_INTERNAL_SECRET": "internal-secret",
    "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "exec-secret",
    "CXG_CAPTOKEN_HMAC_SECRET": "cap-secret",
    "CXG_S3_SECRET_ACCESS_KEY": "s3-secret",
    "CXG_CODEX_API_KEY": "sk-static",
    "CXG_ADMIN_SECRET": "admin-secret",
    "CXG_TMP_ROOT": "/var/lib/codex-app-gateway",
    "AWS_ACCESS_KEY_ID": "AKIA...",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_SESSION_TOKEN": "aws-session",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token",
    "OPENAI_API_KEY": "sk-openai",
    "CODEX_API_KEY": "sk-codex",
    "CODEX_HOME": "/root/.codex",
    "HOME": "/root",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "HOSTNAME": "codex-app-gateway-0",
    "LD_PRELOAD": "/tmp/evil.so",
    "PYTHONPATH": "/app",
    "SOME_RANDOM_VAR": "x",
    "path": "lower-case is a different variable",
}


def child_env(inherited: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """``build_child_env`` with the session's usual directories."""
    return build_child_env(inherited, codex_home=CODEX_HOME, home=HOME, extra=extra or {})


# -- build_child_env ---------------------------------------------------------------------------


def test_only_allow_listed_variables_reach_the_child() -> None:
    env = child_env({**ALLOWED, **REFUSED})
    assert env == {**ALLOWED, "CODEX_HOME": str(CODEX_HOME), "HOME": str(HOME)}


def test_no_secret_value_reaches_the_child() -> None:
    env = child_env({**ALLOWED, **REFUSED})
    for value in REFUSED.values():
        assert value not in env.values()


def test_codex_home_and_home_point_into_the_session() -> None:
    env = child_env({"HOME": "/root", "CODEX_HOME": "/root/.codex"})
    assert env["CODEX_HOME"] == str(CODEX_HOME)
    assert env["HOME"] == str(HOME)


def test_path_gets_a_default_when_the_gateway_has_none() -> None:
    assert child_env({})["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_extra_variables_are_added() -> None:
    env = child_env(ALLOWED, {"MODEL_TOKEN_FILE": "/run/t"})
    assert env["MODEL_TOKEN_FILE"] == "/run/t"


@pytest.mark.parametrize("name", ["CXG_AGENTSERVER_INTERNAL_SECRET", "CXG_ANYTHING", "CXG_"])
def test_extra_with_a_gateway_variable_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        child_env(ALLOWED, {name: "value"})


def test_a_custom_passthrough_replaces_the_default_list() -> None:
    env = build_child_env(
        {"PATH": "/bin", "LANG": "C", "EXTRA": "1"},
        codex_home=CODEX_HOME,
        home=HOME,
        extra={},
        passthrough=("EXTRA",),
    )
    assert env == {
        "EXTRA": "1",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "CODEX_HOME": str(CODEX_HOME),
        "HOME": str(HOME),
    }


@given(
    st.dictionaries(
        st.text(st.characters(codec="ascii", exclude_characters="=\x00"), min_size=1),
        st.text(),
        max_size=30,
    )
)
def test_child_names_are_always_the_allow_list_plus_the_session_directories(
    inherited: dict[str, str],
) -> None:
    env = child_env(inherited)
    assert set(env) <= set(ALLOWED) | {"CODEX_HOME", "HOME"}
    for name in set(env) & set(ALLOWED) - {"PATH"}:
        assert env[name] == inherited[name]


# -- app_server_argv ---------------------------------------------------------------------------


def test_argv_carries_the_token_hash_and_never_the_token() -> None:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    argv = app_server_argv("/usr/local/bin/codex", digest)
    assert argv[:2] == ["/usr/local/bin/codex", "app-server"]
    assert argv[argv.index("--ws-token-sha256") + 1] == digest
    assert argv[argv.index("--ws-auth") + 1] == "capability-token"
    assert argv[argv.index("--listen") + 1] == "ws://127.0.0.1:0"
    assert not any(token in arg for arg in argv)


# -- crash_backoff -----------------------------------------------------------------------------


def test_crash_backoff_doubles_from_the_second_crash_up_to_a_minute() -> None:
    assert [crash_backoff(n) for n in range(10)] == [0, 0, 2, 4, 8, 16, 32, 60, 60, 60]
    assert CRASH_BACKOFF_MAX_SECONDS == 60


@given(st.integers(min_value=-10, max_value=10**9))
def test_crash_backoff_is_bounded_for_any_crash_count(count: int) -> None:
    delay = crash_backoff(count)
    assert 0 <= delay <= CRASH_BACKOFF_MAX_SECONDS
    assert crash_backoff(count + 1) >= delay


# -- sendable_close ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1014, 3000, 4999])
def test_sendable_codes_pass_through_with_their_reason(code: int) -> None:
    assert sendable_close(code, "bye", fallback=1011) == (code, "bye")


@pytest.mark.parametrize(
    "code", [None, 1004, 1005, 1006, 1015, 1016, 2999, 999, 0, -1, 5000, 65535]
)
def test_reserved_and_out_of_range_codes_become_the_fallback(code: int | None) -> None:
    assert sendable_close(code, "why", fallback=1011) == (1011, "why")


def test_a_missing_reason_becomes_empty() -> None:
    assert sendable_close(1000, None, fallback=1011) == (1000, "")
    assert sendable_close(1006, None, fallback=1011) == (1011, "")


def test_a_long_ascii_reason_is_cut_to_123_bytes() -> None:
    assert sendable_close(1000, "x" * 500, fallback=1011) == (1000, "x" * 123)


def test_a_long_reason_is_not_cut_inside_a_character() -> None:
    code, reason = sendable_close(1000, "é" * 100, fallback=1011)  # two bytes each
    assert (code, reason) == (1000, "é" * 61)
    _, reason = sendable_close(1000, "a" + "€" * 60, fallback=1011)  # 1 + 3 * 40 = 121
    assert reason == "a" + "€" * 40


def test_a_long_reason_is_cut_with_the_fallback_code_too() -> None:
    code, reason = sendable_close(1006, "y" * 300, fallback=1000)
    assert (code, reason) == (1000, "y" * 123)


@given(
    code=st.one_of(st.none(), st.integers(-70000, 70000)), reason=st.one_of(st.none(), st.text())
)
def test_the_result_is_always_a_legal_close_frame(code: int | None, reason: str | None) -> None:
    sent_code, sent_reason = sendable_close(code, reason, fallback=1011)
    assert sent_code == code or sent_code == 1011
    assert sent_code not in (1004, 1005, 1006, 1015)
    assert 1000 <= sent_code <= 4999
    assert not 1016 <= sent_code < 3000
    assert len(sent_reason.encode()) <= 123
    assert (reason or "").startswith(sent_reason)
