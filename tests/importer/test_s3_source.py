"""S3 sources against moto's S3 server over real HTTP, with objects put there by the aws CLI
(a second, independent client), and against the fault server for resumes and errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from importer import Checksum, HttpOptions, ImportOptions, Progress, S3Options, import_image
from importer.errors import Failure
from importer.sources.parallel import PART_SIZE, PROBE_BYTES
from importer.sources.s3_client import connect
from tests.conftest import Images, free_port
from tests.importer.test_http_source import TRICKLE, drain_within
from tests.importer.test_import_formats import assert_same_content
from tests.support.faultserver import FaultServer

FAST = HttpOptions(retries=3, backoff=0.01, stall_timeout=2.0, connect_timeout=2.0)
BUCKET = "images"


@pytest.fixture(scope="module", autouse=True)
def credentials() -> Iterator[None]:
    """Static test keys in the environment, as boto3's chain reads them; no metadata service."""
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="AKIDTESTING",
        AWS_SECRET_ACCESS_KEY="s3cr3t-k3y-never-printed",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def moto(images: Images) -> Iterator[str]:
    """moto's S3 server on loopback with the test images put into a bucket by the aws CLI."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = [str(Path(sys.executable).parent / "aws"), "--endpoint-url", endpoint, "s3"]
    subprocess.run([*aws, "mb", f"s3://{BUCKET}"], check=True, capture_output=True)
    for name in ("disk.raw.zst", "disk.qcow2.gz", "disk.vmdk", "disk.raw"):
        subprocess.run(
            [*aws, "cp", str(images.dir / name), f"s3://{BUCKET}/golden/{name}"],
            check=True,
            capture_output=True,
        )
    yield endpoint
    server.stop()


def s3_import(location: str, tmp_path: Path, s3: S3Options, **options: object) -> Path:
    dest = tmp_path / "disk.img"
    import_image(
        location,
        str(dest),
        options=ImportOptions(s3=s3, http=FAST, scratch_dir=str(tmp_path), **options),
    )
    return dest


@pytest.mark.parametrize("name", ["disk.raw.zst", "disk.qcow2.gz", "disk.vmdk"])
def test_s3_url_with_checksum(name: str, moto: str, images: Images, tmp_path: Path) -> None:
    digest = hashlib.sha256((images.dir / name).read_bytes()).hexdigest()
    dest = s3_import(
        f"s3://{BUCKET}/golden/{name}",
        tmp_path,
        S3Options(endpoint=moto),
        checksum=Checksum("sha256", digest),
    )
    assert_same_content(dest, images.raw)


def test_cdi_url_form_and_known_total(moto: str, images: Images, tmp_path: Path) -> None:
    progress = Progress()
    dest = tmp_path / "disk.img"
    options = ImportOptions(s3=S3Options(cdi_url=True), http=FAST)
    import_image(
        f"{moto}/{BUCKET}/golden/disk.raw.zst", str(dest), options=options, progress=progress
    )
    assert_same_content(dest, images.raw)
    download = progress.snapshots()[0]
    assert download.stage == "download"
    assert (
        download.bytes_total == download.bytes_done == (images.dir / "disk.raw.zst").stat().st_size
    )


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        (f"s3://{BUCKET}/golden/missing.img", "NotFound"),
        ("s3://no-such-bucket/disk.img", "NotFound"),
    ],
)
def test_missing_objects_are_final(location: str, reason: str, moto: str, tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        s3_import(location, tmp_path, S3Options(endpoint=moto))
    assert caught.value.reason == reason and caught.value.final


def test_session_token_and_credentials_file(moto: str, images: Images, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = AKIDFILE\n"
        "aws_secret_access_key = file-secret\naws_session_token = tok3n\n"
    )
    saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        dest = s3_import(
            f"s3://{BUCKET}/golden/disk.raw.zst",
            tmp_path,
            S3Options(endpoint=moto, credentials_file=str(creds)),
        )
    finally:
        os.environ.update(saved)
    assert_same_content(dest, images.raw)


def test_no_credentials_is_a_specific_error(moto: str, tmp_path: Path) -> None:
    saved = {k: os.environ.pop(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    os.environ["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    try:
        with pytest.raises(Failure) as caught:
            s3_import(f"s3://{BUCKET}/golden/disk.raw.zst", tmp_path, S3Options(endpoint=moto))
    finally:
        os.environ.update(saved)
        del os.environ["AWS_SHARED_CREDENTIALS_FILE"], os.environ["AWS_CONFIG_FILE"]
    assert caught.value.reason == "NoCredentials"


def fault_s3(faults: FaultServer, **configured: object) -> tuple[str, S3Options]:
    token = uuid.uuid4().hex  # the bucket: a valid bucket name
    faults.configure(token, **configured)
    return token, S3Options(endpoint=f"http://127.0.0.1:{faults.port}")


def test_dropped_connection_resumes_pinned_to_the_etag(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token, s3 = fault_s3(faults, drop_after=300_000, times=2)
    dest = s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3)
    assert_same_content(dest, images.raw)
    sent = [r["headers"] for r in faults.requests[token]]
    assert len(sent) == 3
    assert sent[1]["Range"] == "bytes=300000-" and sent[1]["If-Match"].startswith('"')


def test_replaced_object_is_detected(faults: FaultServer, tmp_path: Path) -> None:
    token, s3 = fault_s3(faults, drop_after=300_000, etag="changing")
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3)
    assert caught.value.reason == "SourceChanged"


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried(
    status: int, faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token, s3 = fault_s3(faults, status=status, times=2)
    assert_same_content(s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3), images.raw)
    assert len(faults.requests[token]) == 3


def test_access_denied_is_final_and_secrets_stay_out(faults: FaultServer, tmp_path: Path) -> None:
    token, s3 = fault_s3(faults, status=403, times=9)
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3)
    assert caught.value.reason == "Forbidden" and len(faults.requests[token]) == 1
    assert "s3cr3t" not in caught.value.message


def test_session_token_is_sent(faults: FaultServer, images: Images, tmp_path: Path) -> None:
    token, s3 = fault_s3(faults)
    os.environ["AWS_SESSION_TOKEN"] = "t0ken-from-sts"
    try:
        assert_same_content(s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3), images.raw)
    finally:
        del os.environ["AWS_SESSION_TOKEN"]
    sent = faults.requests[token][0]["headers"]
    assert sent["X-Amz-Security-Token"] == "t0ken-from-sts"
    assert sent["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTESTING/")


def test_parallel_ranged_download_from_s3(moto: str, images: Images, tmp_path: Path) -> None:
    dest = s3_import(
        f"s3://{BUCKET}/golden/disk.raw", tmp_path, S3Options(endpoint=moto), connections=4
    )
    assert_same_content(dest, images.raw)


def test_parallel_parts_are_pinned_with_if_match(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    token, s3 = fault_s3(faults, rate=16 << 20)  # a slow stream: parts after the probe
    assert_same_content(
        s3_import(f"s3://{token}/disk.raw", tmp_path, s3, connections=4), images.raw
    )
    parts = [r["headers"] for r in faults.requests[token]][1:]
    assert len(parts) == -(-(images.raw.stat().st_size - PROBE_BYTES) // PART_SIZE)
    assert all(h["If-Match"].startswith('"') for h in parts)


def test_wrong_region_is_final_and_names_the_region(faults: FaultServer, tmp_path: Path) -> None:
    token, s3 = fault_s3(
        faults, status=301, s3_error="PermanentRedirect", region="eu-west-3", times=9
    )
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3)
    assert caught.value.reason == "WrongRegion" and caught.value.final
    assert "eu-west-3" in caught.value.message and "--s3-region" in caught.value.message


def test_throttling_is_retried(faults: FaultServer, images: Images, tmp_path: Path) -> None:
    token, s3 = fault_s3(faults, status=503, s3_error="SlowDown", times=2)
    assert_same_content(s3_import(f"s3://{token}/disk.qcow2.gz", tmp_path, s3), images.raw)


def test_s3_from_the_cli(moto: str, images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", f"s3://{BUCKET}/golden/disk.qcow2.gz",
         str(dest), "--s3-endpoint", moto, "--s3-region", "us-east-1", "--s3-addressing", "path",
         "--connections", "2", "--progress", "json", "--scratch-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_content(dest, images.raw)
    assert "s3cr3t" not in done.stdout + done.stderr


def test_cdi_s3_url_from_the_cli(moto: str, images: Images, tmp_path: Path) -> None:
    dest = tmp_path / "disk.img"
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", f"{moto}/{BUCKET}/golden/disk.raw.zst",
         str(dest), "--s3", "--progress", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_content(dest, images.raw)


def test_resume_from_a_store_that_answers_from_byte_zero(
    faults: FaultServer, tmp_path: Path
) -> None:
    token, s3 = fault_s3(faults, drop_after=1_000_000, from_zero=1)
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.raw", tmp_path, s3)
    assert caught.value.reason == "BadContentRange", caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_parts_from_a_store_that_answers_from_byte_zero(
    faults: FaultServer, tmp_path: Path
) -> None:
    token, s3 = fault_s3(faults, rate=16 << 20, from_zero=1)  # a slow stream: parts follow
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.raw", tmp_path, s3, connections=4)
    assert caught.value.reason == "BadContentRange", caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_trickle_from_s3_fails_as_too_slow(faults: FaultServer) -> None:
    from importer.sources.s3 import S3Source

    token, s3 = fault_s3(faults, rate=1)
    error = drain_within(lambda: S3Source(f"s3://{token}/disk.raw", s3, TRICKLE), seconds=30)
    assert isinstance(error, Failure) and error.reason == "TooSlow", error
    assert len(faults.requests[token]) == TRICKLE.retries + 1


def test_a_byte_per_connection_from_s3_is_no_progress(faults: FaultServer, tmp_path: Path) -> None:
    token, s3 = fault_s3(faults, drop_after=1, times=1000)
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{token}/disk.raw", tmp_path, s3)
    # botocore reads bodies without enforcing Content-Length: a drop looks like an early end.
    assert caught.value.reason == "Truncated" and not caught.value.final
    assert len(faults.requests[token]) == FAST.retries + 1


def test_endpoint_connection_failure_is_named(tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        s3_import(f"s3://{BUCKET}/disk.raw", tmp_path, S3Options(endpoint="http://127.0.0.1:9"))
    assert caught.value.reason == "ConnectionFailed"
    assert caught.value.message == (
        f"s3://{BUCKET}/disk.raw: cannot connect to 127.0.0.1:9: connection refused"
    )


def test_endpoint_with_credentials_is_refused(moto: str, tmp_path: Path) -> None:
    dest, log = tmp_path / "disk.img", tmp_path / "termination-log"
    endpoint = moto.replace("http://", "http://admin:hunter2@") + "/?X-Amz-Signature=TOPSECRET"
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "import", f"s3://{BUCKET}/golden/disk.raw", str(dest),
         "--s3-endpoint", endpoint, "--progress", "json", "--termination-log", str(log)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    record = json.loads(log.read_text())
    assert record["reason"] == "InvalidURL" and "credentials" in record["message"]
    for secret in ("hunter2", "TOPSECRET"):
        assert secret not in done.stdout + done.stderr + log.read_text()
    assert not dest.exists()


def test_region_as_the_aws_cli_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """--s3-region, else the endpoint's AWS host name, else AWS_REGION, else
    AWS_DEFAULT_REGION (or the profile's): the region the client signs for."""

    def region(**options: str) -> str:
        s3 = S3Options(**options)
        connection = connect(s3, s3.endpoint, FAST, attempts=1)
        assert connection.client.meta.region_name == connection.region
        return connection.region

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert region() == "us-west-2"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert region() == "eu-west-3"
    assert region(endpoint="https://s3.ap-south-1.amazonaws.com") == "ap-south-1"
    assert region(region="ca-central-1") == "ca-central-1"


def test_endpoint_from_the_environment_with_credentials_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://admin:hunter2@minio.example:9000")
    with pytest.raises(Failure) as caught:
        connect(S3Options(), None, FAST, attempts=1)
    assert caught.value.reason == "InvalidURL" and "hunter2" not in caught.value.message
