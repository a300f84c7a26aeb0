"""The error vocabulary of diskflow: every failure says why, and whether retrying can help.

An import, a template build and a publish all fail with these: `FinalError` for what retrying
cannot fix, `TransientError` for what it may. Reasons are short CamelCase words (like
Kubernetes condition reasons) so that the controller can put them in a DataVolume's status,
CI can match on them, and users can search for them.
"""

from __future__ import annotations


class Failure(Exception):
    """Something failed; `reason` is machine-readable, the message is for people."""

    final: bool = True

    def __init__(self, reason: str, message: str) -> None:
        # Both in args, so the exception survives pickling and Celery's JSON round trip.
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class FinalError(Failure):
    """Retrying the same import cannot succeed: bad input, missing object, checksum mismatch."""

    final = True


class TransientError(Failure):
    """The import may succeed if tried again: connection trouble, server errors, stalls."""

    final = False
