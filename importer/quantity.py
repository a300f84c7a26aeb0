"""Sizes as people and Kubernetes write them: 10Gi, 512Mi, 20G, 1.5Ti, 1048576."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from importer.errors import FinalError

_SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


def parse_quantity(text: str) -> int:
    """Bytes in a Kubernetes-style quantity; the error repeats what was wrong."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(k|[KMGTP]i|[MGTP])?\s*", text)
    try:
        if not match:
            raise InvalidOperation
        value = Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]
    except InvalidOperation:
        raise FinalError(
            "InvalidArgument", f"size {text!r} is not a quantity like 10Gi, 512Mi, 20G or 1048576"
        ) from None
    if value <= 0 or value != int(value):
        raise FinalError(
            "InvalidArgument", f"size {text!r} must be a positive whole number of bytes"
        )
    return int(value)
