"""Bad input, property-based: what arrives from outside the gateway's own code.

Each property feeds arbitrary data to one boundary and accepts only the specified outcomes:
configuration values (``ConfigError`` naming the variable, or a valid ``Config``), the JSON of
the internal APIs (a typed error or a valid result, and a 401 only when agentserver said so),
archives in the store (refused and left untouched, or restored within the bounds and never
outside the target) and capability tokens (a ``CapTokenError`` unless genuinely valid).
Example counts are bounded for ``make test`` and larger under ``make soak``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.authenticators import (
    AgentserverVerifier,
    Identity,
    Unauthorized,
    VerifierUnavailable,
)
from gateway.auth.tokens import is_safe_workspace_id
from gateway.captoken import CapTokenError, CapTokenPayload, verify_cap_token
from gateway.clients.execgateway import ConnectedExecutor, ExecGatewayClient, ExecGatewayError
from gateway.codex_home.config_toml import CodexConfig, ModelProvider, render_config_toml
from gateway.codex_home.persistence import HostileArchive, Persistence
from gateway.config import (
    VARIABLES,
    AgentserverSettings,
    Config,
    ConfigError,
    ExecGatewaySettings,
    RestoreLimits,
    Secret,
    load_config,
)
from gateway.credentials.modelserver import (
    ModelServerClient,
    ModelServerProtocolError,
    ModelServerToken,
    ModelServerUnavailable,
)
from gateway.executors import executor_mcp_servers
from gateway.store.local import LocalDirectoryStore
from gateway_tests.reliability.support import SOAK, CountsRecorder, Scale, bounded

EXAMPLES = 2000 if SOAK else 150
#: How each property's examples ended, by outcome (reported by the last test of the module).
OUTCOMES: Counter[str] = Counter()


# Environment values: any text, including the lone surrogates os.environ uses for undecodable
# bytes (surrogateescape); never NUL, which no environment can carry.
env_text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=()), max_size=40
) | st.sampled_from(["", " ", "0", "-1", "1e9", "99999999999999999999", "10x", "\udcff", "h"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


# -- configuration ------------------------------------------------------------------------------


@bounded(EXAMPLES)
@given(
    name=st.sampled_from([var.name for var in VARIABLES]),
    value=env_text,
    others=st.dictionaries(st.sampled_from([var.name for var in VARIABLES]), env_text, max_size=3),
)
def test_any_value_of_any_variable_is_a_config_or_a_config_error_naming_a_variable(
    name: str, value: str, others: dict[str, str], scale: Scale
) -> None:
    environ = {**others, name: value}
    try:
        config = load_config(environ)
    except ConfigError as exc:
        OUTCOMES["config: ConfigError"] += 1
        message = str(exc)
        assert any(var in message for var in environ), message
        assert "\n" not in message.strip() or "\n" in "".join(environ.values())
        return
    OUTCOMES["config: valid"] += 1
    assert isinstance(config, Config)


# -- JSON from the internal APIs ----------------------------------------------------------------

statuses = st.sampled_from([*[200] * 12, 401, 403, 404, 429, 500, 502, 503, 302])
safe_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
ids = safe_ids | safe_ids | st.text(max_size=20) | json_values
timestamps = st.datetimes().map(lambda d: d.isoformat() + "Z") | st.text(max_size=30) | json_values


def encoded(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bodies of one API: mostly its own shape with arbitrary values, else any JSON or bytes."""
    as_json = shaped.map(lambda v: json.dumps(v).encode())
    return (
        as_json
        | as_json
        | as_json
        | json_values.map(lambda v: json.dumps(v).encode())
        | (st.binary(max_size=64))
    )


verifier_bodies = encoded(
    st.fixed_dictionaries({}, optional={"workspace_id": ids, "user_id": ids | json_values})
)
modelserver_bodies = encoded(
    st.fixed_dictionaries({}, optional={"access_token": ids, "expires_at": timestamps})
)
connected_bodies = encoded(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "exe_id": ids | st.text(max_size=300),
                "description": st.text(max_size=30) | st.text(max_size=30) | json_values,
                "default_cwd": st.text(max_size=30) | st.text(max_size=30) | json_values,
                "is_default": st.booleans() | st.booleans() | json_values,
                "last_seen_at": timestamps,
            },
        ),
        max_size=4,
    )
)


