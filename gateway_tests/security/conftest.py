"""The security suite records its counts like the reliability suite (printed at the end)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway_tests.reliability.support import CountsRecorder, recorded_counts


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> CountsRecorder:
    """Record a scenario's counts under the test's name (printed in the terminal summary)."""
    return CountsRecorder(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the security scenarios' counts at the end of the run."""
    ours = {k: v for k, v in recorded_counts.items() if "/security/" in k}
    if not ours:
        return
    write: Callable[..., None] = terminalreporter.write_line
    terminalreporter.section("security counts")
    for nodeid, values in ours.items():
        write(f"{nodeid}: {', '.join(f'{key}={value}' for key, value in values.items())}")
