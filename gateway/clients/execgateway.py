"""codex-exec-gateway's internal API: which executors a workspace has connected right now.

``GET <internal>/api/exec-gateway/connected?workspace_id=<id>`` with
``Authorization: Bearer <CXG_EXEC_GATEWAY_INTERNAL_SECRET>`` answers a JSON array of
``{exe_id, description, default_cwd, is_default, last_seen_at}`` (``reference/upstream-spec.md``
§8.1). Errors carry the URL and status but never the secret.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
import httpx2
import trio

from gateway.config import Secret

log = logging.getLogger(__name__)

CONNECTED_PATH = "/api/exec-gateway/connected"
REQUEST_TIMEOUT = 5.0
# A workspace has a handful of executors; a body this large is a fault, not a list.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_ERROR_BODY_BYTES = 1024


class ExecGatewayError(Exception):
    """The exec gateway could not be asked, refused, or answered something unreadable."""


@attrs.frozen
class ConnectedExecutor:
    """One executor bound to the workspace and connected to the exec gateway."""

    exe_id: str
    description: str = ""
    default_cwd: str = ""
    is_default: bool = False
    last_seen_at: dt.datetime | None = None


def _structure_timestamp(value: Any, _: object) -> dt.datetime | None:
    # Informational only: a timestamp we cannot read must not cost the user an executor.
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _strict(kind: type) -> Any:
    def structure(value: Any, _: object) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    converter.register_structure_hook(str, _strict(str))
    converter.register_structure_hook(bool, _strict(bool))
    converter.register_structure_hook(dt.datetime | None, _structure_timestamp)
    return converter


_CONVERTER = _make_converter()


def parse_connected(items: Any) -> tuple[ConnectedExecutor, ...]:
    """Decode the ``connected`` array; unknown fields are ignored, nulls mean "absent".

    An entry without a usable ``exe_id`` cannot be reached, so it is skipped (with a warning)
    rather than costing the workspace its other executors.
    """
    if not isinstance(items, list):
        raise ExecGatewayError("execgwclient: decode response: expected a JSON array")
    executors = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ExecGatewayError(f"execgwclient: decode response: entry {index} is not an object")
        fields = {key: value for key, value in item.items() if value is not None}
        if not isinstance(fields.get("exe_id"), str) or not fields["exe_id"]:
            log.warning("execgwclient: skipping executor entry %d without an exe_id", index)
            continue
        try:
            executors.append(_CONVERTER.structure(fields, ConnectedExecutor))
        except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
            reason = (
                "; ".join(cattrs.transform_error(exc))
                if isinstance(exc, cattrs.BaseValidationError)
                else exc
            )
            raise ExecGatewayError(
                f"execgwclient: decode response: entry {index}: {reason}"
            ) from None
    return tuple(executors)


class ExecGatewayClient:
    """Asks the exec gateway's internal API about a workspace's executors.

    The caller owns ``http`` (an open ``httpx2.AsyncClient``); this class never closes it.
    """

    def __init__(self, http: httpx2.AsyncClient, base_url: str, secret: Secret) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._secret = secret

    def _redact(self, text: str) -> str:
        secret = self._secret.reveal()
        return text.replace(secret, "***") if secret else text

    async def connected(self, workspace_id: str) -> tuple[ConnectedExecutor, ...]:
        """The executors of ``workspace_id`` connected now (possibly none)."""
        if not workspace_id:
            raise ExecGatewayError("execgwclient: workspaceID required")
        url = self._base_url + CONNECTED_PATH
        headers = {
            "Authorization": f"Bearer {self._secret.reveal()}",
            "Accept": "application/json",
        }
        # httpx2's timeout bounds each phase; the deadline bounds the whole exchange, as Go's
        # http.Client.Timeout does.
        with trio.move_on_after(REQUEST_TIMEOUT) as deadline:
            try:
                status, body = await self._get(url, workspace_id, headers)
            except httpx2.HTTPError as exc:
                reason = self._redact(str(exc) or type(exc).__name__)
                raise ExecGatewayError(f"execgwclient: GET {url}: {reason}") from None
        if deadline.cancelled_caught:
            raise ExecGatewayError(f"execgwclient: GET {url}: timed out after {REQUEST_TIMEOUT:g}s")
        if status != 200:
            excerpt = self._redact(body[:_ERROR_BODY_BYTES].decode("utf-8", errors="replace"))
            raise ExecGatewayError(f"execgwclient: GET {url}: status={status} body={excerpt!r}")
        try:
            items = json.loads(body)
        except ValueError as exc:
            raise ExecGatewayError(f"execgwclient: decode response: {exc}") from None
        return parse_connected(items)

    async def _get(
        self, url: str, workspace_id: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        """GET with a bounded body: a runaway answer fails instead of filling memory."""
        async with self._http.stream(
            "GET",
            url,
            params={"workspace_id": workspace_id},
            headers=dict(headers),
            timeout=REQUEST_TIMEOUT,
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    if response.status_code != 200:
                        break  # the first KiB is all an error message needs
                    raise ExecGatewayError(
                        f"execgwclient: GET {url}: response larger than {MAX_RESPONSE_BYTES} bytes"
                    )
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)
