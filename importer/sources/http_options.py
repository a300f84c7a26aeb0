"""What an HTTP(S) source is told: its options, and the header lines they are made of.

Apart from importer.sources.http (which re-exports both) so that reading the command line and
building an import's options does not import requests: only an http(s) source needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from importer.errors import FinalError


@dataclass(frozen=True, kw_only=True)
class HttpOptions:
    """How to talk to the server. Credentials here never reach logs or errors."""

    headers: tuple[tuple[str, str], ...] = ()
    """Sent with every request, also after a redirect to another host."""
    secret_headers: tuple[tuple[str, str], ...] = ()
    """Sent only to the host named in the URL, like the basic-auth credentials."""
    auth: tuple[str, str] | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    retries: int = 5
    """Failed attempts in a row before giving up. A connection that fails after real progress
    (64 KiB, or a whole `min_rate_window` at `min_rate`) is resumed and starts the count
    again."""
    backoff: float = 1.0
    """Delay before every reconnect, in seconds; doubles with each failed attempt in a row,
    with jitter, up to 30 s."""
    stall_timeout: float = 60.0
    """A transfer that delivers no byte for this many seconds counts as failed."""
    connect_timeout: float = 30.0
    min_rate: int = 1024
    """Bytes/s: a connection averaging less over `min_rate_window` fails (TooSlow); 0: off."""
    min_rate_window: float = 60.0
    """Seconds of waiting for the network over which `min_rate` is averaged."""


def parse_header(line: str, *, where: str = "a header") -> tuple[str, str]:
    """Split a "Name: value" header line. Errors name `where` the line came from, never its
    content: a malformed line may well be a secret pasted without its name."""
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise FinalError("InvalidArgument", f"{where} is not of the form 'Name: value'")
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
        raise FinalError(
            "InvalidArgument", f"the value of header {name} ({where}) has control characters"
        )
    return name, value.strip()


def check_ca_bundle(path: str) -> None:
    """Refuse a --ca-bundle file without a usable PEM certificate, naming it: TLS would
    otherwise blame the server for it."""
    import ssl  # only when a bundle is given; HTTP loads ssl itself

    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError):
        raise FinalError(
            "InvalidArgument", f"--ca-bundle {path} holds no readable PEM certificate"
        ) from None
