"""Moving a Go deployment over: what the start-up log tells the operator."""

from __future__ import annotations

from pathlib import Path

import trio
from structlog.testing import capture_logs

from gateway_tests.harness import connect, gateway_env, start_gateway
from gateway_tests.test_config import EXEC_GATEWAY


async def test_no_exec_gateway_is_said_once_at_start(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    with capture_logs() as logs:
        running = await start_gateway(nursery, gateway_env(tmp_path, fake_codex_bin))
        async with connect(running, "ws_a"), connect(running, "ws_b"):
            pass
        await running.shutdown()
    warnings = [entry for entry in logs if entry["event"] == "config.no_executors"]
    assert len(warnings) == 1
    assert "without executors" in warnings[0]["hint"]


async def test_a_configured_exec_gateway_is_not_reported_missing(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    with capture_logs() as logs:
        running = await start_gateway(
            nursery, gateway_env(tmp_path, fake_codex_bin, **EXEC_GATEWAY)
        )
        await running.shutdown()
    assert not [entry for entry in logs if entry["event"] == "config.no_executors"]
    assert [entry for entry in logs if entry["event"] == "daemon.serving"]
