"""HTTP behaviour against real servers: nginx for the normal path, the fault server for
dropped connections, stalls, error statuses, HTML pages, missing Range support and redirects."""

from __future__ import annotations

import base64
import logging
import random
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from importer import HttpOptions, ImportOptions, import_image
from importer.errors import Failure
from importer.sources import HttpSource, Source
from tests.conftest import Images, MiB, run
from tests.importer.test_import_formats import assert_same_content
from tests.support.faultserver import FaultServer

FAST = HttpOptions(retries=3, backoff=0.01, stall_timeout=1.0, connect_timeout=2.0)
SOURCE = "disk.qcow2.gz"


def token() -> str:
    return uuid.uuid4().hex


def fetch(url: str, tmp_path: Path, http: HttpOptions = FAST) -> Path:
    dest = tmp_path / "disk.img"
    import_image(url, str(dest), options=ImportOptions(http=http, scratch_dir=str(tmp_path)))
    return dest


def fails(url: str, tmp_path: Path, reason: str, http: HttpOptions = FAST) -> Failure:
    dest = tmp_path / "disk.img"
    with pytest.raises(Failure) as caught:
        import_image(url, str(dest), options=ImportOptions(http=http, scratch_dir=str(tmp_path)))
    assert caught.value.reason == reason, caught.value.message
    assert list(tmp_path.iterdir()) == []
    return caught.value


