"""The stream decoders against `qemu-img convert -O raw`, image by image of a generated corpus
(tests/support/corpus.py): well-formed images made by qemu-img, rewritten and shuffled ones,
and truncated and corrupted variants of them.

For each image, diskflow must make the very disk qemu-img makes, or refuse the image with a
FinalError of a specific reason whose message names what is wrong, or raise Unsupported (the
import then converts it with qemu-img from scratch space). A disk that differs from qemu-img's,
any other exception, a hang, a MemoryError under the worker's address-space limit, or a disk
made of an image qemu-img fails on is a bug. Well-formed images must come out identical: never
refused, and Unsupported only for what the format's decoder documents as a fallback (FALLBACK).

A summary (identical / refused by reason / unsupported / redetected) is printed at the end and
written to the corpus directory as summary.json.
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.corpus import (
    CONFIGS,
    FORMATS,
    TINY,
    Case,
    Corpus,
    DecodeWorker,
    Outcome,
    cases,
    decoder_missing,
    judge,
    prechecks,
)

CASES = cases()

# What each decoder's docstring says it leaves to qemu-img (raises Unsupported for): the
# features of a well-formed case (Case.features) that may come out Unsupported.
FALLBACK: dict[str, frozenset[str]] = {
    "qcow2": frozenset({"extended-l2"}),
    "vmdk": frozenset(),
    "vpc": frozenset(),
    "vdi": frozenset(),
}


# Decoder bugs this corpus found, each until its decoder is fixed (then the strict xfail
# fails: remove the entry). name → what happens.
KNOWN_BUGS: dict[str, str] = {
    # Found and fixed so far, each made a disk of an image qemu-img 7.2 refuses:
    # vpc/dynamic/bad-checksum (0e76179), qcow2/v3-snapshot/snapshot-extra-data-* (1ae1719),
    # vmdk/monolithic-sparse/rgd-huge (11ff6dd), vdi/dynamic/blocks-past-qemu-max (the vdi
    # decoder allowed 0x3fffffff blocks; qemu allows 0x1fffff80).
}


def _param(case: Case) -> object:
    marks = []
    if case.name in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[case.name], strict=True))
    return pytest.param(case, id=case.name, marks=marks)


class Summary:
    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[Case, Outcome]] = {}

    def record(self, case: Case, outcome: Outcome) -> None:
        self.outcomes[case.name] = (case, outcome)

    def lines(self) -> list[str]:
        if not self.outcomes:
            return []
        by_kind: collections.Counter[str] = collections.Counter()
        by_reason: collections.Counter[str] = collections.Counter()
        by_format: collections.Counter[tuple[str, str]] = collections.Counter()
        for case, outcome in self.outcomes.values():
            by_kind[outcome.kind] += 1
            by_format[case.fmt, outcome.kind] += 1
            if outcome.kind == "refused":
                by_reason[outcome.reason] += 1
        lines = [
            f"differential corpus: {len(self.outcomes)} images: "
            + ", ".join(f"{n} {kind}" for kind, n in by_kind.most_common()),
            "  refused by reason: "
            + ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common()),
        ]
        for fmt in FORMATS:
            kinds = {k: n for (f, k), n in by_format.items() if f == fmt}
            if kinds:
                lines.append(f"  {fmt}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for name, (_, outcome) in sorted(self.outcomes.items()):
            if outcome.kind in ("unsupported", "redetected", "unjudged") or outcome.bug:
                lines.append(f"  {name}: {outcome}")
        return lines

    def json(self) -> list[dict]:
        return [
            {
                "case": name,
                "format": case.fmt,
                "kind": case.kind,
                "outcome": outcome.kind,
                "reason": outcome.reason,
                "message": outcome.message[:500],
                "qemu": outcome.qemu[:500],
            }
            for name, (case, outcome) in sorted(self.outcomes.items())
        ]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def worker() -> Iterator[DecodeWorker]:
    worker = DecodeWorker()
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest, corpus: Corpus) -> Iterator[Summary]:
    summary = Summary()
    yield summary
    (corpus.dir / "summary.json").write_text(json.dumps(summary.json(), indent=1))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and summary.outcomes:
        # Past the capture of the last test's teardown, to the terminal.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for line in summary.lines():
                reporter.write_line(line)
            reporter.write_line(f"  (details: {corpus.dir / 'summary.json'})")


def test_corpus_covers_every_format_and_kind() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "case names are unique"
    kinds = {(case.fmt, case.kind) for case in CASES}
    for fmt in FORMATS:
        for kind in ("valid", "shuffled", "truncated", "corrupted"):
            assert (fmt, kind) in kinds or (fmt, kind) == ("vmdk", "shuffled"), (fmt, kind)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_decoder_agrees_with_qemu_img(
    case: Case, corpus: Corpus, worker: DecodeWorker, summary: Summary, tmp_path: Path
) -> None:
    image = corpus.path(case.name)
    assert image is not None, f"{case.name} could not be made from its base"
    missing = decoder_missing(case.fmt)
    if missing:
        with open(image, "rb") as f:
            early = prechecks(case.fmt, f.read(2 << 20))
        if early is None:
            pytest.skip(missing)
        outcome = early
    else:
        configs = (*CONFIGS, TINY) if case.well_formed else CONFIGS
        outcome = judge(image, case.fmt, tmp_path, worker, configs=configs)
    summary.record(case, outcome)
    if outcome.kind == "lenient" and case.qemu_lenient_ok:
        return  # investigated: qemu-img is the stricter one here (see QEMU_STRICT)
    assert not outcome.bug, f"{case.name}: {outcome}\nruns: {outcome.runs}"
    if case.kind == "rejected":
        assert (outcome.kind, outcome.reason) == ("refused", case.expect), str(outcome)
    elif case.well_formed:
        if outcome.kind == "unsupported":
            allowed = case.features & FALLBACK[case.fmt]
            assert allowed, (
                f"{case.name} is well-formed and uses nothing the {case.fmt} decoder documents "
                f"as a fallback, yet: {outcome}"
            )
        else:
            assert outcome.kind == "identical", f"{case.name} is well-formed: {outcome}"
