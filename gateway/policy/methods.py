"""The client methods of codex app-server 0.169.0, sorted by what the policy does with them.

Derived from ``codex app-server generate-json-schema --experimental`` of the pinned binary and
from what the real TUI sends (reference/codex-protocol.md §12). A method in neither table is
refused: a newer codex may add methods that act on the host, and an allow-list fails closed.
"""

from __future__ import annotations

# Forwarded as they are: reads of the session's own threads, models and settings, and changes
# to its own thread store. None of them names a host path, runs a process or changes config.
PLAIN: frozenset[str] = frozenset(
    {
        "initialize",
        "thread/archive",
        "thread/unarchive",
        "thread/delete",
        "thread/unsubscribe",
        "thread/name/set",
        "thread/goal/set",
        "thread/goal/get",
        "thread/goal/clear",
        "thread/metadata/update",
        "thread/compact/start",
        "thread/revert",
        "thread/list",
        "thread/loaded/list",
        "thread/read",
        "thread/readState/update",
        "thread/turns/list",
        "thread/items/list",
        "thread/items/read",
        "thread/search",
        "thread/searchOccurrences",
        "thread/backgroundTerminals/list",
        "thread/backgroundTerminals/terminate",
        "thread/backgroundTerminals/clean",
        "threadSection/list",
        "turn/interrupt",
        "turn/settings/update",
        "review/start",
        "model/list",
        "modelProvider/list",
        "modelProvider/capabilities/read",
        "experimentalFeature/list",
        "collaborationMode/list",
        "configRequirements/read",
        "account/read",
        "account/rateLimits/read",
        "account/usage/read",
        "account/bedrock/checkGovCloudRequirements",
        "mcpServerStatus/list",
        "memory/status",
        "thread/memory/read",
        "command/exec/write",
        "command/exec/terminate",
        "command/exec/resize",
        "fs/unwatch",
        # The TUI sends its own (client-side) working directory in these; codex reads project
        # config layers, hooks, skills and plugin manifests there. Read-only discovery of files
        # the child's uid can read, bounded by the operating system (docs/security.md).
        "config/read",
        "permissionProfile/list",
        "skills/list",
        "hooks/list",
        "plugin/installed",
        "plugin/list",
    }
)

# Forwarded only after their parameters pass a check (gateway/policy/checks.py).
CHECKED: frozenset[str] = frozenset(
    {
        "thread/start",
        "thread/resume",
        "thread/fork",
        "thread/settings/update",
        "turn/start",
        "turn/steer",
        "command/exec",
        "thread/shellCommand",
        "config/value/write",
        "config/batchWrite",
        "fuzzyFileSearch",
        "fuzzyFileSearch/sessionStart",
        "fuzzyFileSearch/sessionUpdate",
        "fuzzyFileSearch/sessionStop",
        "fs/readFile",
        "fs/getMetadata",
        "fs/readDirectory",
        "fs/watch",
        "fs/writeFile",
        "fs/createDirectory",
        "fs/remove",
        "fs/copy",
    }
)

NOTIFICATIONS: frozenset[str] = frozenset({"initialized"})
