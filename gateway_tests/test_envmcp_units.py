"""env-mcp's pure parts: working directories, result text, output bounds, tool arguments.

Also the reading of a model request's offered MCP servers that the end-to-end tests rely on.
"""

from __future__ import annotations

import pytest

from gateway.envmcp.bridge import BridgeRefused, EnvironmentInfo
from gateway.envmcp.server import parse_shell_arguments, shell_tool
from gateway.envmcp.shell import _Stream, format_outcome, resolve_cwd
from gateway_tests.fakes.fake_model_server import announced_mcp_namespaces

INFO = EnvironmentInfo(cwd_uri="file:///home/daisy/work", home_uri="file:///home/daisy")


@pytest.mark.parametrize(
    ("cwd", "uri"),
    [
        (None, "file:///home/daisy/work"),
        ("", "file:///home/daisy/work"),
        ("/srv/app", "file:///srv/app"),
        ("/srv/my app/", "file:///srv/my%20app"),
        ("sub", "file:///home/daisy/work/sub"),
        ("../other", "file:///home/daisy/other"),
        ("~", "file:///home/daisy"),
        ("~/src", "file:///home/daisy/src"),
        ("file:///already/uri", "file:///already/uri"),
    ],
)
def test_cwd_becomes_a_file_uri(cwd: str | None, uri: str) -> None:
    assert resolve_cwd(cwd, INFO) == uri


def test_cwd_defaults_to_tmp_when_the_executor_does_not_say() -> None:
    assert resolve_cwd(None, EnvironmentInfo()) == "file:///tmp"
    assert resolve_cwd("x", EnvironmentInfo()) == "file:///tmp/x"
    with pytest.raises(ValueError, match="home directory"):
        resolve_cwd("~", EnvironmentInfo())


def test_environment_info_reads_the_initialize_answer() -> None:
    info = EnvironmentInfo.from_initialize(
        {"sessionId": "s", "environmentInfo": {"cwd": "file:///w", "userHomeDir": "file:///h"}}
    )
    assert info == EnvironmentInfo(cwd_uri="file:///w", home_uri="file:///h")
    assert EnvironmentInfo.from_initialize({}) == EnvironmentInfo()


def test_result_text_layout() -> None:
    ok = format_outcome("hi\n", "", exit_code=0, failure=None, timed_out_after=None)
    assert (ok.text, ok.is_error) == ("hi\n[exit_code=0]", False)
    both = format_outcome("out", "err\n", exit_code=2, failure=None, timed_out_after=None)
    assert (both.text, both.is_error) == ("out\n--- stderr ---\nerr\n[exit_code=2]", True)
    only_err = format_outcome("", "err", exit_code=1, failure=None, timed_out_after=None)
    assert only_err.text == "err\n[exit_code=1]"
    failed = format_outcome("", "", exit_code=None, failure="spawn", timed_out_after=None)
    assert failed.text == "[exec failure: spawn]\n[exec ended without an exit code]"
    assert failed.is_error
    timed_out = format_outcome("x", "", exit_code=None, failure=None, timed_out_after=2.5)
    assert timed_out.text == "x\n[time limit of 2.5s reached; the process was killed]"
    cancelled = format_outcome(
        "", "", exit_code=None, failure=None, timed_out_after=None, cancelled=True
    )
    assert (cancelled.text, cancelled.is_error) == ("[cancelled; the process was killed]", True)


def test_output_is_bounded_and_split_characters_survive() -> None:
    stream = _Stream(limit=10)
    data = "héllo wörld".encode()
    for byte in data:  # one byte at a time splits the multi-byte characters
        stream.add(bytes([byte]))
    assert stream.text() == data[:10].decode("utf-8", errors="replace") + (
        f"\n[output truncated: {len(data) - 10} more bytes]"
    )
    small = _Stream(limit=100)
    small.add("é".encode()[:1])
    small.add("é".encode()[1:])
    assert small.text() == "é"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (None, "non-empty array"),
        ({}, "non-empty array"),
        ({"command": []}, "non-empty array"),
        ({"command": "ls -la"}, "not a string"),
        ({"command": ["ls", 1]}, "must be a string"),
        ({"command": ["ls", "a\x00b"]}, "NUL"),
        ({"command": ["ls"], "cwd": 3}, "cwd must be a string"),
    ],
)
def test_bad_tool_arguments_are_explained(arguments: dict | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_shell_arguments(arguments)


def test_good_tool_arguments() -> None:
    assert parse_shell_arguments({"command": ["ls", "-la"]}) == (["ls", "-la"], None)
    assert parse_shell_arguments({"command": ["ls"], "cwd": "/srv"}) == (["ls"], "/srv")
    assert parse_shell_arguments({"command": ["ls"], "cwd": ""}) == (["ls"], None)


def test_tool_description_names_the_executor() -> None:
    tool = shell_tool("Daisy's MacBook")
    assert tool.name == "shell"
    assert "Run a shell command on `Daisy's MacBook`." in (tool.description or "")


@pytest.mark.parametrize(
    ("status", "hint"),
    [(401, "rejected"), (403, "does not grant"), (503, "not connected"), (418, "unexpected")],
)
def test_refusals_say_what_went_wrong(status: int, hint: str) -> None:
    error = BridgeRefused(status, "reason text")
    assert f"HTTP {status}" in str(error)
    assert hint in str(error)
    assert str(error).endswith(": reason text")


# -- how a test reads which MCP servers a model request offered (both of codex's forms) --------

DEFERRED_TEXT = (
    "<tools>\nDeferred tool namespaces:\n- mcp__exe_alpha\n"
    "- multi_agent_v1: Tools for spawning and managing sub-agents.\n- mcp__exe_b: Box b\n</tools>"
)


def test_namespace_tools_are_found() -> None:
    body = {
        "tools": [
            {"type": "function", "name": "mcp__not_a_namespace"},
            {"type": "namespace", "name": "mcp__exe_alpha", "tools": []},
        ],
        "input": [],
    }
    assert announced_mcp_namespaces(body) == {"mcp__exe_alpha"}


def test_deferred_namespaces_in_a_developer_message_are_found() -> None:
    message = {"type": "message", "role": "developer"}
    content = [{"type": "input_text", "text": DEFERRED_TEXT}]
    body = {"tools": [], "input": [{**message, "content": content}]}
    assert announced_mcp_namespaces(body) == {"mcp__exe_alpha", "mcp__exe_b"}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tools": [{"type": "namespace", "name": "multi_agent_v1"}]},
        # The same list from the user, not from codex, does not count.
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": DEFERRED_TEXT}]}]},
        {"input": [{"role": "developer", "content": "Tools: - mcp__exe_alpha"}]},
        None,
    ],
)
def test_a_request_without_the_server_offers_none(body: object) -> None:
    assert announced_mcp_namespaces(body) == set()
