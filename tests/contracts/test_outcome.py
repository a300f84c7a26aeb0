"""The termination message: what the pod writes is what the controller reads, in 4096 bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from importer.outcome import (
    EXIT_FINAL,
    EXIT_OK,
    EXIT_TRANSIENT,
    MESSAGE_LIMIT,
    ImportResult,
    Outcome,
)
from importer.reasons import Reason

RESULT = ImportResult(
    source="https://example.com/disk.qcow2.xz", destination="/data/disk.img",
    compression="xz", format="qcow2", bytes_downloaded=123, size=1 << 30,
    checksum="sha256:" + "ab" * 32, seconds=1.5,
)  # fmt: skip


def test_success_round_trips_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    Outcome.success(RESULT, "resize").write(str(path))
    outcome = Outcome.parse(path.read_text())
    assert outcome == Outcome(ok=True, stage="resize", result=RESULT)
    assert outcome.exit_code == EXIT_OK
    assert json.loads(path.read_text())["format"] == "qcow2"  # flat, as before


@pytest.mark.parametrize(
    ("reason", "code"),
    [(Reason.CHECKSUM_MISMATCH, EXIT_FINAL), (Reason.CONNECTION_LOST, EXIT_TRANSIENT)],
)
def test_failures_carry_their_reason_finality_and_exit_code(reason: Reason, code: int) -> None:
    outcome = Outcome.failure(reason, "what happened", "download")
    parsed = Outcome.parse(outcome.to_json())
    assert parsed == outcome and parsed.reason is reason and parsed.exit_code == code
    assert parsed.final is reason.final


def test_a_long_message_is_cut_and_still_parses() -> None:
    outcome = Outcome.failure(Reason.INVALID_IMAGE, "é" * 10_000 + "tail", "convert")
    text = outcome.to_json()
    assert len(text.encode()) <= MESSAGE_LIMIT
    parsed = Outcome.parse(text)
    assert parsed.reason is Reason.INVALID_IMAGE and parsed.stage == "convert"
    assert parsed.message.endswith("...") and parsed.message.startswith("é" * 100)


def test_a_long_source_url_is_cut_on_success_too() -> None:
    long = RESULT.__class__(**{**RESULT.__dict__, "source": "https://x/" + "a\\" * 5000})
    text = Outcome.success(long, "download").to_json()
    assert len(text.encode()) <= MESSAGE_LIMIT
    assert Outcome.parse(text).result.format == "qcow2"


def test_an_unknown_reason_from_a_newer_importer_is_kept_as_text() -> None:
    text = json.dumps({"ok": False, "reason": "SomethingNew", "final": False, "message": "m"})
    parsed = Outcome.parse(text)
    assert parsed.reason == "SomethingNew" and parsed.exit_code == EXIT_TRANSIENT


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not JSON"),
        ("panic: runtime error", "not JSON"),
        ("[1]", "boolean 'ok'"),
        ('{"ok": "yes"}', "boolean 'ok'"),
        ('{"ok": true, "source": "x"}', "lacks"),
        ('{"ok": false, "final": true}', "no reason"),
        ('{"ok": false, "reason": "NotFound"}', "boolean 'final'"),
    ],
)
def test_malformed_messages_are_refused_saying_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Outcome.parse(text)
