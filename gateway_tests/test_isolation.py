"""Child isolation's pure parts and its start-up decisions, without spawning a session.

The hostile end-to-end checks are in ``gateway_tests/security/test_os_isolation.py``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import structlog

from gateway.auth.tokens import mint_hmac_token
from gateway.config import ConfigError, load_config, parse_uid_range, resolve_secret_files
from gateway.sessions import isolation
from gateway.sessions.isolation import (
    ChildIdentity,
    ChildIsolation,
    IsolationError,
    IsolationMode,
    UidRange,
    effective_capabilities,
    filesystem_identity,
    mapped_ranges,
    missing_capabilities,
    untraversable_ancestor,
)
from gateway_tests import checkout_reach
from gateway_tests.daemon_process import base_env, one_line, run_cli

ALL_FIVE = sum(1 << bit for bit in (0, 1, 5, 6, 7))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100000-165535", (100000, 165535)), (" 5-5 ", (5, 5)), ("1-4294967294", (1, 4294967294))],
)
def test_uid_ranges_parse(text: str, expected: tuple[int, int]) -> None:
    assert parse_uid_range(text) == expected


@pytest.mark.parametrize(
    "text", ["", "100000", "0-10", "10-5", "a-b", "1-2-3", "-5", "1-4294967295"]
)
def test_bad_uid_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="uid range"):
        parse_uid_range(text)


def test_a_bad_uid_range_or_mode_stops_the_start_naming_the_variable() -> None:
    base = {"CXG_INBOUND_HMAC_SECRET": "s"}
    with pytest.raises(ConfigError, match="CXG_CHILD_UID_RANGE has an invalid value '0-9'"):
        load_config({**base, "CXG_CHILD_UID_RANGE": "0-9"})
    with pytest.raises(ConfigError, match="CXG_CHILD_ISOLATION must be auto, required or off"):
        load_config({**base, "CXG_CHILD_ISOLATION": "maybe"})
    config = load_config(base)
    assert (config.child_isolation, config.child_uid_range) == ("auto", (100000, 165535))


def test_capabilities_are_read_from_proc_status() -> None:
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t00000000000000e3\n"
    assert effective_capabilities(status) == 0xE3
    assert missing_capabilities(0xE3) == []
    assert missing_capabilities(0xE3 & ~(1 << 1)) == ["DAC_OVERRIDE"]
    assert missing_capabilities(0) == ["CHOWN", "DAC_OVERRIDE", "KILL", "SETGID", "SETUID"]
    assert effective_capabilities("Name:\tx\n") == 0


def test_without_capabilities_auto_falls_back_with_one_warning_and_required_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(isolation, "_own_capabilities", lambda: ALL_FIVE & ~(1 << 7))
    with structlog.testing.capture_logs() as logs:
        chosen = ChildIsolation.from_settings(IsolationMode.AUTO, UidRange(100000, 100009))
    assert chosen.enabled is False and chosen.allocate() is None
    assert [entry["event"] for entry in logs] == ["isolation.unavailable"]
    assert "SETUID" in logs[0]["detail"]
    with pytest.raises(IsolationError, match=r"CXG_CHILD_ISOLATION=required.*SETUID"):
        ChildIsolation.from_settings(IsolationMode.REQUIRED, UidRange(100000, 100009))


def test_off_never_isolates_and_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "_own_capabilities", lambda: ALL_FIVE)
    with structlog.testing.capture_logs() as logs:
        chosen = ChildIsolation.from_settings(IsolationMode.OFF, UidRange(100000, 100009))
    assert chosen.enabled is False
    assert [entry["event"] for entry in logs] == ["isolation.off"]


def test_a_range_holding_the_gateways_own_uid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "_own_capabilities", lambda: ALL_FIVE)
    # As if the gateway ran as uid 100003 (with the capabilities): a range holding it is refused.
    monkeypatch.setattr(os, "geteuid", lambda: 100003)
    with pytest.raises(IsolationError, match="contains the gateway's own uid"):
        ChildIsolation.from_settings(IsolationMode.AUTO, UidRange(100000, 100009))


def test_allocation_is_unique_round_robin_and_bounded() -> None:
    pool = ChildIsolation(True, UidRange(500000, 500002))
    first, second, third = pool.allocate(), pool.allocate(), pool.allocate()
    assert [i.uid for i in (first, second, third) if i] == [500000, 500001, 500002]
    assert first == ChildIdentity(uid=500000, gid=500000)
    with pytest.raises(IsolationError, match="every uid of CXG_CHILD_UID_RANGE"):
        pool.allocate()
    # A freed uid is handed out again only after the ones not used for longer.
    pool._live.discard(500001)
    pool._live.discard(500000)
    assert pool.allocate() == ChildIdentity(500000, 500000)
    assert pool.allocate() == ChildIdentity(500001, 500001)


def test_spawn_options_drop_every_supplementary_group() -> None:
    assert ChildIdentity(7, 7).spawn_options() == {"user": 7, "group": 7, "extra_groups": []}


async def test_reaping_refuses_anything_but_a_child_uid() -> None:
    pool = ChildIsolation(True, UidRange(500000, 500002))
    for uid in (0, os.geteuid(), 499999):
        with pytest.raises(IsolationError, match="refusing to reap"):
            await pool.release(ChildIdentity(uid, uid), Path("/nonexistent"))


def test_an_unpassable_directory_above_the_root_is_named(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "inside").mkdir(parents=True)
    closed.chmod(0o700)
    assert untraversable_ancestor(closed / "inside") in (closed, *closed.parents)
    closed.chmod(0o711)
    blocked = untraversable_ancestor(closed / "inside")
    assert blocked is None or blocked in closed.parents
    if os.geteuid() == 0:
        # Root runs get a passable base temp directory (conftest.py): nothing above is closed.
        assert blocked is None


def test_secret_files_replace_their_variables(tmp_path: Path) -> None:
    path = tmp_path / "hmac"
    path.write_text("file-secret\n")
    path.chmod(0o400)
    resolved = resolve_secret_files({"CXG_INBOUND_HMAC_SECRET_FILE": str(path), "OTHER": "x"})
    assert resolved == {"CXG_INBOUND_HMAC_SECRET": "file-secret", "OTHER": "x"}
    config = load_config({"CXG_INBOUND_HMAC_SECRET_FILE": str(path)})
    assert config.inbound_hmac_secret is not None
    assert config.inbound_hmac_secret.reveal() == "file-secret"


def test_a_loose_missing_or_doubled_secret_file_is_refused_without_its_content(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin"
    path.write_text("loose-content")
    for mode in (0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(ConfigError) as refused:
            load_config({"CXG_INBOUND_HMAC_SECRET": "s", "CXG_ADMIN_SECRET_FILE": str(path)})
        assert f"{mode:04o}" in str(refused.value) and "loose-content" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"CXG_ADMIN_SECRET_FILE names .* cannot be read"):
        load_config({"CXG_INBOUND_HMAC_SECRET": "s", "CXG_ADMIN_SECRET_FILE": str(tmp_path / "x")})
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="both CXG_ADMIN_SECRET and CXG_ADMIN_SECRET_FILE"):
        load_config(
            {
                "CXG_INBOUND_HMAC_SECRET": "s",
                "CXG_ADMIN_SECRET": "v",
                "CXG_ADMIN_SECRET_FILE": str(path),
            }
        )


async def test_mint_token_reads_the_hmac_secret_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "hmac"
    path.write_text("minting-secret\n")
    path.chmod(0o400)
    env = base_env(CXG_INBOUND_HMAC_SECRET_FILE=str(path))
    result = await run_cli(["mint-token", "--workspace", "ws1"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == mint_hmac_token(b"minting-secret", "ws1")
    path.chmod(0o644)
    result = await run_cli(["mint-token", "--workspace", "ws1"], env)
    assert result.returncode == 2
    assert "CXG_INBOUND_HMAC_SECRET_FILE" in one_line(result.stderr)


def test_reading_as_a_child_gets_only_what_the_child_could_read(tmp_path: Path) -> None:
    """The snapshot's reading scope: the child's file ids in this thread, root elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("needs root to take a child's file ids")
    uid = 4_100_000 + os.getpid() % 1000
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o400)
    own = tmp_path / "own"
    own.write_text("the child's")
    own.chmod(0o600)
    os.chown(own, uid, uid)
    seen_elsewhere: list[str] = []
    go = threading.Event()

    def read_when_told() -> None:
        go.wait(30)
        seen_elsewhere.append(secret.read_text())

    # A thread that exists already (the event loop, trio's other workers) keeps its ids.
    other = threading.Thread(target=read_when_told)
    other.start()
    with filesystem_identity(uid, uid):
        with pytest.raises(PermissionError):
            secret.read_text()
        assert own.read_text() == "the child's"
        go.set()
        other.join(30)
    assert seen_elsewhere == ["root only"]  # other threads kept the gateway's ids
    assert secret.read_text() == "root only"  # and this one got them back


