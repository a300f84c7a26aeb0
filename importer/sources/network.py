"""Why a connection could not be made, in words. The libraries' own texts are nested reprs
("HTTPConnectionPool(host=..., port=1): Max retries exceeded ... NewConnectionError(...)")
that bury the one fact that matters under the others."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import urllib3

_DEFAULT_PORTS = {"http": 80, "https": 443}


def connect_problem(exc: BaseException, url: str, *, timeout: float | None = None) -> str | None:
    """What kept a connection to the host of `url` from being made ("cannot connect to
    127.0.0.1:1: connection refused"), or None when `exc` is not about connecting."""
    causes = list(_causes(exc))
    parts = urlsplit(url)
    host = parts.hostname or ""
    address = f"[{host}]" if ":" in host else host
    address = f"{address}:{parts.port or _DEFAULT_PORTS.get(parts.scheme, '')}".rstrip(":")
    if any(isinstance(c, socket.gaierror | urllib3.exceptions.NameResolutionError) for c in causes):
        return f"cannot resolve host {host}"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"cannot connect to {address}: connection refused"
    # NewConnectionError is a ConnectTimeoutError too, for old callers' sake: not a timeout.
    if any(type(c) is urllib3.exceptions.ConnectTimeoutError for c in causes):
        after = f" after {timeout:g} s" if timeout else ""
        return f"connect to {address} timed out{after}"
    if any(isinstance(c, urllib3.exceptions.NewConnectionError) for c in causes):
        errors = [c for c in causes if isinstance(c, OSError) and c.strerror]
        why = errors[0].strerror.lower() if errors else "the connection failed"
        return f"cannot connect to {address}: {why}"
    return None


def transfer_problem(exc: BaseException, *, stall_timeout: float | None = None) -> str | None:
    """What broke a transfer under way ("the server closed the connection with 2097152 bytes
    still to come", "no data for 60 s"), or None when `exc` says nothing more precise."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, urllib3.exceptions.IncompleteRead):
            return f"the server closed the connection with {cause.expected} bytes still to come"
    if any(
        isinstance(c, urllib3.exceptions.ReadTimeoutError | TimeoutError | socket.timeout)
        for c in causes
    ):
        return f"no data for {stall_timeout:g} s" if stall_timeout else "the read timed out"
    if any(isinstance(c, ConnectionResetError) for c in causes):
        return "the connection was reset"
    if any(isinstance(c, urllib3.exceptions.ProtocolError) for c in causes):
        return "the connection broke"
    return None


def tls_problem(exc: BaseException) -> str | None:
    """The TLS library's reason for a failed handshake, without the wrappers around it."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(cause.strerror or cause))
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps, however the library wrapped it: chained, in
    `args`, in urllib3's `reason` or in botocore's `error`."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            (getattr(current, "kwargs", None) or {}).get("error"),
            *current.args,
        ]
        pending.extend(e for e in inner if isinstance(e, BaseException))
