"""How a pod judges its peers' heartbeats: on its own clock, by change, never by their clocks."""

from __future__ import annotations

from gateway.replicas.heartbeat import PeerLiveness
from gateway.replicas.records import Heartbeat

TAKEOVER = 10.0
# When a claim asks (matters only for an incarnation never seen before).
NOW = 0.0


def beat(incarnation: str = "i1", counter: int = 1, *, stopped: bool = False) -> Heartbeat:
    return Heartbeat("pod-a", incarnation, "10.0.0.1:8087", counter, False, stopped, "w")


def test_a_heartbeat_that_keeps_changing_is_alive() -> None:
    liveness = PeerLiveness(TAKEOVER)
    for second in range(0, 60, 2):
        liveness.observe("pod-a", beat(counter=second), f'"{second}"', float(second))
        liveness.looked(float(second))
        assert not liveness.is_dead("pod-a", "i1", NOW)


def test_an_unchanged_heartbeat_is_dead_after_the_takeover_time_of_this_pods_looks() -> None:
    liveness = PeerLiveness(TAKEOVER)
    liveness.observe("pod-a", beat(), '"e1"', 100.0)
    liveness.looked(100.0)
    # Seen again unchanged: only looks that succeeded move the judgement on.
    liveness.observe("pod-a", beat(), '"e1"', 109.0)
    liveness.looked(109.0)
    assert not liveness.is_dead("pod-a", "i1", NOW)
    liveness.looked(110.0)
    assert liveness.is_dead("pod-a", "i1", NOW)


def test_failed_looks_never_make_a_peer_dead() -> None:
    liveness = PeerLiveness(TAKEOVER)
    liveness.observe("pod-a", beat(), '"e1"', 0.0)
    liveness.looked(0.0)
    # This pod's own reads fail for a minute: no successful look, no judgement.
    assert not liveness.is_dead("pod-a", "i1", NOW)
    liveness.observe("pod-a", beat(counter=2), '"e2"', 60.0)
    liveness.looked(60.0)
    assert not liveness.is_dead("pod-a", "i1", NOW)


def test_first_sighting_counts_as_a_change() -> None:
    liveness = PeerLiveness(TAKEOVER)
    liveness.looked(0.0)
    liveness.observe("pod-a", beat(), '"old"', 50.0)
    liveness.looked(50.0)
    # Unchanged since it was first seen at 50, whatever it says about its own time.
    assert not liveness.is_dead("pod-a", "i1", NOW)
    liveness.looked(60.0)
    assert liveness.is_dead("pod-a", "i1", NOW)


def test_another_incarnation_freezes_the_old_ones_clock() -> None:
    liveness = PeerLiveness(TAKEOVER)
    liveness.observe("pod-a", beat("i1"), '"e1"', 0.0)
    liveness.looked(0.0)
    for second in range(1, 30):
        liveness.observe("pod-a", beat("i2", second), f'"n{second}"', float(second))
        liveness.looked(float(second))
    assert liveness.is_dead("pod-a", "i1", NOW)
    assert not liveness.is_dead("pod-a", "i2", NOW)


def test_an_incarnation_never_seen_starts_its_clock_when_first_asked_about() -> None:
    """It may be a pod started after this pod's last look: never dead on the spot."""
    liveness = PeerLiveness(TAKEOVER)
    assert not liveness.is_dead("pod-new", "i9", 0.0)  # no look yet: no judgement at all
    liveness.looked(100.0)
    assert not liveness.is_dead("pod-new", "i9", 101.0)
    liveness.looked(110.0)
    assert not liveness.is_dead("pod-new", "i9", 110.0)
    # Its heartbeat shows up: alive, whatever the record said.
    liveness.observe("pod-new", beat("i9"), '"x"', 110.5)
    liveness.looked(120.0)
    assert not liveness.is_dead("pod-new", "i9", 120.0)
    # A pod long gone: dead a takeover time after this pod first heard of it.
    liveness.looked(130.0)
    assert not liveness.is_dead("pod-gone", "i8", 130.0)
    liveness.looked(140.0)
    assert liveness.is_dead("pod-gone", "i8", 140.0)


def test_a_stopped_heartbeat_is_dead_at_once() -> None:
    liveness = PeerLiveness(TAKEOVER)
    liveness.observe("pod-a", beat(stopped=True), '"s"', 1.0)
    liveness.looked(1.0)
    assert liveness.is_dead("pod-a", "i1", NOW)
    assert not liveness.is_dead("pod-a", "i2", NOW)
