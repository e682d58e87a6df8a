"""Ownership in one process: several pods' placements, each with its real heartbeat task, on
one moto bucket. Claims, takeovers of silent and released owners, commit fencing (the paused
owner's late save), the legacy archive kept current, and two processes with one pod name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio

from gateway.codex_home.persistence import Generation, Persistence, StaleSnapshot
from gateway.config import ReplicaSettings, RestoreLimits, S3Settings, Secret
from gateway.replicas.heartbeat import (
    DuplicatePodName,
    HeartbeatState,
    PeerLiveness,
    check_pod_name_free,
    run_heartbeat,
)
from gateway.replicas.ownership import StorePlacement
from gateway.replicas.placement import OwnedElsewhere
from gateway.replicas.records import OwnerState, Records, new_write_id
from gateway.replicas.snapshots import MIRROR_TAG
from gateway.sessions.outcome import SessionStartError
from gateway.store.base import archive_key
from gateway.store.s3 import S3ObjectStore
from gateway_tests.reliability.support import CuttableProxy
from gateway_tests.s3_server import MotoServer, settings_for

# Short enough for a test, long enough that one slow moto round trip on a busy machine does
# not make a live pod look dead (a heartbeat every 0.6 s, moto in this very process).
TAKEOVER = 3.0
WS = "ws-own"
LIMITS = RestoreLimits(max_total_bytes=64 * 1024 * 1024, max_entries=10_000)


class Signal:
    """Something that happens again and again; ``wait`` returns at its next occurrence."""

    def __init__(self) -> None:
        self._next = trio.Event()
        self.count = 0

    def fire(self) -> None:
        self.count += 1
        self._next.set()
        self._next = trio.Event()

    async def wait(self) -> None:
        await self._next.wait()

    async def reach(self, count: int) -> None:
        """Return once it has happened ``count`` times in all."""
        while self.count < count:
            await self.wait()


class WatchedLiveness(PeerLiveness):
    """The pod's view of its peers, with a signal at the end of every whole look."""

    def __init__(self, takeover_after: float) -> None:
        super().__init__(takeover_after)
        self.looks = Signal()

    def looked(self, now: float) -> None:
        super().looked(now)
        self.looks.fire()


class RenewalCounter:
    """The heartbeat's keeper: petted after every successful renewal."""

    def __init__(self) -> None:
        self.renewals = Signal()

    def pet(self, seconds_left: float) -> None:
        self.renewals.fire()


@attrs.define
class Pod:
    """One pod's replica-mode parts, its heartbeat running in the test's nursery."""

    name: str
    store: S3ObjectStore
    placement: StorePlacement
    heartbeat: HeartbeatState
    proxy: CuttableProxy
    liveness: WatchedLiveness
    keeper: RenewalCounter = attrs.field(factory=RenewalCounter)
    fenced: list[tuple[float, str]] = attrs.field(factory=list)
    refused: DuplicatePodName | None = None
    refusal: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    async def renewals(self, more: int) -> None:
        """Return once its heartbeat has been renewed ``more`` times from now."""
        await self.keeper.renewals.reach(self.keeper.renewals.count + more)

    @property
    def persistence(self) -> Persistence:
        return Persistence(self.store, LIMITS)


StartPod = Callable[..., Awaitable[Pod]]


