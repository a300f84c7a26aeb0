"""HTTP(S) source: one GET stream that survives dropped connections.

A dropped, stalled, too slow or truncated transfer is retried with backoff and resumed with
`Range` + `If-Range`, so a replaced object is detected instead of mixed into the image.
Where the server ignores ranges, the stream is fetched again from byte 0 and the bytes
already passed downstream are skipped: hashing and decompression never notice a resume.
"""

from __future__ import annotations

import base64
import logging
import warnings
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3

from importer.errors import Failure, FinalError, TransientError
from importer.reasons import Reason

# Re-exported: this was their home, and callers that speak HTTP anyway import them from here.
from importer.sources.http_options import HttpOptions as HttpOptions
from importer.sources.http_options import parse_header as parse_header
from importer.sources.network import connect_problem, tls_problem
from importer.sources.resumable import STREAM_ERRORS, ResumableSource

log = logging.getLogger("diskflow.importer")

MAX_REDIRECTS = 10
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
FINAL_STATUSES = {
    401: Reason.UNAUTHORIZED,
    403: Reason.FORBIDDEN,
    404: Reason.NOT_FOUND,
    410: Reason.GONE,
}
_MAX_RETRY_AFTER = 60.0
_SKIP_CHUNK = 1 << 20


def request_failure(
    exc: requests.RequestException,
    url: str,
    describe: Callable[[BaseException], str],
    *,
    method: str = "",
    connect_timeout: float | None = None,
) -> Failure:
    """What a request that got no response means: TLS and URL errors are final, others not."""
    where = f"{method} {redact_url(url)}".lstrip()
    if isinstance(exc, requests.exceptions.SSLError):
        said = tls_problem(exc) or describe(exc)
        return FinalError("TLSError", f"TLS with {redact_url(url)} failed: {said}")
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema):
        return FinalError("InvalidURL", f"{redact_url(url)}: {describe(exc)}")
    said = connect_problem(exc, url, timeout=connect_timeout) or describe(exc)
    return TransientError("ConnectionFailed", f"{where}: {said}")


def status_text(status: int) -> str:
    """The status with its standard phrase ("HTTP 503 Service Unavailable"), never the server's
    own, which may echo what was sent: a proxy quoting the request's headers quotes secrets."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def redact_url(url: str) -> str:
    """The URL without user info and query string (signed URLs carry secrets there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.netloc.rpartition(":")[2]
    port = port if port.isdigit() else ""
    netloc = f"{host}:{port}" if port else host
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, _path_without_userinfo(parts.path), query, ""))


def _path_without_userinfo(path: str) -> str:
    # "http://user:pa/ss@host/x" parses as host "user", path "/ss@host/x": what comes before
    # an '@' in a path may be the rest of a password.
    return f"/<redacted>@{path.rpartition('@')[2]}" if "@" in path else path


