"""A stand-in daemon for the keeper's tests: a process that opens a deadman and pets it.

``python -m gateway_tests.deadman_host --first S --pet-every S --seconds-left S
[--watch KEY:PGID[:UID]]… [--uid-range FIRST-LAST]`` opens ``open_deadman`` (first deadline
``--first`` seconds ahead), watches the given process groups, then pets every ``--pet-every``
seconds (never, when 0). It prints JSON lines on stdout: ``{"keeper": PID}`` once the keeper is
ready, ``{"fired": true}`` the first time the keeper reports that it fired. The tests signal this
process (SIGSTOP, SIGKILL) as they would the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys

import structlog
import trio

from gateway.replicas.deadman import open_deadman
from gateway.sessions.isolation import UidRange


def _say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _host(args: argparse.Namespace) -> None:
    uid_range = None
    if args.uid_range:
        first, last = args.uid_range.split("-")
        uid_range = UidRange(int(first), int(last))
    async with open_deadman(
        first_deadline=trio.current_time() + args.first, uid_range=uid_range
    ) as deadman:
        for spec in args.watch:
            key, pgid, *uid = spec.split(":")
            deadman.watch(key, pgid=int(pgid), uid=int(uid[0]) if uid else None)
        _say({"keeper": deadman.keeper_pid})

        async def report_fired() -> None:
            await deadman.fired.wait()
            _say({"fired": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report_fired)
            while args.pet_every > 0:
                deadman.pet(args.seconds_left)
                await trio.sleep(args.pet_every)
            await trio.sleep_forever()


def main() -> None:
    """Parse the arguments and host the deadman until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--first", type=float, required=True)
    parser.add_argument("--pet-every", type=float, default=0.0)
    parser.add_argument("--seconds-left", type=float, default=1.0)
    parser.add_argument("--watch", action="append", default=[])
    parser.add_argument("--uid-range", default="")
    # stdout carries the reports; the deadman's own log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    trio.run(_host, parser.parse_args())


if __name__ == "__main__":
    main()
