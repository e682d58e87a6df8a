"""``env-mcp``: the MCP stdio server codex spawns per executor (``reference/upstream-spec.md`` §9).

codex starts ``codex-app-gateway env-mcp --exe-id … --bridge-url … --token-env …`` from the
``[mcp_servers.<exe>]`` entries the gateway renders; the ``shell`` tool it offers runs commands
on the user's executor through the exec gateway's ``/bridge/<exe_id>`` WebSocket, speaking the
pinned ``codex exec-server`` protocol.
"""

from gateway.envmcp.cli import add_arguments, main, register, run

__all__ = ["add_arguments", "main", "register", "run"]
