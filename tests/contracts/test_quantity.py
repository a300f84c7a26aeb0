"""Kubernetes quantities: the whole grammar in, the shortest exact form out."""

from __future__ import annotations

from fractions import Fraction

import pytest

from importer.errors import FinalError
from importer.quantity import format_bytes, format_quantity, parse_quantity, parse_quantity_exact


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576", 1 << 20),
        ("10Gi", 10 << 30),
        ("1.5Ti", 3 << 39),
        ("2Pi", 2 << 50),
        ("1Ei", 1 << 60),
        ("20G", 20 * 10**9),
        ("3P", 3 * 10**15),
        ("1E", 10**18),
        ("500k", 500_000),
        ("1.5e9", 1_500_000_000),
        ("2E3", 2000),  # an exponent, not exa
        ("1e-3", Fraction(1, 1000)),
        ("+.5Mi", 1 << 19),
        ("1500m", Fraction(3, 2)),
        ("7.", 7),
        (" 12Mi ", 12 << 20),
    ],
)
def test_every_form_of_the_grammar_parses_exactly(text: str, value: Fraction) -> None:
    assert parse_quantity_exact(text) == value


def test_bytes_round_up_as_kubernetes_does() -> None:
    assert parse_quantity("1500m") == 2
    assert parse_quantity("0.1k") == 100
    assert parse_quantity("858993459.2") == 858993460


@pytest.mark.parametrize("text", ["ten gigs", "10ki", "10 Gi x", "1e", "Gi", "1.2.3", "1e999", ""])
def test_malformed_quantities_are_refused_naming_the_input(text: str) -> None:
    with pytest.raises(FinalError) as caught:
        parse_quantity(text)
    assert caught.value.reason == "InvalidArgument" and repr(text) in caught.value.message


@pytest.mark.parametrize("text", ["0", "-1Gi", "1m"])
def test_a_size_must_be_positive(text: str) -> None:
    if text == "1m":  # a thousandth of a byte rounds up to one byte: positive
        assert parse_quantity(text) == 1
        return
    with pytest.raises(FinalError, match="positive"):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1 << 30, "1Gi"), (3 << 39, "1536Gi"), (1 << 60, "1Ei"), (2 * 10**9, "2G"),
     (1000, "1k"), (1024000, "1024k"), (858993459, "858993459")],
)  # fmt: skip
def test_the_formatter_gives_the_shortest_exact_form_and_parses_back(size: int, text: str) -> None:
    assert format_quantity(size) == text
    assert parse_quantity_exact(text) == size


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (12345, "12.1 KiB"), (4 << 20, "4 MiB"),
     (1.5 * (1 << 30), "1.5 GiB"), (5 << 50, "5120 TiB")],
)  # fmt: skip
def test_sizes_for_people_have_three_figures_and_a_binary_unit(size: float, text: str) -> None:
    assert format_bytes(size) == text
