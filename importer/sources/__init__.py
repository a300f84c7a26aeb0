"""Where image bytes come from: one module per source kind, all behind `Source`."""

from __future__ import annotations

from importer.sources.base import Source
from importer.sources.http import HttpOptions, HttpSource, redact_url
from importer.sources.local import LocalSource
from importer.sources.parallel import PART_SIZE, PROBE_BYTES, ParallelSource
from importer.sources.resumable import ResumableSource
from importer.sources.s3_options import S3Options

__all__ = [
    "HttpOptions",
    "HttpSource",
    "LocalSource",
    "S3Options",
    "Source",
    "open_source",
    "redact_url",
]


def open_source(location: str, http: HttpOptions, s3: S3Options, *, connections: int = 1) -> Source:
    """Open an `http(s)://` URL, an `s3://` URL (or CDI's https S3 form when `s3.cdi_url`),
    or a local path, for reading from its first byte; with `connections` ranged GETs in
    parallel where the server allows and the object is large enough to gain from it."""
    web = location.startswith(("http://", "https://"))
    if location.startswith("s3://") or (s3.cdi_url and web):
        from importer.sources.s3 import S3Source  # boto3 is slow to import: only S3 pays

        source: ResumableSource = S3Source(location, s3, http)
    elif web:
        source = HttpSource(location, http)
    else:
        return LocalSource(location)
    if connections > 1 and source.ranges and (source.size or 0) > PROBE_BYTES + 2 * PART_SIZE:
        return ParallelSource(source, connections=connections)
    return source
