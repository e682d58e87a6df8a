"""The tools env-mcp lists, as specs (``gateway/envmcp/registry.py``); pure, cheap to import.

More tools are added by appending their ``ToolSpec`` to ``EXECUTOR_TOOLS``; each handler lives
in its own module and is imported at its first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from gateway.envmcp.registry import ToolSpec

SHELL_DESCRIPTION = (
    "Run a shell command on `{environment}`. Use this tool for any shell operation in "
    "this environment. The command is an argv list; for pipes, redirections or other "
    'shell syntax use ["bash", "-lc", "<script>"].'
)

SHELL_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "command": {
            "type": "array",
            "items": {"type": "string"},
            "description": "argv as a list of strings",
        },
        "cwd": {
            "type": "string",
            "description": "Working directory; defaults to the executor's working directory",
        },
    },
    "required": ["command"],
}


def parse_shell_arguments(arguments: Mapping[str, Any] | None) -> tuple[list[str], str | None]:
    """Validate the tool's arguments; ``ValueError`` says what is wrong, for the model to fix."""
    arguments = arguments or {}
    command = arguments.get("command")
    if isinstance(command, str):
        raise ValueError(
            'command must be an array of strings, e.g. ["bash", "-lc", "ls -la"], not a string'
        )
    if not isinstance(command, list) or not command:
        raise ValueError("command must be a non-empty array of strings")
    if not all(isinstance(part, str) for part in command):
        raise ValueError("every element of command must be a string")
    if any("\x00" in part for part in command):
        raise ValueError("command must not contain NUL characters")
    cwd = arguments.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError("cwd must be a string")
    return command, cwd or None


def _validate_shell(arguments: Mapping[str, Any]) -> None:
    parse_shell_arguments(arguments)


SHELL = ToolSpec(
    name="shell",
    description=SHELL_DESCRIPTION,
    input_schema=SHELL_SCHEMA,
    handler="gateway.envmcp.shell:handle_shell",
    validate=_validate_shell,
)

_TOOLS = "gateway.envmcp.tools"


def _parsed_by(target: str) -> Callable[[Mapping[str, Any]], None]:
    """A ``validate`` that runs the tool module's check, imported at the first call."""

    def validate(arguments: Mapping[str, Any]) -> None:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(arguments)

    return validate


def _integer(description: str, minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum, "description": description}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_WORKDIR = {
    "type": "string",
    "description": "Working directory; relative paths and the default are the executor's "
    "working directory, ~ is its home directory.",
}
_PATH = {
    "type": "string",
    "description": "File path: absolute, ~-relative, or relative to the executor's working "
    "directory.",
}
_LOGIN = {
    "type": "boolean",
    "description": "Run the shell as a login shell, loading the user's login profile (default "
    "false: quicker, with the executor's own environment).",
}
_MAX_OUTPUT = _integer(
    "Most bytes of output to return; the middle of longer output is left out.", 1024, 262144
)

SHELL_COMMAND = ToolSpec(
    name="shell_command",
    description=(
        "Runs a shell script on `{environment}` with the executor's shell (`-c`) and returns "
        "its output and exit code once it ends. Output streams as progress while it runs; the "
        "command is killed at its time limit."
    ),
    input_schema=_object(
        {
            "command": {"type": "string", "description": "The shell script to run."},
            "workdir": _WORKDIR,
            "timeout_ms": _integer("Time limit in milliseconds.", 1, 3_600_000),
            "login": _LOGIN,
            "max_output_bytes": _MAX_OUTPUT,
        },
        ["command"],
    ),
    handler=f"{_TOOLS}.exec:handle",
    validate=_parsed_by(f"{_TOOLS}.exec:parse_arguments"),
)

READ_FILE = ToolSpec(
    name="read_file",
    description=(
        "Reads a text file on `{environment}` and returns its lines, each prefixed with "
        "`L<n>: ` (its line number). Use offset and limit for part of a long file."
    ),
    input_schema=_object(
        {
            "path": _PATH,
            "offset": _integer("First line to return, counting from 1.", 1, 10**9),
            "limit": _integer("Most lines to return (default 2000).", 1, 10_000),
        },
        ["path"],
    ),
    handler=f"{_TOOLS}.files:handle_read",
    validate=_parsed_by(f"{_TOOLS}.files:parse_read"),
)

