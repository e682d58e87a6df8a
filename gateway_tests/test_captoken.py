"""Capability tokens: the exact upstream byte format, and the exec gateway's verification rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.captoken import (
    HEADER_JSON,
    MAX_TOKEN_LENGTH,
    BadCapTokenSignature,
    CapTokenError,
    ExpiredCapToken,
    MalformedCapToken,
    mint_cap_token,
    verify_cap_token,
)

SECRET = b"s3cret"
NOW = 1_700_000_000

# Signature cross-checked with `openssl dgst -sha256 -hmac s3cret` over the first two parts.
KNOWN_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkNYRyJ9"
    ".eyJ0dXJuX2lkIjoidHJuX2FiMTJjZDM0Iiwid29ya3NwYWNlX2lkIjoid3NfYSIsImV4ZV9pZHMiOlsiZXhlX2Fs"
    "cGhhIl0sImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwfQ"
    ".tqE67Vy6mlHHhcYtBxVmfb5LX65nCRMEh1R-74xZjv8"
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forge(header: bytes, payload: bytes, secret: bytes = SECRET) -> str:
    """A token with arbitrary header and payload bytes, correctly signed."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def test_minted_token_matches_the_known_answer() -> None:
    token = mint_cap_token(SECRET, "trn_ab12cd34", "ws_a", "exe_alpha", 3600, now=NOW)
    assert token == KNOWN_TOKEN


def test_token_parts_are_the_upstream_bytes() -> None:
    header, payload, signature = KNOWN_TOKEN.split(".")
    assert unb64(header) == b'{"alg":"HS256","typ":"CXG"}' == HEADER_JSON
    assert unb64(payload) == (
        b'{"turn_id":"trn_ab12cd34","workspace_id":"ws_a","exe_ids":["exe_alpha"],'
        b'"iat":1700000000,"exp":1700003600}'
    )
    assert "=" not in KNOWN_TOKEN
    assert len(unb64(signature)) == 32


def test_minted_token_verifies_at_the_exec_gateway() -> None:
    token = mint_cap_token(SECRET, "trn_1", "ws_a", "exe_alpha", 60, now=NOW)
    payload = verify_cap_token(token, SECRET, now=NOW + 60)
    assert payload.turn_id == "trn_1"
    assert payload.workspace_id == "ws_a"
    assert payload.exe_ids == ("exe_alpha",)
    assert payload.allows_exe_id("exe_alpha")
    assert not payload.allows_exe_id("exe_beta")


def test_ttl_is_respected_and_a_negative_ttl_is_already_expired() -> None:
    token = mint_cap_token(SECRET, "trn_1", "ws_a", "exe_alpha", 60, now=NOW)
    with pytest.raises(ExpiredCapToken, match="capability token expired"):
        verify_cap_token(token, SECRET, now=NOW + 61)
    expired = mint_cap_token(SECRET, "trn_1", "ws_a", "exe_alpha", -1)
    with pytest.raises(ExpiredCapToken):
        verify_cap_token(expired, SECRET)


def test_fractional_ttl_counts_whole_seconds_only() -> None:
    token = mint_cap_token(SECRET, "t", "w", "e", 1.9, now=NOW)
    assert verify_cap_token(token, SECRET, now=NOW).exp == NOW + 1


def test_empty_secret_is_rejected() -> None:
    with pytest.raises(CapTokenError, match="captoken: empty secret"):
        mint_cap_token(b"", "trn_1", "ws_a", "exe_alpha", 60)


@pytest.mark.parametrize(
    ("turn_id", "workspace_id", "exe_id"),
    [("", "ws_a", "exe_alpha"), ("trn_1", "", "exe_alpha"), ("trn_1", "ws_a", "")],
)
def test_each_empty_field_is_rejected(turn_id: str, workspace_id: str, exe_id: str) -> None:
    with pytest.raises(CapTokenError, match="turnID/workspaceID/exeID required"):
        mint_cap_token(SECRET, turn_id, workspace_id, exe_id, 60)


def test_wrong_secret_is_a_bad_signature() -> None:
    with pytest.raises(BadCapTokenSignature, match="bad capability token signature"):
        verify_cap_token(KNOWN_TOKEN, b"other", now=NOW)


def test_tampered_payload_is_a_bad_signature() -> None:
    header, _, signature = KNOWN_TOKEN.split(".")
    payload = b'{"turn_id":"t","workspace_id":"ws_b","exe_ids":["exe_alpha"],"iat":0,"exp":9e9}'
    with pytest.raises(BadCapTokenSignature):
        verify_cap_token(f"{header}.{b64(payload)}.{signature}", SECRET, now=NOW)


