"""S3 source (AWS or any S3-compatible store: MinIO, Ceph RGW, Wasabi...).

Credentials come from boto3's standard chain (environment, shared config and profiles, web
identity tokens as IRSA uses, instance metadata) or from a credentials file; session tokens
work. The object is read as one GET stream; a resume asks for the rest with `Range` and
`If-Match` on the first response's ETag, so a replaced object is detected, never mixed in.
"""

from __future__ import annotations

import urllib3

from importer.sources.http import HttpOptions
from importer.sources.resumable import ResumableSource
from importer.sources.s3_client import S3_ERRORS, connect, failure
from importer.sources.s3_options import S3Options, parse_location


class S3Source(ResumableSource):
    """Stream an S3 object, resuming after failures."""

    ranges = True  # every S3 store serves byte ranges

    def __init__(self, location: str, s3: S3Options, http: HttpOptions) -> None:
        super().__init__(http)
        self._bucket, self._key, endpoint = parse_location(location, s3)
        self.description = f"s3://{self._bucket}/{self._key}"
        # One attempt per request: retried here, resuming where it stopped.
        connection = connect(s3, endpoint, http, attempts=1)
        self._client = connection.client
        self._secrets.update(connection.secrets)
        self._etag: str | None = None
        self._start()

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._read_exactly(self._get(start, end), end - start, start)

    def _open(self, offset: int) -> urllib3.BaseHTTPResponse:
        return self._get(offset, None)

    def _get(self, offset: int, end: int | None) -> urllib3.BaseHTTPResponse:
        request = {"Bucket": self._bucket, "Key": self._key}
        if offset or end is not None:
            request["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        if self._etag:
            request["IfMatch"] = self._etag
        try:
            response = self._client.get_object(**request)
        except S3_ERRORS as exc:
            raise failure(
                exc,
                what=self.description,
                describe=self._describe,
                connect_timeout=self._options.connect_timeout,
            ) from None
        # The urllib3 response under botocore's StreamingBody: read1, and shutdown on close.
        body = response["Body"]._raw_stream
        if "Range" in request:
            self._check_range(body, response.get("ContentRange"), offset, end)
        if self.size is None:  # the first response: what later ones are pinned to
            self.size = response["ContentLength"]
            self._etag = response.get("ETag")
        return body
