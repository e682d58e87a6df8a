"""The reliability suite's switches: soak selection and the short/long scale.

The ``soak`` marker itself is registered in ``pyproject.toml``.

``make test`` runs the short version of every scenario; ``make soak`` (``CXG_SOAK=1 pytest
gateway_tests/reliability -m soak``) runs the long ones. Soak tests are *deselected*, not
skipped, unless ``CXG_SOAK=1``, so a normal run reports no skips for them.

Every scenario records its counts with the ``counts`` fixture; they are printed at the end of
the run under "reliability counts" (what ``docs/reliability.md`` quotes).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway_tests.reliability.support import (
    SOAK,
    CountsRecorder,
    Scale,
    recorded_counts,
    write_counts,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect soak tests unless ``CXG_SOAK=1``."""
    if SOAK:
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (dropped if item.get_closest_marker("soak") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=["short", pytest.param("soak", marks=pytest.mark.soak)])
def scale(request: pytest.FixtureRequest) -> Scale:
    """Each scenario that takes it runs twice: short (``make test``) and soak (``make soak``)."""
    return Scale(soak=request.param == "soak")


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> CountsRecorder:
    """Record a scenario's counts under the test's name (printed in the terminal summary)."""
    return CountsRecorder(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print every scenario's counts at the end of the run."""
    write_counts(terminalreporter, "reliability counts", recorded_counts)
