"""Writes ``go-format-home.tar.gz``: a CODEX_HOME archive shaped like the Go service's.

The Go gateway (``codexhome/s3.go``) walks the home with ``filepath.Walk``, skips the root,
builds each header with ``tar.FileInfoHeader`` and then sets ``hdr.Name`` to the path relative
to the root (so directories have no trailing slash and no name has a ``./`` prefix), writes
USTAR headers with whole-second times and the directory bit in the mode, copies regular file
contents, and gzips the lot with ``compress/gzip`` defaults (no name, mtime 0). Nothing is
excluded: SQLite files and their WAL go in as raw bytes.

Run ``python gateway_tests/data/make_go_fixture.py`` to regenerate; the output is deterministic.
"""

from __future__ import annotations

import gzip
import io
import sqlite3
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "go-format-home.tar.gz"
MTIME = 1767312000  # 2026-01-02T00:00:00Z
ROLLOUT = (
    "sessions/2026/01/02/rollout-2026-01-02T00-00-00-0199a1b2-0000-7000-8000-000000000001.jsonl"
)
C_ISDIR = 0o40000


def _sqlite_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state_5.sqlite"
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE threads (id TEXT PRIMARY KEY, title TEXT)")
        db.execute("INSERT INTO threads VALUES ('0199a1b2', 'from the Go gateway')")
        db.commit()
        db.close()
        return path.read_bytes()


def entries() -> list[tuple[str, bytes | None, int]]:
    """(name, content or None for a directory, permission bits) in ``filepath.Walk`` order."""
    return [
        ("config.toml", b'model = "gpt-5.5"\n', 0o644),
        ("history.jsonl", b'{"session_id":"0199a1b2","ts":1767312000,"text":"hi"}\n', 0o644),
        ("sessions", None, 0o755),
        ("sessions/2026", None, 0o755),
        ("sessions/2026/01", None, 0o755),
        ("sessions/2026/01/02", None, 0o755),
        (
            ROLLOUT,
            b'{"timestamp":"2026-01-02T00:00:00Z","type":"session_meta","payload":{}}\n',
            0o644,
        ),
        ("skills", None, 0o755),
        ("skills/hello.sh", b"#!/bin/sh\necho hello\n", 0o755),
        ("state_5.sqlite", _sqlite_bytes(), 0o644),
    ]


def build() -> bytes:
    """The fixture's bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content, mode in entries():
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.uid = info.gid = 1000
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = mode | C_ISDIR
                archive.addfile(info)
            else:
                info.mode = mode
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


if __name__ == "__main__":
    FIXTURE.write_bytes(build())
    print(f"wrote {FIXTURE}")
