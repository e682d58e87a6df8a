"""``docs/configuration.md`` and ``gateway.config.VARIABLES`` describe the same variables."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from gateway.config import VARIABLES

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
# The Go service's variables (reference/upstream-spec.md §1.1, plus the two serve flags' env).
UPSTREAM = {
    "CXG_LISTEN_ADDR",
    "CXG_CODEX_BIN",
    "CXG_TMP_ROOT",
    "CXG_IDLE_SHUTDOWN",
    "CXG_CAPTOKEN_TTL",
    "CXG_LOG_LEVEL",
    "CXG_S3_ENDPOINT",
    "CXG_S3_REGION",
    "CXG_S3_BUCKET",
    "CXG_S3_ACCESS_KEY_ID",
    "CXG_S3_SECRET_ACCESS_KEY",
    "CXG_S3_PATH_STYLE",
    "CXG_INBOUND_HMAC_SECRET",
    "CXG_EXEC_GATEWAY_URL",
    "CXG_EXEC_GATEWAY_INTERNAL_URL",
    "CXG_EXEC_GATEWAY_INTERNAL_SECRET",
    "CXG_CAPTOKEN_HMAC_SECRET",
    "CXG_MODEL_PROVIDER",
    "CXG_MODEL",
    "CXG_MODEL_PROVIDER_BASE_URL",
    "CXG_MODEL_PROVIDER_ENV_KEY",
    "CXG_MODEL_PROVIDER_WIRE_API",
    "CXG_CODEX_API_KEY",
    "CXG_PROJECT_TRUSTED_PATHS",
    "CXG_AGENTSERVER_INTERNAL_URL",
    "CXG_AGENTSERVER_INTERNAL_SECRET",
}
GROUPS = [
    "Listening",
    "Authentication",
    "S3 or a local directory",
    "Exec gateway",
    "Model",
    "Sessions",
    "WebSocket",
    "Limits",
    "Logging",
    "Metrics",
]
NAMES = [var.name for var in VARIABLES]
DEFAULTS = {var.name: var.default for var in VARIABLES}
_ROW = re.compile(r"^\|\s*`(CXG_[A-Z0-9_]+)`\s*\|([^|]*)\|([^|]*)\|(.*)\|\s*$")


@attrs.frozen
class Row:
    """One variable's row in a table of the document."""

    name: str
    default: str
    origin: str
    meaning: str


def rows() -> list[Row]:
    """Every table row of the document that documents a variable."""
    found = []
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            name, default, origin, meaning = (part.strip() for part in match.groups())
            found.append(Row(name, default, origin, meaning))
    return found


def documented() -> dict[str, Row]:
    return {row.name: row for row in rows()}


def test_every_variable_has_exactly_one_row() -> None:
    names = [row.name for row in rows()]
    assert len(names) == len(set(names)), "a variable is documented twice"
    assert set(names) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_row_shows_the_default(name: str) -> None:
    default = DEFAULTS[name]
    cell = documented()[name].default
    if default is None:
        assert cell.startswith("(unset)"), f"{name}: {cell!r}"
    elif default == "":
        assert cell.startswith("(empty)"), f"{name}: {cell!r}"
    else:
        assert cell.startswith(f"`{default}`"), f"{name}: {cell!r} should show `{default}`"


@pytest.mark.parametrize("name", NAMES)
def test_each_row_says_whether_the_variable_is_upstream_or_new(name: str) -> None:
    expected = "upstream" if name in UPSTREAM else "new"
    assert documented()[name].origin == expected


def test_each_row_has_a_meaning() -> None:
    for row in rows():
        assert len(row.meaning) > 20, row.name


def test_the_doc_names_no_variable_the_code_does_not_know() -> None:
    known = {var.name for var in VARIABLES}
    mentioned = set(re.findall(r"CXG_[A-Z0-9_]*[A-Z0-9]", DOC.read_text()))
    assert mentioned - known == set()


def test_every_upstream_variable_is_still_read() -> None:
    assert {var.name for var in VARIABLES} >= UPSTREAM


def test_secrets_are_marked_as_secrets() -> None:
    table = documented()
    for var in VARIABLES:
        if var.secret:
            assert "Secret." in table[var.name].meaning, var.name


@pytest.mark.parametrize("group", GROUPS)
def test_the_groups_have_sections(group: str) -> None:
    headings = [line for line in DOC.read_text().splitlines() if line.startswith("## ")]
    assert any(group in heading for heading in headings), group


@pytest.mark.parametrize(
    "note",
    [
        "Empty means default",
        "--listen-addr",
        "--codex-bin",
        "exits with status 2",
        "never echoed",
        "all or none",
        "[model_providers.<id>.auth]",
        "0600 file",
        "under `/tmp`",
    ],
)
def test_the_behaviour_notes_are_there(note: str) -> None:
    assert note in DOC.read_text()