@pytest.mark.parametrize("seed", range(4))
def test_dropped_connections_resume_with_range(
    seed: int, faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    size = images.path("qcow2", "gz").stat().st_size
    drop_after = random.Random(seed).randrange(1, size // 2)
    t = token()
    dest = fetch(faults.url(t, SOURCE, drop_after=drop_after, times=2), tmp_path)
    assert_same_content(dest, images.raw)
    requests = faults.requests[t]
    assert len(requests) == 3
    assert requests[1]["headers"]["Range"] == f"bytes={drop_after}-"
    assert requests[2]["headers"]["Range"] == f"bytes={2 * drop_after}-"
    assert requests[1]["headers"]["If-Range"].startswith('"')


def test_without_range_support_restarts_from_zero(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    t = token()
    dest = fetch(faults.url(t, SOURCE, drop_after=300_000, ranges=0), tmp_path)
    assert_same_content(dest, images.raw)
    assert len(faults.requests[t]) == 2


def test_stalled_transfer_is_retried(faults: FaultServer, images: Images, tmp_path: Path) -> None:
    t = token()
    http = HttpOptions(retries=2, backoff=0.01, stall_timeout=0.5)
    dest = fetch(faults.url(t, SOURCE, stall_after=100_000, stall=5), tmp_path, http)
    assert_same_content(dest, images.raw)
    assert faults.requests[t][1]["headers"]["Range"] == "bytes=100000-"


def test_stalls_exhaust_retries(faults: FaultServer, tmp_path: Path) -> None:
    http = HttpOptions(retries=1, backoff=0.01, stall_timeout=0.3)
    # Each response stalls before its first byte: no progress, so the retries run out.
    error = fails(
        faults.url(token(), SOURCE, stall_after=0, stall=3, times=5),
        tmp_path,
        "ConnectionLost",
        http,
    )
    assert not error.final


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_retried(
    status: int, faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    t = token()
    dest = fetch(faults.url(t, SOURCE, status=status, times=2, retry_after=0), tmp_path)
    assert_same_content(dest, images.raw)
    assert len(faults.requests[t]) == 3


def test_persistent_server_error_is_transient(faults: FaultServer, tmp_path: Path) -> None:
    t = token()
    error = fails(faults.url(t, SOURCE, status=503, times=100), tmp_path, "ServerError")
    assert not error.final and "503" in error.message
    assert len(faults.requests[t]) == FAST.retries + 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "Unauthorized"), (403, "Forbidden"), (404, "NotFound"), (410, "Gone")],
)
def test_final_statuses_are_not_retried(
    status: int, reason: str, faults: FaultServer, tmp_path: Path
) -> None:
    t = token()
    error = fails(faults.url(t, SOURCE, status=status, times=100), tmp_path, reason)
    assert error.final and str(status) in error.message
    assert len(faults.requests[t]) == 1


def test_missing_file_on_nginx(nginx: str, tmp_path: Path) -> None:
    fails(f"{nginx}/no-such-image.qcow2", tmp_path, "NotFound")


@pytest.mark.parametrize("ctype", ["text/html", "application/octet-stream"])
def test_html_page_is_never_a_successful_import(
    ctype: str, faults: FaultServer, tmp_path: Path
) -> None:
    error = fails(
        faults.url(token(), SOURCE, html=1, ctype=ctype, times=100), tmp_path, "HtmlInsteadOfImage"
    )
    assert error.final


def test_object_replaced_during_download_is_detected(faults: FaultServer, tmp_path: Path) -> None:
    error = fails(
        faults.url(token(), SOURCE, drop_after=200_000, etag="changing"), tmp_path, "SourceChanged"
    )
    assert "changed during the download" in error.message


def drain_within(open_source: Callable[[], Source], seconds: float) -> BaseException | None:
    """Open a source and read it to the end in a thread; what it raised (None: nothing).
    Fails the test if that takes over `seconds`: the source is closed then, to end it."""
    outcome: list[BaseException | None] = []
    opened: list[Source] = []

    def drain() -> None:
        try:
            opened.append(open_source())
            while opened[0].read(MiB):
                pass
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reader.join(seconds)
    hung = reader.is_alive()
    if opened:
        opened[0].close()
    reader.join(10)
    assert not hung, f"still reading after {seconds} s"
    return outcome[0]


# A trickle: one byte a second, which no stall timeout notices.
TRICKLE = HttpOptions(
    retries=1, backoff=0.01, stall_timeout=5.0, min_rate=4096, min_rate_window=2.0
)


def test_trickle_under_the_minimum_rate_fails(faults: FaultServer) -> None:
    t = token()
    url = faults.url(t, SOURCE, rate=1)
    # Two connections of a 2 s window each: far less than the 30 s allowed.
    error = drain_within(lambda: HttpSource(url, TRICKLE), seconds=30)
    assert isinstance(error, Failure) and error.reason == "TooSlow", error
    assert not error.final
    assert "4096 bytes/s" in error.message and "--min-rate" in error.message
    assert len(faults.requests[t]) == TRICKLE.retries + 1


def test_a_byte_per_connection_is_no_progress(faults: FaultServer, tmp_path: Path) -> None:
    t = token()
    # Each of the first 1000 responses drops after one byte: each is a failed attempt.
    error = fails(faults.url(t, SOURCE, drop_after=1, times=1000), tmp_path, "ConnectionLost")
    assert not error.final
    assert len(faults.requests[t]) == FAST.retries + 1
    # In words, not urllib3's nested "('Connection broken: IncompleteRead(...)', ...)".
    assert "the server closed the connection with" in error.message, error.message
    assert "IncompleteRead" not in error.message


def test_a_flaky_but_healthy_server_completes(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    t = token()
    # Every connection drops after 4 MiB: ten drops, more than `retries`, but each made progress.
    dest = fetch(faults.url(t, "disk.raw", drop_after=4 * MiB, times=100), tmp_path)
    assert_same_content(dest, images.raw)
    assert len(faults.requests[t]) == 10


def test_a_resume_after_progress_backs_off_first(
    faults: FaultServer, images: Images, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="diskflow.importer")
    dest = fetch(faults.url(token(), SOURCE, drop_after=300_000, times=2), tmp_path)
    assert_same_content(dest, images.raw)
    backoffs = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(backoffs) == 2 and all(m.startswith("attempt 1 failed") for m in backoffs)


def test_resume_from_a_cache_that_answers_from_byte_zero(
    faults: FaultServer, tmp_path: Path
) -> None:
    url = faults.url(token(), "disk.raw", drop_after=1_000_000, from_zero=1)
    error = fails(url, tmp_path, "BadContentRange")
    assert "bytes 1000000-" in error.message


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    error = fails("http://127.0.0.1:9/disk.img", tmp_path, "ConnectionFailed")
    assert not error.final
    assert error.message.endswith("cannot connect to 127.0.0.1:9: connection refused")


def test_unknown_host_is_named(tmp_path: Path) -> None:
    error = fails("http://no-such-host.invalid/disk.img", tmp_path, "ConnectionFailed")
    assert error.message.endswith("cannot resolve host no-such-host.invalid")


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: connecting to it times out."""
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued.connect(("127.0.0.1", port))
        yield port


def test_connect_timeout_is_named(full_backlog: int, tmp_path: Path) -> None:
    http = HttpOptions(retries=0, connect_timeout=0.5)
    url = f"http://127.0.0.1:{full_backlog}/disk.img"
    error = fails(url, tmp_path, "ConnectionFailed", http)
    assert error.message.endswith(f"connect to 127.0.0.1:{full_backlog} timed out after 0.5 s")


@pytest.mark.parametrize(
    ("location", "named"),
    [("file:///etc/passwd", "file:"), ("ftp://127.0.0.1/disk.img", "ftp:"), ("http://[::1", "")],
)
def test_redirect_to_an_unusable_url_is_final(
    location: str, named: str, faults: FaultServer, tmp_path: Path
) -> None:
    t = token()
    error = fails(faults.url(t, SOURCE, redirect=quote(location, safe="")), tmp_path, "InvalidURL")
    assert error.final and named in error.message
    assert len(faults.requests[t]) == 1


def test_redirect_to_another_host_drops_credentials(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    final = token()
    elsewhere = faults.url(final, SOURCE, host="localhost")  # another host name, same server
    first = token()
    http = HttpOptions(
        headers=(("X-Plain", "visible"),),
        secret_headers=(("X-Api-Key", "s3cr3t"),),
        auth=("user", "pa55word"),
        retries=0,
    )
    dest = fetch(faults.url(first, SOURCE, redirect=elsewhere), tmp_path, http)
    assert_same_content(dest, images.raw)
    sent_first = faults.requests[first][0]["headers"]
    assert sent_first["Authorization"] == "Basic " + base64.b64encode(b"user:pa55word").decode()
    assert sent_first["X-Api-Key"] == "s3cr3t"
    sent_after = faults.requests[final][0]["headers"]
    assert "Authorization" not in sent_after and "X-Api-Key" not in sent_after
    assert sent_after["X-Plain"] == "visible"


def test_redirect_on_the_same_host_keeps_credentials(faults: FaultServer, tmp_path: Path) -> None:
    final = token()
    http = HttpOptions(auth=("user", "pa55word"), retries=0)
    fetch(faults.url(token(), SOURCE, redirect=faults.url(final, SOURCE)), tmp_path, http)
    assert "Authorization" in faults.requests[final][0]["headers"]


def test_redirect_loop_is_final(faults: FaultServer, tmp_path: Path) -> None:
    fails(faults.url(token(), SOURCE, redirect="self"), tmp_path, "TooManyRedirects")


def test_secrets_in_url_never_reach_errors(faults: FaultServer, tmp_path: Path) -> None:
    url = faults.url(token(), SOURCE, status=404, times=1, signature="TOPSECRET")
    url = url.replace("http://", "http://admin:hunter2@")
    error = fails(url, tmp_path, "NotFound")
    assert "TOPSECRET" not in error.message and "hunter2" not in error.message


@pytest.fixture(scope="module")
def tls_server(
    images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FaultServer, Path]]:
    """The fault server over TLS with a self-signed certificate for 127.0.0.1."""
    certs = tmp_path_factory.mktemp("tls")
    cert, key = certs / "cert.pem", certs / "key.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", key, "-out", cert)  # fmt: skip
    server = FaultServer(str(images.dir), tls=(str(cert), str(key)))
    yield server, cert
    server.close()


def test_unknown_certificate_authority_is_a_final_tls_error(
    tls_server: tuple[FaultServer, Path], tmp_path: Path
) -> None:
    server, _ = tls_server
    error = fails(server.url(token(), SOURCE), tmp_path, "TLSError")
    assert error.final and "certificate verify failed: self-signed" in error.message
    assert "ConnectionPool" not in error.message


def test_ca_bundle_makes_the_server_trusted(
    tls_server: tuple[FaultServer, Path], images: Images, tmp_path: Path
) -> None:
    server, cert = tls_server
    http = HttpOptions(ca_bundle=str(cert), retries=0)
    assert_same_content(fetch(server.url(token(), SOURCE), tmp_path, http), images.raw)


def test_insecure_skips_verification(
    tls_server: tuple[FaultServer, Path], images: Images, tmp_path: Path
) -> None:
    server, _ = tls_server
    http = HttpOptions(insecure=True, retries=0)
    assert_same_content(fetch(server.url(token(), SOURCE), tmp_path, http), images.raw)


def test_weak_etag_falls_back_to_last_modified(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    t = token()
    dest = fetch(faults.url(t, SOURCE, drop_after=250_000, etag="weak", ranges=0), tmp_path)
    assert_same_content(dest, images.raw)
    assert faults.requests[t][1]["headers"]["If-Range"] == "Wed, 21 Oct 2015 07:28:00 GMT"


def test_query_strings_with_quotes_and_parentheses_are_redacted(
    faults: FaultServer, tmp_path: Path
) -> None:
    url = faults.url(token(), SOURCE, status=404, times=1) + "&sig=ab'SECRET1(SECRET2)"
    error = fails(url, tmp_path, "NotFound")
    assert "SECRET1" not in error.message and "SECRET2" not in error.message


def test_invalid_port_is_a_specific_error(tmp_path: Path) -> None:
    fails("http://127.0.0.1:abc/disk.img", tmp_path, "InvalidURL")
