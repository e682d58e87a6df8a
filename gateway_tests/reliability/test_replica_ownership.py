"""Replica mode's ownership with real gateway processes on one moto bucket.

Each scenario runs a ``gateway_tests.replicas.cluster`` of ``python -m gateway serve``
processes (own pod names, ports and session roots, ``CXG_OWNER_TAKEOVER_AFTER=5s``) and
asserts on ownership facts: which pod started a child for the workspace and when, what the
bucket's ownership record and archives hold. A pod that is not the owner answers the connect
with whatever the front door does with ``OwnedElsewhere`` (a 503 until connects are forwarded);
no assertion depends on that status.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed

from gateway.auth.tokens import mint_hmac_token
from gateway.config import S3Settings
from gateway.replicas.records import owner_key
from gateway.replicas.snapshots import MIRROR_TAG
from gateway.sessions.process_tree import read_stat
from gateway.store.base import archive_key
from gateway_tests.faultproxy import FaultProxy
from gateway_tests.harness import HMAC_SECRET, closed_port
from gateway_tests.real_codex_turns import is_user_message
from gateway_tests.reliability.support import CountsRecorder, Scale, close_code
from gateway_tests.replicas.cluster import (
    TAKEOVER_SECONDS,
    Cluster,
    Pod,
    client,
    running_cluster,
    try_connect,
    until_true,
)
from gateway_tests.s3_server import MotoServer

STEP = 60.0
# A heartbeat is written every takeover/5: the silent owner's last one may be that old.
HEARTBEAT_SECONDS = TAKEOVER_SECONDS / 5


class Bucket:
    """What the shared bucket holds, read behind the gateways' backs."""

    def __init__(self, moto: MotoServer, s3: S3Settings) -> None:
        self.client: Any = moto.boto_client()
        self.name = s3.bucket

    def record(self, workspace_id: str) -> dict[str, Any] | None:
        try:
            response = self.client.get_object(Bucket=self.name, Key=owner_key(workspace_id))
        except self.client.exceptions.NoSuchKey:
            return None
        loaded: dict[str, Any] = json.loads(response["Body"].read())
        return loaded

    def members(self, key: str) -> dict[str, bytes]:
        body = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            return {
                member.name: archive.extractfile(member).read()  # type: ignore[union-attr]
                for member in archive.getmembers()
                if member.isfile()
            }

    def legacy_tag(self, workspace_id: str) -> str | None:
        head = self.client.head_object(Bucket=self.name, Key=archive_key(workspace_id))
        tag: str | None = head.get("Metadata", {}).get(MIRROR_TAG)
        return tag

    def snapshots(self, workspace_id: str) -> list[str]:
        listed = self.client.list_objects_v2(
            Bucket=self.name, Prefix=f"codex-app-gateway/.snapshots/{workspace_id}/"
        )
        return [item["Key"] for item in listed.get("Contents", [])]


