"""Run inside a private network namespace: serve on ``:PORT`` and reach it over both families.

``python -m gateway_tests.dualstack_probe WORKDIR`` starts the real daemon with
``CXG_LISTEN_ADDR=:8086`` and ``CXG_METRICS_LISTEN_ADDR=:9090`` (the Go chart's form), asks
``/healthz`` and ``/metrics`` over ``[::1]`` and ``127.0.0.1``, and prints one JSON object with
the answers. Only ever run by ``test_listen.py`` under ``unshare -rn``: the namespace has
nothing but its own loopback, so a listener on every interface is reachable from nowhere else.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import httpx2
import trio

from gateway.config import load_config
from gateway.daemon import run_daemon
from gateway_tests.conftest import FAKES

TARGETS = {
    "main_v6": "http://[::1]:8086/healthz",
    "main_v4": "http://127.0.0.1:8086/healthz",
    "metrics_v6": "http://[::1]:9090/metrics",
    "metrics_v4": "http://127.0.0.1:9090/metrics",
}


async def probe(workdir: Path) -> dict[str, object]:
    """Serve, probe every target, stop; return what was seen."""
    config = load_config(
        {
            "CXG_INBOUND_HMAC_SECRET": "probe-secret",
            "CXG_TMP_ROOT": str(workdir / "sessions"),
            "CXG_LOCAL_STORE_DIR": str(workdir / "store"),
            "CXG_LISTEN_ADDR": ":8086",
            "CXG_METRICS_LISTEN_ADDR": ":9090",
            "CXG_CODEX_BIN": str(FAKES / "codex"),
            "CXG_LOG_FORMAT": "text",
        }
    )
    stop = trio.Event()
    seen: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        seen["urls"] = await nursery.start(partial(run_daemon, config, stop=stop))
        async with httpx2.AsyncClient(timeout=10) as http:
            for name, url in TARGETS.items():
                try:
                    seen[name] = (await http.get(url)).status_code
                except httpx2.HTTPError as exc:
                    seen[name] = f"{type(exc).__name__}: {exc}"
        stop.set()
    return seen


def main() -> None:
    """Entry point: print the probe's result as JSON on stdout."""
    result = trio.run(probe, Path(sys.argv[1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
