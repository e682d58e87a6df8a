"""A session's private directories under ``CXG_TMP_ROOT/<workspace>``, and their fate."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import attrs

from gateway.auth.tokens import workspace_dir_name


@attrs.define
class SessionDirectories:
    """A session's private directories under ``CXG_TMP_ROOT/<workspace>``."""

    root: Path
    codex_home: Path
    runtime: Path
    home: Path
    # Where the Go service kept this workspace's CODEX_HOME (<CXG_TMP_ROOT>/<workspace>): the
    # archive records rollout paths there, so a Go gateway restoring it resumes threads.
    go_codex_home: Path | None = None

    @classmethod
    def for_workspace(cls, tmp_root: Path, workspace_id: str) -> SessionDirectories:
        """The layout for ``workspace_id``."""
        root = tmp_root / workspace_dir_name(workspace_id)
        return cls(
            root=root,
            codex_home=root / "codex-home",
            runtime=root / "run",
            home=root / "home",
            go_codex_home=Path(os.path.join(tmp_root, workspace_id)),
        )

    def create(self) -> None:
        """Create the directories 0700 whatever the umask (codex and its tools run as us)."""
        for path in (self.root, self.codex_home, self.runtime, self.home):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)

    def remove(self) -> None:
        """Delete everything (only after a successful save)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def set_aside(self) -> Path:
        """Move the directory to ``<tmp root>/.orphaned/`` for an operator; never delete it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.root.parent / ".orphaned" / f"{self.root.name}-{stamp}-{time.time_ns()}"
        aside.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.rename(aside)
        return aside
