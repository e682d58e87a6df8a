"""Who is connecting: the agentserver verifier (production) and HMAC tokens (development).

Outcomes are three and never confused: an ``Identity``, ``Unauthorized`` (the token is bad:
HTTP 401) or ``VerifierUnavailable`` (we could not find out: HTTP 503 — an outage must never
look like a bad token to the user).
"""

from __future__ import annotations

import json
from typing import Protocol

import attrs
import httpx2
import structlog

from gateway.auth.tokens import (
    MAX_TOKEN_LENGTH,
    TokenError,
    is_safe_workspace_id,
    looks_like_hmac_token,
    verify_hmac_token,
)
from gateway.config import AgentserverSettings, Config, Secret

log = structlog.get_logger(__name__)

VERIFY_PATH = "/api/internal/codex/tokens/verify"
VERIFY_TIMEOUT_SECONDS = 5.0
# A verify answer is two short ids; anything bigger is not an answer.
MAX_VERIFY_RESPONSE_BYTES = 64 * 1024


@attrs.frozen
class Identity:
    """A verified caller."""

    workspace_id: str
    user_id: str = ""


class Unauthorized(Exception):
    """The token is missing, malformed, unknown or expired."""


class VerifierUnavailable(Exception):
    """The verifier could not be asked or gave no usable answer (``url``: which verifier)."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class Authenticator(Protocol):
    """Turns a bearer token into an identity."""

    async def verify(self, token: str) -> Identity:
        """Return the identity behind ``token``.

        Raises ``Unauthorized`` or ``VerifierUnavailable``.
        """
        ...


def _checked(identity: Identity) -> Identity:
    if not is_safe_workspace_id(identity.workspace_id):
        # The id becomes a directory and an object key: refuse rather than sanitise.
        log.warning("auth.unsafe_workspace_id", workspace_id=identity.workspace_id[:200])
        raise Unauthorized("workspace id not acceptable")
    return identity


def _header_bytes_as_utf8(token: str) -> str:
    """The token as the Go service saw it: header bytes read as UTF-8.

    HTTP header values reach us decoded as latin-1; the Go service signed and read the raw
    bytes, which are UTF-8 when a workspace id is not ASCII. Tokens that are not such bytes
    (ASCII ones, or text handed over directly) are returned unchanged.
    """
    try:
        return token.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return token


class HmacAuthenticator:
    """Development and break-glass tokens in the Go service's ``ws.thread.hmac`` format."""

    def __init__(self, secret: Secret) -> None:
        self._secret = secret.reveal().encode()

    async def verify(self, token: str) -> Identity:
        try:
            workspace_id = verify_hmac_token(self._secret, _header_bytes_as_utf8(token))
        except TokenError as exc:
            raise Unauthorized(str(exc)) from None
        return _checked(Identity(workspace_id=workspace_id))


class AgentserverVerifier:
    """``POST <agentserver>/api/internal/codex/tokens/verify`` with ``X-Internal-Secret``."""

    def __init__(self, settings: AgentserverSettings, http: httpx2.AsyncClient) -> None:
        self._url = settings.internal_url + VERIFY_PATH
        self._secret = settings.internal_secret
        self._http = http

    async def verify(self, token: str) -> Identity:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("malformed token")
        try:
            response = await self._http.post(
                self._url,
                json={"token": token},
                headers={"X-Internal-Secret": self._secret.reveal()},
                timeout=VERIFY_TIMEOUT_SECONDS,
            )
        except httpx2.HTTPError as exc:
            raise VerifierUnavailable(
                f"token verifier unreachable: {type(exc).__name__}", url=self._url
            ) from None
        if response.status_code == 401:
            raise Unauthorized("token rejected by agentserver")
        if response.status_code != 200:
            raise VerifierUnavailable(
                f"token verifier answered HTTP {response.status_code}", url=self._url
            )
        if len(response.content) > MAX_VERIFY_RESPONSE_BYTES:
            raise VerifierUnavailable("token verifier answer too large", url=self._url)
        try:
            body = json.loads(response.content)
            workspace_id = body["workspace_id"]
            user_id = body.get("user_id") or ""
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VerifierUnavailable(
                "token verifier answer is not the expected JSON", url=self._url
            ) from None
        if not isinstance(workspace_id, str) or not isinstance(user_id, str) or not workspace_id:
            raise VerifierUnavailable("token verifier answer has no workspace_id", url=self._url)
        return _checked(Identity(workspace_id=workspace_id, user_id=user_id))


class ChainedAuthenticator:
    """HMAC-shaped tokens go to the HMAC authenticator when configured; the rest to agentserver.

    agentserver tokens (``ast_<id>_<secret>``) never have the HMAC shape, so routing by shape
    sends each token to the one authenticator that can judge it. With ``refuse_hmac`` (an HMAC
    secret loaded next to the verifier without the opt-in) HMAC-shaped tokens are refused here,
    without asking agentserver about a token it never issued.
    """

    def __init__(
        self,
        hmac: HmacAuthenticator | None,
        remote: AgentserverVerifier | None,
        *,
        refuse_hmac: bool = False,
    ) -> None:
        self._hmac = hmac
        self._remote = remote
        self._refuse_hmac = refuse_hmac

    @property
    def live(self) -> tuple[str, ...]:
        """The authenticators that accept tokens: ``agentserver`` and/or ``hmac``."""
        names = ("agentserver",) if self._remote is not None else ()
        return (*names, "hmac") if self._hmac is not None else names

    async def verify(self, token: str) -> Identity:
        if self._hmac is not None and (self._remote is None or looks_like_hmac_token(token)):
            return await self._hmac.verify(token)
        if self._refuse_hmac and looks_like_hmac_token(token):
            raise Unauthorized("HMAC tokens are not accepted here (CXG_ALLOW_HMAC_TOKENS is off)")
        if self._remote is not None:
            return await self._remote.verify(token)
        raise Unauthorized("no authenticator accepts this token")


def build_authenticator(config: Config, http: httpx2.AsyncClient) -> ChainedAuthenticator:
    """The authenticator ``serve`` uses, from the configuration.

    HMAC tokens are a development and break-glass tool. Without the verifier they are the only
    way in; next to it they are accepted only with ``CXG_ALLOW_HMAC_TOKENS=true``, because the
    Go chart injects ``CXG_INBOUND_HMAC_SECRET`` into every deployment (the Go service loaded
    it and never used it) and reusing that deployment must not open a second way in.
    """
    remote = AgentserverVerifier(config.agentserver, http) if config.agentserver else None
    hmac_wanted = bool(config.inbound_hmac_secret) and (remote is None or config.allow_hmac_tokens)
    hmac_auth = (
        HmacAuthenticator(config.inbound_hmac_secret)
        if hmac_wanted and config.inbound_hmac_secret
        else None
    )
    refuse_hmac = remote is not None and hmac_auth is None
    authenticator = ChainedAuthenticator(hmac_auth, remote, refuse_hmac=refuse_hmac)
    log.info(
        "auth.authenticators",
        live=list(authenticator.live),
        hmac_secret_loaded=bool(config.inbound_hmac_secret),
        hmac_tokens="accepted" if hmac_auth is not None else "refused",
        hint=(
            "CXG_INBOUND_HMAC_SECRET is set but HMAC tokens are refused next to the agentserver "
            "verifier; set CXG_ALLOW_HMAC_TOKENS=true to accept them"
            if config.inbound_hmac_secret and hmac_auth is None
            else None
        ),
    )
    return authenticator
