"""Expected checksums (`ALG:HEX`) and their verification."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from importer.errors import FinalError

ALGORITHMS = {"sha256": 64, "sha512": 128, "sha1": 40, "md5": 32}


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """Parse "sha256:<hex>"; the error names what is wrong with it."""
        algorithm, sep, digest = text.partition(":")
        algorithm, digest = algorithm.strip().lower(), digest.strip().lower()
        if not sep or algorithm not in ALGORITHMS:
            raise FinalError(
                "InvalidArgument",
                f"checksum {text!r} must be ALG:HEX with ALG one of {', '.join(ALGORITHMS)}",
            )
        if not re.fullmatch(f"[0-9a-f]{{{ALGORITHMS[algorithm]}}}", digest):
            raise FinalError(
                "InvalidArgument",
                f"checksum {text!r}: a {algorithm} digest is {ALGORITHMS[algorithm]} hex digits",
            )
        return cls(algorithm, digest)

    def new_hash(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def verify(self, actual: hashlib._Hash, *, what: str) -> None:
        """Raise a final ChecksumMismatch unless `actual` matches."""
        if not hmac.compare_digest(actual.hexdigest(), self.hexdigest):
            raise FinalError(
                "ChecksumMismatch",
                f"{self.algorithm} of {what} is {actual.hexdigest()}, expected {self.hexdigest}",
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"
