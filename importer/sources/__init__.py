"""Where image bytes come from: one module per source kind, all behind `Source`."""

from __future__ import annotations

from importer.sources.base import Source
from importer.sources.http import HttpOptions, HttpSource, redact_url
from importer.sources.local import LocalSource

__all__ = ["HttpOptions", "HttpSource", "LocalSource", "Source", "open_source", "redact_url"]


def open_source(location: str, http: HttpOptions) -> Source:
    """Open an `http(s)://` URL or a local path for reading from its first byte."""
    if location.startswith(("http://", "https://")):
        return HttpSource(location, http)
    return LocalSource(location)
