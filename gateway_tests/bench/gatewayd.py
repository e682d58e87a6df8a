"""The gateway daemon as the benchmarks run it: its own process, so its RSS and CPU are its own.

``python -m gateway_tests.bench.gatewayd`` is ``codex-app-gateway serve`` (configuration from
the environment, stop on SIGTERM, drain) plus two things the benchmarks need:

* the listening URLs are printed to stdout as one JSON line once the daemon serves;
* with ``CXG_BENCH_PROFILE=PATH`` the daemon runs under cProfile (stats written at exit);
* every client→child message goes through the operator's default access policy
  (``gateway/policy/``), as in production: its cost is part of every figure;
* with ``CXG_BENCH_PLACEMENT`` (JSON ``{"pod": NAME, "owners": {WS: [POD, PEER_ADDR, EPOCH]}}``)
  the daemon decides ownership from that fixed table (the hop benchmark's two pods: one owns
  the workspace, the other forwards to it);
* when ``CXG_BENCH_CHILDREN_FILE`` is set, every session's child (its ``ws://`` URL, capability
  token and pid) is recorded there as JSON, keyed by workspace, when it becomes ready. The
  direct and nginx paths of the relay benchmarks use it to reach the very child the gateway
  relays to. The token never leaves the benchmark's private run directory.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from gateway.config import load_config
from gateway.daemon import run_daemon
from gateway.logs import configure_logging
from gateway.replicas.placement import PeerOwner
from gateway.sessions import session as session_module
from gateway.sessions.child import ChildSpec, CodexChild, run_codex_child
from gateway_tests.replicas.hop_support import TablePlacement

CHILDREN_FILE_VAR = "CXG_BENCH_CHILDREN_FILE"
PLACEMENT_VAR = "CXG_BENCH_PLACEMENT"
# When set, the whole daemon runs under cProfile and the stats are dumped there at exit.
PROFILE_VAR = "CXG_BENCH_PROFILE"


def _install_child_recorder(path: Path) -> None:
    original = run_codex_child
    children: dict[str, dict[str, Any]] = {}

    class _Recording:
        def __init__(self, workspace: str, inner: trio.TaskStatus[CodexChild]) -> None:
            self._workspace = workspace
            self._inner = inner

        def started(self, child: CodexChild) -> None:
            children[self._workspace] = {
                "url": child.ws_url,
                "token": child.capability_token,
                "pid": child.pid,
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(children))
            os.replace(tmp, path)
            self._inner.started(child)

    async def recording_run_codex_child(
        spec: ChildSpec, *, task_status: trio.TaskStatus[CodexChild] = trio.TASK_STATUS_IGNORED
    ) -> int:
        workspace = spec.codex_home.parent.name
        return await original(spec, task_status=_Recording(workspace, task_status))  # type: ignore[arg-type]

    # The session module calls the name it imported; replace that one.
    session_module.run_codex_child = recording_run_codex_child  # type: ignore[attr-defined]


def _placement() -> TablePlacement | None:
    table = os.environ.get(PLACEMENT_VAR)
    if not table:
        return None
    loaded = json.loads(table)
    placement = TablePlacement(loaded["pod"])
    for workspace, (pod, peer_addr, epoch) in loaded["owners"].items():
        placement.owners[workspace] = PeerOwner(pod, peer_addr, int(epoch))
    return placement


async def _main() -> None:
    config = load_config(dict(os.environ))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            # The operator's default access policy is on, as in production.
            partial(run_daemon, config, placement=_placement())
        )
        print(json.dumps({"urls": urls, "pid": os.getpid()}), flush=True)


def main() -> int:
    children_file = os.environ.get(CHILDREN_FILE_VAR)
    if children_file:
        _install_child_recorder(Path(children_file))
    config = load_config(dict(os.environ))
    configure_logging(config.log_level, config.log_format)
    profile_path = os.environ.get(PROFILE_VAR)
    if not profile_path:
        trio.run(_main)
        return 0
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(trio.run, _main)
    finally:
        profiler.dump_stats(profile_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
