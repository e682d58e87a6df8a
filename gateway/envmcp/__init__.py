"""``env-mcp``: the MCP stdio server codex spawns for a session's executors.

Multiplexed (the default): codex starts ``codex-app-gateway env-mcp --channel-env
CXG_ENVMCP_CHANNEL`` from the one ``[mcp_servers.executors]`` entry; its ``list_environments``
tool and its executor tools (each with an ``environment_id``) ask the session, over the channel
named by that variable, for the live executor list and a token per bridge connection.
Per-executor (``reference/upstream-spec.md`` §9): ``env-mcp --exe-id … --bridge-url …
--token-env …`` from one ``[mcp_servers.<exe>]`` entry per executor. Either way commands run on
the user's executor through the exec gateway's ``/bridge/<exe_id>`` WebSocket, speaking the
pinned ``codex exec-server`` protocol.
"""

from gateway.envmcp.cli import add_arguments, main, register, run

__all__ = ["add_arguments", "main", "register", "run"]
