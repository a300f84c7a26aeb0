"""S3 the way the aws CLI does it: AWS_CA_BUNDLE, AWS_ENDPOINT_URL(_S3), AWS_PROFILE from the
config and credentials files, AWS_REGION, the aws spellings of the options, and no botocore
chatter in JSON output. Against moto's S3 server over HTTP, and over HTTPS with a certificate
from a private CA; every run is a fresh `diskflow` with a clean AWS environment and HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
import requests
import yaml
from moto.server import ThreadedMotoServer

from diskflow.options import S3Flags
from diskflow.templates_cli import PublishFlags
from tests.cli.test_options import TAKERS, command, declared
from tests.conftest import Images, free_port, run, running_nginx
from tests.importer.test_import_formats import assert_same_content
from tests.pipelines.manifests import finished_build
from tests.support.commands import diskflow
from tests.support.events import events, result

BUCKET = "conventions"
KEY_ID, SECRET = "AKIDCONVENTIONS", "conventions-s3cr3t"
KEYS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
OBJECT = "images/disk.qcow2.gz"
REFUSED = "http://127.0.0.1:1"  # nothing listens there: an endpoint that must not be used


@dataclass(frozen=True)
class Store:
    endpoint: str
    ca: Path | None = None  # the private CA that signed its certificate (https)


@pytest.fixture(scope="module", autouse=True)
def clean_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No AWS_* variable from the test's own environment, a HOME without ~/.aws, no metadata
    service: what a run finds is what its test gives it. Yields that HOME."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            env.delenv(name)
        env.setenv("HOME", str(home))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield home


def client(store: Store) -> Any:
    """A plain boto3 client with the test keys: the tests' independent reader and writer."""
    return boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        verify=str(store.ca) if store.ca else None,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def filled(store: Store, images: Images) -> Store:
    made = client(store)
    made.create_bucket(Bucket=BUCKET)
    made.upload_file(str(images.path("qcow2", "gz")), BUCKET, OBJECT)
    return store


@pytest.fixture(scope="module")
def moto(images: Images) -> Iterator[Store]:
    """moto's S3 server over HTTP, holding OBJECT."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield filled(Store(f"http://127.0.0.1:{port}"), images)
    server.stop()


def private_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA's certificate and key, made with openssl."""
    ca, key = directory / f"{name}.pem", directory / f"{name}.key"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", f"/CN={name}", "-keyout", key, "-out", ca)  # fmt: skip
    return ca, key


@dataclass(frozen=True)
class Certificate:
    ca: Path  # the private CA's certificate
    cert: Path  # for 127.0.0.1, signed by the CA
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    certs = tmp_path_factory.mktemp("certs")
    ca, ca_key = private_ca(certs, "diskflow test CA")
    cert, key, request = certs / "cert.pem", certs / "key.pem", certs / "cert.csr"
    (certs / "extensions").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", key, "-out", request)  # fmt: skip
    run("openssl", "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-days", "1",
        "-CAcreateserial", "-extfile", certs / "extensions", "-out", cert)  # fmt: skip
    return Certificate(ca, cert, key)


@pytest.fixture(scope="module")
def tls_moto(images: Images, certificate: Certificate) -> Iterator[Store]:
    """moto's S3 server over HTTPS with `certificate`, holding OBJECT; in its own process
    (moto_server takes a certificate)."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port),
         "-c", str(certificate.cert), "-k", str(certificate.key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = Store(f"https://127.0.0.1:{port}", certificate.ca)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                requests.get(store.endpoint, verify=str(certificate.ca), timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < end, "moto_server not up"
                time.sleep(0.05)
        yield filled(store, images)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_dav(certificate: Certificate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx as a WebDAV store over HTTPS with `certificate`, beside its plain server; yields
    the https base URL."""
    prefix = tmp_path_factory.mktemp("tls-dav")
    (prefix / "root").mkdir()
    port = free_port()
    tls = f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {certificate.cert};
            ssl_certificate_key {certificate.key};
            root {prefix / "root"};
            client_max_body_size 0;
            location / {{ dav_methods PUT MKCOL; create_full_put_path on; }}
        }}
        """
    with running_nginx(prefix, tls, f"root {prefix / 'root'};"):
        yield f"https://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def build(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished build directory (manifest.json and centos9.qcow2), as `publish` takes."""
    return finished_build(tmp_path_factory.mktemp("build"), images.path("qcow2"))


