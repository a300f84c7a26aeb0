"""Publishing a real qcow2 to moto's S3 server, to nginx as a WebDAV store, to a PUT server that
fails on demand and to a local directory; every result is read back with another client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from importer import HttpOptions, S3Options
from importer.errors import Failure, FinalError, TransientError
from importer.progress import Progress
from pipelines.manifest import BuildManifest
from pipelines.publish import (
    LocalStore,
    Store,
    Stored,
    find_published,
    open_store,
    publish_build,
)
from pipelines.publish.publication import latest_key
from pipelines.publish.s3 import S3Store
from tests.conftest import MiB, sha256
from tests.pipelines.manifests import STORED, finished
from tests.support.stores import (
    BUCKET,
    DAV_PASSWORD,
    DAV_TOKEN,
    DAV_USER,
    SECRET_KEY,
    AuthS3,
    Dav,
    FlakyPutServer,
    Image,
    aws_cli,
    s3_client,
)

pytest_plugins = ["tests.support.stores"]

FAST = HttpOptions(retries=2, backoff=0.01, stall_timeout=5.0, connect_timeout=2.0)
TEMPLATE = "centos9"
SECRETS = (SECRET_KEY, DAV_PASSWORD, DAV_TOKEN)


def build_id() -> str:
    return uuid.uuid4().hex


def folder() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def publish(store: Store, image: Image, build: str, **kwargs: Any) -> Any:
    return publish_build(store, image.path, finished(TEMPLATE, build, 64 * MiB), **kwargs)


def no_secrets(error: Failure) -> None:
    assert not any(secret in str(error) for secret in SECRETS), str(error)


# --- S3 ---------------------------------------------------------------------------------


def s3_store(endpoint: str, prefix: str, **tuning: int) -> S3Store:
    return S3Store(f"s3://{BUCKET}/{prefix}", S3Options(endpoint=endpoint), FAST, **tuning)


def s3_get(endpoint: str, key: str) -> bytes | None:
    client = s3_client(endpoint)
    try:
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def test_s3_publish_is_read_back_by_the_aws_cli(
    moto_s3: str, qcow2: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix, build = folder(), build_id()
    store = open_store(f"s3://{BUCKET}/{prefix}", s3=S3Options(endpoint=moto_s3), http=FAST)
    progress = Progress()
    published = publish(store, qcow2, build, progress=progress)

    base = f"s3://{BUCKET}/{prefix}/{TEMPLATE}/{build}"
    assert published.image_url == f"{base}/{TEMPLATE}.qcow2"
    assert (published.sha256, published.size) == (qcow2.sha256, qcow2.path.stat().st_size)
    for name in (f"{TEMPLATE}.qcow2", f"{TEMPLATE}.qcow2.sha256"):
        subprocess.run(
            [*aws_cli(moto_s3), "cp", f"{base}/{name}", str(tmp_path / name)], check=True
        )
    assert sha256(tmp_path / f"{TEMPLATE}.qcow2") == qcow2.sha256
    # The checksum file is sha256sum's format: sha256sum -c checks the download with it.
    assert (tmp_path / f"{TEMPLATE}.qcow2.sha256").read_text() == (
        f"{qcow2.sha256}  {TEMPLATE}.qcow2\n"
    )
    subprocess.run(["sha256sum", "-c", f"{TEMPLATE}.qcow2.sha256"], cwd=tmp_path, check=True)

    manifest = json.loads(s3_get(moto_s3, f"{prefix}/{TEMPLATE}/{build}/manifest.json") or b"")
    assert manifest == published.manifest.to_json()
    assert manifest["kickstart"] == STORED["kickstart"]
    assert manifest["published"]["image"] == {
        "url": published.image_url,
        "sha256": qcow2.sha256,
        "size": published.size,
    }
    assert manifest["published"]["source"] == {
        "kind": "s3",
        "url": f"{moto_s3}/{BUCKET}/{prefix}/{TEMPLATE}/{build}/{TEMPLATE}.qcow2",
    }
    assert json.loads(s3_get(moto_s3, f"{prefix}/{TEMPLATE}/latest.json") or b"") == manifest
    assert progress.snapshots()[-1].bytes_done == published.size
    assert "reports no checksum" not in caplog.text  # every object's sha256 was compared


def test_s3_multipart_is_used_and_verified(moto_s3: str, qcow2: Image) -> None:
    prefix = folder()
    store = s3_store(moto_s3, prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)
    stored = store.put_file("big.qcow2", qcow2.path)
    assert stored == Stored(qcow2.sha256, qcow2.path.stat().st_size)
    parts = -(-stored.size // (5 * MiB))
    head = s3_client(moto_s3).head_object(
        Bucket=BUCKET, Key=f"{prefix}/big.qcow2", ChecksumMode="ENABLED"
    )
    assert parts == 3 and head["ETag"].strip('"').endswith(f"-{parts}")
    # S3's composite checksum: the sha256 of the parts' sha256 digests.
    data = qcow2.path.read_bytes()
    digests = b"".join(
        hashlib.sha256(data[i : i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB)
    )
    composite = base64.b64encode(hashlib.sha256(digests).digest()).decode()
    assert head["ChecksumSHA256"].partition("-")[0] == composite
    assert hashlib.sha256(s3_get(moto_s3, f"{prefix}/big.qcow2") or b"").hexdigest() == (
        qcow2.sha256
    )


def test_s3_part_corrupted_in_transit_is_caught(moto_s3: str, qcow2: Image) -> None:
    prefix = folder()
    store = s3_store(moto_s3, prefix, multipart_threshold=5 * MiB, part_size=5 * MiB)

    def corrupt(params: dict[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:  # one flipped bit after our hash, before the wire
            data = bytearray(params["Body"].read())
            data[1000] ^= 1
            params["Body"] = bytes(data)

    # Registered after the store's own handler, so the part keeps our digest of the true bytes:
    # AWS would refuse the part (BadDigest); moto keeps it, and the composite checksum differs.
    store._client.meta.events.register("before-parameter-build.s3.UploadPart", corrupt)
    with pytest.raises(FinalError) as caught:
        store.put_file("big.qcow2", qcow2.path)
    assert caught.value.reason == "ChecksumMismatch"


def test_s3_single_put_below_the_threshold(moto_s3: str, qcow2: Image) -> None:
    prefix = folder()
    s3_store(moto_s3, prefix, multipart_threshold=64 * MiB).put_file("small.qcow2", qcow2.path)
    head = s3_client(moto_s3).head_object(
        Bucket=BUCKET, Key=f"{prefix}/small.qcow2", ChecksumMode="ENABLED"
    )
    assert "-" not in head["ETag"]
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(qcow2.sha256)).decode()


@pytest.mark.parametrize("threshold", [5 * MiB, 64 * MiB], ids=["multipart", "single"])
def test_s3_image_that_changed_is_not_committed(threshold: int, moto_s3: str, qcow2: Image) -> None:
    prefix, build = folder(), build_id()
    store = s3_store(moto_s3, prefix, multipart_threshold=threshold, part_size=5 * MiB)
    with pytest.raises(FinalError) as caught:
        publish(store, qcow2, build, sha256="0" * 64)
    assert caught.value.reason == "ChecksumMismatch"
    listed = s3_client(moto_s3).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert listed["KeyCount"] == 0
    uploads = s3_client(moto_s3).list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    assert not uploads.get("Uploads")  # the multipart upload was aborted


def test_s3_find_published(moto_s3: str, qcow2: Image) -> None:
    store = s3_store(moto_s3, folder())
    build = build_id()
    assert find_published(store, TEMPLATE, build) is None
    assert store.get_bytes(latest_key(TEMPLATE)) is None
    published = publish(store, qcow2, build)
    manifest = find_published(store, TEMPLATE, build)
    assert manifest == published.manifest
    assert json.loads(store.get_bytes(latest_key(TEMPLATE)) or b"") == manifest.to_json()


def test_s3_missing_bucket_is_final_and_fails_early(moto_s3: str, qcow2: Image) -> None:
    store = S3Store("s3://no-such-bucket/x", S3Options(endpoint=moto_s3), FAST)
    with pytest.raises(FinalError) as caught:
        find_published(store, TEMPLATE, build_id())  # before any build starts
    assert caught.value.reason == "NotFound"
    with pytest.raises(FinalError) as caught:
        publish(store, qcow2, build_id())
    assert caught.value.reason == "NotFound" and "no-such-bucket" in caught.value.message
    no_secrets(caught.value)


@pytest.mark.parametrize(
    ("who", "reason"), [("stranger", "Unauthorized"), ("powerless", "Forbidden")]
)
def test_s3_credentials_refused(
    who: str, reason: str, moto_auth: AuthS3, qcow2: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, secret = moto_auth.powerless if who == "powerless" else ("AKIDSTRANGER", SECRET_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    prefix, build = folder(), build_id()
    store = s3_store(moto_auth.endpoint, prefix)
    with pytest.raises(FinalError) as caught:
        publish(store, qcow2, build)
    assert caught.value.reason == reason, caught.value.message
    assert secret not in str(caught.value)
    no_secrets(caught.value)
    admin = s3_client(moto_auth.endpoint, *moto_auth.admin)
    assert admin.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["KeyCount"] == 0


# --- WebDAV (nginx) ---------------------------------------------------------------------


def test_webdav_publish_order_and_content(webdav: Dav, qcow2: Image) -> None:
    base, build = f"{webdav.base}/dav/{folder()}", build_id()
    store = open_store(base, http=FAST)
    published = publish(store, qcow2, build)
    # What nginx received, in the order it finished: every PUT verified by a HEAD, and the
    # manifest after the image and its checksum.
    path = base.removeprefix(webdav.base)
    seen = [(m, u.rsplit("/", 1)[1], s) for m, u, s in webdav.requests(path, count=8)]
    assert seen == [
        ("PUT", f"{TEMPLATE}.qcow2", 201),
        ("HEAD", f"{TEMPLATE}.qcow2", 200),
        ("PUT", f"{TEMPLATE}.qcow2.sha256", 201),
        ("HEAD", f"{TEMPLATE}.qcow2.sha256", 200),
        ("PUT", "manifest.json", 201),
        ("HEAD", "manifest.json", 200),
        ("PUT", "latest.json", 201),
        ("HEAD", "latest.json", 200),
    ]
    image_url = f"{base}/{TEMPLATE}/{build}/{TEMPLATE}.qcow2"
    assert published.image_url == image_url
    fetched = subprocess.run(["curl", "-sf", image_url], check=True, capture_output=True).stdout
    assert hashlib.sha256(fetched).hexdigest() == qcow2.sha256
    checksum = requests.get(image_url + ".sha256", timeout=5)
    assert checksum.text == f"{qcow2.sha256}  {TEMPLATE}.qcow2\n"


def test_webdav_find_published(webdav: Dav, qcow2: Image) -> None:
    store, build = open_store(f"{webdav.base}/dav/{folder()}", http=FAST), build_id()
    assert find_published(store, TEMPLATE, build) is None
    publish(store, qcow2, build)
    manifest = find_published(store, TEMPLATE, build)
    assert manifest is not None and manifest.published is not None
    assert manifest.published.image.sha256 == qcow2.sha256


def test_webdav_server_error_is_retried_and_leaves_no_manifest(webdav: Dav, qcow2: Image) -> None:
    base, build = f"{webdav.base}/broken/{folder()}", build_id()
    store = open_store(base, http=FAST)
    with pytest.raises(TransientError) as caught:
        publish(store, qcow2, build)
    assert caught.value.reason == "ServerError"
    path = base.removeprefix(webdav.base)
    assert [m for m, _, _ in webdav.requests(path, count=FAST.retries + 1)] == ["PUT"] * (
        FAST.retries + 1
    )
    for name in ("manifest.json", f"{TEMPLATE}.qcow2.sha256"):
        assert requests.get(f"{base}/{TEMPLATE}/{build}/{name}", timeout=5).status_code == 404
    assert find_published(store, TEMPLATE, build) is None


def test_webdav_forbidden_is_final(webdav: Dav, qcow2: Image) -> None:
    base = f"{webdav.base}/readonly/{folder()}"
    with pytest.raises(FinalError) as caught:
        publish(open_store(base, http=FAST), qcow2, build_id())
    assert caught.value.reason == "Forbidden"
    assert len(webdav.requests(base.removeprefix(webdav.base), count=1)) == 1


def test_basic_auth_from_the_environment(
    webdav: Dav, qcow2: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = f"{webdav.base}/basic/{folder()}"
    monkeypatch.setenv("DISKFLOW_PUBLISH_USER", DAV_USER)
    monkeypatch.setenv("DISKFLOW_PUBLISH_PASSWORD", DAV_PASSWORD)
    published = publish(open_store(base, http=FAST), qcow2, build_id())
    image = requests.get(published.image_url, auth=(DAV_USER, DAV_PASSWORD), timeout=5)
    assert hashlib.sha256(image.content).hexdigest() == qcow2.sha256


def test_basic_auth_from_the_url_and_a_file_stays_secret(
    webdav: Dav, qcow2: Image, tmp_path: Path
) -> None:
    base = f"{webdav.base}/basic/{folder()}"
    in_url = base.replace("http://", f"http://{DAV_USER}:{DAV_PASSWORD}@")
    store = open_store(in_url, http=FAST)
    assert DAV_PASSWORD not in store.description
    published = publish(store, qcow2, build_id())
    manifest = requests.get(published.manifest_url, auth=(DAV_USER, DAV_PASSWORD), timeout=5)
    assert DAV_PASSWORD not in manifest.text and published.image_url.startswith(base)
    secret_file = tmp_path / "auth"
    secret_file.write_text(f"{DAV_USER}:{DAV_PASSWORD}\n")
    publish(open_store(base, http=FAST, auth_file=str(secret_file)), qcow2, build_id())


def test_wrong_password_is_unauthorized_and_not_printed(
    webdav: Dav, qcow2: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, build = f"{webdav.base}/basic/{folder()}", build_id()
    wrong = DAV_PASSWORD + "-wrong"
    monkeypatch.setenv("DISKFLOW_PUBLISH_USER", DAV_USER)
    monkeypatch.setenv("DISKFLOW_PUBLISH_PASSWORD", wrong)
    with pytest.raises(FinalError) as caught:
        publish(open_store(base, http=FAST), qcow2, build)
    assert caught.value.reason == "Unauthorized"
    assert wrong not in str(caught.value)
    no_secrets(caught.value)
    assert not (webdav.root / base.removeprefix(f"{webdav.base}/")).exists()


def test_bearer_token(webdav: Dav, qcow2: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"{webdav.base}/bearer/{folder()}"
    with pytest.raises(FinalError) as caught:
        publish(open_store(base, http=FAST), qcow2, build_id())
    assert caught.value.reason == "Unauthorized"
    monkeypatch.setenv("DISKFLOW_PUBLISH_TOKEN", DAV_TOKEN)
    published = publish(open_store(base, http=FAST), qcow2, build_id())
    assert published.sha256 == qcow2.sha256


# --- a PUT server that fails on demand ----------------------------------------------------


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_retried_put_rereads_and_rehashes(flaky: FlakyPutServer, mode: str, qcow2: Image) -> None:
    flaky.failures, flaky.mode = 1, mode
    build = build_id()
    published = publish(open_store(flaky.base + "/store", http=FAST), qcow2, build)
    assert published.sha256 == qcow2.sha256
    key = f"/store/{TEMPLATE}/{build}/{TEMPLATE}.qcow2"
    assert [path for path, _ in flaky.puts].count(key) == 2
    assert hashlib.sha256(flaky.objects[key]).hexdigest() == qcow2.sha256


def test_strict_webdav_gets_its_collections_made(flaky: FlakyPutServer, qcow2: Image) -> None:
    flaky.collections = True
    flaky.folders.add("/store")
    build = build_id()
    publish(open_store(flaky.base + "/store", http=FAST), qcow2, build)
    assert flaky.mkcols == [(f"/store/{TEMPLATE}", 201), (f"/store/{TEMPLATE}/{build}", 201)]
    image = flaky.objects[f"/store/{TEMPLATE}/{build}/{TEMPLATE}.qcow2"]
    assert hashlib.sha256(image).hexdigest() == qcow2.sha256
    # The template's folder exists now: the next build makes only its own.
    publish(open_store(flaky.base + "/store", http=FAST), qcow2, other := build_id())
    assert flaky.mkcols[2:] == [(f"/store/{TEMPLATE}", 405), (f"/store/{TEMPLATE}/{other}", 201)]


def test_known_checksum_is_sent_and_checked(flaky: FlakyPutServer, qcow2: Image) -> None:
    publish(open_store(flaky.base, http=FAST), qcow2, build_id(), sha256=qcow2.sha256)
    assert flaky.puts[0][1] == qcow2.sha256
    manifest_put = next(sent for path, sent in flaky.puts if path.endswith("manifest.json"))
    assert manifest_put is not None and len(manifest_put) == 64


def test_server_checksum_that_differs_fails(flaky: FlakyPutServer, qcow2: Image) -> None:
    flaky.lie = True
    with pytest.raises(FinalError) as caught:
        publish(open_store(flaky.base, http=FAST), qcow2, build_id())
    assert caught.value.reason == "ChecksumMismatch"
    assert not any(path.endswith("manifest.json") for path in flaky.objects)


def test_http_image_that_changed_is_not_committed(flaky: FlakyPutServer, qcow2: Image) -> None:
    with pytest.raises(FinalError) as caught:
        publish(open_store(flaky.base, http=FAST), qcow2, build_id(), sha256="0" * 64)
    assert caught.value.reason == "ChecksumMismatch"
    assert flaky.objects == {}  # the body stopped short of its Content-Length


# --- local directory --------------------------------------------------------------------


def test_local_publish(tmp_path: Path, qcow2: Image) -> None:
    build = build_id()
    store = open_store(str(tmp_path))
    assert find_published(store, TEMPLATE, build) is None
    published = publish(store, qcow2, build)
    folder_ = tmp_path / TEMPLATE / build
    assert sorted(p.name for p in folder_.iterdir()) == [
        f"{TEMPLATE}.qcow2",
        f"{TEMPLATE}.qcow2.sha256",
        "manifest.json",
    ]
    assert published.image_url == (folder_ / f"{TEMPLATE}.qcow2").as_uri()
    assert published.source is None
    subprocess.run(["sha256sum", "-c", f"{TEMPLATE}.qcow2.sha256"], cwd=folder_, check=True)
    assert find_published(open_store(tmp_path.as_uri()), TEMPLATE, build) == BuildManifest.parse(
        (folder_ / "manifest.json").read_text(), "manifest.json"
    )
    # A manifest whose image is gone is no reason to skip the build.
    (folder_ / f"{TEMPLATE}.qcow2").unlink()
    assert find_published(store, TEMPLATE, build) is None


def test_local_publish_is_readable_by_a_web_server(tmp_path: Path, qcow2: Image) -> None:
    # A web server serving the directory (--public-url) runs as another user: mkstemp's 0600
    # would be a 403 for CDI. Files get 0666 less the umask, as `cp` would give them.
    build = build_id()
    old = os.umask(0o022)
    try:
        publish(LocalStore(tmp_path, public_url="http://example.invalid/images"), qcow2, build)
    finally:
        os.umask(old)
    folder_ = tmp_path / TEMPLATE / build
    for name in (f"{TEMPLATE}.qcow2", f"{TEMPLATE}.qcow2.sha256", "manifest.json"):
        mode = (folder_ / name).stat().st_mode & 0o777
        assert mode & 0o044 == 0o044, f"{name}: {oct(mode)}"
        assert mode == 0o644, f"{name}: {oct(mode)}"


def test_local_image_that_changed_leaves_nothing(tmp_path: Path, qcow2: Image) -> None:
    with pytest.raises(FinalError) as caught:
        publish(LocalStore(tmp_path), qcow2, build_id(), sha256="0" * 64)
    assert caught.value.reason == "ChecksumMismatch"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# --- every store: the manifest is the commit point ----------------------------------------


class Watched:
    """A store that checks, as the manifest is put, that an independent reader already finds
    the whole image and its checksum file; and that can fail one put on request."""

    def __init__(self, store: Store, fetch: Callable[[str], bytes | None], fail: str = "") -> None:
        self._store, self._fetch, self._fail = store, fetch, fail
        self.description = store.description
        self.order: list[str] = []

    def put_file(self, key: str, path: Path, **kwargs: Any) -> Stored:
        self.order.append(key.rsplit("/", 1)[1])
        return self._store.put_file(key, path, **kwargs)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        name = key.rsplit("/", 1)[1]
        self.order.append(name)
        if name == self._fail:
            raise TransientError("ConnectionFailed", "injected")
        if name == "manifest.json":
            folder_ = key.rsplit("/", 1)[0]
            image = self._fetch(f"{folder_}/{TEMPLATE}.qcow2") or b""
            line = f"{hashlib.sha256(image).hexdigest()}  {TEMPLATE}.qcow2\n"
            assert self._fetch(f"{folder_}/{TEMPLATE}.qcow2.sha256") == line.encode()
        self._store.put_bytes(key, data, content_type=content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture(params=["s3", "webdav", "local"])
def any_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Store, Callable[[str], bytes | None]]:
    """A store of each kind, and an independent reader of its keys."""
    if request.param == "s3":
        endpoint, prefix = request.getfixturevalue("moto_s3"), folder()
        return s3_store(endpoint, prefix), lambda key: s3_get(endpoint, f"{prefix}/{key}")
    if request.param == "webdav":
        dav: Dav = request.getfixturevalue("webdav")
        base = f"{dav.base}/dav/{folder()}"

        def get(key: str) -> bytes | None:
            response = requests.get(f"{base}/{key}", timeout=5)
            return None if response.status_code == 404 else response.content

        return open_store(base, http=FAST), get
    return LocalStore(
        tmp_path
    ), lambda key: (tmp_path / key).read_bytes() if (tmp_path / key).exists() else None


def test_manifest_is_written_last(any_store: tuple[Store, Any], qcow2: Image) -> None:
    store, fetch = any_store
    watched = Watched(store, fetch)
    build = build_id()
    publish(watched, qcow2, build)
    assert watched.order == [
        f"{TEMPLATE}.qcow2",
        f"{TEMPLATE}.qcow2.sha256",
        "manifest.json",
        "latest.json",
    ]
    assert fetch(f"{TEMPLATE}/{build}/manifest.json") is not None


def test_failure_before_the_manifest_leaves_none(
    any_store: tuple[Store, Any], qcow2: Image
) -> None:
    store, fetch = any_store
    build = build_id()
    with pytest.raises(TransientError):
        publish(Watched(store, fetch, fail=f"{TEMPLATE}.qcow2.sha256"), qcow2, build)
    assert fetch(f"{TEMPLATE}/{build}/manifest.json") is None
    assert fetch(f"{TEMPLATE}/latest.json") is None
    assert find_published(store, TEMPLATE, build) is None


# --- choosing a store ---------------------------------------------------------------------


def test_open_store_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    for url, kwargs, reason in [
        ("ftp://host/x", {}, "InvalidURL"),
        (str(tmp_path / "missing"), {}, "NotFound"),
        ("s3://bucket/x", {"public_url": "http://x/"}, "InvalidArgument"),
        (str(tmp_path), {"auth_file": "/dev/null"}, "InvalidArgument"),
        (str(tmp_path), {"public_url": "ftp://x/"}, "InvalidURL"),
    ]:
        with pytest.raises(FinalError) as caught:
            open_store(url, **kwargs)
        assert caught.value.reason == reason, url


def test_bad_names_are_refused(tmp_path: Path, qcow2: Image) -> None:
    for template, build in [("../etc", "b1"), ("t", "a/b"), ("", "b1"), ("t", ".hidden")]:
        with pytest.raises(FinalError) as caught:
            publish_build(LocalStore(tmp_path), qcow2.path, finished(template, build))
        assert caught.value.reason == "InvalidArgument"
    assert list(tmp_path.iterdir()) == []


def test_auth_file_must_be_user_colon_password(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("just-a-secret-token\n")
    with pytest.raises(FinalError) as caught:
        open_store("http://127.0.0.1:1/x", auth_file=str(secret))
    assert caught.value.reason == "InvalidArgument" and "just-a-secret" not in str(caught.value)