@pytest.fixture
async def start_pod(
    nursery: trio.Nursery, atomic_moto: MotoServer, atomic_s3_settings: S3Settings
) -> AsyncIterator[StartPod]:
    """Start pods whose S3 traffic goes through their own cuttable proxy."""
    pods: list[Pod] = []
    host, port = atomic_moto.endpoint.removeprefix("http://").split(":")

    async def start(name: str, *, check_name: bool = False) -> Pod:
        proxy = CuttableProxy(host, int(port))
        await nursery.start(proxy.serve)
        store = S3ObjectStore(
            settings_for(proxy.url, atomic_s3_settings.bucket), max_attempts=1, timeout=2
        )
        settings = ReplicaSettings(
            pod_name=name,
            peer_addr=f"127.0.0.1:{9000 + len(pods)}",
            peer_listen_addr="127.0.0.1:0",
            peer_secret=Secret("s"),
            takeover_after=TAKEOVER,
        )
        records = Records(store)
        etag = await check_pod_name_free(records, settings) if check_name else None
        state = HeartbeatState(settings, incarnation=new_write_id(), etag=etag)
        liveness = WatchedLiveness(TAKEOVER)
        placement = StorePlacement(settings, store, liveness, state)
        pod = Pod(name, store, placement, state, proxy, liveness)

        def fence(reason: str) -> None:
            pod.fenced.append((trio.current_time(), reason))

        async def beat(*, task_status: trio.TaskStatus[None]) -> None:
            with pod.scope:
                try:
                    await run_heartbeat(
                        records,
                        state,
                        liveness,
                        fence=fence,
                        keeper=pod.keeper,
                        task_status=task_status,
                    )
                except DuplicatePodName as exc:
                    pod.refused = exc
                    pod.refusal.set()

        await nursery.start(beat)
        pods.append(pod)
        return pod

    yield start
    for pod in pods:
        pod.scope.cancel()
        await pod.store.aclose()


async def claim_outcome(pod: Pod) -> int | str:
    """The epoch ``pod`` holds after claiming, or the pod it was told owns the workspace."""
    try:
        return await pod.placement.claim(WS)
    except OwnedElsewhere as elsewhere:
        return elsewhere.owner.pod


async def test_concurrent_first_claims_make_exactly_one_owner(start_pod: StartPod) -> None:
    pods = [await start_pod(f"pod-{n}") for n in range(3)]
    outcomes: dict[str, int | str] = {}

    async def claim(pod: Pod) -> None:
        outcomes[pod.name] = await claim_outcome(pod)

    async with trio.open_nursery() as nursery:
        for pod in pods:
            nursery.start_soon(claim, pod)
    owners = [name for name, outcome in outcomes.items() if outcome == 1]
    assert len(owners) == 1, outcomes
    assert all(outcome in (1, owners[0]) for outcome in outcomes.values()), outcomes
    assert [pod.placement.holds(WS, 1) for pod in pods].count(True) == 1


async def test_a_live_owner_is_not_taken_over_however_long_it_holds(start_pod: StartPod) -> None:
    owner, other = await start_pod("pod-a"), await start_pod("pod-b")
    assert await owner.placement.claim(WS) == 1
    deadline = trio.current_time() + 2.5 * TAKEOVER
    tries = 0
    while trio.current_time() < deadline:
        assert await claim_outcome(other) == "pod-a"
        tries += 1
        await trio.sleep(TAKEOVER / 5)
    assert tries >= 5 and owner.placement.holds(WS, 1)


async def test_an_owner_cut_off_from_the_store_fences_itself_before_it_is_taken_over(
    start_pod: StartPod,
) -> None:
    owner, other = await start_pod("pod-a"), await start_pod("pod-b")
    assert await owner.placement.claim(WS) == 1
    cut = trio.current_time()
    owner.proxy.cut()
    # Taken over only once its heartbeat has been silent for the takeover time.
    with trio.fail_after(4 * TAKEOVER):
        # The claim is judged on what the last look at the peers saw: try after each one.
        while (outcome := await claim_outcome(other)) == "pod-a":
            await other.liveness.looks.wait()
    taken = trio.current_time()
    assert outcome == 2
    assert taken - cut >= TAKEOVER - owner.heartbeat.settings.heartbeat_interval
    # The silent owner had fenced itself first, and claims nothing while cut off.
    assert owner.fenced and owner.fenced[0][0] < taken
    assert not owner.placement.holds(WS, 1)
    with pytest.raises(SessionStartError):
        await owner.placement.claim("ws-other")
    # Back on the network, its commit is refused: the workspace is pod-b's.
    owner.proxy.restore()
    snapshots = owner.placement.snapshots(WS, 1, owner.persistence)
    with pytest.raises(StaleSnapshot):
        await snapshots.save(
            Path("/nonexistent"), Generation(stored=None), read_as=None, recorded_home=None
        )


