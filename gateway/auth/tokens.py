"""Pure token helpers: the Bearer header, the development HMAC token format, workspace ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

# Tokens are pasted by people and minted by agentserver; anything longer is not a token.
MAX_TOKEN_LENGTH = 4096
_BEARER_PREFIX = "Bearer "
# Workspace ids: the Go service took anything agentserver returned (and, in HMAC tokens,
# anything without "."). The object key keeps the id exactly; the directory name encodes it
# (``workspace_dir_name``). Bounded so that the encoded name fits one path component.
MAX_WORKSPACE_ID_BYTES = 128
# Ids that are their own directory name (every id the earlier, narrower rule accepted).
_PLAIN_WORKSPACE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Control characters (C0, DEL, C1) and the path separator are never part of an id.
_REFUSED_IN_WORKSPACE_ID = re.compile(r"[\x00-\x1f\x7f-\x9f/]")
# Prefix of encoded directory names; a plain id starts with a letter or digit, never with it.
ENCODED_DIR_PREFIX = "_"
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
    """Whether the gateway accepts ``workspace_id``: what the Go service took, within bounds.

    Refused: empty, longer than ``MAX_WORKSPACE_ID_BYTES`` in UTF-8, not encodable as UTF-8
    (lone surrogates), control characters or NUL, ``/`` (the object key would gain a level
    and the Go service's directory ``<root>/<id>`` another), and ``.`` or ``..`` (which name
    the Go service's root and its parent).
    """
    try:
        encoded = workspace_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (
        0 < len(encoded) <= MAX_WORKSPACE_ID_BYTES
        and workspace_id not in (".", "..")
        and _REFUSED_IN_WORKSPACE_ID.search(workspace_id) is None
    )


def workspace_dir_name(workspace_id: str) -> str:
    """The directory name of an (accepted) workspace id under ``CXG_TMP_ROOT``.

    Ids of letters, digits, ``_`` and ``-`` starting with a letter or digit are their own name
    (so directories of earlier versions keep their names); every other id is ``_`` plus the
    lower-case, unpadded base32 of its UTF-8 bytes. Both forms are single path components of
    ``[A-Za-z0-9_-]`` only; they cannot collide because only encoded names start with ``_``,
    and base32 is one-to-one, so the mapping is injective and ``workspace_id_of_dir`` undoes it.
    """
    if _PLAIN_WORKSPACE_ID.fullmatch(workspace_id):
        return workspace_id
    encoded = base64.b32encode(workspace_id.encode("utf-8")).decode("ascii")
    return ENCODED_DIR_PREFIX + encoded.rstrip("=").lower()


def workspace_id_of_dir(name: str) -> str | None:
    """The workspace id whose directory is ``name``, or ``None`` if no id maps to it."""
    if _PLAIN_WORKSPACE_ID.fullmatch(name):
        return name
    if not name.startswith(ENCODED_DIR_PREFIX):
        return None
    body = name[len(ENCODED_DIR_PREFIX) :]
    if body != body.lower():
        return None
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        workspace_id = raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if workspace_dir_name(workspace_id) != name:  # non-canonical spellings map to no id
        return None
    return workspace_id


def _signature(secret: bytes, workspace_id: str, thread_id: str) -> str:
    message = workspace_id.encode() + b"\x00" + thread_id.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def mint_hmac_token(secret: bytes, workspace_id: str, thread_id: str = "dev") -> str:
    """Mint ``<workspace>.<thread>.<hex hmac-sha256>``, the Go service's development format."""
    if not secret:
        raise TokenError("the HMAC secret is empty")
    if not is_safe_workspace_id(workspace_id) or "." in workspace_id:
        raise TokenError(
            f"workspace id {workspace_id!r} is not valid (at most {MAX_WORKSPACE_ID_BYTES} "
            "bytes; no '.', '/' or control characters)"
        )
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
