"""The tools env-mcp offers: a list of specs, each a name, a schema and a handler.

A handler runs one tool call on one executor::

    async def handle(call: ToolCall, arguments: Mapping[str, Any]) -> ToolOutcome

``call.client`` is an exec-server connection already open and initialised for the executor the
model chose (``environment_id``, which the server takes out of ``arguments`` before the handler
sees them). By default it lives for this one call. exec-server 0.169.0 forgets a connection's
processes when it closes, so a tool whose state outlives a call (an interactive process started
by one call and written to by the next) sets ``keep_connection``: it then gets the executor's
kept connection, dialled at its first use with a freshly granted token, shared by every such
tool one call at a time, and redialled after it broke.

The server does everything around a handler: listing the tool (with an ``environment_id``
property added in the multiplexed layout), checking the arguments
with ``validate`` before any bridge is dialled, obtaining the connection (and its one-executor
token), shielding the call so a cancelled one can still clean up (``call.stop`` is set instead),
turning a broken bridge into a clear tool error. A handler's ``ValueError`` becomes ``invalid
arguments: …``; a ``BridgeError`` becomes ``[executor … unreachable: …]``.

``handler`` is named as ``"module:function"`` and imported at the first call, so ``tools/list``
is answered before any bridge or WebSocket code is loaded (codex leaves out of a thread's first
model request every server that has not listed its tools yet).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from gateway.envmcp.bridge import EnvironmentInfo, ExecServerClient

OnOutput = Callable[[str, int], Awaitable[None]]


class ToolOutcome(Protocol):
    """What a handler returns: the text the model reads, and whether the call failed."""

    @property
    def text(self) -> str: ...

    @property
    def is_error(self) -> bool: ...


@attrs.define
class ToolCall:
    """One call on one executor, as a handler sees it."""

    client: ExecServerClient
    info: EnvironmentInfo
    environment_id: str
    environment_description: str
    #: The time limit a command of this call may run (``--timeout``).
    time_limit: float
    #: Set when the call is cancelled (the handler runs shielded; it must stop and clean up).
    stop: trio.Event
    #: Progress reporting, when codex asked for it: ``await on_output(text, total_bytes)``.
    on_output: OnOutput | None
    #: A process id unique within this env-mcp (exec-server's ids are per connection).
    new_process_id: Callable[[], str]


Handler = Callable[[ToolCall, Mapping[str, Any]], Awaitable[ToolOutcome]]


@attrs.frozen
class ToolSpec:
    """One tool: ``description`` may say ``{environment}`` for the executor's description."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    handler: str
    #: Checks the arguments before any bridge is dialled; raises ``ValueError`` to refuse.
    validate: Callable[[Mapping[str, Any]], None] | None = None
    #: Run on the executor's kept connection instead of a connection of its own (see above).
    keep_connection: bool = False

    def load_handler(self) -> Handler:
        """Import the handler (at the first call, not at start)."""
        module_name, _, function = self.handler.partition(":")
        handler: Handler = getattr(importlib.import_module(module_name), function)
        return handler


class ToolRegistry:
    """The tools by name, in the order they are listed."""

    def __init__(self, specs: tuple[ToolSpec, ...] | list[ToolSpec]) -> None:
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"tool {spec.name!r} registered twice")
            self._specs[spec.name] = spec

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(self._specs.values())

    def get(self, name: str) -> ToolSpec | None:
        """The tool called ``name``, if there is one."""
        return self._specs.get(name)


@attrs.frozen
class TextOutcome:
    """A plain :class:`ToolOutcome`."""

    text: str
    is_error: bool
