"""The tools env-mcp lists, as specs (``gateway/envmcp/registry.py``); pure, cheap to import.

More tools are added by appending their ``ToolSpec`` to ``EXECUTOR_TOOLS``; each handler lives
in its own module and is imported at its first call.
"""

from __future__ import annotations

from collections.abc import Mapping
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

# Every tool that runs on an executor, in the order listed.
EXECUTOR_TOOLS: tuple[ToolSpec, ...] = (SHELL,)