def test_a_uid_map_that_misses_the_range_is_seen_from_its_text() -> None:
    # The whole id space (the initial namespace) and the one-id map of `unshare -r`.
    assert mapped_ranges("         0          0 4294967295\n") == [(0, 4294967294)]
    assert mapped_ranges("         0       1000          1\n") == [(0, 0)]
    assert mapped_ranges("") == []


def test_a_checkout_under_a_private_directory_is_made_reachable_but_not_listable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "private"  # as `mktemp -d` makes it
    checkout = private / "checkout"
    (checkout / "gateway_tests").mkdir(parents=True)
    private.chmod(0o700)
    checkout_reach.open_the_way_down(checkout)
    assert private.stat().st_mode & 0o777 == 0o701  # others may pass, never list
    assert untraversable_ancestor(checkout / "gateway_tests") is None
    assert f"{private}: made searchable" in capsys.readouterr().out


def test_a_checkout_cloned_straight_into_a_private_directory_is_made_importable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `git clone … "$(mktemp -d)"`: the checkout itself is 0700. The child venv imports the
    # project from it, and Python's import lists the directory: o+x alone is not enough.
    checkout = tmp_path / "clone"
    (checkout / "gateway_tests").mkdir(parents=True)
    checkout.chmod(0o700)
    checkout_reach.open_the_way_down(checkout)
    assert checkout.stat().st_mode & 0o777 == 0o705
    assert untraversable_ancestor(checkout / "gateway_tests") is None
    assert f"{checkout}: made readable by other uids" in capsys.readouterr().out
