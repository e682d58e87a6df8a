"""Go ``time.ParseDuration`` compatibility and byte sizes, as operators write them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.durations import parse_byte_size, parse_go_duration

# -- parse_go_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("0s", 0.0),
        ("300ms", 0.3),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("30m", 1800.0),
        ("24h", 86400.0),
        ("5m", 300.0),
        ("10s", 10.0),
        ("1h2m3s4ms", 3723.004),
        ("2h45m0.5s", 9900.5),
        ("1.s", 1.0),
        (".5s", 0.5),
        ("1000ns", 1e-6),
        ("1us", 1e-6),
        ("1µs", 1e-6),  # U+00B5 micro sign
        ("1μs", 1e-6),  # U+03BC Greek mu
        ("1m1m", 120.0),
        ("+5s", 5.0),
        ("-1.5h", -5400.0),
        (" 30m ", 1800.0),
    ],
)
def test_go_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "soon",
        "5",
        "00",
        "1.5",
        "1d",
        "1H",
        "1S",
        "1h 30m",
        "1h-30m",
        "h",
        ".s",
        ".",
        "-",
        "+",
        "--1s",
        "1.5.5s",
        "1e3s",
        "s5",
        "1hh",
        "∞s",
        "1_000s",
        "\u0661h",  # ARABIC-INDIC DIGIT ONE: Go takes ASCII digits only
        "\uff12s",  # FULLWIDTH DIGIT TWO
        "2562048h",  # past Go's int64 nanoseconds
        "9" * 400 + "h",
    ],
)
def test_text_outside_the_go_grammar_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


def test_the_longest_go_duration_is_accepted() -> None:
    assert parse_go_duration("2562047h") == 2562047 * 3600


def test_the_error_quotes_what_was_given() -> None:
    with pytest.raises(ValueError, match="'soon'"):
        parse_go_duration("soon")


GO_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(GO_UNITS))), min_size=1, max_size=6
    ),
    st.sampled_from(["", "+", "-"]),
)
def test_any_sequence_of_number_unit_parts_sums_up(parts: list[tuple[int, str]], sign: str) -> None:
    text = sign + "".join(f"{number}{unit}" for number, unit in parts)
    expected = sum(number * GO_UNITS[unit] for number, unit in parts)
    if sign == "-":
        expected = -expected
    assert math.isclose(parse_go_duration(text), expected, rel_tol=1e-9, abs_tol=1e-12)


@given(st.one_of(st.text(max_size=20), st.from_regex(r"[0-9.]{1,400}(h|m|s|ms)", fullmatch=True)))
def test_parsing_arbitrary_text_raises_only_value_error(text: str) -> None:
    try:
        result = parse_go_duration(text)
    except ValueError:
        return
    assert math.isfinite(result)


# -- parse_byte_size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1048576", 1_048_576),
        ("512B", 512),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("64MiB", 64 * 1024 * 1024),
        ("16MB", 16_000_000),
        ("8GiB", 8 * 1024**3),
        ("2GB", 2_000_000_000),
        ("1TiB", 1024**4),
        ("1TB", 10**12),
        ("64mib", 64 * 1024 * 1024),
        ("64 MiB", 64 * 1024 * 1024),
        (" 1KiB ", 1024),
    ],
)
def test_byte_sizes_parse(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "lots", "MiB", "-1", "-1MiB", "1.5GiB", "1 PiB", "1MiBs", "1e6", "0x10", "\u0661\u0660"],
)
def test_malformed_byte_sizes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_byte_size(text)


SIZE_FACTORS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
    "TB": 1000**4,
    "TiB": 1024**4,
}


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZE_FACTORS)))
def test_any_number_with_any_unit_multiplies_out(number: int, unit: str) -> None:
    assert parse_byte_size(f"{number}{unit}") == number * SIZE_FACTORS[unit]
