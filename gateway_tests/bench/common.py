"""Shared pieces of the benchmarks: statistics, result records, /proc readings, small helpers."""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench-results"
KIB = 1024
MIB = 1024 * KIB


@attrs.define
class Options:
    """What the command line asked for."""

    quick: bool
    work_dir: Path
    reps: int = 3


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``samples``."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@attrs.define
class Figure:
    """One measured figure over the repetitions: median and min-max of per-repetition values."""

    section: str
    name: str
    unit: str
    values: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "values": self.values,
            "note": self.note,
        }


@attrs.define
class Target:
    """A target from the issue and whether this run met it."""

    name: str
    wanted: str
    measured: str
    met: bool | None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Results:
    """Everything one run produced."""

    figures: list[Figure] = attrs.Factory(list)
    targets: list[Target] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    sections_run: list[str] = attrs.Factory(list)
    # Sections that raised: their figures are missing or partial.
    failed: list[str] = attrs.Factory(list)
    seconds: dict[str, float] = attrs.Factory(dict)

    def add(
        self, section: str, name: str, unit: str, values: Sequence[float], note: str = ""
    ) -> Figure:
        figure = Figure(section, name, unit, [float(v) for v in values], note)
        self.figures.append(figure)
        return figure

    def find(self, section: str, name: str) -> Figure | None:
        for figure in self.figures:
            if figure.section == section and figure.name == name:
                return figure
        return None

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)


def ratio_values(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repetition ratios (repetitions are paired: they ran back to back)."""
    return [n / d if d else float("nan") for n, d in zip(numerators, denominators, strict=False)]


def difference_values(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repetition differences ``a - b``."""
    return [x - y for x, y in zip(a, b, strict=False)]


# --- /proc -----------------------------------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``."""
    return proc_status_kib(pid, "VmRSS") * KIB


def private_bytes(pid: int) -> int:
    """Private (unshared) resident memory of ``pid`` from ``smaps_rollup``."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total * KIB


def mem_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KIB
    return 0


def mem_total_bytes() -> int:
    """``MemTotal`` from ``/proc/meminfo``."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * KIB
    return 0


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/*/stat``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; fields follow the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by ``pid``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` (synchronously) until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def fmt_value(value: float, unit: str) -> str:
    """A compact human rendering of ``value`` in ``unit``."""
    if value != value:  # NaN
        return "n/a"
    if unit in ("ratio", "x"):
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
