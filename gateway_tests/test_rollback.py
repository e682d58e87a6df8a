"""Rollback to the Go service: a home saved here restores the Go way and its threads resume.

The Go gateway restored ``codex-app-gateway/<ws>.tar.gz`` into ``<CXG_TMP_ROOT>/<ws>`` and ran
codex with exactly that directory as CODEX_HOME (``reference/upstream-spec.md`` §4.2, §5.1, §6):
entries with ``..`` refused, directories 0700, regular files 0600, links and devices skipped,
then its own config.toml written over the archived one. This test saves a real codex home
through the gateway, lays it out that way under the same root, runs the REAL app-server on it
directly and resumes the thread.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import trio

from gateway_tests.harness import LaunchGateway, connect, connect_url
from gateway_tests.real_app_server import run_app_server
from gateway_tests.real_codex_turns import STEP_TIMEOUT, record_user_message

WORKSPACE = "ws_rollback"


def restore_the_go_way(archive: bytes, codex_home: Path) -> None:
    """Extract ``archive`` as the Go service's restore did (see the module docstring)."""
    codex_home.mkdir(mode=0o700, parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            assert ".." not in member.name, member.name
            target = codex_home / member.name
            if member.isdir():
                target.mkdir(mode=(member.mode & 0o700) or 0o700, parents=True, exist_ok=True)
            elif member.isreg():
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
                target.chmod((member.mode & 0o600) or 0o600)


def go_config_toml(model_url: str) -> str:
    """The Go service's seed-era config.toml (upstream-spec §5.3), no executors."""
    return (
        'model_provider = "modelserver"\nmodel = "gpt-5.5"\n\n'
        "[model_providers.modelserver]\n"
        f'name = "modelserver"\nbase_url = "{model_url}"\n'
        'env_key = "CODEX_API_KEY"\nwire_api = "responses"\n\n'
        '[projects."/tmp"]\ntrust_level = "trusted"\n\n'
        "[features]\nshell_tool = false\nunified_exec = false\napply_patch_freeform = false\n"
    )


def turn_texts(thread: dict[str, Any]) -> list[str]:
    """Every user-message text of a thread read with its turns."""
    texts = []
    for turn in thread.get("turns", []):
        for item in turn.get("items", []):
            if item.get("type") == "userMessage":
                texts += [part.get("text") for part in item.get("content", [])]
    return texts


async def test_a_home_saved_here_resumes_in_the_go_layout(
    nursery: trio.Nursery, real_codex_bin: Path, launch_real_gateway: LaunchGateway
) -> None:
    running = await launch_real_gateway()
    root = Path(running.config.tmp_root)
    model_url = running.config.model.base_url
    text = "remember this across the rollback"
    with trio.fail_after(STEP_TIMEOUT * 3):
        async with connect(running, WORKSPACE) as rpc:
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            await record_user_message(rpc, thread_id, text)
        assert (await running.restart(WORKSPACE)).status_code == 204
        await running.shutdown()
    archive = running.archive_path(WORKSPACE).read_bytes()

    # The Go service's layout under the same root: CODEX_HOME is <root>/<workspace>.
    go_home = root / WORKSPACE
    assert not go_home.exists()
    restore_the_go_way(archive, go_home)
    (go_home / "config.toml").write_text(go_config_toml(model_url))

    server = await nursery.start(run_app_server, real_codex_bin, go_home, {})
    try:
        with trio.fail_after(STEP_TIMEOUT * 2):
            async with connect_url(server.url) as rpc:
                listed = await rpc.result("thread/list", {})
                assert thread_id in {t["id"] for t in listed["data"]}
                resumed = await rpc.call("thread/resume", {"threadId": thread_id})
                assert "result" in resumed, json.dumps(resumed)[:2000]
                assert resumed["result"]["thread"]["id"] == thread_id
                read = await rpc.result(
                    "thread/read", {"threadId": thread_id, "includeTurns": True}
                )
                assert text in turn_texts(read["thread"])
                path = Path(read["thread"]["path"])
                assert path.is_relative_to(go_home / "sessions"), path
    finally:
        server.process.terminate()
