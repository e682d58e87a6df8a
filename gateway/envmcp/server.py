"""The MCP server codex talks to on stdio: the executor tools, and where each call runs.

Built on the ``mcp`` package's low-level server (it runs on anyio, hence on Trio), which handles
the protocol: ``initialize`` with version negotiation, ``ping``, concurrent requests and
``notifications/cancelled`` — a cancelled call kills its remote process on the way out.
Prompt and resource lists exist and are empty, as upstream.

Two ways to find executors (an ``EnvironmentSource``):

* ``SessionChannel`` (the multiplexed layout, the default): one env-mcp per session. The
  ``list_environments`` tool asks the session, over its private channel
  (``gateway/envmcp/channel.py``), which executors are connected *now*; every other tool takes an
  ``environment_id`` and, per call, gets a fresh one-executor token from the session and dials
  that executor's bridge. env-mcp holds no secret and no list fixed at spawn.
* ``FixedExecutor`` (``CXG_EXECUTOR_MCP_LAYOUT=per-executor``): one env-mcp per executor, its
  token in the environment, tools without ``environment_id`` (the Go seed's surface).

The tools themselves are specs (``gateway/envmcp/registry.py``, listed in ``specs.py``). Their
handlers, the bridge and the WebSocket client are imported at the first tool call, not at start:
codex includes this server in a thread's first model request only once it has answered
``tools/list``, so start-up imports only what a stdio MCP server needs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import mcp_types as types
import trio
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from gateway.envmcp.channel import (
    ChannelError,
    Environment,
    GrantRequest,
    ListRequest,
    ask,
    check_environment_id,
    parse_environments,
    parse_grant,
)
from gateway.envmcp.kept import KeptConnectionError, KeptConnections
from gateway.envmcp.registry import TextOutcome, ToolCall, ToolOutcome, ToolRegistry, ToolSpec
from gateway.envmcp.specs import EXECUTOR_TOOLS, SHELL, parse_shell_arguments

if TYPE_CHECKING:
    from gateway.envmcp.bridge import EnvironmentInfo, ExecServerClient

__all__ = ["ChannelSettings", "EnvMcpSettings", "ToolServer", "parse_shell_arguments", "serve"]

log = logging.getLogger(__name__)

SERVER_NAME = "codex-env-mcp"
SERVER_VERSION = "0.1"
TOOL_NAME = SHELL.name
LIST_TOOL_NAME = "list_environments"
ENVIRONMENT_ARGUMENT = "environment_id"
METHOD_NOT_FOUND = -32601
# Progress messages are a glimpse of the output, not the output.
_PROGRESS_TEXT = 200

LIST_DESCRIPTION = (
    "List the executors (environments) connected to this workspace right now: their ids, "
    "descriptions and default working directories. An executor the user starts later appears "
    "here as soon as it connects. Pass an id as `environment_id` to the other tools."
)
_MULTIPLEXED_TARGET = "the executor named by `environment_id` (ids from `list_environments`)"
NO_ENVIRONMENTS = (
    "No executor is connected to this workspace right now. Ask the user to start one; it "
    "appears here as soon as it connects."
)


@attrs.frozen
class EnvMcpSettings:
    """How a per-executor env-mcp reaches its one executor."""

    exe_id: str
    bridge_url: str
    token: str = attrs.field(repr=False)
    exe_desc: str
    turn_id: str = ""
    time_limit: float = 50.0


@attrs.frozen
class ChannelSettings:
    """How a multiplexed env-mcp reaches its session."""

    channel_path: str
    time_limit: float = 50.0


Connection = tuple["ExecServerClient", "EnvironmentInfo"]


class EnvironmentSource(Protocol):
    """Which executors there are, and a connection to one of them for one call."""

    #: The one executor of a per-executor env-mcp; ``None``: the model picks one per call.
    fixed_environment: str | None

    async def environments(self) -> list[Environment]:
        """The executors to offer now."""
        ...

    def connect(self, environment_id: str) -> Any:
        """An async context manager yielding ``(client, info)`` for one call."""
        ...


class FixedExecutor:
    """The per-executor layout: one executor, its token given at spawn."""

    def __init__(self, settings: EnvMcpSettings) -> None:
        self.settings = settings
        self.fixed_environment: str | None = settings.exe_id

    async def environments(self) -> list[Environment]:
        return [Environment(id=self.settings.exe_id, description=self.settings.exe_desc)]

    @asynccontextmanager
    async def connect(self, environment_id: str) -> AsyncIterator[Connection]:
        from gateway.envmcp.bridge import open_exec_server

        async with open_exec_server(self.settings.bridge_url, self.settings.token) as connection:
            yield connection


class SessionChannel:
    """The multiplexed layout: the session answers, for each call, over its channel."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fixed_environment: str | None = None

    async def environments(self) -> list[Environment]:
        return parse_environments(await ask(self.path, ListRequest()))

    @asynccontextmanager
    async def connect(self, environment_id: str) -> AsyncIterator[Connection]:
        from gateway.envmcp.bridge import open_exec_server

        grant = parse_grant(await ask(self.path, GrantRequest(environment_id)))
        async with open_exec_server(grant.bridge_url, grant.token) as connection:
            yield connection


