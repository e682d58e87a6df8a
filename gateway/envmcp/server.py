"""The MCP server codex talks to on stdio: one ``shell`` tool that runs on the executor.

Built on the ``mcp`` package's low-level server (it runs on anyio, hence on Trio), which handles
the protocol: ``initialize`` with version negotiation, ``ping``, concurrent requests and
``notifications/cancelled`` — a cancelled call kills its remote process on the way out.
Prompt and resource lists exist and are empty, as upstream.

The bridge and shell modules (and their WebSocket client) are imported at the first tool call,
not at start: codex includes this server in a thread's first model request only once it has
answered ``tools/list``, so start-up imports only what a stdio MCP server needs.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import mcp_types as types
import trio
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

if TYPE_CHECKING:
    from gateway.envmcp.shell import ShellOutcome

log = logging.getLogger(__name__)

SERVER_NAME = "codex-env-mcp"
SERVER_VERSION = "0.1"
TOOL_NAME = "shell"
METHOD_NOT_FOUND = -32601
# Progress messages are a glimpse of the output, not the output.
_PROGRESS_TEXT = 200


@attrs.frozen
class EnvMcpSettings:
    """How this env-mcp instance reaches its one executor."""

    exe_id: str
    bridge_url: str
    token: str = attrs.field(repr=False)
    exe_desc: str
    turn_id: str = ""
    time_limit: float = 50.0


def shell_tool(exe_desc: str) -> types.Tool:
    """The tool as listed: argv plus an optional working directory."""
    return types.Tool(
        name=TOOL_NAME,
        description=(
            f"Run a shell command on `{exe_desc}`. Use this tool for any shell operation in "
            "this environment. The command is an argv list; for pipes, redirections or other "
            'shell syntax use ["bash", "-lc", "<script>"].'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "command": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "argv as a list of strings",
                },
                "cwd": {
                    "type": "string",
                    "description": (
                        "Working directory; defaults to the executor's working directory"
                    ),
                },
            },
            "required": ["command"],
        },
    )


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


def _error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


class ShellToolServer:
    """Serves the ``shell`` tool for one executor; each call dials the bridge afresh."""

    def __init__(self, settings: EnvMcpSettings) -> None:
        self.settings = settings
        # Process ids only need to be unique per exec-server; the random part keeps two env-mcp
        # children of one workspace apart all the same.
        prefix = f"envmcp-{secrets.token_hex(4)}"
        self._process_ids = (f"{prefix}-{n}" for n in itertools.count(1))
        self.server: Server[Any] = Server(
            SERVER_NAME,
            version=SERVER_VERSION,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_prompts=self._list_prompts,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_resource_templates,
        )

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[shell_tool(self.settings.exe_desc)])

    async def _list_prompts(self, ctx: Any, params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[])

    async def _list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[])

    async def _list_resource_templates(
        self, ctx: Any, params: Any
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[])

    async def _call_tool(
        self, ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name != TOOL_NAME:
            raise MCPError(code=METHOD_NOT_FOUND, message=f"unknown tool: {params.name}")
        try:
            argv, cwd = parse_shell_arguments(params.arguments)
        except ValueError as exc:
            return _error_result(f"invalid arguments: {exc}")
        outcome = await self.run(argv, cwd, progress=_progress_reporter(ctx))
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=outcome.text)], is_error=outcome.is_error
        )

    async def run(self, argv: list[str], cwd: str | None, progress: Any = None) -> ShellOutcome:
        """Run one command on the executor; every failure becomes an error outcome, not a raise.

        The work runs shielded so that a cancelled call (``notifications/cancelled``, shutdown)
        can still kill its remote process over the bridge; the cancellation reaches it as the
        ``stop`` event instead, and is re-raised once the process is gone.
        """
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_when_cancelled, stop)
            with trio.CancelScope(shield=True):
                outcome = await self._run(argv, cwd, progress, stop)
            nursery.cancel_scope.cancel()
        return outcome

    async def _run(
        self, argv: list[str], cwd: str | None, progress: Any, stop: trio.Event
    ) -> ShellOutcome:
        from gateway.envmcp.bridge import BridgeError, open_exec_server
        from gateway.envmcp.shell import ShellOutcome, resolve_cwd, run_shell

        settings = self.settings
        process_id = next(self._process_ids)
        log.info("shell call %s on executor %s", process_id, settings.exe_id)
        try:
            async with open_exec_server(settings.bridge_url, settings.token) as (client, info):
                try:
                    cwd_uri = resolve_cwd(cwd, info)
                except ValueError as exc:
                    return ShellOutcome(text=f"invalid arguments: {exc}", is_error=True)
                return await run_shell(
                    client,
                    process_id=process_id,
                    argv=argv,
                    cwd_uri=cwd_uri,
                    time_limit=settings.time_limit,
                    on_output=progress,
                    stop=stop,
                )
        except BridgeError as exc:
            log.warning("shell call %s on executor %s failed: %s", process_id, settings.exe_id, exc)
            return ShellOutcome(
                text=f"[executor {settings.exe_id} unreachable: {exc}]", is_error=True
            )

    async def serve_stdio(self) -> None:
        """Serve MCP on stdin/stdout until stdin closes."""
        async with stdio_server() as (read_stream, write_stream):
            await self.server.run(
                read_stream, write_stream, self.server.create_initialization_options()
            )


async def _set_when_cancelled(stop: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        stop.set()


def _progress_reporter(ctx: Any) -> Any:
    """A callback sending MCP progress notifications, if the caller asked for them."""
    meta = getattr(ctx, "meta", None) or {}
    token = meta.get("progress_token") if isinstance(meta, Mapping) else None
    session = getattr(ctx, "session", None)
    if token is None or session is None:
        return None

    async def report(text: str, total: int) -> None:
        try:
            await session.send_progress_notification(
                token, float(total), message=text[-_PROGRESS_TEXT:]
            )
        except Exception as exc:  # progress is best effort; the result still arrives
            log.debug("progress notification failed: %s", exc)

    return report


async def serve(settings: EnvMcpSettings) -> None:
    """Run the env-mcp server for ``settings`` until stdin closes."""
    log.info(
        "env-mcp starting: exe_id=%s bridge_url=%s turn_id=%s",
        settings.exe_id,
        settings.bridge_url,
        settings.turn_id or "-",
    )
    await ShellToolServer(settings).serve_stdio()
    log.info("env-mcp clean exit (stdin closed)")
