"""Authenticators over real loopback HTTP: a bad token is 401, an outage is never one."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator

import httpx2
import pytest
import trio
from starlette.requests import Request
from starlette.responses import Response
from structlog.testing import capture_logs

from gateway.auth import authenticators
from gateway.auth.authenticators import (
    MAX_VERIFY_RESPONSE_BYTES,
    VERIFY_PATH,
    AgentserverVerifier,
    ChainedAuthenticator,
    HmacAuthenticator,
    Identity,
    Unauthorized,
    VerifierUnavailable,
    build_authenticator,
)
from gateway.auth.tokens import MAX_TOKEN_LENGTH, mint_hmac_token
from gateway.config import AgentserverSettings, Secret, load_config
from gateway_tests.fakes.fake_agentserver import FakeAgentserver

INTERNAL_SECRET = "agentserver-internal-secret"
AST_TOKEN = "ast_0a1b2c3d_s3cr3tpart"
HMAC_SECRET = "inbound-hmac-secret"


class ScriptedAgentserver(FakeAgentserver):
    """The fake agentserver, but the verify route can be told to give any raw answer."""

    def __init__(self, internal_secret: str) -> None:
        self.scripted: Response | None = None
        super().__init__(internal_secret=internal_secret)

    async def _verify(self, request: Request) -> Response:
        if self.scripted is None:
            return await super()._verify(request)
        recorded = self._record(request, await request.body())
        return self._answer(recorded, self.scripted)


@pytest.fixture
async def agentserver() -> AsyncIterator[ScriptedAgentserver]:
    fake = ScriptedAgentserver(internal_secret=INTERNAL_SECRET)
    fake.add_verify_token(AST_TOKEN, user_id="u_test", workspace_id="ws_test")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


def verifier_for(base_url: str, http: httpx2.AsyncClient) -> AgentserverVerifier:
    """An ``AgentserverVerifier`` as ``load_config`` would configure it."""
    settings = AgentserverSettings(internal_url=base_url, internal_secret=Secret(INTERNAL_SECRET))
    return AgentserverVerifier(settings, http)


def closed_port_url() -> str:
    """A loopback URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def raw(body: bytes | str, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


# -- AgentserverVerifier -----------------------------------------------------------------------


async def test_a_known_token_verifies_to_its_identity(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    identity = await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)
    assert identity == Identity(workspace_id="ws_test", user_id="u_test")


async def test_the_verify_call_has_the_upstream_shape(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)
    [request] = agentserver.requests
    assert request.method == "POST"
    assert request.path == VERIFY_PATH == "/api/internal/codex/tokens/verify"
    assert request.headers["x-internal-secret"] == INTERNAL_SECRET
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {"token": AST_TOKEN}


async def test_an_unknown_token_is_unauthorized(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    with pytest.raises(Unauthorized):
        await verifier_for(agentserver.base_url, http).verify("ast_zzzzzzzz_unknown")
    assert agentserver.requests[0].status == 401


async def test_a_revoked_token_is_unauthorized(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    verifier = verifier_for(agentserver.base_url, http)
    await verifier.verify(AST_TOKEN)
    agentserver.remove_verify_token(AST_TOKEN)
    with pytest.raises(Unauthorized):
        await verifier.verify(AST_TOKEN)


@pytest.mark.parametrize("token", ["", "x" * (MAX_TOKEN_LENGTH + 1)])
async def test_empty_or_overlong_tokens_are_refused_without_asking(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient, token: str
) -> None:
    with pytest.raises(Unauthorized):
        await verifier_for(agentserver.base_url, http).verify(token)
    assert agentserver.requests == []


@pytest.mark.parametrize("status", [500, 502, 503, 404, 400, 403])
async def test_an_error_status_means_unavailable_not_unauthorized(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient, status: int
) -> None:
    agentserver.scripted = raw('{"error":"boom"}', status)
    with pytest.raises(VerifierUnavailable, match=str(status)):
        await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)


async def test_an_agentserver_outage_means_unavailable(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    agentserver.outage = True
    with pytest.raises(VerifierUnavailable):
        await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)


async def test_a_closed_port_means_unavailable(http: httpx2.AsyncClient) -> None:
    with pytest.raises(VerifierUnavailable, match="unreachable"):
        await verifier_for(closed_port_url(), http).verify(AST_TOKEN)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "[]",
        '"ws_test"',
        "null",
        '{"user_id": "u_test"}',
        '{"user_id": "u_test", "workspace_id": ""}',
        '{"user_id": "u_test", "workspace_id": null}',
        '{"user_id": "u_test", "workspace_id": 42}',
        '{"user_id": 7, "workspace_id": "ws_test"}',
        '{"user_id": "u_test", "workspace_id": ["ws_test"]}',
        b"\xff\xfe{}",
    ],
)
async def test_an_answer_that_is_not_an_identity_means_unavailable(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient, body: str | bytes
) -> None:
    agentserver.scripted = raw(body)
    with pytest.raises(VerifierUnavailable):
        await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)


