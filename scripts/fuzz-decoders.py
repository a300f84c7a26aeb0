#!/usr/bin/env python3
"""Fuzz the stream decoders for minutes or hours against qemu-img (docs/fuzzing.md).

Seed images of each format (tests/support/corpus.py) are mutated at random (header fields and
table entries set to boundary values, bits flipped, bytes overwritten, the file cut) and each
mutant is judged by the differential oracle: diskflow's decoder, in a worker process under an
address-space limit and a timeout, must make the disk `qemu-img convert -O raw` makes, or
refuse the image with a specific FinalError, or raise Unsupported. Every other result is saved
under --out as the image and a JSON file saying how it was made and what happened; replay one
with --replay FILE.json.

    .venv/bin/python scripts/fuzz-decoders.py --minutes 10 --seed 1 --formats qcow2,vdi
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.corpus import (
    FORMATS,
    FUZZ_SEEDS,
    Corpus,
    DecodeWorker,
    Outcome,
    apply_ops,
    decoder_missing,
    judge,
    random_ops,
)

KEEP_PER_SIGNATURE = 5  # failing inputs saved for each distinct failure
SLOW = 5.0  # seconds: a decode this long is reported (not a failure; a hang is)


def signature(fmt: str, outcome: Outcome) -> str:
    """What tells one failure from another: the kind, the exception, where it was raised."""
    where = ""
    for run in outcome.runs:
        frames = re.findall(r'File "([^"]+)", line (\d+)', run[3] if len(run) > 3 else "")
        if frames:
            where = f"{Path(frames[-1][0]).name}:{frames[-1][1]}"
    if outcome.kind == "crash" and not where:
        where = re.sub(r"\d+", "N", outcome.message)[:80]
    if outcome.kind in ("differs", "inconsistent"):
        where = re.sub(r"\d+", "N", outcome.message)[:80]
    if outcome.kind == "lenient":  # what qemu-img said, without paths and numbers
        said = re.sub(r"'[^']*'", "FILE", outcome.qemu.split("failed:")[-1])
        where = re.sub(r"\d+", "N", said)[-100:]
    return f"{fmt} {outcome.kind} {outcome.reason} {where}".strip()


class Fuzzer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="fuzz-decoders-"))
        self.corpus = Corpus(self.work / "seeds")
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.slow: list[tuple] = []
        self.seeds = {
            fmt: [(name, self.corpus.bytes(name)) for name in FUZZ_SEEDS[fmt]]
            for fmt in args.formats
        }

    def run(self) -> int:
        deadline = time.monotonic() + 60 * self.args.minutes
        threads = [
            threading.Thread(target=self.loop, args=(job, deadline), daemon=True)
            for job in range(self.args.jobs)
        ]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(30)
            with self.lock:
                done = sum(self.counts.values())
                print(
                    f"[{(time.monotonic() - started) / 60:5.1f} min] {done} images: "
                    + ", ".join(f"{k} {n}" for k, n in self.counts.most_common())
                    + f"; {len(self.failures)} distinct failures",
                    flush=True,
                )
        return self.report()

    def loop(self, job: int, deadline: float) -> None:
        rng = random.Random(f"{self.args.seed}-{job}")
        worker = DecodeWorker(timeout=self.args.timeout)
        try:
            while time.monotonic() < deadline:
                fmt = rng.choice(self.args.formats)
                name, data = rng.choice(self.seeds[fmt])
                ops = random_ops(rng, fmt, data)
                self.one(fmt, name, data, ops, worker)
        finally:
            worker.close()

    def one(
        self, fmt: str, name: str, data: bytes, ops: list[tuple], worker: DecodeWorker
    ) -> Outcome:
        mutated = apply_ops(fmt, data, ops)
        with tempfile.TemporaryDirectory(dir=self.work) as work:
            image = Path(work) / "image"
            image.write_bytes(mutated)
            outcome = judge(image, fmt, Path(work), worker, always_qemu=False)
        slowest = max((run[4] for run in outcome.runs), default=0.0)
        with self.lock:
            self.counts[outcome.kind] += 1
            if slowest > SLOW:
                self.slow.append((slowest, name, ops, outcome.kind, outcome.reason))
                print(f"SLOW {slowest:.1f}s: {name} mutated by {ops}: {outcome}"[:1000], flush=True)
            if outcome.kind == "refused":
                self.reasons[f"{fmt} {outcome.reason}"] += 1
            if outcome.bug:
                self.save(fmt, name, ops, mutated, outcome)
        return outcome

    def save(self, fmt: str, name: str, ops: list[tuple], image: bytes, outcome: Outcome) -> None:
        sig = signature(fmt, outcome)
        self.failures[sig] += 1
        if self.failures[sig] > KEEP_PER_SIGNATURE:
            return
        digest = hashlib.sha256(image).hexdigest()[:16]
        stem = self.out / fmt / digest
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".img").write_bytes(image)
        record = {
            "format": fmt,
            "seed_image": name,
            "ops": ops,
            "signature": sig,
            "outcome": outcome.kind,
            "reason": outcome.reason,
            "message": outcome.message,
            "qemu": outcome.qemu,
            "runs": outcome.runs,
        }
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
        self.examples.setdefault(sig, str(stem.with_suffix(".json")))
        print(f"FAILURE {sig}\n  saved {stem}.json: {outcome}"[:2000], flush=True)

    def report(self) -> int:
        summary = {
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "formats": self.args.formats,
            "outcomes": dict(self.counts),
            "refusals": dict(self.reasons.most_common()),
            "failures": {sig: [n, self.examples.get(sig)] for sig, n in self.failures.items()},
            "slow": sorted(self.slow, reverse=True)[:20],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return 1 if self.failures else 0


def replay(path: Path, timeout: float) -> int:
    record = json.loads(path.read_text())
    work = Path(tempfile.mkdtemp(prefix="fuzz-replay-"))
    corpus = Corpus(work / "seeds")
    fmt = record["format"]
    ops = [tuple(op) for op in record["ops"]]
    image = work / "image"
    image.write_bytes(apply_ops(fmt, corpus.bytes(record["seed_image"]), ops))
    saved = path.with_suffix(".img")
    if saved.exists() and saved.read_bytes() != image.read_bytes():
        print(f"note: {saved} differs from the replayed mutation; judging the saved file")
        image.write_bytes(saved.read_bytes())
    worker = DecodeWorker(timeout=timeout)
    try:
        outcome = judge(image, fmt, work, worker, always_qemu=True)
    finally:
        worker.close()
    print(f"{record['seed_image']} mutated by {ops}:\n  {outcome}")
    for run in outcome.runs:
        print(f"  {run[0]}: {run[1]} {run[2]}\n    {run[3]}")
    print(f"(image: {image})")
    return 1 if outcome.bug else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="the random seed (default 1)")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated, of {', '.join(FORMATS)} (default all)",
    )
    parser.add_argument("--out", default="fuzz-failures", help="where failing inputs go")
    parser.add_argument("--jobs", type=int, default=2, help="images judged at once (default 2)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds a decode may take")
    parser.add_argument("--replay", type=Path, help="judge one saved failure again and stop")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay, args.timeout)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in args.formats:
        if fmt not in FORMATS:
            parser.error(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
        missing = decoder_missing(fmt)
        if missing:
            parser.error(f"cannot fuzz {fmt}: {missing}")
    return Fuzzer(args).run()


if __name__ == "__main__":
    sys.exit(main())