def describe(spec: ToolSpec, environment: str | None) -> str:
    """The tool's description for one executor (``environment``) or for any (``None``)."""
    if environment is None:
        return spec.description.replace("`{environment}`", _MULTIPLEXED_TARGET)
    return spec.description.replace("{environment}", environment)


def listed_tool(spec: ToolSpec, environment: str | None) -> types.Tool:
    """``spec`` as ``tools/list`` shows it; multiplexed (``None``) adds ``environment_id``."""
    schema = json.loads(json.dumps(spec.input_schema))
    if environment is None:
        schema.setdefault("properties", {})[ENVIRONMENT_ARGUMENT] = {
            "type": "string",
            "description": "Which executor runs this: an id from `list_environments`",
        }
        schema["required"] = [ENVIRONMENT_ARGUMENT, *schema.get("required", [])]
    return types.Tool(name=spec.name, description=describe(spec, environment), input_schema=schema)


def shell_tool(exe_desc: str) -> types.Tool:
    """The per-executor ``shell`` tool as listed: argv plus an optional working directory."""
    return listed_tool(SHELL, exe_desc)


def list_environments_tool() -> types.Tool:
    """The multiplexed layout's ``list_environments`` tool (no arguments)."""
    return types.Tool(
        name=LIST_TOOL_NAME,
        description=LIST_DESCRIPTION,
        input_schema={"type": "object", "properties": {}},
    )


def environments_text(environments: list[Environment]) -> str:
    """What ``list_environments`` answers: JSON the model can read, or how to get one."""
    if not environments:
        return NO_ENVIRONMENTS
    return json.dumps({"environments": [attrs.asdict(e) for e in environments]}, indent=1)


def _error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


