"""A restored home's recorded rollout paths are moved to where the home now is."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.codex_home.relocate import old_home_of, relocate_codex_home

GO_HOME = "/tmp/codex-app-gateway/ws_a"


def _state_db(home: Path, rows: list[str]) -> Path:
    database = home / "state_5.sqlite"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE threads (id TEXT, rollout_path TEXT, cwd TEXT)")
        connection.executemany(
            "INSERT INTO threads VALUES (?, ?, ?)",
            [(str(i), path, "/work") for i, path in enumerate(rows)],
        )
    return database


def _paths(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [
            row[0] for row in connection.execute("SELECT rollout_path FROM threads ORDER BY id")
        ]


def test_old_home_is_what_precedes_the_sessions_directory() -> None:
    assert old_home_of(f"{GO_HOME}/sessions/2026/05/15/rollout-x.jsonl") == GO_HOME
    assert old_home_of(f"{GO_HOME}/archived_sessions/rollout-x.jsonl") == GO_HOME
    assert old_home_of("rollout-x.jsonl") is None


def test_paths_from_the_go_service_home_move_to_the_new_home(tmp_path: Path) -> None:
    database = _state_db(
        tmp_path,
        [
            f"{GO_HOME}/sessions/2026/05/15/rollout-a.jsonl",
            f"{GO_HOME}/archived_sessions/rollout-b.jsonl",
        ],
    )
    assert relocate_codex_home(tmp_path) == 2
    assert _paths(database) == [
        f"{tmp_path}/sessions/2026/05/15/rollout-a.jsonl",
        f"{tmp_path}/archived_sessions/rollout-b.jsonl",
    ]
    # Already where it belongs: nothing to do the second time.
    assert relocate_codex_home(tmp_path) == 0


def test_unrelated_rows_and_unknown_schemas_are_left_alone(tmp_path: Path) -> None:
    database = _state_db(tmp_path, ["relative/rollout.jsonl"])
    other = tmp_path / "state_9.sqlite"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE something_else (rollout_path TEXT)")
        connection.execute("INSERT INTO something_else VALUES ('/old/sessions/x.jsonl')")
    assert relocate_codex_home(tmp_path) == 0
    assert _paths(database) == ["relative/rollout.jsonl"]


def test_a_corrupt_database_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "state_5.sqlite").write_bytes(b"not a database at all" * 100)
    assert relocate_codex_home(tmp_path) == 0


def test_a_snapshot_records_the_go_home_in_its_copy_and_leaves_the_live_database(
    tmp_path: Path,
) -> None:
    from gateway.codex_home.snapshot import ExcludePolicy, snapshot_entries

    home = tmp_path / "ws_a" / "codex-home"
    (home / "sessions").mkdir(parents=True)
    live = _state_db(home, [f"{home}/sessions/2026/05/15/rollout-a.jsonl"])
    go_home = tmp_path / "ws_a-go"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    archived: list[str] = []
    for entry in snapshot_entries(home, ExcludePolicy(), scratch, recorded_home=go_home):
        if entry.name == "state_5.sqlite":
            assert entry.source is not None
            archived = _paths(entry.source)
    assert archived == [f"{go_home}/sessions/2026/05/15/rollout-a.jsonl"]
    assert _paths(live) == [f"{home}/sessions/2026/05/15/rollout-a.jsonl"]