async def test_an_oversized_answer_means_unavailable(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    padding = "x" * MAX_VERIFY_RESPONSE_BYTES
    agentserver.scripted = raw(json.dumps({"workspace_id": "ws_test", "padding": padding}))
    with pytest.raises(VerifierUnavailable, match="too large"):
        await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)


async def test_a_missing_user_id_is_tolerated(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    agentserver.scripted = raw('{"workspace_id": "ws_test"}')
    identity = await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)
    assert identity == Identity(workspace_id="ws_test", user_id="")


@pytest.mark.parametrize("workspace_id", ["../etc", "ws/a", "..", ".", "ws\n", "a" * 200])
async def test_an_unsafe_workspace_id_from_the_verifier_is_unauthorized(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient, workspace_id: str
) -> None:
    agentserver.scripted = raw(json.dumps({"user_id": "u", "workspace_id": workspace_id}))
    with pytest.raises(Unauthorized):
        await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)


@pytest.mark.parametrize("workspace_id", ["ws.a", "...", "team a@corp:ws", "wś-ünïcode"])
async def test_workspace_ids_the_go_service_took_from_agentserver_are_accepted(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient, workspace_id: str
) -> None:
    agentserver.scripted = raw(json.dumps({"user_id": "u", "workspace_id": workspace_id}))
    identity = await verifier_for(agentserver.base_url, http).verify(AST_TOKEN)
    assert identity.workspace_id == workspace_id


