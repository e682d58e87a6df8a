"""placeholder."""

from __future__ import annotations

from gateway_tests.bench.common import Options, Results


async def run(opts: Options, results: Results) -> None:
    results.note("persistence: not implemented yet")
