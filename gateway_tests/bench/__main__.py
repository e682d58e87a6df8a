"""``python -m gateway_tests.bench [--quick] [--only SECTION,…]`` — see ``docs/benchmarks.md``."""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from gateway_tests.bench import coldstart, envmcp, hop, persistence, relay, report, scale, storm
from gateway_tests.bench.common import RESULTS_DIR, Options, Results

SECTIONS = {
    "relay": relay.run,
    "coldstart": coldstart.run,
    "scale": scale.run,
    "persistence": persistence.run,
    "storm": storm.run,
    "envmcp": envmcp.run,
    "hop": hop.run,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_tests.bench",
        description="Benchmarks of the gateway against baselines measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="a short pass (fewer samples, sizes)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of each interleaved measurement"
    )
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="do not rewrite docs/benchmarks.md (only full runs of every section do)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "bench.json", help="where the JSON goes"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: render the table, targets and docs again from a bench.json",
    )
    parser.add_argument(
        "--keep-work-dir", action="store_true", help="keep the scratch directory (logs)"
    )
    return parser.parse_args(argv)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(sections: list[str], opts: Options, results: Results) -> None:
    for name in sections:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            await SECTIONS[name](opts, results)
        except Exception as exc:  # one failing section must not lose the others' figures
            results.note(f"section {name} failed: {exc!r}")
            results.failed.append(name)
            import traceback

            traceback.print_exc()
        results.sections_run.append(name)
        results.seconds[name] = time.monotonic() - started
        print(f"== {name} done in {results.seconds[name]:.0f} s", flush=True)


def _render_again(args: argparse.Namespace) -> int:
    results, opts, info = report.load_json(args.from_json)
    report.evaluate_targets(results)
    print(report.table(results))
    report.write_json(results, opts, args.output, info)
    if not args.no_docs:
        _write_docs_if_complete(results, opts, info)
    return 0


def _write_docs_if_complete(
    results: Results, opts: Options, info: dict[str, Any] | None = None
) -> None:
    """Rewrite the generated block of docs/benchmarks.md from a full run in which every
    section ran to its end; say why not otherwise."""
    if opts.quick or set(results.sections_run) != set(SECTIONS):
        print("docs/benchmarks.md not updated: only a full run of every section rewrites it")
    elif results.failed:
        print("docs/benchmarks.md not updated: section(s) failed: " + ", ".join(results.failed))
    else:
        print(f"docs: {report.write_docs(results, opts, info)}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.from_json is not None:
        return _render_again(args)
    _raise_fd_limit()
    work_dir = Path(tempfile.mkdtemp(prefix="cxg-bench-", dir="/var/tmp"))
    # Each session's child runs under its own uid (gateway/sessions/isolation.py) and must be
    # able to pass through (not list) the directories above its CXG_TMP_ROOT.
    work_dir.chmod(0o711)
    opts = Options(quick=args.quick, work_dir=work_dir, reps=max(1, args.reps))
    results = Results()
    started = time.monotonic()
    try:
        trio.run(_run, sections, opts, results)
    finally:
        if args.keep_work_dir:
            print(f"scratch directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    results.seconds["total"] = time.monotonic() - started
    report.evaluate_targets(results)
    print()
    print(report.table(results))
    report.write_json(results, opts, args.output)
    print(f"\nJSON: {args.output}")
    if not args.no_docs:
        _write_docs_if_complete(results, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
