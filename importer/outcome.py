"""How an import ended, as the importer pod tells the controller: its exit code and the JSON
of its termination message (Kubernetes keeps the first 4096 bytes of /dev/termination-log).

    0   {"ok": true, "stage": "resize", "source": ..., "format": "qcow2", "size": ..., ...}
    1   {"ok": false, "reason": "ChecksumMismatch", "final": true, "message": ..., "stage": ...}
    75  {"ok": false, "reason": "ConnectionLost", "final": false, ...}   (try again later)

The pod writes it with `Outcome.write()`; the controller reads it with `Outcome.parse()`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from importer.events import Event, result
from importer.reasons import Reason

EXIT_OK = 0
EXIT_FINAL = 1
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: trying again later may work
MESSAGE_LIMIT = 4096  # what Kubernetes keeps of a termination message
_ELLIPSIS = "..."


@dataclass(frozen=True)
class ImportResult:
    """What a successful import did."""

    source: str
    destination: str
    compression: str
    format: str
    bytes_downloaded: int
    size: int
    """Length in bytes of the raw image at the destination, after any resize (for an
    archive: the bytes of file data extracted)."""
    checksum: str | None
    """The checksum verified, as ALG:HEX; None when none was asked for."""
    seconds: float
    path: str = "stream"
    """How the image was written: "stream" (as it downloaded, in one pass) or "scratch"
    (landed in scratch space, then converted by qemu-img): what scratch space an import of
    it needs."""
    fallback: str | None = None
    """Why an image of a format that streams went through scratch space instead."""


@dataclass(frozen=True)
class Outcome:
    """The end of an import: a result, or a reason with its finality."""

    ok: bool
    reason: str | None = None
    """A `Reason` for an import (a template build has reasons of its own)."""
    message: str = ""
    final: bool = False
    stage: str | None = None
    """The stage the import was in when it ended (download, convert, resize, ...)."""
    result: ImportResult | None = None

    @classmethod
    def success(cls, result: ImportResult, stage: str | None = None) -> Outcome:
        return cls(ok=True, stage=stage, result=result)

    @classmethod
    def failure(cls, reason: Reason, message: str, stage: str | None = None) -> Outcome:
        """A failure whose finality is the reason's."""
        return cls(ok=False, reason=reason, message=message, final=reason.final, stage=stage)

    @property
    def exit_code(self) -> int:
        if self.ok:
            return EXIT_OK
        return EXIT_FINAL if self.final else EXIT_TRANSIENT

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object: ok, stage, then the result's fields or reason/final/message."""
        record: dict[str, Any] = {"ok": self.ok}
        if self.stage:
            record["stage"] = self.stage
        if self.ok:
            record.update(asdict(self.result) if self.result else {})
        else:
            record.update(reason=str(self.reason), final=self.final, message=self.message)
        return record

    def event(self, summary: str = "") -> Event:
        """The outcome as the command's result event: `summary` says what a success did."""
        fields = self.to_dict()
        return result(summary if self.ok else fields.pop("message"), fields)

    def to_json(self) -> str:
        """The JSON, at most MESSAGE_LIMIT bytes: the longest strings are cut, never the
        structure, so what Kubernetes keeps still parses."""
        record = self.to_dict()
        text = _dumps(record)
        while len(text.encode()) > MESSAGE_LIMIT:
            key = max((k for k, v in record.items() if isinstance(v, str)),
                      key=lambda k: len(record[k]))  # fmt: skip
            excess = len(text.encode()) - MESSAGE_LIMIT
            raw = record[key].removesuffix(_ELLIPSIS).encode()
            keep = max(0, len(raw) - excess - len(_ELLIPSIS))
            record[key] = raw[:keep].decode(errors="ignore") + _ELLIPSIS
            text = _dumps(record)
        return text

    def write(self, path: str) -> None:
        """Write the termination message to `path` (e.g. /dev/termination-log)."""
        with open(path, "w") as out:
            out.write(self.to_json())

    @classmethod
    def parse(cls, text: str) -> Outcome:
        """The outcome a termination message holds; ValueError naming what is wrong."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the termination message is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("ok"), bool):
            raise ValueError("the termination message has no boolean 'ok'")
        stage = record.get("stage")
        if record["ok"]:
            names = {f.name for f in fields(ImportResult)}
            # Fields added later have defaults: a message from an older importer still parses.
            required = {f.name for f in fields(ImportResult) if f.default is MISSING}
            missing = required - record.keys()
            if missing:
                raise ValueError(f"the termination message lacks {', '.join(sorted(missing))}")
            result = ImportResult(**{name: record[name] for name in names & record.keys()})
            return cls.success(result, stage)
        reason = record.get("reason")
        if not isinstance(reason, str) or not reason:
            raise ValueError("the termination message of a failure has no reason")
        final = record.get("final")
        if not isinstance(final, bool):
            raise ValueError("the termination message of a failure has no boolean 'final'")
        return cls(
            ok=False,
            reason=_reason(reason),
            message=str(record.get("message", "")),
            final=final,
            stage=stage,
        )


def _reason(name: str) -> str:
    """A `Reason` when the importer knows the name (one of a newer importer stays a string)."""
    try:
        return Reason(name)
    except ValueError:
        return name


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