def answering(status: int, body: bytes) -> httpx2.AsyncClient:
    """An HTTP client whose every request gets ``status`` with ``body``."""
    return httpx2.AsyncClient(
        transport=httpx2.MockTransport(lambda _: httpx2.Response(status, content=body))
    )


@bounded(EXAMPLES)
@given(status=statuses, body=verifier_bodies, token=st.text(min_size=1, max_size=30))
def test_any_verifier_answer_is_an_identity_or_a_typed_error_and_401_only_when_said(
    status: int, body: bytes, token: str, scale: Scale
) -> None:
    async def verify() -> Identity | Exception:
        async with answering(status, body) as http:
            verifier = AgentserverVerifier(
                AgentserverSettings("http://agentserver", Secret("internal")), http
            )
            try:
                return await verifier.verify(token)
            except (Unauthorized, VerifierUnavailable) as exc:
                return exc

    outcome = trio.run(verify)
    OUTCOMES[f"verifier: {type(outcome).__name__}"] += 1
    if isinstance(outcome, Identity):
        assert status == 200 and is_safe_workspace_id(outcome.workspace_id)
    elif isinstance(outcome, Unauthorized):
        # A 401 for the user only when agentserver said 401, or named an unusable workspace.
        assert status == 401 or (
            status == 200 and not is_safe_workspace_id(json.loads(body)["workspace_id"])
        )
    else:
        assert isinstance(outcome, VerifierUnavailable)
        assert status != 401


@bounded(EXAMPLES)
@given(status=statuses, body=modelserver_bodies)
def test_any_modelserver_token_answer_is_a_token_none_or_a_typed_error(
    status: int, body: bytes, scale: Scale
) -> None:
    async def fetch() -> ModelServerToken | Exception | None:
        async with answering(status, body) as http:
            client = ModelServerClient(http, "http://agentserver", Secret("internal"))
            try:
                return await client.fetch("ws_any")
            except (ModelServerUnavailable, ModelServerProtocolError) as exc:
                return exc

    outcome = trio.run(fetch)
    OUTCOMES[f"modelserver: {type(outcome).__name__}"] += 1
    if isinstance(outcome, ModelServerUnavailable):
        assert status >= 500 or status == 429
    elif isinstance(outcome, ModelServerProtocolError):
        assert status < 500 and status != 429
    elif isinstance(outcome, ModelServerToken):
        assert status == 200 and outcome.access_token.reveal()
        assert outcome.expires_at is None or outcome.expires_at.tzinfo is not None
    else:
        assert outcome is None and status in (200, 404)


# How many executor servers the connected property rendered in all (a count, not an outcome).
RENDERED = "connected: executors rendered"
EXEC_SETTINGS = ExecGatewaySettings(
    ws_url="ws://exec-gateway",
    internal_url="http://exec-gateway",
    internal_secret=Secret("internal"),
    captoken_secret=Secret("captoken"),
    captoken_ttl=3600.0,
)


@bounded(EXAMPLES)
@given(status=statuses, body=connected_bodies)
def test_any_connected_answer_is_executors_or_a_typed_error_and_renders_valid_toml(
    status: int, body: bytes, scale: Scale
) -> None:
    async def ask() -> tuple[tuple[ConnectedExecutor, ...] | Exception, Any]:
        async with answering(status, body) as http:
            client = ExecGatewayClient(http, "http://exec-gateway", Secret("internal"))
            try:
                executors: tuple[ConnectedExecutor, ...] | Exception = await client.connected(
                    "ws_any"
                )
            except ExecGatewayError as exc:
                executors = exc
            servers = await executor_mcp_servers(
                EXEC_SETTINGS, http, "ws_any", ("/usr/bin/python3", "-m", "gateway")
            )
        return executors, servers

    executors, servers = trio.run(ask)
    OUTCOMES[f"connected: {type(executors).__name__}"] += 1
    OUTCOMES[RENDERED] += len(servers)
    if isinstance(executors, Exception):
        assert servers == ()
        return
    assert status == 200
    assert all(isinstance(e.exe_id, str) and e.exe_id for e in executors)
    # Whatever the ids, the session's config.toml stays valid TOML with safe server names.
    rendered = render_config_toml(
        CodexConfig(
            model="m",
            provider=ModelProvider(id="p", name="p", base_url="http://m", env_key="K"),
            trusted_paths=("/tmp",),
            mcp_servers=servers,
        )
    )
    parsed = tomllib.loads(rendered)
    names = set(parsed.get("mcp_servers", {}))
    assert names == {server.name for server in servers}
    assert all(name and name.replace("_", "").replace("-", "").isalnum() for name in names)
    assert all(name.isascii() for name in names)


