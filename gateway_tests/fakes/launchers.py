"""Per-test launchers for the fake codex.

The gateway builds its child's environment from a strict allow-list, so a test cannot steer the
fake through the gateway's own environment. Instead a test writes a small executable script with
:func:`make_fake_codex_launcher` and points ``CXG_CODEX_BIN`` (or ``--codex-bin``) at it; the
script exports the ``FAKE_CODEX_*`` knobs and execs the fake with the repository's virtualenv
python::

    bin_path = make_fake_codex_launcher(tmp_path, DELTA_MS="1", OUTBOUND_CAP="16")
    # bin_path is tmp_path / "codex"; it runs fake_codex.py with
    # FAKE_CODEX_DELTA_MS=1 and FAKE_CODEX_OUTBOUND_CAP=16 in its environment.

Knob names are given without the ``FAKE_CODEX_`` prefix (either case; a name that already has
the prefix is kept as is). The knobs themselves are documented in ``fake_codex.py``.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

FAKES_DIR = Path(__file__).resolve().parent
FAKE_CODEX_SCRIPT = FAKES_DIR / "fake_codex.py"
REPO_PYTHON = FAKES_DIR.parent.parent / ".venv" / "bin" / "python"
# The system python reading the venv's packages (Makefile), for children run under their own uids.
CHILD_PYTHON = FAKES_DIR.parent.parent / ".venv-child" / "bin" / "python"
KNOB_PREFIX = "FAKE_CODEX_"
_KNOB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def fake_codex_python() -> Path:
    """The interpreter that runs the fake: one child uids can reach, else the venv's."""
    if CHILD_PYTHON.exists():
        return CHILD_PYTHON
    return REPO_PYTHON if REPO_PYTHON.exists() else Path(sys.executable)


def knob_env(**knobs: str) -> dict[str, str]:
    """Map knob names (``DELTA_MS`` or ``delta_ms``) to their ``FAKE_CODEX_*`` variables."""
    env: dict[str, str] = {}
    for name, value in knobs.items():
        if not _KNOB_NAME.match(name):
            raise ValueError(f"invalid knob name: {name!r}")
        if not isinstance(value, str):
            raise TypeError(f"knob {name} must be a string, got {type(value).__name__}")
        key = name.upper()
        if not key.startswith(KNOB_PREFIX):
            key = KNOB_PREFIX + key
        env[key] = value
    return env


def make_fake_codex_launcher(directory: Path, **knobs: str) -> Path:
    """Write an executable sh launcher for the fake codex into `directory` and return its path.

    The first launcher in a directory is named ``codex``; later ones get ``codex-2``,
    ``codex-3``, … so a test can hold several differently configured launchers at once.
    The script uses absolute paths, so it works from any working directory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "codex"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"codex-{n}"
    lines = [
        "#!/bin/sh",
        "# Fake codex launcher for one test; knobs are documented in fake_codex.py.",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in knob_env(**knobs).items()]
    # Python invents LC_CTYPE under a C locale; tell the fake whether the caller really set it.
    lines.append('export FAKE_CODEX_LC_CTYPE_GIVEN="${LC_CTYPE+1}"')
    lines.append(
        f'exec {shlex.quote(str(fake_codex_python()))} {shlex.quote(str(FAKE_CODEX_SCRIPT))} "$@"'
    )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o755)
    return path
