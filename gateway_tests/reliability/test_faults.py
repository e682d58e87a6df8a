"""Faults (SPEC §8), each ending with what survived, asserted and reported as counts.

* the child SIGKILLed mid-turn: clients get 1011 within a second; the thread and the user's
  message survive into the next session;
* agentserver down: connects get 503 (never 401) while attached sessions keep serving and keep
  their model token; after it returns, connects work and the token is refreshed again;
* S3 down during checkpoints: saves fail and are reported, the session keeps serving, and the
  first checkpoint after recovery uploads it all; a checkpoint whose answer was lost in transit
  is recognised as the session's own (S3 down at a final save, and daemon SIGKILL then restart,
  are covered by ``gateway_tests/test_persistence_gateway.py``);
* SIGTERM to the daemon process while a checkpoint of a large home (20 MB short, 50 MB
  soak) is uploading: exit 0 and a
  complete, restorable archive.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY
from trio_websocket import ConnectionRejected

from gateway.codex_home.persistence import Persistence
from gateway.config import RestoreLimits
from gateway.credentials import SessionModelCredentials
from gateway.store.s3 import S3ObjectStore
from gateway_tests.daemon_credentials import install_credentials
from gateway_tests.daemon_process import client, daemon_env, serve_process
from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.harness import (
    LaunchGateway,
    Rpc,
    RunningGateway,
    connect,
    connect_url,
    eventually,
    process_environ,
    token_for,
)
from gateway_tests.reliability.support import (
    CountsRecorder,
    CuttableProxy,
    Scale,
    close_code,
    until,
)
from gateway_tests.s3_server import BUCKET, MotoServer, running_moto, settings_for

TURN_TIMEOUT = 15.0


def saves(kind: str, result: str) -> float:
    """The daemon's ``cxg_saves_total`` counter (in-process daemons share the registry)."""
    value = REGISTRY.get_sample_value("cxg_saves_total", {"kind": kind, "result": result})
    return value or 0.0


async def run_turn(rpc: Rpc, thread_id: str, text: str) -> dict[str, Any]:
    """Start a turn with ``text`` and wait for its ``turn/completed``."""
    turn = await rpc.result(
        "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
    )
    turn_id = turn["turn"]["id"]
    with trio.fail_after(TURN_TIMEOUT):
        return await rpc.wait_for("turn/completed", lambda m: m["params"]["turn"]["id"] == turn_id)


async def user_messages(rpc: Rpc, thread_id: str) -> list[str]:
    """The user messages of a thread, as the child reads them back from its rollout."""
    read = await rpc.result("thread/read", {"threadId": thread_id, "includeTurns": True})
    return [
        part["text"]
        for turn in read["thread"]["turns"]
        for item in turn["items"]
        if item["type"] == "userMessage"
        for part in item["content"]
    ]


# -- child SIGKILL mid-turn ---------------------------------------------------------------------


def _archive_exists(gateway: RunningGateway, workspace: str) -> bool:
    return gateway.archive_path(workspace).exists()


def _stored_has(moto: Any, workspace: str, texts: tuple[str, ...]) -> bool:
    stored = stored_bytes(moto, workspace)
    return all(text.encode() in stored for text in texts)


def _etag_changed(moto: Any, workspace: str, before: Any) -> bool:
    return bool(stored_etag(moto, workspace) != before)


async def test_child_killed_mid_turn_closes_clients_with_1011_within_a_second_and_keeps_the_thread(
    launch_gateway: LaunchGateway, counts: CountsRecorder, scale: Scale
) -> None:
    runs = scale.pick(3, 20)
    gateway = await launch_gateway()
    for run in range(runs):
        workspace = f"ws_kill_{run}"
        message = f"__slow__ message {run} that must survive the crash"
        async with connect(gateway, workspace) as one, connect(gateway, workspace) as two:
            pid = int((await one.result("fake/pid"))["pid"])
            thread_id = (await one.result("thread/start", {}))["thread"]["id"]
            await one.result(
                "turn/start",
                {"threadId": thread_id, "input": [{"type": "text", "text": message}]},
            )
            with trio.fail_after(TURN_TIMEOUT):
                await one.wait_for("item/agentMessage/delta")
            counts.add("turns_killed")
            os.kill(pid, signal.SIGKILL)
            killed = trio.current_time()
            with trio.fail_after(1):
                codes = [await close_code(one.ws), await close_code(two.ws)]
            counts["slowest_close_seconds"] = max(
                counts.values.get("slowest_close_seconds", 0.0),
                round(trio.current_time() - killed, 3),
            )
        counts.add("clients_closed_1011", codes.count(1011))
        assert codes == [1011, 1011]
        await eventually(partial(_archive_exists, gateway, workspace))
        async with connect(gateway, workspace) as rpc:
            assert int((await rpc.result("fake/pid"))["pid"]) != pid
            listed = await rpc.result("thread/list", {})
            assert thread_id in {t["id"] for t in listed["data"]}
            counts.add("threads_survived")
            assert message in await user_messages(rpc, thread_id)
            counts.add("user_messages_survived")
    assert counts.values["threads_survived"] == counts.values["user_messages_survived"] == runs


