"""Let the child uids of a root run reach this checkout (search permission only, never listing).

Run as root, the daemon starts every child under a uid of its own (gateway/sessions/
isolation.py), and those children execute tools inside this checkout: the child venv's python,
the fake codex, the pinned real codex. A checkout under a private directory (``mktemp -d``
makes one 0700) is out of their reach, and every session would fail to start with "Permission
denied". ``make run``, ``make test`` and ``make bench`` call this first: each directory above the
checkout that others cannot pass through gets o+x, and says so; a directory that belongs to
someone else is left alone, with the reason. The checkout itself (a clone made straight into
``mktemp -d``) gets o+rx: the child venv imports the project from it (``.venv-child``'s ``.pth``
names the checkout), and Python lists a directory on its path to import from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gateway.sessions.isolation import untraversable_ancestor

CHECKOUT = Path(__file__).resolve().parents[1]


def main() -> None:
    """In a root run, open the way down to this checkout for the children's uids."""
    if os.geteuid() == 0:  # otherwise children run as this user: nothing to reach through
        open_the_way_down(CHECKOUT)


def open_the_way_down(checkout: Path) -> None:
    """Give o+x to every directory above ``checkout`` that lacks it and o+rx to ``checkout``
    itself, or say why it cannot be."""
    while (blocked := untraversable_ancestor(checkout)) is not None and blocked != checkout:
        _grant(
            blocked,
            0o001,
            refused="is not searchable by others, so the isolated children cannot reach this "
            "checkout; move the checkout or add o+x",
            done="made searchable by other uids (o+x, still not listable), so that the "
            "isolated children can run this checkout's tools",
        )
    if checkout.stat().st_mode & 0o005 != 0o005:
        _grant(
            checkout,
            0o005,
            refused="is not readable by others, so the isolated children cannot import this "
            "checkout's code; add o+rx to it",
            done="made readable by other uids (o+rx), so that the isolated children can "
            "import this checkout's code",
        )


def _grant(directory: Path, bits: int, *, refused: str, done: str) -> None:
    """Add the permission ``bits`` for others to ``directory`` (ours), saying so; exit
    saying ``refused`` when it belongs to someone else."""
    status = directory.stat()
    if status.st_uid != os.geteuid():
        sys.exit(f"{directory} (owner uid {status.st_uid}) {refused}")
    directory.chmod(status.st_mode & 0o7777 | bits)
    print(f"{directory}: {done}")


if __name__ == "__main__":
    main()