class ToolServer:
    """Serves the registered tools on the executors of ``source``; each call dials afresh."""

    def __init__(
        self,
        source: EnvironmentSource,
        *,
        time_limit: float,
        tools: tuple[ToolSpec, ...] = EXECUTOR_TOOLS,
        exe_desc: str = "",
    ) -> None:
        self.source = source
        self.registry = ToolRegistry(tools)
        # For tools with ``keep_connection``; its ``run`` is started by ``serve_stdio``.
        self.kept = KeptConnections(source.connect)
        self.time_limit = time_limit
        self._exe_desc = exe_desc
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

    def tools(self) -> list[types.Tool]:
        """Every tool as listed (no I/O: the first turn must not wait for anything)."""
        if self.source.fixed_environment is not None:
            return [listed_tool(spec, self._exe_desc) for spec in self.registry]
        return [list_environments_tool(), *(listed_tool(spec, None) for spec in self.registry)]

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools())

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
        if self.source.fixed_environment is None and params.name == LIST_TOOL_NAME:
            outcome = await self.list_environments()
        else:
            spec = self.registry.get(params.name)
            if spec is None:
                raise MCPError(code=METHOD_NOT_FOUND, message=f"unknown tool: {params.name}")
            outcome = await self.call(spec, params.arguments, progress=_progress_reporter(ctx))
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=outcome.text)], is_error=outcome.is_error
        )

    async def list_environments(self) -> ToolOutcome:
        """The executors connected now, asked of the session at every call."""
        try:
            environments = await self.source.environments()
        except ChannelError as exc:
            return TextOutcome(f"[cannot list environments: {exc}]", is_error=True)
        return TextOutcome(environments_text(environments), is_error=False)

    async def call(
        self, spec: ToolSpec, arguments: Mapping[str, Any] | None, progress: Any = None
    ) -> ToolOutcome:
        """Check the arguments, pick the executor, and run ``spec``'s handler on it."""
        arguments = dict(arguments or {})
        environment_id = self.source.fixed_environment
        if environment_id is None:
            try:
                environment_id = check_environment_id(arguments.pop(ENVIRONMENT_ARGUMENT, None))
            except ChannelError as exc:
                return TextOutcome(
                    f"invalid arguments: {exc}; call {LIST_TOOL_NAME} for the ids", is_error=True
                )
        if spec.validate is not None:
            try:
                spec.validate(arguments)
            except ValueError as exc:
                return TextOutcome(f"invalid arguments: {exc}", is_error=True)
        return await self.run(spec, environment_id, arguments, progress)

    async def run(
        self,
        spec: ToolSpec,
        environment_id: str,
        arguments: Mapping[str, Any],
        progress: Any = None,
    ) -> ToolOutcome:
        """Run one call; every failure becomes an error outcome, not a raise.

        The work runs shielded so that a cancelled call (``notifications/cancelled``, shutdown)
        can still kill its remote process over the bridge; the cancellation reaches it as the
        ``stop`` event instead, and is re-raised once the process is gone.
        """
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_when_cancelled, stop)
            with trio.CancelScope(shield=True):
                outcome = await self._run(spec, environment_id, arguments, progress, stop)
            nursery.cancel_scope.cancel()
        return outcome

    async def _run(
        self,
        spec: ToolSpec,
        environment_id: str,
        arguments: Mapping[str, Any],
        progress: Any,
        stop: trio.Event,
    ) -> ToolOutcome:
        from gateway.envmcp.bridge import BridgeError, ExecServerError

        handler = spec.load_handler()
        log.info("%s call on executor %s", spec.name, environment_id)
        if spec.keep_connection:
            connection = self.kept.use(environment_id)
        else:
            connection = self.source.connect(environment_id)
        try:
            async with connection as (client, info):
                call = ToolCall(
                    client=client,
                    info=info,
                    environment_id=environment_id,
                    environment_description=self._exe_desc or environment_id,
                    time_limit=self.time_limit,
                    stop=stop,
                    on_output=progress,
                    new_process_id=lambda: next(self._process_ids),
                )
                try:
                    return await handler(call, arguments)
                except ValueError as exc:
                    return TextOutcome(f"invalid arguments: {exc}", is_error=True)
                except BridgeError as exc:
                    if spec.keep_connection and not isinstance(exc, ExecServerError):
                        # The connection itself broke: the next call dials afresh.
                        self.kept.drop(environment_id)
                    raise
        except (ChannelError, KeptConnectionError) as exc:
            log.warning("%s call on executor %s refused: %s", spec.name, environment_id, exc)
            return TextOutcome(f"[environment {environment_id} unavailable: {exc}]", is_error=True)
        except BridgeError as exc:
            log.warning("%s call on executor %s failed: %s", spec.name, environment_id, exc)
            return TextOutcome(f"[executor {environment_id} unreachable: {exc}]", is_error=True)

    async def serve_stdio(self) -> None:
        """Serve MCP on stdin/stdout until stdin closes (then kept connections close)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.kept.run)
            try:
                async with stdio_server() as (read_stream, write_stream):
                    await self.server.run(
                        read_stream, write_stream, self.server.create_initialization_options()
                    )
            finally:
                await self.end_sessions()
            nursery.cancel_scope.cancel()

    async def end_sessions(self) -> None:
        """Kill the interactive sessions' processes while their kept connections are open."""
        # Imported at the first session call only; without one there is nothing to end.
        sessions = sys.modules.get("gateway.envmcp.tools.sessions")
        if sessions is not None:
            await sessions.TABLE.aclose(self.kept.use)


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


async def serve(settings: EnvMcpSettings | ChannelSettings) -> None:
    """Run the env-mcp server for ``settings`` until stdin closes."""
    server: ToolServer
    if isinstance(settings, ChannelSettings):
        log.info("env-mcp starting: the session's executors, over its channel")
        server = ToolServer(SessionChannel(settings.channel_path), time_limit=settings.time_limit)
    else:
        log.info(
            "env-mcp starting: exe_id=%s bridge_url=%s turn_id=%s",
            settings.exe_id,
            settings.bridge_url,
            settings.turn_id or "-",
        )
        server = ToolServer(
            FixedExecutor(settings), time_limit=settings.time_limit, exe_desc=settings.exe_desc
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_end_sessions_on_sigterm, server)
        await server.serve_stdio()
        nursery.cancel_scope.cancel()
    log.info("env-mcp clean exit (stdin closed)")


async def _end_sessions_on_sigterm(server: ToolServer) -> None:
    """SIGTERM still ends env-mcp at once, but only after its interactive sessions are ended.

    Dying on the signal straight away would drop the kept connections without a close, and
    exec-server 0.169.0 keeps the processes of such a connection for about 80 s (for a resume)
    before it kills them. (A graceful stop is not possible: the stdio transport reads stdin in
    a thread that cancellation cannot interrupt.)
    """
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("env-mcp stopping (SIGTERM): ending its sessions first")
            await server.end_sessions()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
