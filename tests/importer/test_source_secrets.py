"""No secret reaches an error message, even from a server that quotes the request's headers
in its reason phrase, as some proxies do: for imports and for publishing over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from importer import HttpOptions, ImportOptions, import_image
from importer.errors import ImportFailure
from pipelines.publish.http import HttpStore
from tests.support.faultserver import FaultServer

SECRETS = ("s3cr3t-header", "pa55word", "TOPSECRET")
HTTP = HttpOptions(
    secret_headers=(("X-Api-Key", "s3cr3t-header"),),
    auth=("user", "pa55word"),
    retries=1,
    backoff=0.01,
)


@pytest.mark.parametrize(
    ("status", "reason", "phrase"),
    [(503, "ServerError", "Service Unavailable"), (403, "Forbidden", "Forbidden")],
)
def test_import_errors_use_the_standard_phrase(
    status: int, reason: str, phrase: str, faults: FaultServer, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    faults.configure(token, status=status, echo=1, times=100)
    url = faults.url(token, "disk.raw", sig="TOPSECRET")
    with pytest.raises(ImportFailure) as caught:
        import_image(url, str(tmp_path / "disk.img"), options=ImportOptions(http=HTTP))
    assert caught.value.reason == reason
    assert caught.value.message.endswith(f"answered HTTP {status} {phrase}")
    assert faults.requests[token][0]["headers"]["X-Api-Key"] == "s3cr3t-header"  # was echoed
    for secret in SECRETS:
        assert secret not in caught.value.message


def test_publish_errors_use_the_standard_phrase(faults: FaultServer) -> None:
    token = uuid.uuid4().hex
    faults.configure(token, status=403, echo=1, times=100)
    store = HttpStore(f"http://127.0.0.1:{faults.port}/{token}/", HTTP)
    with pytest.raises(ImportFailure) as caught:
        store.get_bytes("disk.raw")
    assert caught.value.reason == "Forbidden"
    assert caught.value.message.endswith("answered HTTP 403 Forbidden")
    for secret in SECRETS:
        assert secret not in caught.value.message


def test_a_password_holding_a_slash_is_not_printed(tmp_path: Path) -> None:
    """ "http://admin:9000/Kz+pw@host/x" parses as host "admin", port 9000, and a path that
    holds the rest of the password: the message must not quote it."""
    url = "http://admin:9/Kz+pw-TOPSECRET@127.0.0.1:1/disk.img"
    options = ImportOptions(http=HttpOptions(retries=0, connect_timeout=2))
    with pytest.raises(ImportFailure) as caught:
        import_image(url, str(tmp_path / "disk.img"), options=options)
    assert "TOPSECRET" not in str(caught.value)
