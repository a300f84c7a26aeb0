"""Publishing built images to artifact stores: S3, HTTP PUT (Artifactory, Nexus, WebDAV), or a
local directory.

    store = open_store("s3://golden/images", s3=S3Options(endpoint="https://minio:9000"))
    if find_published(store, manifest.template, manifest.build_id) is None:
        published = publish_build(store, image, manifest)  # a pipelines.manifest.BuildManifest
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from importer.errors import FinalError
from importer.sources.http import HttpOptions, redact_url
from importer.sources.s3_options import S3Options
from pipelines.publish.base import ImportSource, Store, Stored
from pipelines.publish.local import LocalStore
from pipelines.publish.publication import (
    Published,
    find_published,
    publish_build,
)

__all__ = [
    "ImportSource",
    "LocalStore",
    "Published",
    "Store",
    "Stored",
    "find_published",
    "open_store",
    "publish_build",
]


def open_store(
    url: str,
    *,
    s3: S3Options | None = None,
    http: HttpOptions | None = None,
    auth_file: str | None = None,
    public_url: str | None = None,
) -> Store:
    """The store at `s3://bucket[/prefix]`, an `http(s)://` base URL, or a local directory
    (a path or `file://`). `auth_file` (`user:password`) is for http(s) stores; `public_url`
    is the HTTP base serving a local directory, for DataVolumes."""
    scheme = urlsplit(url).scheme
    if public_url and scheme not in ("", "file"):
        raise FinalError("InvalidArgument", "a public URL applies to a local directory store")
    if auth_file and scheme not in ("http", "https"):
        raise FinalError("InvalidArgument", "an auth file applies to an http(s) store")
    http = http or HttpOptions()
    if scheme == "s3":
        from pipelines.publish.s3 import S3Store  # boto3 is slow to import: only S3 pays

        return S3Store(url, s3 or S3Options(), http)
    if scheme in ("http", "https"):
        from pipelines.publish.http import HttpStore, with_credentials

        return HttpStore(url, with_credentials(url, http, auth_file=auth_file))
    if scheme == "file":
        return LocalStore(Path(unquote(urlsplit(url).path)), public_url=public_url)
    if scheme:
        raise FinalError("InvalidURL", f"{redact_url(url)}: publish to s3://, http(s):// or a path")
    return LocalStore(Path(url), public_url=public_url)
