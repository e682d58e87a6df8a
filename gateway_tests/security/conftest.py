"""The security suite's counts: every hostile attempt and every refusal, printed at the end.

Recorded like the reliability suite's (``gateway_tests/reliability/``): a ``counts`` fixture per
test, and a "security counts" section in the terminal summary (what ``docs/security.md``
quotes).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway_tests.reliability.support import CountsRecorder, write_counts

#: Counts of every security test of this run, by test id.
security_counts: dict[str, dict[str, Any]] = {}


class SecurityCounts(CountsRecorder):
    """A ``CountsRecorder`` kept apart from the reliability suite's."""

    def __init__(self, nodeid: str) -> None:
        self.values = security_counts.setdefault(nodeid, {})


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> SecurityCounts:
    """Record a test's attempts and refusals under its name."""
    return SecurityCounts(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print every security test's counts at the end of the run."""
    write_counts(terminalreporter, "security counts", security_counts)
