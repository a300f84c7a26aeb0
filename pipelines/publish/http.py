"""HTTP PUT artifact store: Artifactory or Nexus raw repositories, WebDAV servers (nginx).

The image is streamed from the file with Content-Length set, hashed as it is sent. A failed
PUT is retried from the first byte with a fresh hash, so a retry cannot corrupt the digest.
After the upload a HEAD must report the size, and the sha256 where the server reports one
(Artifactory's X-Checksum-Sha256). When the sha256 is known up front it is sent in
X-Checksum-Sha256, which Artifactory checks before it stores anything. A WebDAV server that
answers 409 (a parent collection is missing) gets the collections made with MKCOL.

Credentials come from the URL's user info, a `user:password` file, or the environment
(DISKFLOW_PUBLISH_TOKEN for a bearer token, DISKFLOW_PUBLISH_USER and
DISKFLOW_PUBLISH_PASSWORD for basic auth), in that order; they never reach argv, logs or
errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from importer.errors import FinalError, TransientError
from importer.progress import Progress
from importer.redaction import describe
from importer.sources.http import (
    FINAL_STATUSES,
    HttpOptions,
    redact_url,
    request_failure,
    retry_after,
    status_text,
)
from pipelines.publish.base import CHUNK, HashingReader, ImportSource, Stored

log = logging.getLogger("diskflow.publish")
T = TypeVar("T")

TOKEN_ENV = "DISKFLOW_PUBLISH_TOKEN"
USER_ENV, PASSWORD_ENV = "DISKFLOW_PUBLISH_USER", "DISKFLOW_PUBLISH_PASSWORD"
CHECKSUM_HEADER = "X-Checksum-Sha256"
_PUT_STATUSES = {
    **FINAL_STATUSES,
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "TooLarge",
    507: "InsufficientStorage",
}


def with_credentials(
    url: str, options: HttpOptions, *, auth_file: str | None = None
) -> HttpOptions:
    """`options` with the first credentials found: already in `options`, the URL's user info,
    `auth_file` (one line `user:password`), then the environment."""
    if options.auth or any(name.lower() == "authorization" for name, _ in options.secret_headers):
        return options
    parts = urlsplit(url)
    if parts.username is not None:
        return dataclasses.replace(
            options, auth=(unquote(parts.username), unquote(parts.password or ""))
        )
    if auth_file:
        return dataclasses.replace(options, auth=_read_auth_file(auth_file))
    if token := os.environ.get(TOKEN_ENV):
        return dataclasses.replace(options, secret_headers=(("Authorization", f"Bearer {token}"),))
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if (user is None) != (password is None):
        raise FinalError("InvalidArgument", f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    return dataclasses.replace(options, auth=(user, password)) if user and password else options


def _read_auth_file(path: str) -> tuple[str, str]:
    try:
        with open(path) as file:
            line = file.readline().rstrip("\r\n")
    except OSError as exc:
        raise FinalError("InvalidArgument", f"cannot read {path}: {exc.strerror}") from None
    user, sep, password = line.partition(":")
    if not sep or not user:
        # The content is not quoted: a malformed line may still be a secret.
        raise FinalError("InvalidArgument", f"{path} must hold one line 'user:password'")
    return user, password


class HttpStore:
    """Objects under an http(s) base URL, written with PUT."""

    def __init__(self, url: str, options: HttpOptions) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FinalError("InvalidURL", f"{redact_url(url)} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise FinalError("InvalidURL", f"{redact_url(url)}: a store URL takes no query")
        self._base = redact_url(url).rstrip("/") + "/"
        self.description = self._base
        self._options = options
        self._secrets = {value for _, value in options.secret_headers}
        if options.auth and options.auth[1]:
            self._secrets.add(options.auth[1])
        self._session = requests.Session()
        # Passed per request: a session-wide `verify` loses to REQUESTS_CA_BUNDLE in the env.
        self._tls_verify: str | bool = options.ca_bundle or not options.insecure

    # --- Store --------------------------------------------------------------------------

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, progress: Progress | None = None
    ) -> Stored:
        """PUT `path` streamed and hashed; every retry re-reads it from the first byte."""
        size = path.stat().st_size
        body = _FileBody(path, size=size, expected=sha256, progress=progress)
        self._retrying(self._put, key, body, size=size, sha256=sha256)
        assert body.sha256 is not None  # a PUT that succeeded sent every byte
        self._verify(key, size, body.sha256)
        return Stored(body.sha256, size)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """PUT a small object with its sha256 in X-Checksum-Sha256."""
        digest = hashlib.sha256(data).hexdigest()
        self._retrying(
            self._put, key, data, size=len(data), sha256=digest, content_type=content_type
        )
        self._verify(key, len(data), digest)

    def get_bytes(self, key: str) -> bytes | None:
        response = self._retrying(self._request, "GET", self.url(key))
        return None if response.status_code == 404 else self._checked(response).content

    def size(self, key: str) -> int | None:
        response = self._retrying(self._request, "HEAD", self.url(key))
        if response.status_code == 404:
            return None
        length = self._checked(response).headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise FinalError("HttpError", f"{self.url(key)} has no Content-Length in a HEAD")
        return int(length)

    def url(self, key: str) -> str:
        return self._base + quote(key)

    def import_source(self, key: str) -> ImportSource:
        """The same URL serves GET; credentials, if needed, go in the DataVolume's secretRef."""
        return ImportSource("http", self.url(key))

    # --- requests -----------------------------------------------------------------------

    def _put(
        self,
        key: str,
        body: bytes | _FileBody,
        *,
        size: int,
        sha256: str | None,
        content_type: str = "application/octet-stream",
    ) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        if sha256:
            headers[CHECKSUM_HEADER] = sha256
        url = self.url(key)
        response = self._request("PUT", url, data=body, headers=headers)
        # RFC 4918: 409 means a parent collection is missing. (nginx answers 500 instead: it
        # needs `create_full_put_path on`.)
        if response.status_code == 409 and self._make_collections(key):
            response = self._request("PUT", url, data=body, headers=headers)
        self._checked(response)

    def _make_collections(self, key: str) -> bool:
        """MKCOL each directory of `key` below the base URL; False if none was missing."""
        made = False
        folders = key.split("/")[:-1]
        for depth in range(1, len(folders) + 1):
            url = self.url("/".join(folders[:depth])) + "/"
            response = self._request("MKCOL", url)
            if response.status_code == 201:
                made = True
            elif response.status_code != 405:  # 405: it exists already
                self._checked(response)
        return made

    def _request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | _FileBody | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        sent = {
            **dict(self._options.headers),
            **dict(self._options.secret_headers),
            **(headers or {}),
        }
        try:
            return self._session.request(
                method,
                url,
                data=data,
                headers=sent,
                auth=self._options.auth,
                verify=self._tls_verify,
                # A redirected PUT would need its body again, and may leave the origin
                # the credentials belong to: only reads follow redirects.
                allow_redirects=method in ("GET", "HEAD"),
                timeout=(self._options.connect_timeout, self._options.stall_timeout),
            )
        except requests.RequestException as exc:
            raise request_failure(exc, url, self._describe, method=method) from None

    def _checked(self, response: requests.Response) -> requests.Response:
        """`response` if it is a success, else the error it means."""
        status = response.status_code
        if 200 <= status < 300:
            return response
        where = redact_url(response.request.url or "")
        said = f"{response.request.method} {where} answered {status_text(status)}"
        if 300 <= status < 400:
            location = redact_url(urljoin(response.url, response.headers.get("Location", "")))
            raise FinalError("Redirected", f"{said} to {location}: publish to that URL")
        if status in (408, 429) or (status >= 500 and status not in _PUT_STATUSES):
            error = TransientError("ServerError", said)
            error.retry_after = retry_after(response)  # type: ignore[attr-defined]
            raise error
        raise FinalError(_PUT_STATUSES.get(status, "HttpError"), said)

    def _verify(self, key: str, size: int, sha256: str) -> None:
        response = self._checked(self._retrying(self._request, "HEAD", self.url(key)))
        length = response.headers.get("Content-Length")
        if length != str(size):
            raise FinalError(
                "SizeMismatch", f"{self.url(key)} holds {length} bytes after uploading {size}"
            )
        reported = response.headers.get(CHECKSUM_HEADER)
        if reported and not hmac.compare_digest(reported.lower(), sha256):
            raise FinalError(
                "ChecksumMismatch",
                f"{self.url(key)}: the store reports sha256 {reported}, the upload sent {sha256}",
            )

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._secrets)

    # --- retries ------------------------------------------------------------------------

    def _retrying(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        retrying = Retrying(
            stop=stop_after_attempt(self._options.retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._options.backoff
        delay = (wait_exponential(multiplier=backoff, max=30) + wait_random(0, backoff))(state)
        exc = state.outcome.exception() if state.outcome else None
        return max(delay, getattr(exc, "retry_after", 0.0))


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0
    log.warning("attempt %d failed (%s); retrying in %.1fs", state.attempt_number, exc, delay)


class _FileBody:
    """A PUT body that reads `path` from its first byte each time it is iterated, with a
    fresh hash: `sha256` is that of the last pass that reached the end."""

    def __init__(
        self, path: Path, *, size: int, expected: str | None, progress: Progress | None
    ) -> None:
        self._path = path
        self._size = size
        self._expected = expected
        self._progress = progress
        self.sha256: str | None = None

    def __len__(self) -> int:  # requests sets Content-Length from it
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        self.sha256 = None
        if self._progress is not None:
            self._progress.set_done(0)
        with self._path.open("rb") as file:
            reader = HashingReader(
                file, size=self._size, expected=self._expected, progress=self._progress
            )
            while data := reader.read(CHUNK):
                yield data
        self.sha256 = reader.sha256
