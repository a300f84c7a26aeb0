"""S3 source (AWS or any S3-compatible store: MinIO, Ceph RGW, Wasabi...).

Credentials come from boto3's standard chain (environment, shared config and profiles, web
identity tokens as IRSA uses, instance metadata) or from a credentials file; session tokens
work. The object is read as one GET stream; a resume asks for the rest with `Range` and
`If-Match` on the first response's ETag, so a replaced object is detected, never mixed in.
"""

from __future__ import annotations

import boto3
import botocore.config
import botocore.exceptions
import urllib3

from importer.errors import FinalError, ImportFailure, TransientError
from importer.sources.http import HttpOptions
from importer.sources.resumable import ResumableSource
from importer.sources.s3_options import S3Options, parse_location, region_of

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_FORBIDDEN = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_UNAUTHORIZED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_WRONG_REGION = {
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "301",
    "IllegalLocationConstraintException",
}
_CHANGED = {"PreconditionFailed", "412"}
_RETRIED = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


class S3Source(ResumableSource):
    """Stream an S3 object, resuming after failures."""

    ranges = True  # every S3 store serves byte ranges

    def __init__(self, location: str, s3: S3Options, http: HttpOptions) -> None:
        super().__init__(retries=http.retries, backoff=http.backoff)
        self._bucket, self._key, endpoint = parse_location(location, s3)
        self.description = f"s3://{self._bucket}/{self._key}"
        session = boto3.session.Session(profile_name=s3.profile)
        if s3.credentials_file:
            # boto3 has no public knob for this; botocore's session has.
            session._session.set_config_variable("credentials_file", s3.credentials_file)
        credentials = session.get_credentials()
        if credentials is None:
            raise FinalError(
                "NoCredentials",
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, "
                "a web identity token, or --s3-credentials-file",
            )
        frozen = credentials.get_frozen_credentials()
        self._secrets.update(s for s in (frozen.secret_key, frozen.token) if s)
        addressing = s3.addressing if s3.addressing != "auto" or not endpoint else "path"
        config = botocore.config.Config(
            region_name=s3.region or region_of(endpoint) or session.region_name or "us-east-1",
            s3={"addressing_style": addressing},
            retries={"total_max_attempts": 1},  # retried here, resuming where it stopped
            connect_timeout=http.connect_timeout,
            read_timeout=http.stall_timeout,
        )
        self._client = session.client(
            "s3", endpoint_url=endpoint, verify=http.ca_bundle or not http.insecure, config=config
        )
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
        except botocore.exceptions.ClientError as exc:
            raise self._failure(exc) from None
        except botocore.exceptions.NoCredentialsError:
            raise FinalError("NoCredentials", "no S3 credentials were found") from None
        except botocore.exceptions.SSLError as exc:
            raise FinalError(
                "TLSError", f"TLS with the S3 endpoint failed: {self._describe(exc)}"
            ) from None
        except botocore.exceptions.ParamValidationError as exc:
            raise FinalError("InvalidURL", f"{self.description}: {self._describe(exc)}") from None
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(
                "ConnectionFailed", f"{self.description}: {self._describe(exc)}"
            ) from None
        if self.size is None:  # the first response: what later ones are pinned to
            self.size = response["ContentLength"]
            self._etag = response.get("ETag")
        # The urllib3 response under botocore's StreamingBody: read1, and shutdown on close.
        return response["Body"]._raw_stream

    def _failure(self, exc: botocore.exceptions.ClientError) -> ImportFailure:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        said = f"{self.description}: {code} {self._describe(Exception(error.get('Message', '')))}"
        if code in _NOT_FOUND:
            return FinalError("NotFound", said)
        if code in _FORBIDDEN:
            return FinalError("Forbidden", said)
        if code in _UNAUTHORIZED:
            return FinalError("Unauthorized", said)
        if code in _WRONG_REGION:
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            where = headers.get("x-amz-bucket-region")
            hint = f"it is in {where}: " if where else ""
            return FinalError(
                "WrongRegion", f"{said}; the bucket is in another region ({hint}set --s3-region)"
            )
        if code in _CHANGED:
            return TransientError(
                "SourceChanged",
                f"{self.description} changed during the download; start the import again",
            )
        if code in _RETRIED or (isinstance(status, int) and status >= 500):
            return TransientError("ServerError", said)
        return FinalError("S3Error", said)
