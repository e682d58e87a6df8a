"""Client of agentserver's ModelServer token endpoint (upstream-spec §8.2, with auth added).

``GET <agentserver>/internal/workspaces/{id}/modelserver-token`` answers
``{"access_token": "...", "expires_at": "<RFC 3339>"}``, or 404 when the workspace has no
ModelServer connection. Unlike the Go client this one path-escapes the id and sends
``X-Internal-Secret`` (agentserver's convention for internal calls).

Errors are typed so the caller can tell "agentserver is down, keep what you have and retry"
(:class:`ModelServerUnavailable`) from "agentserver answered something we cannot use"
(:class:`ModelServerProtocolError`); "no connection" is not an error but ``None``. No error
message, repr or log line ever contains a token.
"""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import quote

import attrs
import httpx2

from gateway.config import Secret

FETCH_TIMEOUT_SECONDS = 5.0
# Go's RFC 3339 output may carry up to nine fractional digits; Python reads at most six.
_FRACTION = re.compile(r"(\.\d{1,6})\d*")


class ModelServerError(Exception):
    """The ModelServer token could not be obtained; the message never contains a token."""


class ModelServerUnavailable(ModelServerError):
    """agentserver is unreachable, timed out or answered 5xx/429: worth retrying later."""


class ModelServerProtocolError(ModelServerError):
    """agentserver answered, but with a status or body this client cannot use."""


@attrs.frozen
class ModelServerToken:
    """A workspace's current ModelServer access token."""

    access_token: Secret
    expires_at: dt.datetime | None  # timezone-aware; None when agentserver gave no expiry


def parse_expires_at(value: object) -> dt.datetime | None:
    """Parse an RFC 3339 ``expires_at``; None for a missing, empty or unreadable value."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = _FRACTION.sub(r"\1", value.strip())
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        # RFC 3339 always carries an offset; a bare time is most likely UTC from a lax server.
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


class ModelServerClient:
    """Fetches ModelServer tokens from agentserver with an HTTP client the daemon owns."""

    def __init__(
        self,
        http: httpx2.AsyncClient,
        base_url: str,
        internal_secret: Secret,
        *,
        timeout: float = FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._secret = internal_secret
        self._timeout = timeout

    def url_for(self, workspace_id: str) -> str:
        """The token URL of a workspace (the id escaped as one path segment)."""
        return (
            f"{self._base_url}/internal/workspaces/{quote(workspace_id, safe='')}/modelserver-token"
        )

    async def fetch(self, workspace_id: str) -> ModelServerToken | None:
        """The workspace's current token, or None when it has no ModelServer connection.

        Raises :class:`ModelServerUnavailable` or :class:`ModelServerProtocolError`.
        """
        if not workspace_id:
            raise ValueError("modelserver client: workspace id required")
        url = self.url_for(workspace_id)
        try:
            response = await self._http.get(
                url,
                headers={"X-Internal-Secret": self._secret.reveal(), "Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx2.TimeoutException:
            raise ModelServerUnavailable(
                f"modelserver token fetch: GET {url}: timed out after {self._timeout:g}s"
            ) from None
        except httpx2.HTTPError as exc:
            # The exception text of a transport error names the host, never a response body.
            raise ModelServerUnavailable(
                f"modelserver token fetch: GET {url}: {type(exc).__name__}: {exc}"
            ) from None
        status = response.status_code
        if status == 404:
            return None
        if status != 200:
            # A non-200 answer carries no token, so a short excerpt helps whoever debugs it.
            excerpt = response.text[:200].replace("\n", " ")
            message = f"modelserver token fetch: GET {url}: status={status} body={excerpt!r}"
            if status >= 500 or status == 429:
                raise ModelServerUnavailable(message)
            raise ModelServerProtocolError(message)
        try:
            payload = response.json()
        except ValueError:
            raise ModelServerProtocolError(
                f"modelserver token fetch: GET {url}: response is not JSON"
            ) from None
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if token is not None and not isinstance(token, str):
            raise ModelServerProtocolError(
                f"modelserver token fetch: GET {url}: access_token is not a string"
            )
        if not token:
            return None
        return ModelServerToken(Secret(token), parse_expires_at(payload.get("expires_at")))
