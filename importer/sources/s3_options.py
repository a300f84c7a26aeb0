"""Where an S3 object is and how to reach its store: plain data and parsing, importable
without boto3 (which takes a noticeable part of a second to import)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from importer.errors import FinalError


@dataclass(frozen=True, kw_only=True)
class S3Options:
    """Where and how to reach the store. Transport settings (TLS, retries, timeouts) are
    HttpOptions' own."""

    endpoint: str | None = None
    """The store's URL (https://minio.example:9000); default: AWS."""
    region: str | None = None
    """Default: from an AWS host name, else the profile's, else us-east-1."""
    addressing: str = "auto"
    """path, virtual or auto (path for a custom endpoint: IP:port endpoints need it)."""
    profile: str | None = None
    credentials_file: str | None = None
    """An AWS shared-credentials file (INI) to read keys from, instead of the default."""
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    """A static key pair (CDI's `accessKeyId`/`secretKey`), used instead of boto3's chain;
    neither is shown by repr()."""
    cdi_url: bool = False
    """Read an http(s) URL as CDI's S3 form https://host[:port]/bucket/key."""

    def __post_init__(self) -> None:
        if (self.access_key is None) != (self.secret_key is None):
            raise FinalError("InvalidArgument", "a static S3 key needs both its id and its secret")


def parse_location(location: str, options: S3Options) -> tuple[str, str, str | None]:
    """(bucket, key, endpoint) of `s3://bucket/key`, or of CDI's `https://host/bucket/key`."""
    parts = urlsplit(location)
    if parts.scheme == "s3":
        bucket, key, endpoint = parts.netloc, parts.path.lstrip("/"), options.endpoint
    else:
        bucket, _, key = parts.path.lstrip("/").partition("/")
        endpoint = options.endpoint or f"{parts.scheme}://{parts.netloc}"
    if not bucket or not key:
        raise FinalError("InvalidURL", f"{location} does not name a bucket and a key")
    return bucket, key, endpoint


def region_of(endpoint: str | None) -> str | None:
    """The region in an AWS endpoint's host name (s3.eu-west-1.amazonaws.com), if any."""
    host = urlsplit(endpoint).hostname or "" if endpoint else ""
    match = re.search(r"s3[.-]([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com$", host)
    return match.group(1) if match else None
