"""Signed grants: what lets a peer pod hand a verified connect to the workspace's owner.

The pod that verified a client's bearer token (the forwarder) never passes that token on.
It signs a *grant* instead — workspace, user, ownership epoch, expiry, a random nonce and the
name of the pod it is meant for — with ``CXG_PEER_SECRET`` (HMAC-SHA256), and the owner's
internal listener serves the connect only if the grant verifies:

* the signature matches (compared in constant time) — nothing else is looked at before that;
* it is not expired, and its expiry is not further ahead than a grant's lifetime (both with a
  bounded allowance for the pods' clocks disagreeing: expiries are wall-clock seconds because
  they cross pods);
* it names this pod (a grant for one owner is useless at another);
* its nonce was not seen before (each grant serves one connect); nonces are remembered until
  their grant expires, in a bounded window that refuses new grants rather than forgets live ones.

The wire form is ``v1.<payload>.<signature>``: base64url without padding of a compact JSON
object and of the 32-byte MAC over ``v1.<payload>``. Parsing is strict — exact keys, exact
types, bounded sizes, canonical base64 — so one grant has exactly one spelling. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import attrs

from gateway.auth.tokens import is_safe_workspace_id

VERSION = "v1"
# A grant is minted just before the hop is opened and used at once: a short life keeps a
# leaked grant (in a proxy log, say) useless, and keeps the replay window small.
GRANT_LIFETIME = 30.0
# How far the pods' wall clocks may disagree before grants are refused (NTP keeps pods within
# milliseconds; this is for a drifting node, not for a broken one).
MAX_CLOCK_SKEW = 5.0
# The whole grant as sent in the header; a grant of the longest workspace id, user id and pod
# name is well under this.
MAX_GRANT_CHARS = 2048
MAX_USER_ID_CHARS = 256
MAX_POD_NAME_CHARS = 253
NONCE_BYTES = 16
# Nonces remembered at once. At a grant's lifetime plus both skews (40 s) this admits over
# 1,600 forwarded connects a second into one pod; past it new grants are refused (503) until
# old ones expire, never accepted unchecked.
MAX_REMEMBERED_NONCES = 65536
_MAX_EPOCH = (1 << 63) - 1
_MAC_BYTES = hashlib.sha256().digest_size
_KEYS = frozenset({"ws", "user", "epoch", "exp", "nonce", "pod"})
_DOMAIN = b"cxg-peer-grant."


class GrantRefused(Exception):
    """The grant is not acceptable; the message says why (for the log only)."""


class ReplayWindowFull(GrantRefused):
    """Too many live grants are remembered to check one more for replay; try again soon."""


@attrs.frozen
class Grant:
    """What a verified grant says."""

    workspace_id: str
    user_id: str
    epoch: int
    # Unix seconds (wall clock) after which the grant is refused.
    expires_at: int
    nonce: str
    pod: str


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Canonical base64url without padding, or ``GrantRefused``."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise GrantRefused("grant is not base64url") from None
    # Non-canonical spellings (stray padding, non-zero trailing bits) would give one grant
    # several forms.
    if _b64encode(data) != text:
        raise GrantRefused("grant is not canonical base64url")
    return data


def _mac(secret: bytes, signed: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + signed, hashlib.sha256).digest()


class GrantSigner:
    """Mints grants for peer pods (the forwarder's side)."""

    def __init__(
        self,
        secret: str,
        *,
        lifetime: float = GRANT_LIFETIME,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("a grant secret must not be empty")
        self._secret = secret.encode()
        self._lifetime = lifetime
        self._now = now

    def sign(self, *, workspace_id: str, user_id: str, epoch: int, pod: str) -> str:
        """A fresh grant for ``pod`` to serve one connect of ``workspace_id`` at ``epoch``."""
        payload = {
            "ws": workspace_id,
            "user": user_id,
            "epoch": epoch,
            "exp": int(self._now() + self._lifetime),
            "nonce": secrets.token_hex(NONCE_BYTES),
            "pod": pod,
        }
        body = _b64encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{VERSION}.{body}"
        return f"{signed}.{_b64encode(_mac(self._secret, signed.encode()))}"


class GrantVerifier:
    """Checks grants meant for this pod (the owner's side) and remembers their nonces."""

    def __init__(
        self,
        secret: str,
        pod: str,
        *,
        lifetime: float = GRANT_LIFETIME,
        max_skew: float = MAX_CLOCK_SKEW,
        max_nonces: int = MAX_REMEMBERED_NONCES,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("a grant secret must not be empty")
        self._secret = secret.encode()
        self._pod = pod
        self._lifetime = lifetime
        self._max_skew = max_skew
        self._max_nonces = max_nonces
        self._now = now
        self._seen: set[str] = set()
        self._forget: list[tuple[float, str]] = []  # (when it may be forgotten, nonce), a heap

    @property
    def remembered(self) -> int:
        """How many nonces are remembered now."""
        return len(self._seen)

    def verify(self, grant: str) -> Grant:
        """The grant's content if it is acceptable here, now, for the first time.

        Raises ``GrantRefused`` (``ReplayWindowFull`` when it cannot be checked for replay).
        """
        if len(grant) > MAX_GRANT_CHARS:
            raise GrantRefused("grant too long")
        if not grant.isascii():
            raise GrantRefused("grant is not ASCII")
        parts = grant.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise GrantRefused("grant is not a v1 grant")
        _, body, signature = parts
        mac = _b64decode(signature)
        expected = _mac(self._secret, f"{VERSION}.{body}".encode())
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, expected):
            raise GrantRefused("grant signature does not match")
        content = _parse_payload(_b64decode(body))
        if content.pod != self._pod:
            raise GrantRefused(f"grant is for pod {content.pod!r}, not this one")
        now = self._now()
        if now > content.expires_at + self._max_skew:
            raise GrantRefused("grant expired")
        if content.expires_at > now + self._lifetime + self._max_skew:
            raise GrantRefused("grant expires further ahead than a grant lives")
        self._remember(content.nonce, content.expires_at + self._max_skew, now)
        return content

    def _remember(self, nonce: str, forget_at: float, now: float) -> None:
        forget = self._forget
        while forget and forget[0][0] < now:
            self._seen.discard(heapq.heappop(forget)[1])
        if nonce in self._seen:
            raise GrantRefused("grant was already used")
        if len(self._seen) >= self._max_nonces:
            raise ReplayWindowFull("too many live grants to check one more for replay")
        self._seen.add(nonce)
        heapq.heappush(forget, (forget_at, nonce))


def _parse_payload(raw: bytes) -> Grant:
    try:
        payload: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise GrantRefused("grant payload is not JSON") from None
    if not isinstance(payload, dict) or set(payload) != _KEYS:
        raise GrantRefused("grant payload does not have exactly the grant's fields")
    ws, user, epoch = payload["ws"], payload["user"], payload["epoch"]
    exp, nonce, pod = payload["exp"], payload["nonce"], payload["pod"]
    if not isinstance(ws, str) or not is_safe_workspace_id(ws):
        raise GrantRefused("grant names no valid workspace")
    if not isinstance(user, str) or len(user) > MAX_USER_ID_CHARS:
        raise GrantRefused("grant's user is not a bounded string")
    # bool is an int in Python; true is not an epoch.
    if type(epoch) is not int or not 0 <= epoch <= _MAX_EPOCH:
        raise GrantRefused("grant's epoch is not a non-negative integer")
    if type(exp) is not int or not 0 < exp <= _MAX_EPOCH:
        raise GrantRefused("grant's expiry is not a positive integer")
    if (
        not isinstance(nonce, str)
        or len(nonce) != 2 * NONCE_BYTES
        or any(c not in "0123456789abcdef" for c in nonce)
    ):
        raise GrantRefused("grant's nonce is not 16 bytes of lower-case hex")
    if not isinstance(pod, str) or not 0 < len(pod) <= MAX_POD_NAME_CHARS:
        raise GrantRefused("grant's pod is not a pod name")
    return Grant(ws, user, epoch, exp, nonce, pod)