def test_signature_is_checked_before_the_payload_is_decoded() -> None:
    # A payload that is not even base64-decodable JSON must fail on the signature first.
    header, _, signature = KNOWN_TOKEN.split(".")
    with pytest.raises(BadCapTokenSignature):
        verify_cap_token(f"{header}.{b64(b'not json')}.{signature}", SECRET, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dots",
        "one.two",
        "...",
        "a..c",
        "a.b.c.d",
        KNOWN_TOKEN + "=",
        KNOWN_TOKEN.replace("eyJhbGciOiJIUzI1NiIsInR5cCI6IkNYRyJ9", "eyJhbGciOiJub25lIn0"),
        "é" + KNOWN_TOKEN,
        KNOWN_TOKEN.replace(".eyJ0", ".é"),
        "A" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(MalformedCapToken, match="malformed capability token"):
        verify_cap_token(token, SECRET, now=NOW)


@pytest.mark.parametrize(
    "header",
    [b'{"alg":"none","typ":"CXG"}', b'{"alg":"HS256","typ":"JWT"}', b"[]", b"nope"],
)
def test_wrong_headers_are_malformed(header: bytes) -> None:
    payload = b'{"turn_id":"t","workspace_id":"w","exe_ids":["e"],"iat":0,"exp":9999999999}'
    with pytest.raises(MalformedCapToken):
        verify_cap_token(forge(header, payload), SECRET, now=NOW)


@pytest.mark.parametrize(
    "payload",
    [b"[]", b"{", b'{"turn_id":1,"workspace_id":"w","exp":9999999999}', b'{"turn_id":"t"}'],
)
def test_signed_but_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(MalformedCapToken):
        verify_cap_token(forge(HEADER_JSON, payload), SECRET, now=NOW)


def test_multi_id_payloads_and_unknown_claims_are_accepted() -> None:
    claims = {
        "turn_id": "t",
        "workspace_id": "w",
        "exe_ids": ["exe_a", "exe_b"],
        "iat": NOW,
        "exp": NOW + 10,
        "user_id": "u_1",
    }
    payload = verify_cap_token(forge(HEADER_JSON, json.dumps(claims).encode()), SECRET, now=NOW)
    assert payload.allows_exe_id("exe_a")
    assert payload.allows_exe_id("exe_b")
    assert not payload.allows_exe_id("exe_c")


def test_go_style_json_escapes_html_characters() -> None:
    token = mint_cap_token(SECRET, "a<b>&c", "ws\u2028", "exé", 10, now=NOW)
    raw = unb64(token.split(".")[1])
    assert b'"a\\u003cb\\u003e\\u0026c"' in raw
    assert b'"ws\\u2028"' in raw
    assert '"exé"'.encode() in raw
    payload = verify_cap_token(token, SECRET, now=NOW)
    assert (payload.turn_id, payload.workspace_id, payload.exe_ids) == (
        "a<b>&c",
        "ws\u2028",
        ("exé",),
    )


@given(
    secret=st.binary(min_size=1, max_size=64),
    turn_id=st.text(min_size=1, max_size=40),
    workspace_id=st.text(min_size=1, max_size=40),
    exe_id=st.text(min_size=1, max_size=40),
    ttl=st.integers(min_value=0, max_value=10**8),
    now=st.integers(min_value=0, max_value=2**40),
)
def test_round_trip(
    secret: bytes, turn_id: str, workspace_id: str, exe_id: str, ttl: int, now: int
) -> None:
    token = mint_cap_token(secret, turn_id, workspace_id, exe_id, ttl, now=now)
    payload = verify_cap_token(token, secret, now=now + ttl)
    surrogate_free = all(not 0xD800 <= ord(c) <= 0xDFFF for c in turn_id + workspace_id + exe_id)
    if surrogate_free:
        assert (payload.turn_id, payload.workspace_id) == (turn_id, workspace_id)
        assert payload.allows_exe_id(exe_id)
    assert payload.exp - payload.iat == ttl
    with pytest.raises(ExpiredCapToken):
        verify_cap_token(token, secret, now=now + ttl + 1)


@given(token=st.text(max_size=200))
def test_verifier_never_raises_anything_but_cap_token_errors(token: str) -> None:
    with pytest.raises(CapTokenError):
        verify_cap_token(token, SECRET, now=NOW)


@given(
    position=st.integers(min_value=0, max_value=len(KNOWN_TOKEN) - 1),
    char=st.sampled_from("AQg_-x"),
)
def test_any_single_character_change_is_refused(position: int, char: str) -> None:
    tampered = KNOWN_TOKEN[:position] + char + KNOWN_TOKEN[position + 1 :]
    if tampered == KNOWN_TOKEN:
        return
    try:
        verify_cap_token(tampered, SECRET, now=NOW)
    except CapTokenError:
        return
    # Changing the last character's unused low bits still decodes to the same signature bytes
    # (base64 is not canonical without strict mode, as with Go's RawURLEncoding); that is the
    # only way a changed token may still verify, and then the claims are unchanged.
    assert position == len(KNOWN_TOKEN) - 1
