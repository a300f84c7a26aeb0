"""Keeping secrets out of error messages: shared by the import sources and the publish stores."""

from __future__ import annotations

import re
from collections.abc import Iterable


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """The exception's text with every known secret, and any query string, removed."""
    text = str(exc)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    # Library messages quote request paths; anything after a '?' is suspect.
    return re.sub(r"\?\S+", "?<redacted>", text) or type(exc).__name__