async def test_a_wrong_internal_secret_is_rejected_by_agentserver(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    settings = AgentserverSettings(agentserver.base_url, Secret("wrong-secret"))
    with pytest.raises(Unauthorized):
        await AgentserverVerifier(settings, http).verify(AST_TOKEN)


async def test_failures_never_carry_the_internal_secret_or_the_token(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    verifier = verifier_for(agentserver.base_url, http)
    for scripted in (raw("oops", 500), raw("not json"), raw('{"workspace_id": "../x"}')):
        agentserver.scripted = scripted
        with pytest.raises((VerifierUnavailable, Unauthorized)) as caught:
            await verifier.verify(AST_TOKEN)
        assert INTERNAL_SECRET not in str(caught.value)
        assert AST_TOKEN not in str(caught.value)


# -- HmacAuthenticator -------------------------------------------------------------------------


async def test_hmac_tokens_verify_to_their_workspace() -> None:
    token = mint_hmac_token(HMAC_SECRET.encode(), "ws_alpha", "thr_42")
    identity = await HmacAuthenticator(Secret(HMAC_SECRET)).verify(token)
    assert identity == Identity(workspace_id="ws_alpha")


@pytest.mark.parametrize("token", ["", "no-dots", "one.two", "...", "ws_alpha.thr_42." + "0" * 64])
async def test_bad_hmac_tokens_are_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized):
        await HmacAuthenticator(Secret(HMAC_SECRET)).verify(token)


async def test_a_validly_signed_unsafe_workspace_is_unauthorized() -> None:
    # Signed by hand: mint refuses such ids, but someone holding the secret could sign anything.
    signature = hmac.new(HMAC_SECRET.encode(), b"-ws/x\x00t", hashlib.sha256).hexdigest()
    with pytest.raises(Unauthorized, match="workspace id"):
        await HmacAuthenticator(Secret(HMAC_SECRET)).verify(f"-ws/x.t.{signature}")


# -- ChainedAuthenticator ----------------------------------------------------------------------


async def test_the_chain_sends_hmac_shaped_tokens_to_hmac_and_the_rest_to_agentserver(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    chain = ChainedAuthenticator(
        HmacAuthenticator(Secret(HMAC_SECRET)), verifier_for(agentserver.base_url, http)
    )
    hmac_token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    assert await chain.verify(hmac_token) == Identity(workspace_id="ws_dev")
    assert agentserver.requests == []
    assert await chain.verify(AST_TOKEN) == Identity(workspace_id="ws_test", user_id="u_test")
    assert len(agentserver.requests) == 1


async def test_an_agentserver_outage_does_not_affect_hmac_tokens(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    agentserver.outage = True
    chain = ChainedAuthenticator(
        HmacAuthenticator(Secret(HMAC_SECRET)), verifier_for(agentserver.base_url, http)
    )
    hmac_token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    assert await chain.verify(hmac_token) == Identity(workspace_id="ws_dev")
    with pytest.raises(VerifierUnavailable):
        await chain.verify(AST_TOKEN)


async def test_a_forged_hmac_shaped_token_is_judged_by_hmac_alone(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    chain = ChainedAuthenticator(
        HmacAuthenticator(Secret(HMAC_SECRET)), verifier_for(agentserver.base_url, http)
    )
    with pytest.raises(Unauthorized):
        await chain.verify("ws_dev.t." + "0" * 64)
    assert agentserver.requests == []


async def test_hmac_only_judges_every_token() -> None:
    chain = ChainedAuthenticator(HmacAuthenticator(Secret(HMAC_SECRET)), None)
    with pytest.raises(Unauthorized):
        await chain.verify(AST_TOKEN)


async def test_agentserver_only_judges_every_token(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    chain = ChainedAuthenticator(None, verifier_for(agentserver.base_url, http))
    token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    with pytest.raises(Unauthorized):
        await chain.verify(token)
    assert json.loads(agentserver.requests[0].body) == {"token": token}


async def test_a_chain_without_authenticators_accepts_nothing() -> None:
    with pytest.raises(Unauthorized):
        await ChainedAuthenticator(None, None).verify(AST_TOKEN)


async def test_build_authenticator_follows_the_configuration(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    config = load_config(
        {
            "CXG_AGENTSERVER_INTERNAL_URL": agentserver.base_url + "/",
            "CXG_AGENTSERVER_INTERNAL_SECRET": INTERNAL_SECRET,
            "CXG_INBOUND_HMAC_SECRET": HMAC_SECRET,
            "CXG_ALLOW_HMAC_TOKENS": "true",
        }
    )
    with capture_logs() as logs:
        chain = build_authenticator(config, http)
    assert await chain.verify(AST_TOKEN) == Identity(workspace_id="ws_test", user_id="u_test")
    hmac_token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    assert await chain.verify(hmac_token) == Identity(workspace_id="ws_dev")
    assert [r.path for r in agentserver.requests] == [VERIFY_PATH]
    [line] = [entry for entry in logs if entry["event"] == "auth.authenticators"]
    assert line["live"] == ["agentserver", "hmac"]
    assert line["hmac_tokens"] == "accepted"


def _verifier_and_hmac_secret(base_url: str, **extra: str) -> dict[str, str]:
    return {
        "CXG_AGENTSERVER_INTERNAL_URL": base_url,
        "CXG_AGENTSERVER_INTERNAL_SECRET": INTERNAL_SECRET,
        "CXG_INBOUND_HMAC_SECRET": HMAC_SECRET,
        **extra,
    }


async def test_hmac_tokens_are_refused_when_the_verifier_is_enabled_without_the_opt_in(
    agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    # The Go chart's deployment: the verifier plus an HMAC secret the Go service never used.
    config = load_config(_verifier_and_hmac_secret(agentserver.base_url))
    assert config.inbound_hmac_secret is not None  # loaded, as Go did
    with capture_logs() as logs:
        chain = build_authenticator(config, http)
    hmac_token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    with pytest.raises(Unauthorized, match="CXG_ALLOW_HMAC_TOKENS"):
        await chain.verify(hmac_token)
    # Refused here: agentserver is never asked about a token it did not issue.
    assert agentserver.requests == []
    assert await chain.verify(AST_TOKEN) == Identity(workspace_id="ws_test", user_id="u_test")
    [line] = [entry for entry in logs if entry["event"] == "auth.authenticators"]
    assert line["live"] == ["agentserver"]
    assert line["hmac_secret_loaded"] is True
    assert line["hmac_tokens"] == "refused"
    assert "CXG_ALLOW_HMAC_TOKENS=true" in line["hint"]
    assert HMAC_SECRET not in repr(logs)


@pytest.mark.parametrize("opt_in", ["false", "0", ""])
async def test_hmac_tokens_stay_refused_unless_the_opt_in_is_true(
    opt_in: str, agentserver: ScriptedAgentserver, http: httpx2.AsyncClient
) -> None:
    config = load_config(
        _verifier_and_hmac_secret(agentserver.base_url, CXG_ALLOW_HMAC_TOKENS=opt_in)
    )
    chain = build_authenticator(config, http)
    assert chain.live == ("agentserver",)
    with pytest.raises(Unauthorized):
        await chain.verify(mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t"))


async def test_without_a_verifier_hmac_tokens_work_as_in_development(
    http: httpx2.AsyncClient,
) -> None:
    config = load_config({"CXG_INBOUND_HMAC_SECRET": HMAC_SECRET})
    with capture_logs() as logs:
        chain = build_authenticator(config, http)
    token = mint_hmac_token(HMAC_SECRET.encode(), "ws_dev", "t")
    assert await chain.verify(token) == Identity(workspace_id="ws_dev")
    [line] = [entry for entry in logs if entry["event"] == "auth.authenticators"]
    assert line["live"] == ["hmac"]
    assert line["hint"] is None


async def test_a_verifier_that_never_answers_means_unavailable(
    http: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listener that accepts and never answers: the verifier's own timeout must end the wait.
    monkeypatch.setattr(authenticators, "VERIFY_TIMEOUT_SECONDS", 0.2)
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with trio.fail_after(5), pytest.raises(VerifierUnavailable):
            await verifier_for(f"http://127.0.0.1:{port}", http).verify(AST_TOKEN)
