"""Volume sizes as CDI computes them: the PVC a request needs, the space an image may use."""

from __future__ import annotations

import random

import pytest

from importer.capacity import DEFAULT_OVERHEAD, MiB, required_volume_size, usable_size
from importer.errors import FinalError
from importer.quantity import parse_quantity


def test_cdi_fs_overhead_test_image_fits() -> None:
    # CDI's own test: an image of 819.2 MiB virtual size, requested as `storage: 858993459`.
    request = parse_quantity("858993459")
    pvc = required_volume_size(request)
    assert pvc == 911_422_260  # ceil(820 MiB * 1.06)
    assert usable_size(pvc) == 820 * MiB >= int(819.2 * MiB)


def test_the_default_overhead_is_cdis_current_one() -> None:
    assert DEFAULT_OVERHEAD == 0.06
    assert required_volume_size(10 << 30) == 11_381_663_335  # ceil(10 GiB * 1.06)


@pytest.mark.parametrize("overhead", [0, 0.055, 0.06, 0.1, 0.33])
def test_a_volume_sized_for_a_request_always_holds_it(overhead: float) -> None:
    rng = random.Random(overhead)
    requests = [MiB, MiB + 1, 967 * MiB + 1, 10 << 30, (100 << 30) + 1]
    requests += [rng.randrange(MiB, 1 << 44) for _ in range(2000)]
    for request in requests:
        pvc = required_volume_size(request, overhead=overhead)
        assert usable_size(pvc, overhead) >= request, (request, overhead)
        # ... and no more than a MiB plus the overhead's share past it.
        assert pvc <= (request + MiB) * (1 + overhead) + 1


def test_block_volumes_are_not_inflated() -> None:
    assert required_volume_size(10 << 30, block=True) == 10 << 30


def test_requests_under_a_mebibyte_are_refused() -> None:
    with pytest.raises(FinalError, match="under the 1Mi minimum"):
        required_volume_size(MiB - 1)


def test_usable_size_rounds_down_to_whole_mebibytes() -> None:
    assert usable_size(11 << 30) == (11 << 30) * 100 // 106 // MiB * MiB
    assert usable_size(64 * MiB, 0) == 64 * MiB
    assert usable_size(1000, 0) == 512  # tiny volumes: whole sectors


def test_an_overhead_out_of_range_is_refused() -> None:
    for overhead in (-0.1, 1, 2.5):
        with pytest.raises(FinalError, match="overhead"):
            usable_size(64 * MiB, overhead)