WRITE_FILE = ToolSpec(
    name="write_file",
    description=(
        "Writes a text file on `{environment}`, replacing it if it exists and creating missing "
        "parent directories. For changes to an existing file prefer apply_patch."
    ),
    input_schema=_object(
        {
            "path": _PATH,
            "content": {"type": "string", "description": "The file's whole new content."},
        },
        ["path", "content"],
    ),
    handler=f"{_TOOLS}.files:handle_write",
    validate=_parsed_by(f"{_TOOLS}.files:parse_write"),
)

APPLY_PATCH = ToolSpec(
    name="apply_patch",
    description=(
        "Edits files on `{environment}` with a patch in the apply_patch format:\n"
        "*** Begin Patch\n"
        "*** Add File: <path>      (then every line of the new file prefixed with +)\n"
        "*** Delete File: <path>\n"
        "*** Update File: <path>   (optionally followed by *** Move to: <new path>)\n"
        "@@ <optional line to find first, e.g. a function header>\n"
        " <context line>\n"
        "-<removed line>\n"
        "+<added line>\n"
        "*** End Patch\n"
        "Give about 3 lines of context around each change. Paths are relative to the "
        "executor's working directory. Nothing is written unless every change applies."
    ),
    input_schema=_object(
        {"input": {"type": "string", "description": "The whole patch, Begin to End."}},
        ["input"],
    ),
    handler=f"{_TOOLS}.patch:handle",
    validate=_parsed_by(f"{_TOOLS}.patch:parse_arguments"),
)

_SESSION_ID = _integer("Session id returned by exec_command.", 1, 2**31)
_YIELD = _integer("How long to wait for output, in ms.", 0, 30_000)

# The session tools run on the executor's kept connection: their process outlives the call.
EXEC_COMMAND = ToolSpec(
    name="exec_command",
    description=(
        "Starts a command on `{environment}` and returns its output after yield_time_ms: the "
        "exit code if it ended, else a session_id to use with write_stdin (send input or poll "
        "for more output) and terminate_session. Sessions end with this server."
    ),
    input_schema=_object(
        {
            "cmd": {"type": "string", "description": "Shell command to run."},
            "workdir": _WORKDIR,
            "tty": {
                "type": "boolean",
                "description": "Run in a pseudo-terminal (default false: plain pipes).",
            },
            "login": _LOGIN,
            "yield_time_ms": _YIELD,
            "max_output_bytes": _MAX_OUTPUT,
        },
        ["cmd"],
    ),
    handler=f"{_TOOLS}.sessions:handle_start",
    validate=_parsed_by(f"{_TOOLS}.sessions:parse_start"),
    keep_connection=True,
)

WRITE_STDIN = ToolSpec(
    name="write_stdin",
    description=(
        "Writes characters to the stdin of a session started by exec_command on "
        "`{environment}` and returns the output since the last read (chars may be empty to "
        "only poll)."
    ),
    input_schema=_object(
        {
            "session_id": _SESSION_ID,
            "chars": {
                "type": "string",
                "description": "Characters to write (may be empty to poll).",
            },
            "yield_time_ms": _YIELD,
            "max_output_bytes": _MAX_OUTPUT,
        },
        ["session_id"],
    ),
    handler=f"{_TOOLS}.sessions:handle_write",
    validate=_parsed_by(f"{_TOOLS}.sessions:check_write"),
    keep_connection=True,
)

TERMINATE_SESSION = ToolSpec(
    name="terminate_session",
    description=(
        "Kills the process of a session started by exec_command on `{environment}` and "
        "returns its last output."
    ),
    input_schema=_object({"session_id": _SESSION_ID}, ["session_id"]),
    handler=f"{_TOOLS}.sessions:handle_terminate",
    validate=_parsed_by(f"{_TOOLS}.sessions:check_terminate"),
    keep_connection=True,
)

# Every tool that runs on an executor, in the order listed.
EXECUTOR_TOOLS: tuple[ToolSpec, ...] = (
    SHELL,
    SHELL_COMMAND,
    EXEC_COMMAND,
    WRITE_STDIN,
    TERMINATE_SESSION,
    READ_FILE,
    WRITE_FILE,
    APPLY_PATCH,
)
