"""S3 artifact store: AWS or any S3-compatible store, reached like the S3 import source.

Uploads go through boto3's transfer manager (multipart above a threshold, parts in parallel)
fed by a HashingReader: not seekable, so the manager reads it once, in order, into per-part
buffers, and the sha256 of the image is taken in that one pass, along with each part's.

Verification is end to end with those digests: each part (or the single PUT) carries our own
`x-amz-checksum-sha256`, which S3 checks on receipt, and afterwards HeadObject must report the
size and the checksum S3 keeps, which for a multipart object is the composite
sha256(part digests)-N we compute ourselves. Stores that keep no checksums are checked on
size only, with a warning.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import boto3.s3.transfer

from importer.errors import FinalError
from importer.progress import Progress
from importer.redaction import describe
from importer.sources.http import HttpOptions
from importer.sources.s3_client import S3_ERRORS, connect, failure
from importer.sources.s3_options import S3Options
from pipelines.publish.base import HashingReader, ImportSource, Stored

log = logging.getLogger("diskflow.publish")

MiB = 1 << 20
MAX_PARTS = 10_000
MIN_PART, MAX_PART = 5 * MiB, 5 << 30  # S3's limits on all parts but the last
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}  # HeadObject has no body, hence no code


class S3Store:
    """Objects under `s3://bucket/prefix/`. Files from `multipart_threshold` bytes on go up in
    parts of `part_size` (more where 10,000 parts would not hold them), `concurrency` at a
    time; the parts wait in memory (the reader cannot seek), at most 10 of them: s3transfer's
    bound, which boto3's TransferConfig does not expose. One upload at a time per store: the
    part checksums are those of the upload in progress."""

    def __init__(
        self,
        url: str,
        s3: S3Options,
        http: HttpOptions,
        *,
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        concurrency: int = 8,
    ) -> None:
        parts = urlsplit(url)
        self._bucket, self._prefix = parts.netloc, parts.path.strip("/")
        if parts.scheme != "s3" or not self._bucket:
            raise FinalError("InvalidURL", f"{url} is not of the form s3://bucket[/prefix]")
        if not MIN_PART <= part_size <= MAX_PART:
            raise FinalError("InvalidArgument", "an S3 part size must be 5 MiB to 5 GiB")
        self.description = f"s3://{self._bucket}/{self._prefix}".rstrip("/")
        # Every body carries our x-amz-checksum-sha256, a signed header that S3 checks: signing
        # the payload too (which botocore does over plain http) would hash each byte again.
        self._connection = connect(
            s3, s3.endpoint, http, attempts=http.retries + 1, sign_payload=False
        )
        self._client = self._connection.client
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._concurrency = concurrency
        self._uploading: HashingReader | None = None
        events = self._client.meta.events
        events.register("before-parameter-build.s3.UploadPart", self._add_part_checksum)
        events.register("before-parameter-build.s3.PutObject", self._add_object_checksum)

    # --- Store --------------------------------------------------------------------------

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, progress: Progress | None = None
    ) -> Stored:
        """Upload `path` (multipart above the threshold), hashing it in the same pass."""
        size = path.stat().st_size
        part_size = self._part_size_for(size)
        config = boto3.s3.transfer.TransferConfig(
            multipart_threshold=self._threshold,
            multipart_chunksize=part_size,
            max_concurrency=self._concurrency,
            preferred_transfer_client="classic",  # the CRT client reads files its own way
        )
        with path.open("rb") as file:
            reader = HashingReader(file, size=size, expected=sha256, part_size=part_size)
            self._uploading = reader
            try:
                self._call(
                    self._client.upload_fileobj,
                    reader,
                    self._bucket,
                    self._key(key),
                    ExtraArgs={
                        "ChecksumAlgorithm": "SHA256",
                        "ContentType": "application/octet-stream",
                    },
                    Config=config,
                    Callback=progress.advance if progress else None,
                    what=self.url(key),
                )
            finally:
                self._uploading = None
        assert reader.sha256 is not None  # the transfer manager read to the end
        multipart = size >= self._threshold
        expected = _composite(reader.parts) if multipart else _b64(bytes.fromhex(reader.sha256))
        self._verify(key, size, expected, parts=len(reader.parts) if multipart else None)
        return Stored(reader.sha256, size)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """PUT a small object with its sha256, which S3 checks on receipt."""
        checksum = _b64(hashlib.sha256(data).digest())
        self._call(
            self._client.put_object,
            Bucket=self._bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
            ChecksumAlgorithm="SHA256",  # with the value: moto keeps the checksum only then
            ChecksumSHA256=checksum,
            what=self.url(key),
        )
        self._verify(key, len(data), checksum, parts=None)

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content; None for a missing key (a missing bucket raises NotFound)."""
        response = self._call(
            self._client.get_object,
            Bucket=self._bucket,
            Key=self._key(key),
            what=self.url(key),
            missing=True,
        )
        return None if response is None else self._call(response["Body"].read, what=self.url(key))

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else head["ContentLength"]

    def url(self, key: str) -> str:
        return f"s3://{self._bucket}/{self._key(key)}"

    def import_source(self, key: str) -> ImportSource:
        """CDI's path-style form: https://endpoint/bucket/key, at the endpoint in use (also
        one that AWS_ENDPOINT_URL names)."""
        aws = f"https://s3.{self._connection.region}.amazonaws.com"
        endpoint = (self._connection.endpoint or aws).rstrip("/")
        return ImportSource("s3", f"{endpoint}/{self._bucket}/{quote(self._key(key))}")

    # --- helpers ------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def _part_size_for(self, size: int) -> int:
        # Within S3's 10,000 parts; whole MiB keep the boundaries easy to reason about.
        needed = -(-size // MAX_PARTS)
        return min(max(self._part_size, -(-needed // MiB) * MiB), MAX_PART)

    def _add_part_checksum(self, params: dict[str, Any], **_: Any) -> None:
        # Our digest of the part, taken as it was read, instead of botocore's second pass:
        # S3 then checks the bytes it received against the bytes we hashed.
        digests = self._uploading.parts if self._uploading else []
        if 0 < params.get("PartNumber", 0) <= len(digests):
            params["ChecksumSHA256"] = _b64(digests[params["PartNumber"] - 1])

    def _add_object_checksum(self, params: dict[str, Any], **_: Any) -> None:
        if self._uploading and self._uploading.sha256 and "ChecksumSHA256" not in params:
            params["ChecksumSHA256"] = _b64(bytes.fromhex(self._uploading.sha256))

    def _verify(self, key: str, size: int, checksum: str, *, parts: int | None) -> None:
        head = self._head(key)
        where = self.url(key)
        if head is None:
            raise FinalError("VerificationFailed", f"{where} is missing right after its upload")
        if head["ContentLength"] != size:
            raise FinalError(
                "SizeMismatch",
                f"{where} holds {head['ContentLength']} bytes after uploading {size}",
            )
        reported = head.get("ChecksumSHA256")
        if reported is None:
            log.warning("%s reports no checksum; verified its size only", self.description)
            return
        value, _, count = reported.partition("-")
        # AWS appends -N to a composite checksum; moto does not.
        if value != checksum or (count and parts is not None and int(count) != parts):
            raise FinalError(
                "ChecksumMismatch",
                f"{where}: the store reports sha256 {reported}, the upload sent {checksum}",
            )

    def _head(self, key: str) -> dict[str, Any] | None:
        return self._call(
            self._client.head_object,
            Bucket=self._bucket,
            Key=self._key(key),
            ChecksumMode="ENABLED",
            what=self.url(key),
            missing=True,
        )

    def _call(self, fn: Any, *args: Any, what: str, missing: bool = False, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), its errors mapped; with `missing`, None for a missing key."""
        try:
            return fn(*args, **kwargs)
        except S3_ERRORS as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            # A missing key is an answer; a missing bucket (NoSuchBucket) stays an error.
            if missing and code in _MISSING_KEY:
                return None
            redact = partial(describe, secrets=self._connection.secrets)
            raise failure(exc, what=what, describe=redact) from None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _composite(parts: list[bytes]) -> str:
    """S3's checksum of a multipart object: the sha256 of the parts' digests, concatenated."""
    return _b64(hashlib.sha256(b"".join(parts)).digest())
