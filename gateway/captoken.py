"""Capability tokens for codex-exec-gateway's ``/bridge/<exe_id>`` (pure functions, no I/O).

The format is the Go service's ``MintCapToken``, byte for byte, so that codex-exec-gateway's
``VerifyCapabilityToken`` accepts what is minted here::

    base64url(header) "." base64url(payload) "." base64url(HMAC-SHA256(secret, h "." p))

with the fixed header ``{"alg":"HS256","typ":"CXG"}``, a payload whose keys come in the order
``turn_id, workspace_id, exe_ids, iat, exp`` rendered the way Go's ``encoding/json`` renders a
struct, and base64url without padding everywhere. The verifier follows the exec gateway's rules;
the fake exec gateway in the tests uses it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import attrs

# The exact header bytes upstream signs; never re-serialised, so never reordered.
HEADER_JSON = b'{"alg":"HS256","typ":"CXG"}'

# A minted token is a few hundred bytes; anything far larger is refused before any decoding so
# a hostile caller cannot make the verifier chew on megabytes.
MAX_TOKEN_LENGTH = 8192

_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")

# Go's encoding/json escapes these even though JSON does not require it (HTML safety).
_GO_EXTRA_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


class CapTokenError(ValueError):
    """A capability token could not be minted or did not verify."""


class MalformedCapToken(CapTokenError):
    """The token is not three well-formed base64url parts with the CXG header and a payload."""

    def __init__(self) -> None:
        super().__init__("malformed capability token")


class BadCapTokenSignature(CapTokenError):
    """The signature does not match the secret."""

    def __init__(self) -> None:
        super().__init__("bad capability token signature")


class ExpiredCapToken(CapTokenError):
    """The token's ``exp`` lies in the past."""

    def __init__(self) -> None:
        super().__init__("capability token expired")


@attrs.frozen
class CapTokenPayload:
    """The claims of a verified token."""

    turn_id: str
    workspace_id: str
    exe_ids: tuple[str, ...]
    iat: int
    exp: int

    def allows_exe_id(self, exe_id: str) -> bool:
        """Whether the token grants access to executor ``exe_id`` (membership, as upstream)."""
        return exe_id in self.exe_ids


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded base64url strictly (Go's ``RawURLEncoding``: no padding, no stray bytes)."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise MalformedCapToken()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _go_json(value: object) -> bytes:
    """Compact JSON as Go's ``encoding/json`` writes it (UTF-8 kept, HTML characters escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _GO_EXTRA_ESCAPES.items():
        text = text.replace(char, escape)
    # Go replaces invalid UTF-8 (here: lone surrogates) with U+FFFD rather than failing.
    return text.encode("utf-8", errors="replace")


def _sign(secret: bytes, signing_input: str) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def mint_cap_token(
    secret: bytes,
    turn_id: str,
    workspace_id: str,
    exe_id: str,
    ttl_seconds: float,
    now: float | None = None,
) -> str:
    """Mint a token for one executor of one workspace, valid ``ttl_seconds`` from ``now``.

    ``iat`` is the current Unix second and ``exp`` adds the whole seconds of the TTL, so a
    negative TTL yields a token that is already expired (as upstream).
    """
    if not secret:
        raise CapTokenError("captoken: empty secret")
    if not turn_id or not workspace_id or not exe_id:
        raise CapTokenError("captoken: turnID/workspaceID/exeID required")
    iat = int(time.time() if now is None else now)
    payload = {
        "turn_id": turn_id,
        "workspace_id": workspace_id,
        "exe_ids": [exe_id],
        "iat": iat,
        "exp": iat + int(ttl_seconds),
    }
    signing_input = f"{_b64encode(HEADER_JSON)}.{_b64encode(_go_json(payload))}"
    return f"{signing_input}.{_b64encode(_sign(secret, signing_input))}"


def _json_object(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise MalformedCapToken() from None
    if not isinstance(value, dict):
        raise MalformedCapToken()
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _payload_from(claims: dict[str, object]) -> CapTokenPayload:
    turn_id = claims.get("turn_id", "")
    workspace_id = claims.get("workspace_id", "")
    # A missing list grants nothing; extra claims from newer minters are ignored.
    exe_ids = claims.get("exe_ids") or []
    iat = claims.get("iat", 0)
    exp = claims.get("exp")
    if not (
        isinstance(turn_id, str)
        and isinstance(workspace_id, str)
        and isinstance(exe_ids, list)
        and all(isinstance(exe, str) for exe in exe_ids)
        and _is_int(iat)
        and _is_int(exp)
    ):
        raise MalformedCapToken()
    assert isinstance(iat, int) and isinstance(exp, int)  # narrowed above, for the type checker
    return CapTokenPayload(
        turn_id=turn_id,
        workspace_id=workspace_id,
        exe_ids=tuple(exe_ids),
        iat=iat,
        exp=exp,
    )


def verify_cap_token(token: str, secret: bytes, now: float | None = None) -> CapTokenPayload:
    """Verify ``token`` under ``secret`` the way codex-exec-gateway does.

    Three non-empty parts; the header must say HS256/CXG; the signature is compared in constant
    time *before* the payload is decoded; ``now > exp`` is expired. Payloads listing several
    executors are accepted (forward compatibility); check :meth:`CapTokenPayload.allows_exe_id`.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise MalformedCapToken()
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise MalformedCapToken()
    header_b64, payload_b64, signature_b64 = parts
    if not _B64URL.match(payload_b64):
        raise MalformedCapToken()
    header = _json_object(_b64decode(header_b64))
    if header.get("alg") != "HS256" or header.get("typ") != "CXG":
        raise MalformedCapToken()
    signature = _b64decode(signature_b64)
    expected = _sign(secret, f"{header_b64}.{payload_b64}")
    if not hmac.compare_digest(signature, expected):
        raise BadCapTokenSignature()
    payload = _payload_from(_json_object(_b64decode(payload_b64)))
    current = int(time.time() if now is None else now)
    if current > payload.exp:
        raise ExpiredCapToken()
    return payload