# -- agentserver outage: verifier and model-token refresh ---------------------------------------


async def connect_status(gateway: RunningGateway, token: str) -> int:
    """The HTTP status a connect with ``token`` gets (101 when it is accepted)."""
    try:
        async with connect_url(gateway.ws_url, token):
            return 101
    except ConnectionRejected as rejected:
        return int(rejected.status_code)


async def test_agentserver_outage_gives_503_never_401_and_attached_sessions_keep_their_token(
    launch_gateway: LaunchGateway,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    counts: CountsRecorder,
    scale: Scale,
) -> None:
    attempts = scale.pick(20, 300)
    workspace, token = "ws_outage", "ast_reliab01_outagetoken"
    made: list[SessionModelCredentials] = []
    install_credentials(monkeypatch, made)
    agentserver = FakeAgentserver(internal_secret="internal")
    agentserver.add_verify_token(token, user_id="u1", workspace_id=workspace)
    agentserver.connect_modelserver(workspace, rotate_every=0.5)
    url: str = await nursery.start(agentserver.serve)
    gateway = await launch_gateway(
        CXG_AGENTSERVER_INTERNAL_URL=url,
        CXG_AGENTSERVER_INTERNAL_SECRET="internal",
        CXG_MODEL_TOKEN_REFRESH_INTERVAL="1s",
    )
    async with connect_url(gateway.ws_url, token) as attached:
        (creds,) = made
        pid = (await attached.result("fake/pid"))["pid"]
        with trio.fail_after(10):
            await creds.wait_for_version(2)  # refreshes work before the outage

        agentserver.outage = True
        version = creds.version
        failed_before = len([r for r in agentserver.token_requests(workspace) if r.status == 503])
        statuses = [await connect_status(gateway, token) for _ in range(attempts)]
        statuses += [await connect_status(gateway, "ast_unknown_token") for _ in range(5)]
        counts["connects_during_outage"] = len(statuses)
        counts["answered_503"] = statuses.count(503)
        counts["answered_401"] = statuses.count(401)
        assert statuses == [503] * len(statuses)

        # The refresh task hits the outage too; the session keeps its current token.
        with trio.fail_after(15):
            await agentserver.wait_until(
                lambda: (
                    len([r for r in agentserver.token_requests(workspace) if r.status == 503])
                    >= failed_before + 2
                )
            )
        failed = [r for r in agentserver.token_requests(workspace) if r.status == 503]
        counts["token_refreshes_failed"] = len(failed) - failed_before
        assert creds.version == version
        reply = await attached.result("fake/echo", {"payload": "still here"})
        assert reply["payload"] == "still here"
        kept = (await attached.result("fake/pid"))["pid"] == pid
        counts["attached_client_kept"] = int(kept)
        assert kept

        agentserver.outage = False
        after = [await connect_status(gateway, token) for _ in range(5)]
        counts["connects_after_outage_ok"] = after.count(101)
        assert after == [101] * 5
        with trio.fail_after(15):
            await creds.wait_for_version(version + 1)
        counts["token_refreshed_after_outage"] = creds.version - version
        assert (await attached.result("fake/pid"))["pid"] == pid


# -- S3 outage during checkpoints and during a final save ---------------------------------------


@pytest.fixture(scope="module")
def private_moto() -> Iterator[MotoServer]:
    """A moto server only this module uses (the proxy in front of it cuts it off)."""
    with running_moto() as server:
        yield server


@pytest.fixture
async def s3_proxy(nursery: trio.Nursery, private_moto: MotoServer) -> CuttableProxy:
    """A fresh bucket behind a proxy the test can cut."""
    private_moto.reset()
    private_moto.boto_client().create_bucket(Bucket=BUCKET)
    host, port = private_moto.endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    await nursery.start(proxy.serve)
    return proxy