async def test_a_released_workspace_is_taken_over_at_once(start_pod: StartPod) -> None:
    owner, other = await start_pod("pod-a"), await start_pod("pod-b")
    assert await owner.placement.claim(WS) == 1
    assert await claim_outcome(other) == "pod-a"
    await owner.placement.release(WS, 1)
    released = trio.current_time()
    assert await claim_outcome(other) == 2
    assert trio.current_time() - released < TAKEOVER / 2
    found = await other.placement.records.read_owner(WS)
    assert (
        found is not None and found.value.pod == "pod-b" and found.value.state is OwnerState.OWNED
    )


async def test_the_peer_owner_is_read_without_claiming(start_pod: StartPod) -> None:
    owner, other = await start_pod("pod-a"), await start_pod("pod-b")
    assert await other.placement.peer_owner(WS) is None  # nobody's yet
    assert await owner.placement.claim(WS) == 1
    found = await other.placement.peer_owner(WS)
    assert found is not None and (found.pod, found.epoch) == ("pod-a", 1)
    assert await owner.placement.peer_owner(WS) is None  # its own, not a peer's
    record = await other.placement.records.read_owner(WS)
    assert record is not None and record.value.pod == "pod-a"  # the look wrote nothing
    await owner.placement.release(WS, 1)
    assert await other.placement.peer_owner(WS) is None  # released: free to claim


def write_home(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "history.jsonl").write_text(text)


async def restore_text(persistence: Persistence, tmp: Path, key: str | None = None) -> str:
    target = tmp / f"restored-{new_write_id()}"
    await persistence.restore(WS, target, key=key)
    return (target / "history.jsonl").read_text()


async def test_a_paused_owners_late_save_never_becomes_the_current_snapshot(
    start_pod: StartPod, tmp_path: Path, atomic_moto: MotoServer, atomic_s3_settings: S3Settings
) -> None:
    """The hard case: its write lands after the takeover, before the new owner wrote a thing."""
    owner, other = await start_pod("pod-a"), await start_pod("pod-b")
    assert await owner.placement.claim(WS) == 1
    old = owner.placement.snapshots(WS, 1, owner.persistence)
    home_a = tmp_path / "a"
    generation = await old.restore(home_a)
    write_home(home_a, "committed by a\n")
    generation = await old.save(home_a, generation, read_as=None, recorded_home=None)

    # pod-a freezes (its store traffic stops); pod-b takes over once it is silent.
    owner.proxy.cut()
    with trio.fail_after(4 * TAKEOVER):
        while await claim_outcome(other) == "pod-a":
            await other.liveness.looks.wait()
    new = other.placement.snapshots(WS, 2, other.persistence)
    home_b = tmp_path / "b"
    restored_by_b = await new.restore(home_b)
    assert (home_b / "history.jsonl").read_text() == "committed by a\n"

    # pod-a wakes up and finishes the save it had started: its snapshot lands in the store
    # after the takeover and before pod-b wrote anything — and is refused at the commit.
    owner.proxy.restore()
    write_home(home_a, "late, uncommitted save of a\n")
    with pytest.raises(StaleSnapshot):
        await old.save(home_a, generation, read_as=None, recorded_home=None)
    found = await other.placement.records.read_owner(WS)
    assert found is not None and found.value.pod == "pod-b" and found.value.epoch == 2
    reader = Persistence(S3ObjectStore(atomic_s3_settings), LIMITS)
    assert await restore_text(reader, tmp_path, key=found.value.committed) == "committed by a\n"
    assert await restore_text(reader, tmp_path) == "committed by a\n"
    # What it wrote is deleted again; nothing of it is reachable.
    listed = atomic_moto.boto_client().list_objects_v2(
        Bucket=atomic_s3_settings.bucket, Prefix=f"codex-app-gateway/.snapshots/{WS}/"
    )
    assert [item["Key"] for item in listed.get("Contents", [])] == [found.value.committed]

    # pod-b's own saves go on as if nothing happened.
    write_home(home_b, "committed by b\n")
    await new.save(home_b, restored_by_b, read_as=None, recorded_home=None)
    assert await restore_text(reader, tmp_path) == "committed by b\n"
    await reader.store.aclose()