def prefix() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def imported(
    tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None, dest: str = "disk.img"
) -> subprocess.CompletedProcess[str]:
    """`diskflow import` of OBJECT into tmp_path/dest."""
    return diskflow("import", f"s3://{BUCKET}/{OBJECT}", tmp_path / dest, "--retries", "0",
                    "--scratch-dir", tmp_path, "--progress", "json", *args,
                    env=env, timeout=120)  # fmt: skip


def published(
    build: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return diskflow("publish", build, "--publish-to", prefix(), "--progress", "json", *args,
                    env=env, timeout=120)  # fmt: skip


def datavolume_url(build: Path) -> str:
    return yaml.safe_load((build / "datavolume.yaml").read_text())["spec"]["source"]["s3"]["url"]


def assert_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr


def assert_fails(done: subprocess.CompletedProcess[str], reason: str, said: str = "") -> None:
    assert done.returncode == 1 and f"[{reason}]" in done.stderr and said in done.stderr, (
        done.stderr
    )
    assert "Traceback" not in done.stderr


# --- the options ------------------------------------------------------------------------

ALIASES = {"s3_endpoint": "--endpoint-url", "s3_region": "--region", "s3_profile": "--profile"}


@pytest.mark.parametrize("path", TAKERS[S3Flags], ids=" ".join)
def test_aws_spellings_are_on_every_command_taking_the_s3_options(path: tuple[str, ...]) -> None:
    options = declared(command(*path))
    for name, alias in ALIASES.items():
        assert options[name] == (f"--{name.replace('_', '-')}", alias)


@pytest.mark.parametrize("path", TAKERS[PublishFlags], ids=" ".join)
def test_every_publishing_command_takes_a_ca_bundle(path: tuple[str, ...]) -> None:
    assert declared(command(*path))["ca_bundle"] == ("--ca-bundle",)


def test_aws_spellings_work(moto: Store, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[ci]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    done = imported(tmp_path, "--endpoint-url", moto.endpoint, "--region", "eu-west-3",
                    "--profile", "ci", "--s3-credentials-file", credentials)  # fmt: skip
    assert_ok(done)


# --- TLS --------------------------------------------------------------------------------


def test_aws_ca_bundle_is_trusted_by_import_and_publish(
    tls_moto: Store, build: Path, images: Images, tmp_path: Path
) -> None:
    trusted = KEYS | {"AWS_CA_BUNDLE": str(tls_moto.ca)}
    endpoint = ("--endpoint-url", tls_moto.endpoint)
    done = imported(tmp_path, *endpoint, env=trusted)
    assert_ok(done)
    assert_same_content(tmp_path / "disk.img", images.raw)
    assert_fails(imported(tmp_path, *endpoint, env=KEYS), "TLSError")

    assert_ok(published(build, *endpoint, env=trusted))
    assert_fails(published(build, *endpoint, env=KEYS), "TLSError")


def test_publish_ca_bundle_wins_over_the_environment(
    tls_moto: Store, build: Path, tmp_path: Path
) -> None:
    other, _ = private_ca(tmp_path, "another CA")
    endpoint = ("--endpoint-url", tls_moto.endpoint)
    done = published(build, *endpoint, "--ca-bundle", tls_moto.ca, env=KEYS)
    assert_ok(done)
    url = result(done.stdout)["image"]
    bucket, _, key = url.removeprefix("s3://").partition("/")
    stored = client(tls_moto).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == (build / "centos9.qcow2").read_bytes()
    wrong = published(
        build, *endpoint, "--ca-bundle", other, env=KEYS | {"AWS_CA_BUNDLE": str(tls_moto.ca)}
    )
    assert_fails(wrong, "TLSError")


def test_publish_ca_bundle_for_an_https_store(
    tls_dav: str, certificate: Certificate, build: Path
) -> None:
    base = f"{tls_dav}/{uuid.uuid4().hex[:8]}"
    done = diskflow("publish", build, "--publish-to", base, "--ca-bundle", certificate.ca,
                    "--progress", "none")  # fmt: skip
    assert_ok(done)
    image = requests.get(
        yaml.safe_load((build / "datavolume.yaml").read_text())["spec"]["source"]["http"]["url"],
        verify=str(certificate.ca),
        timeout=10,
    )
    assert image.content == (build / "centos9.qcow2").read_bytes()
    untrusted = diskflow("publish", build, "--publish-to", base, "--progress", "none")
    assert_fails(untrusted, "TLSError")


def test_ca_bundle_that_is_no_certificate_or_for_no_tls_store(build: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    done = published(build, "--endpoint-url", REFUSED, "--ca-bundle", junk, env=KEYS)
    assert_fails(done, "InvalidArgument", f"--ca-bundle {junk} holds no readable PEM certificate")
    done = diskflow("publish", build, "--publish-to", tmp_path, "--ca-bundle", junk)
    assert_fails(done, "InvalidArgument", "--ca-bundle applies to an s3:// or https:// store")


# --- endpoint, profile, region ----------------------------------------------------------


def test_endpoint_from_the_environment(
    moto: Store, build: Path, images: Images, tmp_path: Path
) -> None:
    # The per-service variable before the global one, as botocore reads them.
    service = KEYS | {"AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_ENDPOINT_URL": REFUSED}
    assert_ok(imported(tmp_path, env=service))
    done = published(build, env=KEYS | {"AWS_ENDPOINT_URL": moto.endpoint})
    assert_ok(done)
    # The DataVolume imports from the store the environment named, not from AWS.
    image = result(done.stdout)["image"].removeprefix("s3://")
    assert datavolume_url(build) == f"{moto.endpoint}/{image}"
    # An explicit endpoint wins over the environment's.
    explicit = imported(tmp_path, "--endpoint-url", moto.endpoint,
                        env=KEYS | {"AWS_ENDPOINT_URL_S3": REFUSED})  # fmt: skip
    assert_ok(explicit)


def test_profile_from_the_config_and_credentials_files(
    moto: Store, build: Path, tmp_path: Path
) -> None:
    """No keys in the environment: only the profile's can work. Its region and endpoint come
    from the config file, its keys from the credentials file."""
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile ci]\nregion = eu-west-3\nendpoint_url = {moto.endpoint}\n")
    credentials.write_text(
        f"[ci]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    files = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    assert_ok(imported(tmp_path, env=files | {"AWS_PROFILE": "ci"}))
    assert_ok(imported(tmp_path, "--profile", "ci", env=files))
    done = published(build, env=files | {"AWS_PROFILE": "ci"})
    assert_ok(done)
    assert datavolume_url(build).startswith(f"{moto.endpoint}/{BUCKET}/")
    # A profile only --s3-credentials-file holds is found too.
    elsewhere = {"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "ci"}
    assert_ok(imported(tmp_path, "--s3-credentials-file", credentials, env=elsewhere))

    missing = imported(tmp_path, env=files | {"AWS_PROFILE": "nope"})
    said = f"there is no AWS profile 'nope' (from AWS_PROFILE) in {config} or {credentials}"
    assert_fails(missing, "InvalidArgument", said)
    missing = published(build, "--profile", "nope", env=files)
    assert_fails(missing, "InvalidArgument", f"there is no AWS profile 'nope' in {config}")
    nothing = imported(tmp_path, "--endpoint-url", moto.endpoint)
    assert_fails(nothing, "NoCredentials")


# --- output -----------------------------------------------------------------------------


def test_json_output_has_no_botocore_lines(moto: Store, build: Path, tmp_path: Path) -> None:
    """botocore says "Found credentials in environment variables" at INFO: not for users."""
    env = KEYS | {"AWS_ENDPOINT_URL": moto.endpoint}
    for done in (imported(tmp_path, env=env), published(build, env=env)):
        assert_ok(done)
        said = events(done.stdout)  # every line an event
        assert not [e for e in said if e.get("logger", "").startswith("botocore")], said
        assert "Found credentials" not in done.stderr and "Found endpoint" not in done.stderr
    debug = imported(tmp_path, env=env | {"DISKFLOW_DEBUG": "1"})
    found = [e for e in events(debug.stdout) if "Found credentials in environment" in e["message"]]
    assert found and found[0]["type"] == "log" and found[0]["logger"].startswith("botocore")