def s3_env(proxy: CuttableProxy) -> dict[str, str]:
    """The daemon's S3 settings, pointed at the proxy."""
    return {
        "CXG_S3_BUCKET": BUCKET,
        "CXG_S3_ENDPOINT": proxy.url,
        "CXG_S3_ACCESS_KEY_ID": "test",
        "CXG_S3_SECRET_ACCESS_KEY": "test",
        "CXG_S3_PATH_STYLE": "true",
    }


def stored_etag(moto: MotoServer, workspace: str) -> str | None:
    """The stored archive's ETag (None when there is no object)."""
    client = moto.boto_client()
    try:
        head = client.head_object(Bucket=BUCKET, Key=f"codex-app-gateway/{workspace}.tar.gz")
    except client.exceptions.ClientError:
        return None
    return str(head["ETag"])


def stored_bytes(moto: MotoServer, workspace: str) -> bytes:
    """Every file of the stored archive, concatenated (b"" when there is no object)."""
    client = moto.boto_client()
    try:
        body = client.get_object(Bucket=BUCKET, Key=f"codex-app-gateway/{workspace}.tar.gz")
    except client.exceptions.NoSuchKey:
        return b""
    data = body["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return b"".join(
            archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile()
        )


async def test_s3_outage_fails_checkpoints_keeps_serving_and_the_next_checkpoint_uploads(
    launch_gateway: LaunchGateway,
    private_moto: MotoServer,
    s3_proxy: CuttableProxy,
    counts: CountsRecorder,
    scale: Scale,
) -> None:
    workspace = "ws_s3_checkpoint"
    outages = scale.pick(1, 10)
    expected = ["said before the outage"]
    gateway = await launch_gateway(CXG_CHECKPOINT_INTERVAL="1s", **s3_env(s3_proxy))
    failed_before, ok_before = saves("checkpoint", "failed"), saves("checkpoint", "ok")

    async def listing() -> dict[str, Any]:
        entry = await gateway.session(workspace)
        assert entry is not None
        return entry

    try:
        async with connect(gateway, workspace) as rpc:
            pid = (await rpc.result("fake/pid"))["pid"]
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            await run_turn(rpc, thread_id, "said before the outage")
            await eventually(
                lambda: b"said before the outage" in stored_bytes(private_moto, workspace),
                within=15,
            )

            for cycle in range(outages):
                said = [f"said during outage {cycle}", f"and more during outage {cycle}"]
                refused = s3_proxy.refused
                s3_proxy.cut()
                await run_turn(rpc, thread_id, said[0])
                await until(lambda: _has_save_error(listing), within=30)
                counts.add("connections_refused_during_outages", s3_proxy.refused - refused)
                assert s3_proxy.refused > refused
                # The session goes on serving; the store still has the snapshot from before.
                for n in range(10):
                    reply = await rpc.result("fake/echo", {"payload": n})
                    assert reply["payload"] == n
                await run_turn(rpc, thread_id, said[1])
                assert (await rpc.result("fake/pid"))["pid"] == pid
                assert said[0].encode() not in stored_bytes(private_moto, workspace)
                assert (await listing())["state"] == "running"

                s3_proxy.restore()
                await eventually(
                    partial(_stored_has, private_moto, workspace, (said[1],)),
                    within=30,
                )
                await until(lambda: _save_error_cleared(listing), within=10)
                expected += said

            stored = stored_bytes(private_moto, workspace)
            survived = [text for text in expected if text.encode() in stored]
            counts["outages"] = outages
            counts["checkpoints_failed"] = int(saves("checkpoint", "failed") - failed_before)
            counts["checkpoints_ok"] = int(saves("checkpoint", "ok") - ok_before)
            counts["user_messages_stored_after_recovery"] = f"{len(survived)}/{len(expected)}"
            assert survived == expected
            assert counts.values["checkpoints_failed"] >= outages
    finally:
        await gateway.shutdown()