async def test_the_legacy_archive_is_adopted_and_kept_current_for_a_single_pod_gateway(
    start_pod: StartPod, tmp_path: Path, atomic_s3_settings: S3Settings
) -> None:
    single = Persistence(S3ObjectStore(atomic_s3_settings), LIMITS)
    # A Go or single-pod archive before replica mode was turned on.
    write_home(tmp_path / "go", "from the single-pod gateway\n")
    await single.save(WS, tmp_path / "go", Generation(stored=None))

    pod = await start_pod("pod-a")
    assert await pod.placement.claim(WS) == 1
    snapshots = pod.placement.snapshots(WS, 1, pod.persistence)
    home = tmp_path / "replica"
    generation = await snapshots.restore(home)
    assert (home / "history.jsonl").read_text() == "from the single-pod gateway\n"
    write_home(home, "from replica mode\n")
    await snapshots.save(home, generation, read_as=None, recorded_home=None)
    await pod.placement.release(WS, 1)
    # The legacy key holds the committed snapshot: a single-pod gateway restores it ...
    assert await restore_text(single, tmp_path) == "from replica mode\n"
    found = await pod.store.read_metadata(archive_key(WS))
    assert found is not None and MIRROR_TAG in found[1]

    # ... and saves newer history there, which replica mode adopts on its next claim.
    rolled_back = tmp_path / "rolled-back"
    legacy = await single.restore(WS, rolled_back)
    write_home(rolled_back, "newer, from a rollback\n")
    await single.save(WS, rolled_back, legacy)
    assert await pod.placement.claim(WS) == 2
    again = tmp_path / "again"
    await pod.placement.snapshots(WS, 2, pod.persistence).restore(again)
    assert (again / "history.jsonl").read_text() == "newer, from a rollback\n"
    await single.store.aclose()


async def test_a_second_process_with_a_live_pod_name_refuses_to_start(
    start_pod: StartPod,
) -> None:
    await start_pod("pod-a")
    with pytest.raises(DuplicatePodName, match="CXG_POD_NAME"):
        await start_pod("pod-a", check_name=True)


async def test_two_live_processes_with_one_pod_name_leave_one_serving(
    start_pod: StartPod,
) -> None:
    """The first is frozen while the second starts (so it looks free), then wakes up."""
    first = await start_pod("pod-a")
    assert await first.placement.claim(WS) == 1
    first.proxy.cut()
    second = await start_pod("pod-a", check_name=True)
    first.proxy.restore()
    interval = first.heartbeat.settings.heartbeat_interval
    with trio.fail_after(10 * interval):
        await first.refusal.wait()
    assert "CXG_POD_NAME" in str(first.refused)
    with pytest.raises(SessionStartError):
        await first.placement.claim("ws-other")
    # The other goes on renewing its heartbeat and serving.
    counter = second.heartbeat.counter
    with trio.fail_after(10 * interval):
        await second.renewals(2)
    assert second.heartbeat.counter >= counter + 2
    assert second.refused is None
    assert await second.placement.claim("ws-other") == 1


async def test_a_second_process_that_writes_first_refuses_at_its_first_heartbeat(
    start_pod: StartPod,
) -> None:
    first = await start_pod("pod-a")
    with pytest.raises(RuntimeError):
        # Its first conditional write finds another incarnation's heartbeat: it never serves.
        await start_pod("pod-a")
    counter = first.heartbeat.counter
    with trio.fail_after(10 * first.heartbeat.settings.heartbeat_interval):
        await first.renewals(2)
    assert first.heartbeat.counter >= counter + 2
    assert first.refused is None
    shown = await first.placement.records.read_heartbeat("pod-a")
    assert shown is not None and shown.value.incarnation == first.heartbeat.incarnation


async def test_a_draining_pod_claims_nothing_and_its_heartbeat_says_so(
    start_pod: StartPod,
) -> None:
    pod, other = await start_pod("pod-a"), await start_pod("pod-b")
    pod.placement.set_draining()
    with pytest.raises(SessionStartError, match="draining"):
        await pod.placement.claim(WS)
    with trio.fail_after(10 * pod.heartbeat.settings.heartbeat_interval):
        while not other.liveness.is_draining("pod-a"):
            await other.liveness.looks.wait()
    assert await other.placement.claim(WS) == 1
