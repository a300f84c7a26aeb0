"""Where image bytes come from: one module per source kind, all behind `Source`."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from importer.errors import FinalError
from importer.sources.base import Source
from importer.sources.http_options import HttpOptions
from importer.sources.local import LocalSource
from importer.sources.s3_options import S3Options

if TYPE_CHECKING:
    from importer.sources.http import HttpSource, redact_url
    from importer.sources.resumable import ResumableSource

__all__ = [
    "HttpOptions",
    "HttpSource",
    "LocalSource",
    "S3Options",
    "Source",
    "open_source",
    "redact_url",
]

# The network sources import requests, urllib3 and tenacity (boto3 for S3): loaded on first
# use, so that a local file or blank: import never pays for them.
_NETWORK = {
    "HttpSource": "importer.sources.http",
    "redact_url": "importer.sources.http",
    "PART_SIZE": "importer.sources.parallel",
    "PROBE_BYTES": "importer.sources.parallel",
    "ParallelSource": "importer.sources.parallel",
    "ResumableSource": "importer.sources.resumable",
}


def __getattr__(name: str) -> Any:
    module = _NETWORK.get(name)
    if module is None:
        raise AttributeError(f"module 'importer.sources' has no attribute {name!r}")
    __import__(module)  # not importlib.import_module: -X importtime reports this one
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value


# RFC 3986's scheme, then "://": what a user means as a URL, whatever the scheme.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES = ("http", "https", "s3", "file")


def open_source(location: str, http: HttpOptions, s3: S3Options, *, connections: int = 1) -> Source:
    """Open an `http(s)://` URL, an `s3://` URL (or CDI's https S3 form when `s3.cdi_url`),
    a `file://` URL or a local path, for reading from its first byte; with `connections`
    ranged GETs in parallel where the server allows and the object is large enough to gain
    from it. A URL of any other scheme is InvalidURL, not a file name."""
    match = _URL.match(location)
    scheme = match.group(1).lower() if match else None
    if scheme is None:
        return LocalSource(location)
    if scheme not in _SCHEMES:
        # Only the scheme is quoted: the rest of a URL may hold a password.
        raise FinalError(
            "InvalidURL",
            f"diskflow does not read {scheme}:// URLs; SOURCE is an http://, https://, s3:// "
            "or file:// URL, a local path (./NAME for a file whose name looks like a URL), or "
            "blank:",
        )
    if scheme == "file":
        return LocalSource(_file_path(location))
    # As _NETWORK above: only a URL loads the network sources.
    from importer.sources.parallel import PART_SIZE, PROBE_BYTES, ParallelSource

    source: ResumableSource
    if scheme == "s3" or s3.cdi_url:
        from importer.sources.s3 import S3Source  # boto3 is slow to import: only S3 pays

        source = S3Source(location, s3, http)
    else:
        from importer.sources.http import HttpSource

        source = HttpSource(location, http)
    if connections > 1 and source.ranges and (source.size or 0) > PROBE_BYTES + 2 * PART_SIZE:
        return ParallelSource(source, connections=connections)
    return source


def _file_path(location: str) -> str:
    """The local path of a `file://` URL (RFC 8089: no host, or localhost)."""
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        # The host alone: a netloc may hold user:password@.
        raise FinalError(
            "InvalidURL",
            f"a file:// URL names a file on this machine (file:///PATH), not on {parts.hostname}",
        )
    if not parts.path:
        raise FinalError("InvalidURL", "the file:// URL names no file (file:///PATH)")
    return unquote(parts.path)
