"""Signed grants: everything a hostile peer or a captured grant could try is refused.

Pure logic, no sockets: a grant is minted by one pod's ``GrantSigner`` and checked by another's
``GrantVerifier``, on clocks the test sets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from gateway.replicas.grants import (
    GRANT_LIFETIME,
    MAX_CLOCK_SKEW,
    MAX_GRANT_CHARS,
    Grant,
    GrantRefused,
    GrantSigner,
    GrantVerifier,
    ReplayWindowFull,
)

SECRET = "peer-secret-for-grant-tests"
NOW = 1_800_000_000.0


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign_raw(payload: bytes, secret: str = SECRET) -> str:
    """A grant over an arbitrary payload, correctly signed (what a peer holding the secret
    but sending nonsense would produce)."""
    signed = f"v1.{_b64(payload)}"
    mac = hmac.new(secret.encode(), b"cxg-peer-grant." + signed.encode(), hashlib.sha256)
    return f"{signed}.{_b64(mac.digest())}"


def _payload(grant: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_unb64(grant.split(".")[1]))
    return loaded


def _mint(
    clock: Clock,
    *,
    workspace_id: str = "ws_a",
    user_id: str = "u1",
    epoch: int = 7,
    pod: str = "gw-a",
) -> str:
    return GrantSigner(SECRET, now=clock).sign(
        workspace_id=workspace_id, user_id=user_id, epoch=epoch, pod=pod
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> GrantVerifier:
    return GrantVerifier(SECRET, "gw-a", now=clock)


def test_a_fresh_grant_for_this_pod_says_what_was_signed(
    clock: Clock, verifier: GrantVerifier
) -> None:
    grant = verifier.verify(_mint(clock))
    assert grant == Grant(
        workspace_id="ws_a",
        user_id="u1",
        epoch=7,
        expires_at=int(NOW + GRANT_LIFETIME),
        nonce=grant.nonce,
        pod="gw-a",
    )
    assert len(grant.nonce) == 32


def test_a_grant_signed_with_another_secret_is_refused(
    clock: Clock, verifier: GrantVerifier
) -> None:
    forged = GrantSigner("another-secret", now=clock).sign(
        workspace_id="ws_a", user_id="u1", epoch=7, pod="gw-a"
    )
    with pytest.raises(GrantRefused, match="signature"):
        verifier.verify(forged)
    assert verifier.remembered == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ws", "ws_b"),
        ("user", "someone-else"),
        ("epoch", 8),
        ("exp", int(NOW + GRANT_LIFETIME) + 1),
        ("nonce", "0" * 32),
        ("pod", "gw-b"),
    ],
)
def test_changing_any_signed_field_breaks_the_signature(
    clock: Clock, verifier: GrantVerifier, field: str, value: Any
) -> None:
    grant = _mint(clock)
    version, _, signature = grant.split(".")
    payload = _payload(grant) | {field: value}
    tampered_body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    with pytest.raises(GrantRefused, match="signature"):
        verifier.verify(f"{version}.{tampered_body}.{signature}")


def test_flipping_any_single_character_of_a_grant_is_refused(
    clock: Clock, verifier: GrantVerifier
) -> None:
    grant = _mint(clock)
    for index, char in enumerate(grant):
        for replacement in {"A", "-", "."} - {char}:
            mutated = grant[:index] + replacement + grant[index + 1 :]
            with pytest.raises(GrantRefused):
                verifier.verify(mutated)
    # None of the mutations used the grant up: the original still works, once.
    verifier.verify(grant)


def test_a_truncated_or_extended_signature_is_refused(
    clock: Clock, verifier: GrantVerifier
) -> None:
    grant = _mint(clock)
    signed, _, signature = grant.rpartition(".")
    mac = _unb64(signature)
    for bad in (mac[:16], mac + b"\0", b""):
        with pytest.raises(GrantRefused):
            verifier.verify(f"{signed}.{_b64(bad)}")


def test_an_expired_grant_is_refused_after_the_skew_allowance(
    clock: Clock, verifier: GrantVerifier
) -> None:
    late = _mint(clock)
    on_time = _mint(clock)
    clock.now = NOW + GRANT_LIFETIME + MAX_CLOCK_SKEW  # a slow receiver's clock: still fine
    verifier.verify(on_time)
    clock.now += 1.01
    with pytest.raises(GrantRefused, match="expired"):
        verifier.verify(late)


def test_a_grant_from_a_clock_far_ahead_is_refused(verifier: GrantVerifier) -> None:
    # The sender's clock runs a minute ahead: its grants would stay valid (and their nonces
    # remembered) far longer than a grant lives.
    ahead = _mint(Clock(NOW + 60))
    with pytest.raises(GrantRefused, match="further ahead"):
        verifier.verify(ahead)
    slightly_ahead = _mint(Clock(NOW + MAX_CLOCK_SKEW - 1))
    verifier.verify(slightly_ahead)


def test_a_grant_for_another_pod_is_refused(clock: Clock, verifier: GrantVerifier) -> None:
    with pytest.raises(GrantRefused, match="gw-b"):
        verifier.verify(_mint(clock, pod="gw-b"))


def test_a_grant_is_accepted_once_and_replays_are_refused(
    clock: Clock, verifier: GrantVerifier
) -> None:
    grant = _mint(clock)
    verifier.verify(grant)
    clock.now += GRANT_LIFETIME / 2
    with pytest.raises(GrantRefused, match="already used"):
        verifier.verify(grant)
    # Once expired it is refused as expired; its nonce is forgotten (memory stays bounded).
    clock.now = NOW + GRANT_LIFETIME + MAX_CLOCK_SKEW + 1
    with pytest.raises(GrantRefused, match="expired"):
        verifier.verify(grant)
    verifier.verify(_mint(clock))
    assert verifier.remembered == 1


def test_the_replay_window_is_bounded_and_refuses_rather_than_forgets(clock: Clock) -> None:
    verifier = GrantVerifier(SECRET, "gw-a", max_nonces=3, now=clock)
    grants = [_mint(clock) for _ in range(4)]
    for grant in grants[:3]:
        verifier.verify(grant)
    with pytest.raises(ReplayWindowFull):
        verifier.verify(grants[3])
    # The remembered ones are still refused as replays: nothing was forgotten to make room.
    with pytest.raises(GrantRefused, match="already used"):
        verifier.verify(grants[0])
    clock.now += GRANT_LIFETIME + MAX_CLOCK_SKEW + 1
    verifier.verify(_mint(clock))
    assert verifier.remembered == 1


def test_an_oversized_grant_is_refused_before_any_work() -> None:
    verifier = GrantVerifier(SECRET, "gw-a")
    with pytest.raises(GrantRefused, match="too long"):
        verifier.verify("v1." + "A" * MAX_GRANT_CHARS + ".AAAA")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "..",
        "v1",
        "v1..",
        "v2.e30.AAAA",
        "v1.e30",
        "v1.e30.AAAA.AAAA",
        "v1.!!!!.AAAA",
        "v1.e30=.AAAA",
        "v1.\u00e9.AAAA",
        "v1.e30.\x00",
        "Bearer abc",
    ],
)
def test_garbage_is_refused(verifier: GrantVerifier, garbage: str) -> None:
    with pytest.raises(GrantRefused):
        verifier.verify(garbage)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"grant"',
        b"{}",
        # Missing, extra and duplicated-by-case fields.
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":1800000030,"nonce":"%s"}',
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":1800000030,"nonce":"%s","pod":"gw-a","x":1}',
        # Wrong types and out-of-range values.
        b'{"ws":1,"user":"u1","epoch":7,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"","user":"u1","epoch":7,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"a/b","user":"u1","epoch":7,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":null,"epoch":7,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":true,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":-1,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":7.0,"exp":1800000030,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":99999999999999999999,"exp":1800000030,'
        b'"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":"1800000030","nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":1800000030.5,"nonce":"%s","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":1800000030,"nonce":"short","pod":"gw-a"}',
        b'{"ws":"ws_a","user":"u1","epoch":7,"exp":1800000030,"nonce":"%s","pod":""}',
    ],
)
def test_a_correctly_signed_but_malformed_payload_is_refused(
    verifier: GrantVerifier, payload: bytes
) -> None:
    if b"%s" in payload:
        payload = payload.replace(b"%s", b"ab" * 16)
    with pytest.raises(GrantRefused):
        verifier.verify(_sign_raw(payload))
    assert verifier.remembered == 0


def test_a_long_user_id_is_bounded(clock: Clock, verifier: GrantVerifier) -> None:
    with pytest.raises(GrantRefused, match="user"):
        verifier.verify(_mint(clock, user_id="u" * 300))


def test_the_secret_never_appears_in_a_grant(clock: Clock) -> None:
    grant = _mint(clock)
    assert SECRET not in grant
    assert SECRET not in json.dumps(_payload(grant))
    with pytest.raises(ValueError, match="empty"):
        GrantSigner("")
    with pytest.raises(ValueError, match="empty"):
        GrantVerifier("", "gw-a")
