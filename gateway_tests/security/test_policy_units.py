"""``ClientPolicy`` without sockets: what each rule forwards and refuses, and malformed input."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import PolicySettings
from gateway.policy import ClientPolicy, Refusal

HOME = "/sessions/ws1/home"
CODEX_HOME = "/sessions/ws1/codex-home"


def policy(**overrides: Any) -> ClientPolicy:
    return ClientPolicy(
        settings=PolicySettings(**overrides), home=HOME, codex_home=CODEX_HOME, provider="ms"
    )


def request(method: str, params: Any = None, request_id: Any = 7) -> str:
    return json.dumps({"id": request_id, "method": method, "params": params or {}})


def refused(message: str | bytes, **overrides: Any) -> Refusal:
    refusal = policy(**overrides).check(message)
    assert refusal is not None, message
    return refusal


def error_of(refusal: Refusal) -> dict[str, Any]:
    assert refusal.response is not None
    answer = json.loads(refusal.response)
    error: dict[str, Any] = answer["error"]
    return {"id": answer["id"], **error}


def test_the_tuis_read_only_methods_are_forwarded() -> None:
    for method in ("initialize", "thread/list", "thread/read", "model/list", "account/read"):
        assert policy().check(request(method)) is None
    assert policy().check(json.dumps({"method": "initialized"})) is None


def test_an_answer_to_the_childs_request_is_forwarded() -> None:
    assert policy().check(json.dumps({"id": 3, "result": {"decision": "accept"}})) is None


def test_an_unknown_method_is_refused_with_the_same_id_and_the_setting_named() -> None:
    error = error_of(refused(request("plugin/install", request_id="abc")))
    assert error["id"] == "abc"
    assert error["code"] == -32600
    assert "CXG_POLICY_EXTRA_METHODS" in error["message"]
    assert error["data"]["rule"] == "method_not_allowed"


def test_extra_methods_allow_a_prefix_and_deny_methods_win() -> None:
    assert policy(extra_methods=("fake/*",)).check(request("fake/echo")) is None
    refusal = refused(request("thread/list"), deny_methods=("thread/list",))
    assert refusal.rule == "method_denied"
    assert "CXG_POLICY_DENY_METHODS" in error_of(refusal)["message"]


def test_a_refused_notification_gets_no_answer() -> None:
    refusal = refused(json.dumps({"method": "fs/readFile", "params": {"path": "/etc/passwd"}}))
    assert refusal.response is None
    assert refusal.log_fields["method"] == "fs/readFile"


def test_json_escapes_in_the_method_do_not_get_past_the_policy() -> None:
    escaped = '{"id":1,"method":"\\u0066s/readFile","params":{"path":"/proc/1/environ"}}'
    assert refused(escaped).rule == "path_outside_home"


@pytest.mark.parametrize(
    ("method", "params", "rule"),
    [
        ("thread/start", {"sandbox": "danger-full-access"}, "sandbox_beyond_max"),
        ("thread/start", {"permissions": ":danger-full-access"}, "sandbox_beyond_max"),
        ("thread/start", {"permissions": "my-own-profile"}, "sandbox_beyond_max"),
        (
            "thread/start",
            {"config": {"mcp_servers": {"x": {"command": "sh"}}}},
            "config_key_not_allowed",
        ),
        ("thread/start", {"config": {"mcp_servers.x.command": "sh"}}, "config_key_not_allowed"),
        ("thread/start", {"config": {"sandbox_mode": "danger-full-access"}}, "sandbox_beyond_max"),
        ("thread/start", {"cwd": "/"}, "path_outside_home"),
        (
            "thread/start",
            {"config": {"default_permissions": ":danger-full-access"}},
            "sandbox_beyond_max",
        ),
        ("thread/start", {"config": {"features.unified_exec": True}}, "config_key_not_allowed"),
        ("thread/start", {"modelProvider": "openai"}, "model_provider_not_allowed"),
        (
            "thread/resume",
            {"threadId": "t", "path": "/sessions/ws2/codex-home/x.jsonl"},
            "path_outside_home",
        ),
        (
            "thread/settings/update",
            {"threadId": "t", "permissions": ":danger-full-access"},
            "sandbox_beyond_max",
        ),
        (
            "turn/start",
            {"threadId": "t", "input": [], "sandboxPolicy": {"type": "dangerFullAccess"}},
            "sandbox_beyond_max",
        ),
        (
            "turn/start",
            {"threadId": "t", "input": [], "sandboxPolicy": {"type": "externalSandbox"}},
            "sandbox_beyond_max",
        ),
        (
            "turn/start",
            {
                "threadId": "t",
                "input": [],
                "sandboxPolicy": {"type": "workspaceWrite", "writableRoots": ["/"]},
            },
            "path_outside_home",
        ),
        (
            "turn/start",
            {"threadId": "t", "input": [{"type": "localImage", "path": "/etc/shadow"}]},
            "path_outside_home",
        ),
        (
            "command/exec",
            {"command": ["id"], "sandboxPolicy": {"type": "dangerFullAccess"}},
            "sandbox_beyond_max",
        ),
        ("command/exec", {"command": ["id"], "cwd": "/etc"}, "path_outside_home"),
        (
            "config/batchWrite",
            {
                "edits": [
                    {
                        "keyPath": "model_providers.ms.auth.command",
                        "value": "sh",
                        "mergeStrategy": "replace",
                    }
                ]
            },
            "config_key_not_allowed",
        ),
        (
            "config/value/write",
            {
                "keyPath": "mcp_servers",
                "value": {"x": {"command": "sh"}},
                "mergeStrategy": "replace",
            },
            "config_key_not_allowed",
        ),
        (
            "config/value/write",
            {
                "keyPath": "model",
                "value": "x",
                "mergeStrategy": "replace",
                "filePath": "/etc/codex/requirements.toml",
            },
            "config_key_not_allowed",
        ),
        (
            "config/value/write",
            {"keyPath": "features.shell_tool", "value": True, "mergeStrategy": "replace"},
            "config_key_not_allowed",
        ),
        ("fs/readFile", {"path": "/proc/1/environ"}, "path_outside_home"),
        ("fs/readFile", {"path": HOME + "/../../ws2/home/secret"}, "path_outside_home"),
        ("fs/readFile", {"path": "relative/path"}, "path_outside_home"),
        (
            "fs/writeFile",
            {"path": CODEX_HOME + "/config.toml", "dataBase64": ""},
            "path_outside_home",
        ),
        (
            "fs/writeFile",
            {"path": "/etc/codex/requirements.toml", "dataBase64": ""},
            "path_outside_home",
        ),
        (
            "fs/copy",
            {"sourcePath": "/etc/passwd", "destinationPath": HOME + "/p"},
            "path_outside_home",
        ),
    ],
)
def test_each_route_beyond_the_default_bounds_is_refused(
    method: str, params: dict[str, Any], rule: str
) -> None:
    assert refused(request(method, params)).rule == rule


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("thread/start", {"sandbox": "workspace-write", "approvalPolicy": "on-request"}),
        ("thread/start", {"config": {"model_reasoning_effort": "low", "notice": {"a": True}}}),
        ("thread/start", {"cwd": HOME + "/project"}),
        # What the TUI's hidden title thread sends: everything switched off.
        (
            "thread/start",
            {
                "config": {
                    "default_permissions": ":read-only",
                    "features.code_mode_only": False,
                    "tools": {"update_plan": {"enabled": False}},
                    "mcp_servers": {},
                    "skills": {"include_instructions": False},
                }
            },
        ),
        ("thread/settings/update", {"threadId": "t", "permissions": ":workspace"}),
        ("thread/settings/update", {"threadId": "t", "approvalPolicy": {"granular": {}}}),
        ("turn/start", {"threadId": "t", "input": [{"type": "text", "text": "hi"}]}),
        (
            "turn/start",
            {
                "threadId": "t",
                "input": [],
                "sandboxPolicy": {"type": "workspaceWrite", "writableRoots": [HOME + "/x"]},
            },
        ),
        ("command/exec", {"command": ["git", "diff"], "sandboxPolicy": None, "cwd": HOME}),
        (
            "config/batchWrite",
            {"edits": [{"keyPath": "model", "value": "m", "mergeStrategy": "upsert"}]},
        ),
        ("thread/shellCommand", {"threadId": "t", "command": "ls"}),
        ("fs/readFile", {"path": CODEX_HOME + "/config.toml"}),
        ("fs/writeFile", {"path": HOME + "/notes.txt", "dataBase64": ""}),
    ],
)
def test_what_stays_within_the_default_bounds_is_forwarded(
    method: str, params: dict[str, Any]
) -> None:
    assert policy().check(request(method, params)) is None


def test_the_operator_can_switch_off_shell_commands_and_fs() -> None:
    shell = request("thread/shellCommand", {"threadId": "t", "command": "ls"})
    assert refused(shell, allow_shell_command=False).rule == "shell_command_off"
    read = request("fs/readFile", {"path": HOME + "/a"})
    assert refused(read, fs_access="off").rule == "fs_off"


def test_fs_any_leaves_paths_to_the_os_and_home_bounds_them() -> None:
    outside = request("fs/readFile", {"path": "/proc/1/environ"})
    write = request("fs/writeFile", {"path": "/etc/codex/requirements.toml", "dataBase64": ""})
    assert refused(outside).rule == "path_outside_home"
    assert refused(write).rule == "path_outside_home"
    assert policy(fs_access="any").check(outside) is None
    assert policy(fs_access="any").check(write) is None


def test_the_operator_can_narrow_sandbox_and_approvals() -> None:
    start = request("thread/start", {"sandbox": "workspace-write"})
    assert refused(start, max_sandbox="read-only").rule == "sandbox_beyond_max"
    asking = request("turn/start", {"threadId": "t", "input": [], "approvalPolicy": "on-request"})
    assert refused(asking, approval_policies=("never",)).rule == "approval_policy_not_allowed"
    full = request(
        "command/exec", {"command": ["id"], "sandboxPolicy": {"type": "dangerFullAccess"}}
    )
    assert policy(max_sandbox="danger-full-access").check(full) is None


@pytest.mark.parametrize(
    ("message", "rule", "code"),
    [
        ("{nope", "not_json", -32700),
        ('[{"id":1,"method":"thread/list"}]', "batch", -32600),
        ('{"id":1,"method":"thread/list","method":"fs/readFile"}', "duplicate_key", -32600),
        ("[" * 100_000 + "]" * 100_000, "too_deep", -32600),
        ('"just a string"', "malformed", -32600),
        ('{"id":true,"method":"thread/list"}', "malformed", -32600),
        ('{"id":1,"method":7}', "malformed", -32600),
        ('{"id":1,"method":"thread/start","params":[1]}', "malformed", -32600),
    ],
)
def test_malformed_messages_get_a_clear_error(message: str, rule: str, code: int) -> None:
    refusal = refused(message)
    assert refusal.rule == rule
    assert error_of(refusal)["code"] == code


def test_binary_messages_are_forwarded_unparsed() -> None:
    # codex 0.169.0 ignores binary frames (gateway_tests/security/test_policy.py proves it).
    assert policy().check(request("fs/readFile", {"path": "/etc/passwd"}).encode()) is None


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=12), inner, max_size=4)
            ),
            max_leaves=30,
        ).map(json.dumps),
    )
)
def test_any_input_is_forwarded_or_refused_with_valid_json(message: str | bytes) -> None:
    refusal = policy().check(message)
    if refusal is not None and refusal.response is not None:
        answer = json.loads(refusal.response)
        assert set(answer) == {"id", "error"}
        assert isinstance(answer["error"]["message"], str)


_METHODS = st.sampled_from(
    ["thread/start", "turn/start", "command/exec", "config/batchWrite", "fs/readFile", "x/y"]
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    _METHODS,
    st.dictionaries(
        st.sampled_from(
            ["sandbox", "sandboxPolicy", "config", "cwd", "path", "edits", "input", "permissions"]
        ),
        st.recursive(
            st.none() | st.booleans() | st.text(max_size=30),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=10), inner, max_size=3)
            ),
            max_leaves=12,
        ),
    ),
)
def test_checked_methods_never_raise_on_any_params(method: str, params: dict[str, Any]) -> None:
    policy().check(request(method, params))


def test_check_is_cheap_for_an_ordinary_message() -> None:
    """A microbenchmark bound, far above what it measures (docs/security.md quotes the cost)."""
    checker = policy()
    turn = request("turn/start", {"threadId": "t", "input": [{"type": "text", "text": "x" * 200}]})
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):
        checker.check(turn)
    per_message = (time.perf_counter() - start) / rounds
    assert per_message < 200e-6, per_message
