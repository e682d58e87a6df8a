"""The hostile user of one workspace, with a valid token and the real codex 0.169.0 behind it.

Every route the protocol policy closes is tried through the gateway; each must come back as a
JSON-RPC error for that request naming the rule, leave no effect behind, and leave the session
(same child) and another workspace's client working. Counts are recorded for docs/security.md.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway_tests.harness import LaunchGateway, Rpc, RunningGateway, connect
from gateway_tests.reliability.support import CountsRecorder

WORKSPACE, OTHER = "ws_hostile", "ws_victim"


@pytest.fixture
async def gateway(launch_real_gateway: LaunchGateway) -> RunningGateway:
    """The real codex as the child, default policy (nothing beyond it), an unreachable model."""
    return await launch_real_gateway(CXG_POLICY_EXTRA_METHODS="")


def session_dir(gateway: RunningGateway, workspace: str) -> Path:
    return Path(gateway.config.tmp_root) / workspace


async def refused(rpc: Rpc, method: str, params: dict[str, Any], rule: str) -> dict[str, Any]:
    response = await rpc.call(method, params)
    assert "error" in response, response
    error: dict[str, Any] = response["error"]
    assert error["data"]["rule"] == rule, error
    assert error["message"].startswith("refused by the gateway's policy"), error
    return error


async def test_every_route_out_of_the_home_is_refused_and_the_session_goes_on(
    gateway: RunningGateway, tmp_path: Path, counts: CountsRecorder
) -> None:
    async with connect(gateway, OTHER) as victim:
        await victim.result("thread/start", {})
        async with connect(gateway, WORKSPACE) as rpc:
            pid_before = (await gateway.session(WORKSPACE) or {})["pid"]
            home = session_dir(gateway, WORKSPACE) / "home"
            codex_home = session_dir(gateway, WORKSPACE) / "codex-home"
            thread = (await rpc.result("thread/start", {}))["thread"]["id"]
            marker = tmp_path / "spawned-marker"
            outside = tmp_path / "outside.txt"
            config_before = (codex_home / "config.toml").read_text()
            routes: list[tuple[str, dict[str, Any], str]] = [
                ("fs/readFile", {"path": f"/proc/{os.getpid()}/environ"}, "path_outside_home"),
                (
                    "fs/readFile",
                    {"path": str(session_dir(gateway, OTHER) / "codex-home" / "config.toml")},
                    "path_outside_home",
                ),
                (
                    "fs/readDirectory",
                    {"path": str(session_dir(gateway, OTHER))},
                    "path_outside_home",
                ),
                (
                    "fs/readFile",
                    {"path": f"{home}/../../{OTHER}/codex-home/config.toml"},
                    "path_outside_home",
                ),
                (
                    "fs/writeFile",
                    {"path": str(outside), "dataBase64": base64.b64encode(b"x").decode()},
                    "path_outside_home",
                ),
                (
                    "fs/writeFile",
                    {
                        "path": str(codex_home / "config.toml"),
                        "dataBase64": base64.b64encode(b"").decode(),
                    },
                    "path_outside_home",
                ),
                # Invalid base64 as well: even a broken policy could not make codex write /etc.
                (
                    "fs/writeFile",
                    {"path": "/etc/codex/requirements.toml", "dataBase64": "!!"},
                    "path_outside_home",
                ),
                (
                    "thread/start",
                    {
                        "config": {
                            "mcp_servers": {"evil": {"command": "touch", "args": [str(marker)]}}
                        }
                    },
                    "config_key_not_allowed",
                ),
                (
                    "thread/start",
                    {"config": {"mcp_servers.evil.command": "touch"}},
                    "config_key_not_allowed",
                ),
                ("thread/start", {"sandbox": "danger-full-access"}, "sandbox_beyond_max"),
                ("thread/start", {"cwd": "/"}, "path_outside_home"),
                (
                    "thread/settings/update",
                    {
                        "threadId": thread,
                        "permissions": ":danger-full-access",
                        "approvalPolicy": "never",
                    },
                    "sandbox_beyond_max",
                ),
                (
                    "turn/start",
                    {
                        "threadId": thread,
                        "input": [{"type": "text", "text": "hi"}],
                        "sandboxPolicy": {"type": "dangerFullAccess"},
                    },
                    "sandbox_beyond_max",
                ),
                (
                    "turn/start",
                    {
                        "threadId": thread,
                        "input": [{"type": "text", "text": "hi"}],
                        "sandboxPolicy": {"type": "workspaceWrite", "writableRoots": ["/"]},
                    },
                    "path_outside_home",
                ),
                (
                    "command/exec",
                    {
                        "command": ["touch", str(marker)],
                        "sandboxPolicy": {"type": "dangerFullAccess"},
                    },
                    "sandbox_beyond_max",
                ),
                (
                    "command/exec",
                    {
                        "command": ["touch", str(marker)],
                        "sandboxPolicy": {"type": "externalSandbox"},
                    },
                    "sandbox_beyond_max",
                ),
                (
                    "config/batchWrite",
                    {
                        "edits": [
                            {
                                "keyPath": "model_providers.modelserver.auth.command",
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
                        "keyPath": "mcp_servers.evil",
                        "value": {"command": "touch", "args": [str(marker)]},
                        "mergeStrategy": "upsert",
                    },
                    "config_key_not_allowed",
                ),
                (
                    "plugin/install",
                    {"marketplacePath": "/tmp/x", "pluginName": "x"},
                    "method_not_allowed",
                ),
                (
                    "process/spawn",
                    {"command": ["touch", str(marker)], "cwd": str(home), "processHandle": "p"},
                    "method_not_allowed",
                ),
            ]
            for method, params, rule in routes:
                await refused(rpc, method, params, rule)
                counts.add(f"refused_{rule}")
            counts.add("routes_tried", len(routes))

            # What codex would silently drop gets a clear error too.
            await rpc.ws.send_message("{not json")
            parse_error = json.loads(await rpc.ws.get_message())
            assert parse_error["error"]["code"] == -32700 and parse_error["id"] is None
            # A binary frame is not parsed by the gateway, and codex 0.169.0 ignores it: the
            # write below never happens (the next text request is answered after it).
            binary = {
                "id": 999,
                "method": "fs/writeFile",
                "params": {"path": str(outside), "dataBase64": "eA=="},
            }
            await rpc.ws.send_message(json.dumps(binary).encode())
            assert "result" in await rpc.call("thread/list", {})

            assert not marker.exists() and not outside.exists()
            assert (codex_home / "config.toml").read_text() == config_before
            # The same child still serves this client, and allowed fs/* inside the home work.
            assert (await gateway.session(WORKSPACE) or {})["pid"] == pid_before
            data = base64.b64encode(b"mine").decode()
            await rpc.result("fs/writeFile", {"path": str(home / "note.txt"), "dataBase64": data})
            read = await rpc.result("fs/readFile", {"path": str(home / "note.txt")})
            assert base64.b64decode(read["dataBase64"]) == b"mine"
            counts.add("allowed_fs_inside_home", 2)
        # The other workspace's client never saw any of it.
        assert "result" in await victim.call("thread/list", {})
        assert not [n for n in victim.notifications if "error" in n]