def misplaced_userinfo(url: str) -> bool:
    """Whether `url` has an '@' in its path: perhaps user info whose password holds a '/',
    which URL parsers take for the start of the path."""
    return "@" in urlsplit(url).path


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class HttpSource(ResumableSource):
    """Stream an image over HTTP(S), resuming after failures."""

    def __init__(self, url: str, options: HttpOptions) -> None:
        super().__init__(options, stream_errors=(*STREAM_ERRORS, requests.RequestException))
        self._url = url
        self._remember_secrets(url)
        self._secrets.update(value for _, value in options.secret_headers if value)
        if options.auth and options.auth[1]:
            basic = base64.b64encode(":".join(options.auth).encode()).decode()
            self._secrets.update((options.auth[1], basic))
        self.description = redact_url(url)
        self._session = requests.Session()
        # Passed per request: a session-wide `verify` loses to REQUESTS_CA_BUNDLE in the env.
        self._verify: str | bool = options.ca_bundle or not options.insecure
        if self._verify is False:
            log.warning("not verifying the TLS certificate of %s (--insecure)", self.description)
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._start()

    def close(self) -> None:
        super().close()
        self._session.close()

    def _open(self, offset: int) -> urllib3.BaseHTTPResponse:
        return (self._open_first() if offset == 0 else self._resume(offset)).raw

    # --- requests ---------------------------------------------------------------------

    def _open_first(self) -> requests.Response:
        response = self._request(0)
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            response.close()
            raise FinalError(
                "HtmlInsteadOfImage",
                f"{self.description} answered with an HTML page ({content_type}), not a disk "
                "image; the link may have expired or need a login",
            )
        if "Content-Length" in response.headers and not response.headers.get("Content-Encoding"):
            self.size = int(response.headers["Content-Length"])
        etag = response.headers.get("ETag")
        # Only a strong ETag may be used in If-Range (RFC 9110 13.1.5).
        self._etag = etag if etag and not etag.startswith("W/") else None
        self._last_modified = response.headers.get("Last-Modified")
        self.ranges = (
            response.headers.get("Accept-Ranges", "").lower() == "bytes"
            and self.size is not None
            and self._validator is not None
        )
        return response

    @property
    def _validator(self) -> str | None:
        return self._etag or self._last_modified

    def _resume(self, offset: int) -> requests.Response:
        response = self._request(offset)
        if response.status_code == 206:
            self._check_range(response, response.headers.get("Content-Range"), offset, None)
            log.info("resumed %s at byte %d", self.description, offset)
            return response
        # Compare like with like: ETag with ETag, else Last-Modified with Last-Modified.
        header = "ETag" if self._etag else "Last-Modified"
        now = response.headers.get(header)
        if self._validator and now and now != self._validator:
            response.close()
            raise TransientError(
                "SourceChanged",
                f"{self.description} changed during the download ({header} {self._validator} "
                f"became {now}); start the import again",
            )
        log.warning("%s does not resume; fetching again from byte 0", self.description)
        self._skip(response, offset)
        return response

    def _skip(self, response: requests.Response, count: int) -> None:
        assert self._meter is not None  # skipping is part of the connection's transfer
        try:
            while count:
                data = self._meter.read(response.raw, min(count, _SKIP_CHUNK))
                if not data:
                    raise TransientError("Truncated", f"{self.description} ended early")
                count -= len(data)
                self._meter.check()
        except self._stream_errors as exc:
            response.close()
            raise TransientError("ConnectionLost", self._describe_break(exc)) from None
        except BaseException:
            response.close()
            raise

    def _fetch_range(self, start: int, end: int) -> bytes:
        response = self._request(start, end)
        if response.status_code != 206:
            response.close()  # If-Range failed: the whole (new) object came back
            raise TransientError(
                "SourceChanged",
                f"{self.description} changed during the download; start the import again",
            )
        self._check_range(response, response.headers.get("Content-Range"), start, end)
        return self._read_exactly(response.raw, end - start, start)

    def _request(self, offset: int, end: int | None = None) -> requests.Response:
        headers = {"Accept-Encoding": "identity", **dict(self._options.headers)}
        if offset or end is not None:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
            if self._validator:
                headers["If-Range"] = self._validator
        url, trusted = self._url, True
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, headers, trusted=trusted)
            if response.status_code not in _REDIRECT_STATUSES:
                self._check_status(response, url)
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise FinalError("HttpError", f"{redact_url(url)} redirected without a Location")
            target = _redirect_target(url, location)
            self._remember_secrets(target)
            # Credentials belong to the origin the user named; a redirect elsewhere loses them.
            trusted = trusted and _origin(target) == _origin(self._url)
            url = target
        raise FinalError(
            "TooManyRedirects", f"{self.description} redirected more than {MAX_REDIRECTS} times"
        )

    def _get(self, url: str, headers: dict[str, str], *, trusted: bool) -> requests.Response:
        if trusted:
            headers = {**headers, **dict(self._options.secret_headers)}
        try:
            return self._session.get(
                url,
                headers=headers,
                auth=self._options.auth if trusted else None,
                stream=True,
                verify=self._verify,
                allow_redirects=False,
                timeout=(self._options.connect_timeout, self._options.stall_timeout),
            )
        except requests.RequestException as exc:
            raise request_failure(
                exc, url, self._describe, connect_timeout=self._options.connect_timeout
            ) from None
        except ValueError:  # requests parses a redirect's Location even when not following it
            raise _malformed_redirect(url) from None

    def _check_status(self, response: requests.Response, url: str) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        response.close()
        said = f"{redact_url(url)} answered {status_text(status)}"
        if status in FINAL_STATUSES:
            raise FinalError(FINAL_STATUSES[status], said)
        if status in (408, 429) or status >= 500:
            error = TransientError("ServerError", said)
            error.retry_after = retry_after(response)  # type: ignore[attr-defined]
            raise error
        raise FinalError("HttpError", said)

    def _remember_secrets(self, url: str) -> None:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise FinalError("InvalidURL", f"{redact_url(url)} has an invalid port") from None
        maybe_password = parts.path.rpartition("@")[0]  # see _path_without_userinfo
        self._secrets.update(s for s in (parts.query, parts.password, maybe_password) if s)


def _redirect_target(url: str, location: str) -> str:
    """Where a redirect from `url` leads; only http(s) is followed, as a file: or ftp: target
    can never succeed (nor be retried into success)."""
    try:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
    except ValueError:
        raise _malformed_redirect(url) from None
    if scheme not in ("http", "https"):
        raise FinalError(
            "InvalidURL",
            f"{redact_url(url)} redirected to a {scheme}: URL; only http and https are followed",
        )
    return target


def _malformed_redirect(url: str) -> FinalError:
    # The Location itself is not quoted: it may carry a signed query string.
    return FinalError("InvalidURL", f"{redact_url(url)} redirected to a malformed URL")


def retry_after(response: requests.Response) -> float:
    try:
        return min(float(response.headers.get("Retry-After", 0)), _MAX_RETRY_AFTER)
    except ValueError:
        return 0.0
