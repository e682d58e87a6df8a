"""Let the child uids of a root run reach this checkout (search permission only, never listing).

Run as root, the daemon starts every child under a uid of its own (gateway/sessions/
isolation.py), and those children execute tools inside this checkout: the child venv's python,
the fake codex, the pinned real codex. A checkout under a private directory (``mktemp -d``
makes one 0700) is out of their reach, and every session would fail to start with "Permission
denied". ``make run``, ``make test`` and ``make bench`` call this first: each directory above the
checkout that others cannot pass through gets o+x, and says so; a directory that belongs to
someone else is left alone, with the reason.
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
    """Give o+x to every directory above ``checkout`` that lacks it, or say why it cannot be."""
    while (blocked := untraversable_ancestor(checkout / "gateway_tests")) is not None:
        status = blocked.stat()
        if status.st_uid != os.geteuid():
            sys.exit(
                f"{blocked} (owner uid {status.st_uid}) is not searchable by others, so the "
                "isolated children cannot reach this checkout; move the checkout or add o+x"
            )
        blocked.chmod(status.st_mode & 0o7777 | 0o001)
        print(
            f"{blocked}: made searchable by other uids (o+x, still not listable), so that the "
            "isolated children can run this checkout's tools"
        )


if __name__ == "__main__":
    main()
