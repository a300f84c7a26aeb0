"""Where image bytes come from: one module per source kind, all behind `Source`."""

from __future__ import annotations

from importer.sources.base import Source
from importer.sources.http import HttpOptions, HttpSource, redact_url
from importer.sources.local import LocalSource
from importer.sources.s3 import S3Options, S3Source

__all__ = [
    "HttpOptions",
    "HttpSource",
    "LocalSource",
    "S3Options",
    "S3Source",
    "Source",
    "open_source",
    "redact_url",
]


def open_source(location: str, http: HttpOptions, s3: S3Options) -> Source:
    """Open an `http(s)://` URL, an `s3://` URL (or CDI's https S3 form when `s3.cdi_url`),
    or a local path, for reading from its first byte."""
    if location.startswith("s3://") or (
        s3.cdi_url and location.startswith(("http://", "https://"))
    ):
        return S3Source(location, s3, http)
    if location.startswith(("http://", "https://")):
        return HttpSource(location, http)
    return LocalSource(location)