async def test_a_checkpoint_whose_answer_was_lost_is_known_as_its_own_and_the_session_goes_on(
    launch_gateway: LaunchGateway,
    tmp_path: Path,
    private_moto: MotoServer,
    s3_proxy: CuttableProxy,
    counts: CountsRecorder,
    scale: Scale,
) -> None:
    # The store took the write but the answer never came back: the next save must recognise
    # the stored object as its own, not as a newer snapshot from elsewhere (which would stop
    # the session and set its home aside).
    workspace = "ws_s3_lost_answer"
    gateway = await launch_gateway(CXG_CHECKPOINT_INTERVAL="1s", **s3_env(s3_proxy))

    async def listing() -> dict[str, Any]:
        entry = await gateway.session(workspace)
        assert entry is not None
        return entry

    try:
        async with connect(gateway, workspace) as rpc:
            pid = (await rpc.result("fake/pid"))["pid"]
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            for round_ in range(scale.pick(2, 10)):
                before = stored_etag(private_moto, workspace)
                lost = f"said while answers are lost {round_}"
                s3_proxy.lose_answers = True
                await run_turn(rpc, thread_id, lost)
                # A write lands (the store changed) but the session never hears back.
                await eventually(
                    partial(_etag_changed, private_moto, workspace, before),
                    within=15,
                )
                await until(lambda: _has_save_error(listing), within=30)
                s3_proxy.lose_answers = False
                after = f"said after answers came back {round_}"
                await run_turn(rpc, thread_id, after)
                await eventually(
                    partial(_stored_has, private_moto, workspace, (lost, after)), within=30
                )
                await until(lambda: _save_error_cleared(listing), within=10)
                entry = await listing()
                assert (entry["state"], entry["pid"]) == ("running", pid)
                counts.add("rounds_with_lost_answers")
            counts["answers_lost"] = s3_proxy.answers_lost
            orphaned = tmp_path / "sessions" / ".orphaned"
            set_aside = list(orphaned.iterdir()) if orphaned.exists() else []
            counts["sessions_set_aside"] = len(set_aside)
            assert not orphaned.exists(), set_aside
    finally:
        await gateway.shutdown()


async def _has_save_error(listing: Any) -> bool:
    return bool((await listing())["lastSaveError"])


async def _save_error_cleared(listing: Any) -> bool:
    return (await listing())["lastSaveError"] is None


# -- SIGTERM while a save of a large home is running (the daemon as a process) ------------------


async def test_sigterm_during_a_large_checkpoint_exits_0_with_a_complete_restorable_archive(
    tmp_path: Path,
    fake_codex_bin: Path,
    private_moto: MotoServer,
    s3_proxy: CuttableProxy,
    counts: CountsRecorder,
    scale: Scale,
) -> None:
    # The S3 save path runs at a few MB/s against moto, so even the short run's home keeps a
    # save going for several seconds.
    size = scale.pick(20, 50) << 20
    workspace = "ws_sigterm_save"
    env = daemon_env(
        tmp_path,
        fake_codex_bin,
        CXG_CHECKPOINT_INTERVAL="1s",
        CXG_DRAIN_BUDGET="120s",
        **s3_env(s3_proxy),
    )
    async with serve_process(env) as (daemon, url):
        async with client(url, token_for(workspace)) as rpc:
            pid = int((await rpc.result("fake/pid"))["pid"])
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            codex_home = Path(process_environ(pid)["CODEX_HOME"])
            blob = os.urandom(size)
            digest = hashlib.sha256(blob).hexdigest()
            await trio.to_thread.run_sync((codex_home / "big.bin").write_bytes, blob)
            del blob
            uploaded = s3_proxy.bytes_up
            # A checkpoint is uploading the big home: SIGTERM now.
            with trio.fail_after(60):
                await s3_proxy.wait_until(lambda: s3_proxy.bytes_up > uploaded + (4 << 20))
            counts["bytes_uploaded_before_sigterm"] = s3_proxy.bytes_up - uploaded
            daemon.process.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            with trio.fail_after(10):
                assert await close_code(rpc.ws) == 1001
        with trio.fail_after(120):
            status = await daemon.wait_exit()
        counts["seconds_from_sigterm_to_exit"] = round(trio.current_time() - signalled, 1)
        assert status == 0, daemon.output
        finished = await daemon.wait_for_log("drain.finished")
        counts["sessions_saved"] = f"{finished['saved']}/{finished['total']}"
        assert (finished["saved"], finished["total"]) == (1, 1)

    # The stored object is complete: restore it the way a new session would and compare.
    store = S3ObjectStore(settings_for(private_moto.endpoint))
    target = tmp_path / "restored" / "codex-home"
    try:
        persistence = Persistence(store, RestoreLimits(max_total_bytes=1 << 30, max_entries=10000))
        generation = await persistence.restore(workspace, target)
    finally:
        await store.aclose()
    counts["archive_bytes"] = generation.size
    restored = await trio.to_thread.run_sync((target / "big.bin").read_bytes)
    matches = hashlib.sha256(restored).hexdigest() == digest
    counts["restored_sha256_matches"] = int(matches)
    assert matches
    assert any(thread_id in p.name for p in (target / "sessions").rglob("*.jsonl"))