def child_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie its frozen parent cannot reap does not)."""
    stat = read_stat(pid)
    return stat is not None and stat.alive


def bucket_of(atomic_moto: MotoServer, atomic_s3_settings: S3Settings) -> Bucket:
    return Bucket(atomic_moto, atomic_s3_settings)


async def start_pods(cluster: Cluster, count: int) -> list[Pod]:
    pods: list[Pod] = []
    async with trio.open_nursery() as nursery:

        async def one(name: str) -> None:
            pods.append(await cluster.start(name))

        for n in range(count):
            nursery.start_soon(one, f"pod-{n}")
    return sorted(pods, key=lambda pod: pod.name)


# -- one child per workspace ----------------------------------------------------------------


async def test_concurrent_first_connects_on_every_pod_start_exactly_one_child(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    bucket = bucket_of(atomic_moto, atomic_s3_settings)
    workspaces = ["ws_rep_a", "ws_rep_b", "ws_rep_c"]
    async with running_cluster(tmp_path, fake_codex_bin, atomic_s3_settings) as cluster:
        pods = await start_pods(cluster, 3)
        statuses: list[int] = []
        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:

                async def connect(pod: Pod, workspace_id: str) -> None:
                    statuses.append(await try_connect(pod, workspace_id))

                for workspace_id in workspaces:
                    for pod in pods:
                        nursery.start_soon(connect, pod, workspace_id)
        for workspace_id in workspaces:
            started = cluster.children_started(workspace_id)
            assert len(started) == 1, (started, statuses)
            owner = started[0][1]
            record = bucket.record(workspace_id)
            assert record is not None and record["pod"] == owner and record["epoch"] == 1
            # Every pod's admin listing names the owner.
            for pod in pods:
                listing = await pod.admin_sessions()
                owners = {o["workspaceId"]: o["ownerPod"] for o in listing["replica"]["owners"]}
                assert owners[workspace_id] == owner
                mine = [s["workspaceId"] for s in listing["sessions"]]
                assert (workspace_id in mine) == (pod.name == owner)
        counts["pods"] = len(pods)
        counts["connects"] = len(statuses)
        counts["children"] = sum(len(cluster.children_started(ws)) for ws in workspaces)
        # Every connect was served: by the owner itself, or forwarded to it.
        assert statuses == [101] * len(statuses), statuses
        counts["served"] = statuses.count(101)
        counts["forwarded"] = int(
            sum(
                [
                    await pod.metric("cxg_forwarded_connections_total", result="relayed")
                    for pod in pods
                ]
            )
        )


async def test_every_pod_serves_a_workspace_through_its_one_owner(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    ws = "ws_rep_everywhere"
    async with running_cluster(tmp_path, fake_codex_bin, atomic_s3_settings) as cluster:
        pods = await start_pods(cluster, 3)
        # Many tokens of one workspace (one per client here), spread over the pods.
        tokens = [mint_hmac_token(HMAC_SECRET.encode(), ws, f"token{n}") for n in range(3)]
        assert len(set(tokens)) == 3
        with trio.fail_after(STEP):
            async with (
                client(pods[0], ws, token=tokens[0]) as first,
                client(pods[1], ws, token=tokens[1]) as second,
                client(pods[2], ws, token=tokens[2]) as third,
            ):
                rpcs = (first, second, third)
                pids = {int((await rpc.result("fake/pid"))["pid"]) for rpc in rpcs}
                thread = (await second.result("thread/start", {}))["thread"]["id"]
                listed = await third.result("thread/list", {})
                big = "x" * (1 << 20)
                echoed = await third.result("fake/echo", {"payload": big})
        [(_, owner, child)] = cluster.children_started(ws)
        # One child, on the owner; the clients of the other pods reached it through the hop.
        assert pids == {child}
        assert thread in {entry["id"] for entry in listed["data"]}
        assert echoed == {"payload": big}
        forwarded = [
            await pod.metric("cxg_forwarded_connections_total", result="relayed") for pod in pods
        ]
        assert sum(forwarded) == 2
        assert forwarded[[pod.name for pod in pods].index(owner)] == 0
        counts["clients"] = len(rpcs)
        counts["children"] = len(cluster.children_started(ws))
        counts["forwarded"] = int(sum(forwarded))


# -- a released workspace moves at once -----------------------------------------------------


async def test_a_released_workspace_is_taken_over_by_the_next_connect_at_once(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    bucket = bucket_of(atomic_moto, atomic_s3_settings)
    async with running_cluster(
        tmp_path, fake_codex_bin, atomic_s3_settings, CXG_IDLE_SHUTDOWN="1s", CXG_DRAIN_BUDGET="20s"
    ) as cluster:
        first, second = await start_pods(cluster, 2)
        with trio.fail_after(STEP):
            # Idle stop with a successful final save: released.
            async with client(first, "ws_rep_idle") as rpc:
                thread = (await rpc.result("thread/start", {}))["thread"]["id"]
            released_at, _ = await first.wait_for_log("owner.released", workspace_id="ws_rep_idle")
            assert bucket.record("ws_rep_idle")["state"] == "released"  # type: ignore[index]
            async with client(second, "ws_rep_idle") as rpc:
                listed = {t["id"] for t in (await rpc.result("thread/list", {}))["data"]}
            moved = cluster.children_started("ws_rep_idle")
            assert [pod for _, pod, _ in moved] == [first.name, second.name]
            assert moved[1][0] - released_at < TAKEOVER_SECONDS
            assert thread in listed

            # Drain (SIGTERM) with a successful final save: released too.
            async with client(second, "ws_rep_drain") as rpc:
                await rpc.result("thread/start", {})
                second.signal(signal.SIGTERM)
            assert await second.process.wait() == 0  # type: ignore[union-attr]
            drained_at, _ = await second.wait_for_log("owner.released", workspace_id="ws_rep_drain")
            async with client(first, "ws_rep_drain"):
                pass
            drained = cluster.children_started("ws_rep_drain")
            assert [pod for _, pod, _ in drained] == [second.name, first.name]
            assert drained[1][0] - drained_at < TAKEOVER_SECONDS
        counts["idle_handover_seconds"] = round(moved[1][0] - released_at, 2)
        counts["drain_handover_seconds"] = round(drained[1][0] - drained_at, 2)


async def test_a_rolling_restart_of_every_pod_loses_no_thread(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
    scale: Scale,
) -> None:
    ws = "ws_rep_rolling"
    made: list[str] = []
    rounds, per_turn = scale.pick(1, 4), scale.pick(3, 20)
    async with running_cluster(
        tmp_path, fake_codex_bin, atomic_s3_settings, CXG_DRAIN_BUDGET="20s"
    ) as cluster:
        pods = await start_pods(cluster, 3)
        with trio.fail_after(STEP * 4 * rounds):
            # Each pod in turn, as a rolling update does: its replacement comes up first
            # (maxSurge), then it drains (SIGTERM) while a client of the workspace keeps
            # writing through whichever pod it reached.
            for turn in range(rounds * len(pods)):
                live = [pod for pod in cluster.pods if pod.process.returncode is None]  # type: ignore[union-attr]
                leaving = live[0]
                await cluster.start(f"pod-next{turn}")
                staying = [pod for pod in live[1:]] + [cluster.pods[-1]]
                entry = staying[turn % len(staying)]
                async with client(entry, ws) as rpc:
                    for _ in range(per_turn):
                        made.append((await rpc.result("thread/start", {}))["thread"]["id"])
                leaving.signal(signal.SIGTERM)
                assert await leaving.process.wait() == 0  # type: ignore[union-attr]
            # Every thread made, whichever pod held the workspace then, is there now.
            survivor = next(pod for pod in cluster.pods if pod.process.returncode is None)  # type: ignore[union-attr]
            async with client(survivor, ws) as rpc:
                listed: set[str] = set()
                cursor = None
                while True:  # every page: the soak run makes more threads than one holds
                    page = await rpc.result("thread/list", {"limit": 100, "cursor": cursor})
                    listed.update(thread["id"] for thread in page["data"])
                    cursor = page["nextCursor"]
                    if cursor is None:
                        break
        assert set(made) <= listed, sorted(set(made) - listed)
        started = cluster.children_started(ws)
        # The workspace moved with the drains, one child per pod that held it.
        assert len({pod for _, pod, _ in started}) == len(started) >= 2
        counts["pods_restarted"] = rounds * len(pods)
        counts["threads_made"] = len(made)
        counts["threads_lost"] = len(set(made) - listed)
        counts["owners"] = len(started)


async def test_an_owner_cut_off_from_the_store_fences_itself_and_its_workspace_moves(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    ws = "ws_rep_cut"
    endpoint = urlsplit(atomic_moto.endpoint)
    assert endpoint.hostname is not None and endpoint.port is not None
    async with trio.open_nursery() as proxies:
        # Only this pod reaches the store through the proxy: the S3 cut is its alone.
        proxy: FaultProxy = await proxies.start(
            FaultProxy((endpoint.hostname, endpoint.port)).serve
        )
        async with running_cluster(tmp_path, fake_codex_bin, atomic_s3_settings) as cluster:
            cut_pod = await cluster.start("pod-cut", CXG_S3_ENDPOINT=proxy.url())
            other = await cluster.start("pod-other")
            with trio.fail_after(STEP * 2):
                async with client(cut_pod, ws) as rpc:
                    await rpc.result("thread/start", {})
                    [(_, old_child)] = cut_pod.children_started(ws)
                    proxy.cut()
                    cut_at = trio.current_time()
                    # It cannot renew its heartbeat: it fences itself, before any peer may
                    # take the workspace over. Its client is told at once.
                    assert await close_code(rpc.ws) == 1012
                fenced_after = trio.current_time() - cut_at
                assert fenced_after < TAKEOVER_SECONDS, fenced_after
                await until_true(lambda: not child_alive(old_child), within=STEP)
                assert not cluster.children_started(ws)[1:], "a second child started early"

                async def moved() -> bool:
                    await try_connect(other, ws)
                    return bool(cluster.children_started(ws)[1:])

                await until_true(moved, within=STEP, every=0.5)
                [_, (_, new_owner, new_child)] = cluster.children_started(ws)
                assert new_owner == other.name
                # The store comes back: the pod serves again, forwarding to the new owner.
                proxy.pass_through()
                await cut_pod.wait_for_log("fence.lifted")
                async with client(cut_pod, ws) as rpc:
                    assert int((await rpc.result("fake/pid"))["pid"]) == new_child
            counts["children"] = len(cluster.children_started(ws))
        proxies.cancel_scope.cancel()
    counts["fenced_after_seconds"] = round(fenced_after, 1)


# -- the duplicate pod name -----------------------------------------------------------------


async def test_two_processes_with_one_pod_name_never_serve_together(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    counts: CountsRecorder,
) -> None:
    async with running_cluster(tmp_path, fake_codex_bin, atomic_s3_settings) as cluster:
        original = await cluster.start("pod-same")
        with trio.fail_after(STEP):
            refused = await cluster.start("pod-same", wait=False)
            assert await refused.process.wait() == 1  # type: ignore[union-attr]
            await refused.exited.wait()
        assert "CXG_POD_NAME" in refused.output
        assert await try_connect(original, "ws_rep_dup") == 101

        # Frozen while a second process starts (so the name looks free), then woken up:
        # the first finds its heartbeat rewritten by another incarnation and stops serving.
        original.signal(signal.SIGSTOP)
        try:
            replacement = await cluster.start("pod-same")
        finally:
            original.signal(signal.SIGCONT)
        with trio.fail_after(STEP):
            status = await original.process.wait()  # type: ignore[union-attr]
            await original.exited.wait()
        assert status != 0
        assert "CXG_POD_NAME" in original.output
        assert replacement.process.returncode is None  # type: ignore[union-attr]
        assert await try_connect(replacement, "ws_rep_dup2") == 101
        counts["refused_at_start"] = 1
        counts["refused_while_serving"] = 1


# -- compatibility: the legacy key ----------------------------------------------------------


async def test_the_legacy_archive_is_adopted_and_restored_by_a_single_pod_gateway_after(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    bucket = bucket_of(atomic_moto, atomic_s3_settings)
    ws = "ws_rep_legacy"
    async with running_cluster(tmp_path, fake_codex_bin, atomic_s3_settings) as cluster:
        # A single-pod gateway (no CXG_PEER_ADDR) writes the archive first ...
        # No CXG_PEER_ADDR: a single-pod gateway.
        single = await cluster.start("single-1", CXG_PEER_ADDR="")
        with trio.fail_after(STEP):
            async with client(single, ws) as rpc:
                before = (await rpc.result("thread/start", {}))["thread"]["id"]
            single.signal(signal.SIGTERM)
            assert await single.process.wait() == 0  # type: ignore[union-attr]
        assert bucket.legacy_tag(ws) is None

        # ... replica mode adopts it on the first claim and adds to it ...
        pod = await cluster.start("pod-0")
        with trio.fail_after(STEP):
            async with client(pod, ws) as rpc:
                listed = {t["id"] for t in (await rpc.result("thread/list", {}))["data"]}
                assert before in listed
                during = (await rpc.result("thread/start", {}))["thread"]["id"]
            pod.signal(signal.SIGTERM)
            assert await pod.process.wait() == 0  # type: ignore[union-attr]
        record = bucket.record(ws)
        assert record is not None and record["state"] == "released"
        assert bucket.legacy_tag(ws) == record["committed"]
        assert bucket.snapshots(ws) == [record["committed"]]

        # ... and a single-pod gateway after the replica run restores the committed snapshot.
        again = await cluster.start("single-2", CXG_PEER_ADDR="")
        with trio.fail_after(STEP):
            async with client(again, ws) as rpc:
                listed = {t["id"] for t in (await rpc.result("thread/list", {}))["data"]}
        assert {before, during} <= listed
        counts["threads_carried"] = len({before, during} & listed)


# -- the owner lost without warning ---------------------------------------------------------


async def test_sigkill_of_the_owner_moves_the_workspace_from_its_last_committed_checkpoint(
    tmp_path: Path,
    real_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    """Real codex: a thread and its message, checkpointed, survive the owner's SIGKILL."""
    bucket = bucket_of(atomic_moto, atomic_s3_settings)
    ws, text = "ws_rep_kill", "remember me on another pod"
    async with running_cluster(
        tmp_path,
        real_codex_bin,
        atomic_s3_settings,
        CXG_CHECKPOINT_INTERVAL="1s",
        CXG_CHILD_READY_TIMEOUT="60s",
        CXG_MODEL_PROVIDER_BASE_URL=f"http://127.0.0.1:{await closed_port()}/v1",
    ) as cluster:
        owner, other = await start_pods(cluster, 2)
        with trio.fail_after(STEP * 3):
            async with client(owner, ws) as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
                turn = (
                    await rpc.result(
                        "turn/start",
                        {"threadId": thread_id, "input": [{"type": "text", "text": text}]},
                    )
                )["turn"]
                await rpc.wait_for("item/completed", is_user_message(text))
                await rpc.result("turn/interrupt", {"threadId": thread_id, "turnId": turn["id"]})

                def committed_has_the_message() -> bool:
                    record = bucket.record(ws)
                    if record is None or not record.get("committed"):
                        return False
                    members = bucket.members(record["committed"])
                    return (
                        any(
                            thread_id in name and text.encode() in data
                            for name, data in members.items()
                        )
                        and "state_5.sqlite" in members
                    )

                await until_true(committed_has_the_message, within=STEP)
                # One more checkpoint so the state database lists the thread too.
                committed = bucket.record(ws)["committed"]  # type: ignore[index]
                await until_true(
                    lambda: bucket.record(ws)["committed"] != committed,  # type: ignore[index]
                    within=STEP,
                )
                cluster.kill(owner)
                killed = trio.current_time()
            # Until the takeover time has passed, the other pod starts nothing.
            statuses: list[int] = []

            async def served_elsewhere() -> bool:
                statuses.append(await try_connect(other, ws))
                return bool(cluster.children_started(ws)[1:])

            await until_true(served_elsewhere, within=STEP, every=0.5)
            moved = cluster.children_started(ws)
            assert [pod for _, pod, _ in moved] == [owner.name, other.name]
            assert moved[1][0] - killed >= TAKEOVER_SECONDS - HEARTBEAT_SECONDS
            record = bucket.record(ws)
            assert record is not None and record["pod"] == other.name and record["epoch"] == 2
            async with client(other, ws) as rpc:
                listed = {t["id"] for t in (await rpc.result("thread/list", {}))["data"]}
                assert thread_id in listed
                resumed = await rpc.result("thread/resume", {"threadId": thread_id})
                assert text in Path(resumed["thread"]["path"]).read_text()
            assert await other.metric("cxg_owner_acquisitions_total", kind="takeover") == 1
        counts["takeover_seconds"] = round(moved[1][0] - killed, 2)
        counts["connects_before_takeover"] = len(statuses) - 1


