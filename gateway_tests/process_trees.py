"""Test helpers for session process trees: a fake codex that starts grandchildren, and checks.

Every check looks only at processes the test itself caused (by pid and start time), never at
the machine's other processes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from gateway.sessions.process_tree import read_stat
from gateway_tests.fakes.launchers import FAKE_CODEX_SCRIPT, fake_codex_python

# What the tree launcher starts before it becomes the fake codex, by name.
GRANDCHILDREN = ("ignores_term", "own_session", "orphan")


def make_tree_launcher(directory: Path, pid_file: Path, *, last_words: str | None = None) -> Path:
    """A codex launcher that starts three grandchildren, then runs the fake codex.

    * ``ignores_term``: a ``sleep`` in the child's process group that ignores SIGTERM;
    * ``own_session``: a ``sleep`` that called ``setsid`` (it left the group and the session);
    * ``orphan``: a ``setsid`` ``sleep`` whose parent exited at once (double fork).

    Their pids are appended to ``pid_file`` as ``name pid`` lines. The launcher ``exec``s the
    fake codex, so the grandchildren are children of the gateway's child. With ``last_words``
    the fake runs as a child of the launcher instead, and when it ends (killed, or stopped by
    the group's SIGTERM) the launcher writes a flood of lines and then ``last_words`` to stderr
    and exits 101: what a dying child writes last.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # The child may run under a uid of its own (isolation): it must be able to append here.
    pid_file.touch()
    pid_file.chmod(0o666)
    path = directory / "codex-tree"
    out = shlex.quote(str(pid_file))
    fake = f"{shlex.quote(str(fake_codex_python()))} {shlex.quote(str(FAKE_CODEX_SCRIPT))}"
    quiet = "</dev/null >/dev/null 2>&1"
    lines = [
        "#!/bin/sh",
        # The daemon's start-up check runs `codex --version`: no tree for that one.
        f'if [ "$1" = "--version" ]; then exec {fake} "$@"; fi',
        f"sh -c 'trap \"\" TERM; exec sleep 1000' {quiet} &",
        f'echo "ignores_term $!" >> {out}',
        f"setsid sleep 1000 {quiet} &",
        f'echo "own_session $!" >> {out}',
        f"sh -c 'setsid sleep 1000 {quiet} & echo \"orphan $!\" >> {out}'",
    ]
    if last_words is None:
        lines.append(f'exec {fake} "$@"')
    else:
        lines += [
            # SIGTERM (a stop) reaches the fake through the group; the launcher outlives it.
            "trap true TERM",
            f'{fake} "$@"',
            'i=0; while [ $i -lt 20000 ]; do echo "noise line $i" >&2; i=$((i+1)); done',
            f"echo {shlex.quote(last_words)} >&2",
            "exit 101",
        ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def read_pids(pid_file: Path) -> dict[str, tuple[int, int]]:
    """The launcher's grandchildren: name → (pid, start time), once all are written."""
    found: dict[str, tuple[int, int]] = {}
    if not pid_file.exists():
        return found
    for line in pid_file.read_text().splitlines():
        name, pid = line.split()
        stat = read_stat(int(pid))
        if stat is not None:
            found[name] = (int(pid), stat.start_time)
    return found


def is_running(pid: int, start_time: int) -> bool:
    """Whether the process that started at ``start_time`` is still there (and not a zombie)."""
    stat = read_stat(pid)
    return stat is not None and stat.alive and stat.start_time == start_time


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of all its threads, and theirs), from /proc.

    A process that exits meanwhile is simply not listed.
    """
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop(0)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child != pid and child not in found:
                    found.append(child)
                    pending.append(child)
    return found


def secrets_in_processes(pid: int, secrets: list[str]) -> list[str]:
    """``/proc/<pid>/{environ,cmdline}`` files of ``pid`` and below that hold one of ``secrets``."""
    found = []
    for process in (pid, *descendants(pid)):
        for name in ("environ", "cmdline"):
            try:
                data = Path(f"/proc/{process}/{name}").read_bytes()
            except OSError:
                continue  # a short-lived `cat` that has exited meanwhile
            if any(secret.encode() in data for secret in secrets):
                found.append(f"/proc/{process}/{name}")
    return found
