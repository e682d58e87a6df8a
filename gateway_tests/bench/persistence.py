"""Persistence: save and restore of a CODEX_HOME against moto's S3 server vs ``tar czf/xzf``.

Homes of 10 MB, 100 MB and 1 GB: half random bytes (incompressible: attachments, SQLite pages
of binary data), half text made of random words (compressible about 3:1, like rollouts), plus
a few hundred small files. Each save and restore runs in its own process (``persist_worker``)
that does nothing else, so its peak RSS growth is the persistence code's own. The baselines
are GNU tar with gzip on the same directory (``tar czf`` to a local file, ``tar xzf`` from it),
with their peak RSS from ``wait4``. Throughput is uncompressed home bytes per second.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import trio

from gateway_tests.bench.common import (
    MIB,
    Options,
    Results,
    children_of,
    proc_status_kib,
    ratio_values,
)
from gateway_tests.bench.procs import running_moto
from gateway_tests.s3_server import BUCKET, REGION

SECTION = "persistence"
SIZES_FULL = ((10 * MIB, "10 MB"), (100 * MIB, "100 MB"), (1024 * MIB, "1 GB"))
SIZES_QUICK = ((10 * MIB, "10 MB"), (30 * MIB, "30 MB"))
WORKER_TIMEOUT = 900
# A 1 GB save takes minutes (see docs/benchmarks.md): one repetition at that size keeps
# `make bench` near 20 minutes; smaller homes get the usual repetitions.
LARGE_HOME = 512 * MIB
LARGE_HOME_REPS = 1


def make_home(root: Path, total: int, seed: int = 7) -> int:
    """Fill ``root`` with ``total`` bytes: half random, half compressible text, small files."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(2000)
    ]
    small_total = min(total // 20, 8 * MIB)
    big_file = max(MIB, min(16 * MIB, total // 16))
    random_total = (total - small_total) // 2
    text_total = total - small_total - random_total
    written = 0
    (root / "sessions" / "2026" / "11").mkdir(parents=True, exist_ok=True)
    (root / "attachments").mkdir(parents=True, exist_ok=True)
    (root / "small").mkdir(parents=True, exist_ok=True)
    index = 0
    remaining = random_total
    while remaining > 0:
        size = min(big_file, remaining)
        (root / "attachments" / f"blob-{index:05d}.bin").write_bytes(os.urandom(size))
        remaining -= size
        written += size
        index += 1
    # Text: a 1 MiB block of random words, varied per file, written repeatedly.
    remaining = text_total
    index = 0
    while remaining > 0:
        size = min(big_file, remaining)
        block = " ".join(rng.choice(words) for _ in range(200_000)).encode()[:MIB]
        with (root / "sessions" / "2026" / "11" / f"rollout-{index:05d}.jsonl").open("wb") as f:
            left = size
            line = 0
            while left > 0:
                piece = (f'{{"line":{line},"text":"'.encode() + block)[: min(MIB, left)]
                f.write(piece)
                left -= len(piece)
                line += 1
        remaining -= size
        written += size
        index += 1
    remaining = small_total
    index = 0
    while remaining > 0:
        size = min(rng.randint(512, 32 * 1024), remaining)
        (root / "small" / f"f-{index:05d}.json").write_bytes(
            os.urandom(size // 2) + b"x" * (size - size // 2)
        )
        remaining -= size
        written += size
        index += 1
    return written


def _worker(operation: str, endpoint: str, workspace: str, directory: Path) -> dict[str, float]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway_tests.bench.persist_worker",
            operation,
            endpoint,
            BUCKET,
            workspace,
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"persist_worker {operation} failed: {completed.stderr[-2000:]}")
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _timed_tar(argv: list[str]) -> tuple[float, int]:
    """Run tar; its wall seconds and the peak RSS (bytes) of its largest process.

    ``wait4``'s ``ru_maxrss`` would report this (large) process's RSS at fork time, since Linux
    keeps the high-water mark across ``exec``; so ``VmHWM`` of tar and its gzip child is read
    from ``/proc`` every 20 ms instead (it only grows, so the last reading is the peak).
    """
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    peaks: dict[int, int] = {}
    deadline = time.monotonic() + WORKER_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        for pid in (process.pid, *children_of(process.pid)):
            peaks[pid] = max(peaks.get(pid, 0), proc_status_kib(pid, "VmHWM") * 1024)
        time.sleep(0.02)
    if process.poll() is None:
        process.kill()
    process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv[:2]} exited {process.returncode}")
    return seconds, max(peaks.values(), default=0)


def _boto(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _run_sync(opts: Options, results: Results) -> None:
    work = opts.work_dir / SECTION
    work.mkdir(parents=True, exist_ok=True)
    sizes = SIZES_QUICK if opts.quick else SIZES_FULL
    with running_moto(work / "moto.log") as endpoint:
        s3 = _boto(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for total, label in sizes:
            home = work / f"home-{label.replace(' ', '')}"
            home.mkdir(parents=True)
            started = time.monotonic()
            size = make_home(home, total)
            print(
                f"  {label}: made a {size / MIB:.0f} MiB home in {time.monotonic() - started:.0f} s"
            )
            figures: dict[str, list[float]] = {
                k: []
                for k in (
                    "save s",
                    "restore s",
                    "tar czf s",
                    "tar xzf s",
                    "save rss",
                    "restore rss",
                    "tar czf rss",
                    "tar xzf rss",
                    "stored",
                )
            }
            reps = min(opts.reps, LARGE_HOME_REPS) if total > LARGE_HOME else opts.reps
            if reps < opts.reps:
                results.note(f"persistence: {label} measured with {reps} repetition(s) only")
            for rep in range(reps):
                workspace = f"bench-{label.replace(' ', '')}-{rep}"
                saved = _worker("save", endpoint, workspace, home)
                figures["save s"].append(saved["seconds"])
                figures["save rss"].append(saved["peak_rss"] - saved["rss_before"])
                figures["stored"].append(saved["stored_bytes"] or 0)
                tarball = work / "baseline.tar.gz"
                seconds, peak = _timed_tar(["tar", "czf", str(tarball), "-C", str(home), "."])
                figures["tar czf s"].append(seconds)
                figures["tar czf rss"].append(peak)
                target = work / f"restored-{rep}"
                restored = _worker("restore", endpoint, workspace, target / "codex-home")
                figures["restore s"].append(restored["seconds"])
                figures["restore rss"].append(restored["peak_rss"] - restored["rss_before"])
                shutil.rmtree(target, ignore_errors=True)
                untarred = work / f"untarred-{rep}"
                untarred.mkdir()
                seconds, peak = _timed_tar(["tar", "xzf", str(tarball), "-C", str(untarred)])
                figures["tar xzf s"].append(seconds)
                figures["tar xzf rss"].append(peak)
                shutil.rmtree(untarred, ignore_errors=True)
                tarball.unlink(missing_ok=True)
                s3.delete_object(Bucket=BUCKET, Key=f"codex-app-gateway/{workspace}.tar.gz")
                print(
                    f"    rep {rep + 1} save {size / MIB / figures['save s'][-1]:6.1f} MiB/s "
                    f"(tar czf {size / MIB / figures['tar czf s'][-1]:6.1f}), restore "
                    f"{size / MIB / figures['restore s'][-1]:6.1f} MiB/s "
                    f"(tar xzf {size / MIB / figures['tar xzf s'][-1]:6.1f}); peak RSS growth "
                    f"save {figures['save rss'][-1] / MIB:.1f} MiB, restore "
                    f"{figures['restore rss'][-1] / MIB:.1f} MiB",
                    flush=True,
                )
            shutil.rmtree(home, ignore_errors=True)
            note = f"{size / MIB:.0f} MiB home; MiB/s of home data"
            for op, baseline in (("save", "tar czf"), ("restore", "tar xzf")):
                rate = [size / MIB / s for s in figures[f"{op} s"]]
                base = [size / MIB / s for s in figures[f"{baseline} s"]]
                results.add(SECTION, f"{op} throughput, {label}", "MiB/s", rate, note)
                results.add(SECTION, f"{baseline} throughput, {label}", "MiB/s", base, note)
                results.add(
                    SECTION,
                    f"{op} / {baseline} throughput, {label}",
                    "ratio",
                    ratio_values(rate, base),
                )
                results.add(
                    SECTION,
                    f"{op} peak RSS growth, {label}",
                    "MiB",
                    [v / MIB for v in figures[f"{op} rss"]],
                    "VmHWM during the operation - VmRSS before it, in a process doing only that",
                )
                results.add(
                    SECTION,
                    f"{baseline} peak RSS, {label}",
                    "MiB",
                    [v / MIB for v in figures[f"{baseline} rss"]],
                    "largest process of the tar pipeline (tar or gzip), absolute",
                )
            results.add(
                SECTION,
                f"archive size / home size, {label}",
                "ratio",
                [v / size for v in figures["stored"]],
            )


async def run(opts: Options, results: Results) -> None:
    await trio.to_thread.run_sync(_run_sync, opts, results)
