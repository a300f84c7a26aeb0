"""Sizes as Kubernetes writes them (the whole quantity grammar, in and out), and durations as
Go, kubectl and Prometheus write them.

    quantity ::= signedNumber suffix
    suffix   ::= binarySI (Ki Mi Gi Ti Pi Ei) | decimalSI (m "" k M G T P E)
               | decimalExponent (e or E, then a signed integer)

Parsing is exact (fractions, never floats); a size in bytes is rounded up to a whole byte, as
Kubernetes does for storage requests.

    duration ::= number | (number unit)+      (units: ms s m h d; a bare number is seconds)
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from importer.errors import FinalError

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "P": 10**15, "E": 10**18}  # fmt: skip
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>[KMGTPE]i)|[eE](?P<exponent>[+-]?[0-9]+)|(?P<decimal>[mkMGTPE]?))"
)
_EXAMPLES = "a quantity like 10Gi, 512Mi, 20G, 1.5e9 or 1048576"
_SECONDS = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|[smhd]))+|{_NUMBER}")
_PART = re.compile(rf"({_NUMBER})(ms|[smhd])")


def parse_quantity_exact(text: str) -> Fraction:
    """The exact value of a Kubernetes quantity; the error repeats what was wrong."""
    match = _QUANTITY.fullmatch(text.strip())
    if not match or (match["exponent"] and abs(int(match["exponent"])) > 100):
        raise FinalError("InvalidArgument", f"size {text!r} is not {_EXAMPLES}")
    number = Fraction(match["number"])
    if match["binary"]:
        return number * _BINARY[match["binary"]]
    if match["exponent"] is not None:
        return number * Fraction(10) ** int(match["exponent"])
    return number * _DECIMAL[match["decimal"]]


def parse_quantity(text: str) -> int:
    """Bytes in a Kubernetes quantity, rounded up to a whole byte; it must be positive."""
    value = parse_quantity_exact(text)
    if value <= 0:
        raise FinalError("InvalidArgument", f"size {text!r} must be a positive number of bytes")
    return math.ceil(value)


def parse_duration(text: str) -> float:
    """Seconds in a duration: 90s, 10m, 1h30m, 1.5h, 250ms, 2d, or a bare number of seconds."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        raise FinalError(
            "InvalidArgument",
            f"{text!r} is not a duration like 90s, 10m, 3h, 1h30m or 600 (seconds)",
        )
    if not text[-1].isalpha():
        return float(Fraction(text))
    return float(sum(Fraction(number) * _SECONDS[unit] for number, unit in _PART.findall(text)))


def format_bytes(size: float) -> str:
    """`size` bytes for a person to read, to three figures: 512 B, 12.3 KiB, 4.00 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1000 or unit == "TiB":
            break
        size /= 1024
    figures = f"{size:.3g}" if unit != "B" and size < 1000 else f"{size:.0f}"
    return f"{figures} {unit}"


def format_quantity(size: int) -> str:
    """`size` bytes in the shortest exact form (binary first on a tie): 10Gi, 2G, 1048577."""
    candidates = []
    for units in (_BINARY, {k: v for k, v in _DECIMAL.items() if k not in ("m", "")}):
        exact = [f"{size // unit}{suffix}" for suffix, unit in units.items() if size % unit == 0]
        candidates += exact[-1:] if size else []
    return min([*candidates, str(size)], key=len)
