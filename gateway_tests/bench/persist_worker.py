"""One save or restore of a CODEX_HOME through the gateway's persistence code, in its own process.

``python -m gateway_tests.bench.persist_worker save|restore ENDPOINT BUCKET WORKSPACE DIRECTORY``
prints one JSON line: ``seconds``, ``rss_before`` (bytes, after a warm-up request to the store)
and ``peak_rss`` (the process's high-water mark during the operation, reset just before it).
Nothing else runs in this process, so the growth is the persistence code's own.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import trio

from gateway.codex_home.persistence import Generation, Persistence
from gateway.config import RestoreLimits
from gateway.sessions.wiring import ARCHIVE_EXCLUDES
from gateway.store.s3 import S3ObjectStore
from gateway_tests.bench.common import KIB
from gateway_tests.s3_server import settings_for


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


async def _main(
    operation: str, endpoint: str, bucket: str, workspace: str, directory: Path
) -> None:
    store = S3ObjectStore(settings_for(endpoint, bucket))
    persistence = Persistence(
        store,
        RestoreLimits(max_total_bytes=16 << 30, max_entries=200_000),
        exclude=ARCHIVE_EXCLUDES,
    )
    try:
        # Warm up: the S3 client and its connection pool exist before the measurement.
        await store.head_generation("codex-app-gateway/warm-up.tar.gz")
        gc.collect()
        _reset_peak()
        rss_before = _self_kib("VmRSS")
        started = time.perf_counter()
        if operation == "save":
            generation = await persistence.save(workspace, directory, Generation(stored=None))
            stored = generation.size
        else:
            generation = await persistence.restore(workspace, directory)
            stored = generation.size
        seconds = time.perf_counter() - started
        peak = _self_kib("VmHWM")
    finally:
        await store.aclose()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before": rss_before * KIB,
                "peak_rss": peak * KIB,
                "stored_bytes": stored,
            }
        ),
        flush=True,
    )


def _self_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    operation, endpoint, bucket, workspace, directory = argv
    if operation not in ("save", "restore"):
        print("operation must be save or restore", file=sys.stderr)
        return 2
    trio.run(_main, operation, endpoint, bucket, workspace, Path(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
