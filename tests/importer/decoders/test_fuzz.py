"""A quick property test of the stream decoders (the long run is scripts/fuzz-decoders.py):
seed images of every format (tests/support/corpus.py) with their header fields and table
entries set to boundary values, bits flipped, bytes overwritten and the file cut, and the
decoder held to the differential oracle: a disk byte-identical to `qemu-img convert`'s, or a
FinalError of a specific reason, or Unsupported; never another exception, never a hang (the
decode worker is killed after a timeout, and pytest-timeout bounds the test), never more
memory than the worker's address-space limit (a MemoryError there is a bug).

Deterministic (`derandomize=True`, no example database): the same examples on every run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.corpus import (
    BYTES,
    FIELD,
    FLIP,
    FUZZ_SEEDS,
    REGIONS,
    TRUNCATE,
    Corpus,
    DecodeWorker,
    apply_ops,
    decoder_missing,
    judge,
)

EXAMPLES = 12  # per seed image: about 20 s for all of them

SEEDS = [(fmt, name) for fmt, names in FUZZ_SEEDS.items() for name in names]

ops = st.lists(
    st.one_of(
        st.tuples(st.just(FIELD), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
        st.tuples(st.just(FIELD), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
        st.tuples(
            st.just(FLIP), st.sampled_from(REGIONS), st.integers(0, 1 << 32), st.integers(0, 7)
        ),
        st.tuples(
            st.just(BYTES),
            st.sampled_from(REGIONS),
            st.integers(0, 1 << 32),
            st.binary(min_size=1, max_size=8).map(bytes.hex),
        ),
        st.tuples(st.just(TRUNCATE), st.sampled_from(REGIONS), st.integers(0, 1 << 32)),
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def worker() -> Iterator[DecodeWorker]:
    worker = DecodeWorker(timeout=20)
    yield worker
    worker.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("fmt", "seed"), SEEDS, ids=[name for _, name in SEEDS])
def test_mutated_images_are_decoded_as_qemu_img_does_or_refused(
    fmt: str, seed: str, corpus: Corpus, worker: DecodeWorker
) -> None:
    missing = decoder_missing(fmt)
    if missing:
        pytest.skip(missing)
    data = corpus.bytes(seed)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations=ops)
    def check(mutations: list[tuple]) -> None:
        mutated = apply_ops(fmt, data, mutations)
        with tempfile.TemporaryDirectory(dir=corpus.dir) as work:
            image = Path(work) / "image"
            image.write_bytes(mutated)
            outcome = judge(image, fmt, Path(work), worker, always_qemu=False)
        assert not outcome.bug, f"{seed} mutated by {mutations}: {outcome}\n{outcome.runs}"

    check()
