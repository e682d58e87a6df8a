"""Make a restored CODEX_HOME valid at its new path.

codex records absolute rollout paths in its state database (``state_<n>.sqlite``, table
``threads``, column ``rollout_path``). A home restored under another directory — another
``CXG_TMP_ROOT``, or an archive written by the Go service, whose homes lived at
``/tmp/codex-app-gateway/<workspace>`` — lists its threads but cannot resume them, because
every recorded path points into the old directory. Before the child starts, the recorded paths
are moved to the new home. Only rows that point into a ``sessions/`` or ``archived_sessions/``
directory of some other home are touched; a database without that table or column (another
codex version) is left alone.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_ROLLOUT_DIRS = ("/sessions/", "/archived_sessions/")
# (table, column) pairs that hold paths of rollout files, in the schemas codex 0.169.0 writes.
_PATH_COLUMNS = (
    ("threads", "rollout_path"),
    ("rollout_migration_skipped_rollouts", "rollout_path"),
)


def old_home_of(rollout_path: str) -> str | None:
    """The CODEX_HOME a recorded rollout path was written under, if it has the usual shape."""
    for marker in _ROLLOUT_DIRS:
        index = rollout_path.rfind(marker)
        if index > 0:
            return rollout_path[:index]
    return None


def _columns(connection: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in connection.execute(f"PRAGMA table_info('{table}')")}


def relocate_state_database(database: Path, new_home: Path) -> int:
    """Rewrite rollout paths in one state database to ``new_home``; return rows changed."""
    target = str(new_home)
    changed = 0
    connection = sqlite3.connect(database, timeout=10)
    try:
        with connection:
            for table, column in _PATH_COLUMNS:
                if column not in _columns(connection, table):
                    continue
                rows = connection.execute(f"SELECT DISTINCT {column} FROM {table}").fetchall()
                homes = {old_home_of(value) for (value,) in rows if isinstance(value, str)}
                for old in sorted(h for h in homes if h and h != target):
                    cursor = connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (target, len(old) + 1, len(old) + 1, old + "/"),
                    )
                    changed += cursor.rowcount
    finally:
        connection.close()
    return changed


def relocate_codex_home(codex_home: Path) -> int:
    """Point every state database of ``codex_home`` at ``codex_home``; return rows changed."""
    total = 0
    for database in sorted(codex_home.glob("state_*.sqlite")):
        try:
            changed = relocate_state_database(database, codex_home)
        except sqlite3.Error as exc:
            # A database codex cannot use either; codex rebuilds its index from the rollouts.
            log.warning("codex_home.relocate_failed", database=database.name, error=str(exc))
            continue
        if changed:
            log.info("codex_home.relocated", database=database.name, rows=changed)
        total += changed
    return total
