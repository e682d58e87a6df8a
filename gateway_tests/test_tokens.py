"""Token helpers: Bearer extraction, the upstream HMAC development token, workspace ids."""

from __future__ import annotations

import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.tokens import (
    MAX_TOKEN_LENGTH,
    TokenError,
    extract_bearer,
    is_safe_workspace_id,
    looks_like_hmac_token,
    mint_hmac_token,
    verify_hmac_token,
)

SECRET = b"s3cret"
# Cross-checked with: printf 'ws_alpha\0thr_42' | openssl dgst -sha256 -hmac s3cret
KNOWN_SIGNATURE = "9bc904fed6e89d73b68dce865c7050b97b00240837495900f42e3e77201c8a38"
KNOWN_TOKEN = f"ws_alpha.thr_42.{KNOWN_SIGNATURE}"

# Every character, lone surrogates included: a token is whatever a caller sends.
ANY_TEXT = st.text(st.characters(exclude_categories=()))


# -- extract_bearer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def", "abc.def"),
        ("Bearer ast_0123abcd_secret", "ast_0123abcd_secret"),
        ("Bearer ", ""),
        ("Bearer  padded ", " padded "),
        ("Bearer\ttab", None),
        ("bearer abc", None),
        ("BEARER abc", None),
        ("Bearer", None),
        ("BearerX abc", None),
        ("Basic dXNlcjpwYXNz", None),
        (" Bearer abc", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_bearer_takes_exactly_what_follows_the_case_sensitive_prefix(
    header: str | None, expected: str | None
) -> None:
    assert extract_bearer(header) == expected


@given(ANY_TEXT)
def test_extract_bearer_returns_the_remainder_unchanged(token: str) -> None:
    assert extract_bearer("Bearer " + token) == token


# -- mint / verify -----------------------------------------------------------------------------


def test_minted_token_matches_an_independently_computed_signature() -> None:
    digest = hmac.new(SECRET, b"ws_alpha" + b"\x00" + b"thr_42", hashlib.sha256).hexdigest()
    assert digest == KNOWN_SIGNATURE
    assert mint_hmac_token(SECRET, "ws_alpha", "thr_42") == KNOWN_TOKEN


def test_minted_token_has_the_upstream_shape() -> None:
    token = mint_hmac_token(SECRET, "ws_alpha", "thr_42")
    assert token.startswith("ws_alpha.thr_42.")
    signature = token.split(".")[2]
    assert len(signature) == 64
    assert signature == signature.lower()
    assert looks_like_hmac_token(token)


def test_thread_defaults_to_dev() -> None:
    assert mint_hmac_token(SECRET, "ws_alpha").startswith("ws_alpha.dev.")


def test_verify_returns_the_workspace_of_a_minted_token() -> None:
    assert verify_hmac_token(SECRET, KNOWN_TOKEN) == "ws_alpha"


@given(
    workspace=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", fullmatch=True),
    thread=st.text(min_size=1, max_size=40).filter(lambda t: "." not in t),
    secret=st.binary(min_size=1, max_size=64),
)
def test_mint_then_verify_round_trips(workspace: str, thread: str, secret: bytes) -> None:
    assert verify_hmac_token(secret, mint_hmac_token(secret, workspace, thread)) == workspace


@pytest.mark.parametrize(
    "token", ["", "no-dots", "one.two", "...", "a..b", ".b.c", "a.b.", "a.b.c.d"]
)
def test_verify_rejects_tokens_without_three_non_empty_parts(token: str) -> None:
    with pytest.raises(TokenError, match="malformed"):
        verify_hmac_token(SECRET, token)


@pytest.mark.parametrize(
    "token",
    [
        f"ws_alpha.thr_42.{KNOWN_SIGNATURE[:-1]}0",
        f"ws_alpha.thr_42.{KNOWN_SIGNATURE.upper()}",
        f"ws_alpha.thr_43.{KNOWN_SIGNATURE}",
        f"ws_beta.thr_42.{KNOWN_SIGNATURE}",
        f"ws_alpha.thr_42.{KNOWN_SIGNATURE[:32]}",
        "ws_alpha.thr_42.not-hex",
    ],
)
def test_verify_rejects_a_bad_signature(token: str) -> None:
    with pytest.raises(TokenError, match="signature mismatch"):
        verify_hmac_token(SECRET, token)


def test_verify_rejects_a_token_signed_with_another_secret() -> None:
    with pytest.raises(TokenError, match="signature mismatch"):
        verify_hmac_token(b"other", KNOWN_TOKEN)


def test_verify_rejects_an_overlong_token_before_hashing() -> None:
    token = "w." + "t" * MAX_TOKEN_LENGTH + "." + KNOWN_SIGNATURE
    with pytest.raises(TokenError, match="too long"):
        verify_hmac_token(SECRET, token)


@given(ANY_TEXT)
def test_verify_raises_only_token_error_on_arbitrary_text(token: str) -> None:
    with contextlib.suppress(TokenError):
        verify_hmac_token(SECRET, token)


@given(ANY_TEXT)
def test_shape_test_never_raises(token: str) -> None:
    looks_like_hmac_token(token)


@pytest.mark.parametrize(
    ("secret", "workspace", "thread"),
    [
        (b"", "ws_alpha", "t"),
        (SECRET, "", "t"),
        (SECRET, "../etc", "t"),
        (SECRET, "ws.alpha", "t"),
        (SECRET, "ws_alpha", ""),
        (SECRET, "ws_alpha", "a.b"),
    ],
)
def test_mint_refuses_what_could_not_verify(secret: bytes, workspace: str, thread: str) -> None:
    with pytest.raises(TokenError):
        mint_hmac_token(secret, workspace, thread)


def test_shape_test_needs_64_lower_case_hex_digits() -> None:
    assert looks_like_hmac_token(KNOWN_TOKEN)
    assert not looks_like_hmac_token(KNOWN_TOKEN + "\n")
    assert not looks_like_hmac_token(f"ws.t.{KNOWN_SIGNATURE.upper()}")
    assert not looks_like_hmac_token("ast_0123abcd_secretsecret")
    assert not looks_like_hmac_token(f".t.{KNOWN_SIGNATURE}")


# -- workspace ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("workspace_id", ["ws_alpha", "a", "WS-1", "0abc", "a" * 128])
def test_safe_workspace_ids(workspace_id: str) -> None:
    assert is_safe_workspace_id(workspace_id)


@pytest.mark.parametrize(
    "workspace_id",
    [
        "",
        ".",
        "..",
        "../etc",
        "ws/a",
        "ws.a",
        "ws a",
        "_ws",
        "-ws",
        "a" * 129,
        "wś",
        "ws\n",
        "ws\x00",
        "ws\\a",
    ],
)
def test_unsafe_workspace_ids(workspace_id: str) -> None:
    assert not is_safe_workspace_id(workspace_id)


@given(ANY_TEXT)
def test_a_safe_workspace_id_is_a_plain_path_component(workspace_id: str) -> None:
    if is_safe_workspace_id(workspace_id):
        assert workspace_id.isascii()
        assert workspace_id not in (".", "..")
        assert not set(workspace_id) & set("/\\.\x00\n\r ")
        assert 1 <= len(workspace_id) <= 128
