"""HTTP/1.1 heads of the WebSocket upgrade, without I/O (RFC 6455 §4, RFC 9112 §2-§5).

The front door reads the first request head of every connection and decides from it whether
the tunnel takes the connection (a WebSocket upgrade on a relay path) or Hypercorn serves it.
The tunnel then forwards the upgrade to the child with only what the child needs, and answers
refusals with plain HTTP responses built here.
"""

from __future__ import annotations

import base64
import binascii
import http

import attrs

# The first request head must fit here (codex sends a few hundred bytes; a bearer token of a
# few KiB fits easily) — Hypercorn's own limit for request heads is the same.
MAX_HEAD = 16 * 1024
RELAY_PATHS = frozenset({"/", "/codex-app/ws"})
# Headers of the client's upgrade that reach the child. Authorization is replaced by the
# session's capability token; Origin never goes (the child refuses any Origin with 403);
# Sec-WebSocket-Extensions never goes, because the access policy reads every client message:
# no compression is negotiated.
_FORWARDED = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol")


@attrs.frozen
class RequestHead:
    """A parsed request head (header names lower-cased, values as sent)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every ``name`` header, lower-cased."""
        return {
            token.strip().lower()
            for key, value in self.headers
            if key == name
            for token in value.split(",")
        }


def head_end(data: bytes | bytearray) -> int:
    """Index just past the blank line ending the head, or -1 when it has not arrived."""
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def parse_request_head(head: bytes) -> RequestHead | None:
    """The request head, or ``None`` if it is not well-formed HTTP/1.x."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        return None
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0") or any(c in target for c in "\x00\t "):
        return None
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t\x00"):
            return None
        headers.append((name.lower(), value.strip()))
    return RequestHead(method, target, version, tuple(headers))


def is_relay_upgrade(request: RequestHead) -> bool:
    """Whether the tunnel takes this request: a WebSocket upgrade on a relay path."""
    return (
        request.method == "GET"
        and request.path in RELAY_PATHS
        and "websocket" in request.tokens("upgrade")
        and "upgrade" in request.tokens("connection")
    )


def upgrade_problem(request: RequestHead) -> str | None:
    """Why this upgrade is not a valid RFC 6455 opening handshake, or ``None``."""
    if request.version != "HTTP/1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    keys = [value for name, value in request.headers if name == "sec-websocket-key"]
    if len(keys) != 1:
        return "the upgrade needs exactly one Sec-WebSocket-Key header"
    try:
        valid_key = len(base64.b64decode(keys[0], validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return "Sec-WebSocket-Key must be 16 base64-encoded bytes"
    if request.header("sec-websocket-version") != "13":
        return "Sec-WebSocket-Version must be 13"
    return None


def child_upgrade_request(
    request: RequestHead, host: str, target: str, authorization: str
) -> bytes:
    """The client's upgrade as the child gets it: its key and version, the capability token."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Authorization: {authorization}",
    ]
    lines += [f"{name}: {value}" for name, value in request.headers if name in _FORWARDED]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_status(head: bytes) -> int | None:
    """The status code of a response head, or ``None`` if it is not HTTP/1.1."""
    first = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(first) < 2 or not first[0].startswith(b"HTTP/1.") or not first[1].isdigit():
        return None
    return int(first[1])


def plain_response(
    status: int, message: str, *, retry_after: float | None = None, request_id: str | None = None
) -> bytes:
    """A complete ``text/plain`` response that closes the connection."""
    body = (message + "\n").encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 426:
        lines.append("sec-websocket-version: 13")
    if retry_after is not None:
        lines.append(f"retry-after: {int(retry_after)}")
    if request_id is not None:
        lines.append(f"x-request-id: {request_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
