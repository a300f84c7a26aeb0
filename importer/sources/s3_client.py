"""An S3 client made from S3Options, and what S3's errors mean.

Shared by the S3 source (import) and the S3 artifact store (publish), so that both find
credentials the same way and fail with the same reasons.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import urllib3
from botocore.configprovider import ConfiguredEndpointProvider

from importer.errors import Failure, FinalError, TransientError
from importer.sources.http import HttpOptions, misplaced_userinfo, redact_url
from importer.sources.network import connect_problem, tls_problem
from importer.sources.s3_options import S3Options, region_of

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

# What a call on an S3 client raises; `failure` says what each means.
S3_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    urllib3.exceptions.HTTPError,
    OSError,
)


@dataclass(frozen=True)
class S3Connection:
    client: Any  # botocore's S3 client (its class is generated at run time)
    region: str
    endpoint: str | None
    """The store's URL: as given, else as the AWS environment or config names it; None: AWS."""
    secrets: frozenset[str]
    """The secret key and session token: never printed."""


def connect(
    s3: S3Options,
    endpoint: str | None,
    http: HttpOptions,
    *,
    attempts: int,
    sign_payload: bool | None = None,
) -> S3Connection:
    """A client for the store at `endpoint` (None: the one the AWS environment or config
    names, else AWS) with `s3`'s static keys, or else credentials from boto3's chain or
    `s3.credentials_file`, making `attempts` tries per request (1: the caller retries).
    `sign_payload=False` spares the sha256 of each body that SigV4 takes over plain http; only
    for a caller whose every body carries its own (signed) x-amz-checksum header."""
    core = _botocore_session(s3)
    try:
        session = boto3.session.Session(
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            profile_name=s3.profile,
            botocore_session=core,
        )
        endpoint = endpoint or _configured_endpoint(core)
        credentials = session.get_credentials()
        configured_region = session.region_name
    except botocore.exceptions.ProfileNotFound as exc:
        raise _no_profile(core, exc.kwargs["profile"], given=s3.profile is not None) from None
    if endpoint:
        _check_endpoint(endpoint)
    if credentials is None:
        raise FinalError(
            "NoCredentials",
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, "
            "a web identity token, or --s3-credentials-file",
        )
    frozen = credentials.get_frozen_credentials()
    # AWS_REGION before AWS_DEFAULT_REGION and the profile's, as the aws CLI reads them:
    # botocore knows only the latter two.
    region = (
        s3.region
        or region_of(endpoint)
        or os.environ.get("AWS_REGION")
        or configured_region
        or "us-east-1"
    )
    addressing = s3.addressing if s3.addressing != "auto" or not endpoint else "path"
    s3_config: dict[str, object] = {"addressing_style": addressing}
    if sign_payload is not None:  # None: botocore's default, or the profile's setting
        s3_config["payload_signing_enabled"] = sign_payload
    config = botocore.config.Config(
        region_name=region,
        s3=s3_config,
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=http.connect_timeout,
        read_timeout=http.stall_timeout,
    )
    client = session.client("s3", endpoint_url=endpoint, verify=_verify(http), config=config)
    secrets = frozenset(s for s in (frozen.secret_key, frozen.token) if s)
    return S3Connection(client, region, endpoint, secrets)


def _botocore_session(s3: S3Options) -> botocore.session.Session:
    """botocore's session, reading `s3.credentials_file` instead of the default one: set
    before any profile is looked up, so that a profile only that file holds is found."""
    core = botocore.session.Session()
    if s3.credentials_file:
        core.set_config_variable("credentials_file", s3.credentials_file)
    return core


def _configured_endpoint(core: botocore.session.Session) -> str | None:
    """The endpoint the environment or config names (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL,
    the profile's endpoint_url), found by the provider botocore itself asks (private in name,
    pinned by the tests): the store's address has to be known here too, for the addressing
    style and the URL a DataVolume imports from."""
    if core.get_config_variable("ignore_configured_endpoint_urls"):
        return None
    provider = ConfiguredEndpointProvider(
        full_config=core.full_config, scoped_config=core.get_scoped_config(), client_name="s3"
    )
    return provider.provide()


def _no_profile(core: botocore.session.Session, name: str, *, given: bool) -> FinalError:
    """What to say of a profile that neither file holds, and who named it."""
    named_by = [
        v for v in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE") if not given and os.environ.get(v)
    ]
    source = f" (from {named_by[0]})" if named_by else ""
    files = " or ".join(
        os.path.expanduser(core.get_config_variable(variable))
        for variable in ("config_file", "credentials_file")
    )
    return FinalError("InvalidArgument", f"there is no AWS profile {name!r}{source} in {files}")


def _verify(http: HttpOptions) -> str | bool | None:
    """How botocore checks TLS: --ca-bundle, else off with --insecure, else None, which is
    botocore's default and honours AWS_CA_BUNDLE (True would ignore it, unlike the aws CLI)."""
    if http.ca_bundle:
        return http.ca_bundle
    return False if http.insecure else None


def _check_endpoint(endpoint: str) -> None:
    """Refuse an endpoint carrying credentials or a query: botocore would quote it in full in
    its errors, and keys belong in the credential chain, not in a URL."""
    parts = urlsplit(endpoint)
    if parts.username is not None or parts.query or parts.fragment or misplaced_userinfo(endpoint):
        raise FinalError(
            "InvalidURL",
            f"the S3 endpoint {redact_url(endpoint)} must be scheme://host[:port] without "
            "user info or query; give keys as AWS credentials (environment, profile, "
            "--s3-credentials-file)",
        )


def failure(
    exc: BaseException,
    *,
    what: str,
    describe: Callable[[BaseException], str],
    connect_timeout: float | None = None,
) -> Failure:
    """What one of S3_ERRORS means for the transfer of `what`; `describe` keeps secrets out."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return _client_failure(exc, what=what, describe=describe)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return FinalError("NoCredentials", "no S3 credentials were found")
    if isinstance(exc, botocore.exceptions.SSLError):
        said = tls_problem(exc) or describe(exc)
        return FinalError("TLSError", f"TLS with the S3 endpoint failed: {said}")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return FinalError("InvalidURL", f"{what}: {describe(exc)}")
    url = (getattr(exc, "kwargs", None) or {}).get("endpoint_url")
    said = url and connect_problem(exc, url, timeout=connect_timeout)
    return TransientError("ConnectionFailed", f"{what}: {said or describe(exc)}")


def _client_failure(
    exc: botocore.exceptions.ClientError, *, what: str, describe: Callable[[BaseException], str]
) -> Failure:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    said = f"{what}: {code} {describe(Exception(error.get('Message', '')))}"
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
            "SourceChanged", f"{what} changed during the download; start the import again"
        )
    if code in _RETRIED or (isinstance(status, int) and status >= 500):
        return TransientError("ServerError", said)
    return FinalError("S3Error", said)
