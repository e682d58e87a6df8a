"""Token helpers: Bearer extraction, the upstream HMAC development token, workspace ids."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import string

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
    workspace_dir_name,
    workspace_id_of_dir,
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


# Ids as the Go service took them: anything agentserver returned, anything without "." in HMAC.
GO_TYPICAL_IDS = [
    "ws_alpha",
    "a",
    "WS-1",
    "0abc",
    "a" * 128,
    "ws.a",
    "ws a",
    "_ws",
    "-ws",
    "wś",
    "team a@corp:ws#1",
    "ws\\a",
    "…",
    "日本語のワークスペース",
    "ws~1",
    "~",
]


@pytest.mark.parametrize("workspace_id", GO_TYPICAL_IDS)
def test_workspace_ids_the_go_service_took_are_accepted(workspace_id: str) -> None:
    assert is_safe_workspace_id(workspace_id)


@pytest.mark.parametrize(
    "workspace_id",
    [
        "",
        ".",
        "..",
        "../etc",
        "ws/a",
        "/",
        "a" * 129,
        "é" * 65,
        "ws\n",
        "ws\x00",
        "\x7f",
        "ws\x85",
        "\ud800",
    ],
)
def test_unsafe_workspace_ids(workspace_id: str) -> None:
    assert not is_safe_workspace_id(workspace_id)


PLAIN_DIR = re.compile(r"[A-Za-z0-9_-]{1,255}")


@given(ANY_TEXT)
def test_every_accepted_id_gets_a_plain_reversible_directory_name(workspace_id: str) -> None:
    if not is_safe_workspace_id(workspace_id):
        return
    name = workspace_dir_name(workspace_id)
    assert PLAIN_DIR.fullmatch(name)
    assert name not in (".", "..")
    assert workspace_id_of_dir(name) == workspace_id


@given(ANY_TEXT, ANY_TEXT)
def test_directory_names_are_injective(first: str, second: str) -> None:
    if first != second and is_safe_workspace_id(first) and is_safe_workspace_id(second):
        assert workspace_dir_name(first) != workspace_dir_name(second)


@given(st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=255))
def test_a_directory_name_maps_back_to_at_most_one_id(name: str) -> None:
    # Injectivity from the other side: a name some id maps to is that id's name, canonically.
    workspace_id = workspace_id_of_dir(name)
    if workspace_id is not None:
        assert workspace_dir_name(workspace_id) == name


def test_ids_of_the_earlier_narrow_rule_keep_their_directory_names() -> None:
    # Directories left by earlier versions (the adoption of unsaved homes) keep matching.
    for workspace_id in ("ws_alpha", "WS-1", "0abc", "a" * 128):
        assert workspace_dir_name(workspace_id) == workspace_id
    assert workspace_dir_name("ws.a").startswith("_")


def test_mint_refuses_a_dot_in_the_workspace_as_the_token_format_needs() -> None:
    with pytest.raises(TokenError, match=r"no '\.'"):
        mint_hmac_token(b"secret", "ws.a")
    assert mint_hmac_token(b"secret", "team a@corp").startswith("team a@corp.dev.")
