"""Pure token helpers: the Bearer header, the development HMAC token format, workspace ids."""

from __future__ import annotations

import hashlib
import hmac
import re

# Tokens are pasted by people and minted by agentserver; anything longer is not a token.
MAX_TOKEN_LENGTH = 4096
_BEARER_PREFIX = "Bearer "
# Workspace ids become a directory name and an object key; keep them to a safe alphabet.
_WORKSPACE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TokenError(ValueError):
    """A token is malformed or its signature does not match."""


def extract_bearer(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, else ``None``.

    As upstream: the prefix is exact and case-sensitive and nothing else is trimmed; an empty
    token is returned as ``""`` and fails verification later.
    """
    if authorization is None or not authorization.startswith(_BEARER_PREFIX):
        return None
    return authorization[len(_BEARER_PREFIX) :]


def is_safe_workspace_id(workspace_id: str) -> bool:
    """Whether ``workspace_id`` is safe as a path component and an object key."""
    return bool(_WORKSPACE_ID.fullmatch(workspace_id))


def _signature(secret: bytes, workspace_id: str, thread_id: str) -> str:
    message = workspace_id.encode() + b"\x00" + thread_id.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def mint_hmac_token(secret: bytes, workspace_id: str, thread_id: str = "dev") -> str:
    """Mint ``<workspace>.<thread>.<hex hmac-sha256>``, the Go service's development format."""
    if not secret:
        raise TokenError("the HMAC secret is empty")
    if not is_safe_workspace_id(workspace_id):
        raise TokenError(f"workspace id {workspace_id!r} is not valid (letters, digits, _ and -)")
    if not thread_id or "." in thread_id:
        raise TokenError("thread id must be non-empty and contain no '.'")
    return f"{workspace_id}.{thread_id}.{_signature(secret, workspace_id, thread_id)}"


def looks_like_hmac_token(token: str) -> bool:
    """Cheap shape test used to route a token to the HMAC authenticator."""
    parts = token.split(".")
    return len(parts) == 3 and all(parts) and bool(_HEX64.fullmatch(parts[2]))


def verify_hmac_token(secret: bytes, token: str) -> str:
    """Return the workspace id of a valid development token; raise ``TokenError`` otherwise."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token too long")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenError("malformed token")
    workspace_id, thread_id, signature = parts
    try:
        expected = _signature(secret, workspace_id, thread_id)
        matches = hmac.compare_digest(expected.encode(), signature.encode())
    except UnicodeEncodeError:  # lone surrogates: no token was ever minted from those
        raise TokenError("malformed token") from None
    if not matches:
        raise TokenError("signature mismatch")
    return workspace_id