# -- archives -----------------------------------------------------------------------------------

LIMITS = RestoreLimits(max_total_bytes=4096, max_entries=8)
MEMBER_TYPES = [
    *[tarfile.REGTYPE] * 6,
    *[tarfile.DIRTYPE] * 4,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
    b"Z",
]
safe_parts = st.sampled_from(["a", "b", "é", "~", " ", "sessions", "x" * 60, "."])
name_parts = safe_parts | st.sampled_from(["..", "", "\\"])
member_names = st.one_of(
    st.lists(safe_parts, min_size=1, max_size=4).map("/".join),
    st.lists(safe_parts, min_size=1, max_size=4).map("/".join),
    st.lists(name_parts, min_size=1, max_size=6).map("/".join),
    st.lists(name_parts, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.text(max_size=40),
    st.just("../outside/escaped"),
    st.just("./"),
)
members = st.lists(
    st.tuples(
        member_names,
        st.sampled_from(MEMBER_TYPES),
        st.integers(min_value=0, max_value=600) | st.integers(min_value=0, max_value=5000),
        st.sampled_from(["", "../outside", "/etc/passwd", "a", "sessions/../../x"]),
    ),
    max_size=6,
)


def build_archive(entries: list[tuple[str, bytes, int, str]], outside: Path) -> bytes:
    """A tar.gz with ``entries`` as (name, type, size, link target); absolute names point at
    ``outside`` so an escape would land somewhere the test looks."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for name, type_flag, size, link in entries:
            info = tarfile.TarInfo(str(outside) + name if name.startswith("/") else name)
            info.type = type_flag
            info.linkname = str(outside) + link if link.startswith("/") else link
            data = None
            if type_flag in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                info.size = size
                data = io.BytesIO(os.urandom(size))
            archive.addfile(info, data)
    return raw.getvalue()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its type bits and size (links not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            found[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size)
    return found


@bounded(EXAMPLES)
@given(entries=members)
def test_any_archive_is_refused_untouched_or_restored_within_bounds_and_inside_the_home(
    entries: list[tuple[str, bytes, int, str]], scale: Scale
) -> None:
    work = Path(tempfile.mkdtemp(prefix="cxg-archive-"))
    try:
        outside = work / "outside"
        outside.mkdir()
        (outside / "sentinel").write_text("keep")
        store = LocalDirectoryStore(str(work / "store"))
        key = store.root / "codex-app-gateway" / "ws_fuzz.tar.gz"
        key.parent.mkdir(parents=True)
        blob = build_archive(entries, outside)
        key.write_bytes(blob)
        home = work / "sessions" / "codex-home"
        before = tree(outside)

        async def restore() -> HostileArchive | None:
            try:
                await Persistence(store, LIMITS).restore("ws_fuzz", home)
            except HostileArchive as exc:
                return exc
            return None

        refused = trio.run(restore)
        OUTCOMES["archive: refused" if refused else "archive: restored"] += 1
        assert tree(outside) == before, "something was written outside the home"
        assert key.read_bytes() == blob, "the stored archive was changed"
        # Nothing but the home (and nothing half-restored beside it) under sessions/.
        assert [p.name for p in home.parent.iterdir()] == ["codex-home"]
        restored = tree(home)
        if refused is not None:
            assert "ws_fuzz" in str(refused)
            assert restored == {}
            return
        assert len(restored) <= LIMITS.max_entries
        assert sum(size for kind, size in restored.values() if kind == stat.S_IFREG) <= 4096
        assert {kind for kind, _ in restored.values()} <= {stat.S_IFREG, stat.S_IFDIR}
        for relative in restored:
            mode = stat.S_IMODE((home / relative).lstat().st_mode)
            assert mode in (0o600, 0o700)
    finally:
        shutil.rmtree(work)


# -- capability tokens --------------------------------------------------------------------------

CAP_SECRET = b"captoken-secret"


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: bytes, payload: bytes) -> str:
    """A token whose signature is right for ``CAP_SECRET``, whatever its parts say."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = hmac.new(CAP_SECRET, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


claims = st.fixed_dictionaries(
    {},
    optional={
        "turn_id": json_values | st.text(max_size=10),
        "workspace_id": json_values | st.text(max_size=10),
        "exe_ids": json_values | st.lists(st.text(max_size=8), max_size=3),
        "iat": json_values | st.integers(),
        "exp": json_values | st.integers(),
    },
)
well_typed_claims = st.fixed_dictionaries(
    {
        "turn_id": st.text(max_size=10),
        "workspace_id": st.text(max_size=10),
        "exe_ids": st.lists(st.text(max_size=8), max_size=3),
        "iat": st.integers(min_value=-(2**40), max_value=2**40),
        "exp": st.integers(min_value=-(2**40), max_value=2**40),
    },
    optional={"extra": json_values},
)
cap_tokens = st.one_of(
    st.text(max_size=120),
    st.builds(
        signed,
        st.just(b'{"alg":"HS256","typ":"CXG"}')
        | st.just(b'{"alg":"HS256","typ":"CXG"}')
        | json_values.map(lambda v: json.dumps(v).encode()),
        well_typed_claims.map(lambda v: json.dumps(v).encode())
        | claims.map(lambda v: json.dumps(v).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=40),
    ),
    st.lists(st.text("ABCxyz09-_=+/.", max_size=20), min_size=1, max_size=5).map(".".join),
)


@bounded(EXAMPLES)
@given(token=cap_tokens, now=st.integers(min_value=0, max_value=2**34))
def test_any_cap_token_verifies_to_claims_or_raises_its_typed_error(
    token: str, now: int, scale: Scale
) -> None:
    try:
        payload = verify_cap_token(token, CAP_SECRET, now=now)
    except CapTokenError as exc:
        OUTCOMES[f"cap token: {type(exc).__name__}"] += 1
        return
    OUTCOMES["cap token: valid"] += 1
    assert isinstance(payload, CapTokenPayload)
    assert payload.exp >= now
    assert all(isinstance(exe, str) for exe in payload.exe_ids)


# Each property with an accepting and a refusing branch, and its accepting outcome's name;
# every other outcome of the family is a refusal.
BOTH_SIDES = {
    "archive": "archive: restored",
    "cap token": "cap token: valid",
    "config": "config: valid",
    "connected": "connected: tuple",
    "modelserver": "modelserver: ModelServerToken",
    "verifier": "verifier: Identity",
}


def test_every_property_reached_both_its_accepting_and_its_refusing_branch(
    counts: CountsRecorder, scale: Scale
) -> None:
    """The properties above ran here, and none of their strategies was one-sided.

    A generator that only ever produced refused (or only accepted) input would let its
    property pass without testing the other branch. Runs after the properties (file order).
    """
    counts["max_examples_per_property"] = EXAMPLES
    for outcome, number in sorted(OUTCOMES.items()):
        counts[outcome] = number
    for family, accepted in BOTH_SIDES.items():
        seen = {name: n for name, n in OUTCOMES.items() if name.startswith(f"{family}: ")}
        assert seen, f"the {family} property did not run before this test"
        assert seen.get(accepted, 0) > 0, (family, seen)
        # "executors rendered" counts servers, not examples: it is no outcome of its own.
        refused = {name: n for name, n in seen.items() if name not in (accepted, RENDERED)}
        assert sum(refused.values()) > 0, (family, seen)
