"""Volume sizes as CDI computes them, in plain numbers.

A DataVolume's storage request is the space the image needs. A Filesystem volume also holds
the filesystem's own metadata, so the PVC asks for more: ceil(roundUp(request, 1 MiB) *
(1 + overhead)). The importer, handed the PVC's size, lets the image use size ÷ (1 + overhead)
rounded down to whole MiB, which is never less than the request. A Block volume is the device:
not inflated. The controller (PVC sizing), the importer (its bound) and the template pipeline
(the DataVolume it emits) all call these two functions.
"""

from __future__ import annotations

import math
from fractions import Fraction

from importer.errors import FinalError

MiB = 1 << 20
DEFAULT_OVERHEAD = 0.06
"""CDI's default filesystem overhead since 2025 (0.055 before); per storage class in CDI."""


def required_volume_size(request: int, *, overhead: float = DEFAULT_OVERHEAD,
                         block: bool = False) -> int:  # fmt: skip
    """Bytes the PVC asks for so that an image of `request` bytes fits in it."""
    if request < MiB:
        raise FinalError(
            "InvalidArgument", f"a storage request of {request} bytes is under the 1Mi minimum"
        )
    if block:
        return request
    aligned = -(-request // MiB) * MiB
    return math.ceil(aligned * (1 + _fraction(overhead)))


def usable_size(size: int, overhead: float = DEFAULT_OVERHEAD) -> int:
    """Bytes an image may take in a Filesystem volume of `size` bytes: size ÷ (1 + overhead),
    rounded down to whole MiB (to 512 bytes when under a MiB)."""
    usable = math.floor(size / (1 + _fraction(overhead)))
    return usable - usable % MiB if usable >= MiB else usable - usable % 512


def _fraction(overhead: float) -> Fraction:
    # Exact arithmetic, so that usable_size(required_volume_size(r)) >= r holds for every r.
    if not 0 <= overhead < 1:
        raise FinalError(
            "InvalidArgument", "the filesystem overhead must be at least 0 and below 1"
        )
    return Fraction(str(overhead))