# -- the paused owner -----------------------------------------------------------------------


async def test_a_paused_owner_never_makes_its_late_save_the_current_snapshot(
    tmp_path: Path,
    fake_codex_bin: Path,
    atomic_s3_settings: S3Settings,
    atomic_moto: MotoServer,
    counts: CountsRecorder,
) -> None:
    bucket = bucket_of(atomic_moto, atomic_s3_settings)
    ws = "ws_rep_pause"
    async with running_cluster(
        tmp_path, fake_codex_bin, atomic_s3_settings, CXG_CHECKPOINT_INTERVAL="1s"
    ) as cluster:
        owner, other = await start_pods(cluster, 2)
        with trio.fail_after(STEP * 2):
            async with client(owner, ws) as old:
                await old.result("thread/start", {})
                await until_true(
                    lambda: bool((bucket.record(ws) or {}).get("committed")), within=STEP
                )
                [(_, old_child)] = owner.children_started(ws)
                owner.signal(signal.SIGSTOP)
                paused = trio.current_time()
                try:
                    # The frozen daemon cannot stop its child; its keeper does, before any peer
                    # may take the workspace over: two children of one workspace never overlap.
                    await until_true(lambda: not child_alive(old_child), within=STEP)
                    killed_after = trio.current_time() - paused
                    assert killed_after < TAKEOVER_SECONDS, killed_after
                    assert not cluster.children_started(ws)[1:], "a second child started early"

                    async def taken_over() -> bool:
                        await try_connect(other, ws)
                        return bool(cluster.children_started(ws)[1:])

                    await until_true(taken_over, within=STEP, every=0.5)
                    async with client(other, ws) as new:
                        mine = (await new.result("thread/start", {}))["thread"]["id"]
                        await until_true(
                            lambda: (
                                (bucket.record(ws) or {})
                                .get("committed", "")
                                .find("/000000000002-")
                                > 0
                            ),
                            within=STEP,
                        )
                        committed_by_new = bucket.record(ws)["committed"]  # type: ignore[index]
                finally:
                    owner.signal(signal.SIGCONT)
                # Awake again, the old owner learns that its keeper fired and fences itself: its
                # client is closed with 1012 and nothing of its session is saved.
                with contextlib.suppress(ConnectionClosed):
                    await old.result("thread/start", {})
                await owner.wait_for_log("fence.sessions_stopped")
                assert await close_code(old.ws) == 1012
        record = bucket.record(ws)
        assert record is not None and record["pod"] == other.name and record["epoch"] == 2
        assert record["committed"].split("/")[-1].startswith("000000000002-")
        assert bucket.legacy_tag(ws) == record["committed"]
        # Nothing the paused owner wrote late is left to be restored.
        assert all("/000000000001-" not in key for key in bucket.snapshots(ws))
        assert committed_by_new and mine
        assert await owner.metric("cxg_replica_events_total", event="fenced") >= 1
        assert await other.metric("cxg_owner_acquisitions_total", kind="takeover") == 1
        counts["paused_seconds"] = round(trio.current_time() - paused, 1)
        counts["child_killed_after_seconds"] = round(killed_after, 1)
        counts["late_commits"] = len(owner.find("session.superseded"))
