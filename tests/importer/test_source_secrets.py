"""No secret reaches an error message, even from a server that quotes the request's headers
in its reason phrase, as some proxies do: for imports and for publishing over HTTP. And
credentials mounted as Kubernetes mounts Secrets and ConfigMaps (--secret-dir, --header-file
and --ca-bundle directories) reach the servers that ask for them, and nothing else."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer import HttpOptions, ImportOptions, S3Options, import_image
from importer.errors import Failure
from pipelines.publish.http import HttpStore
from tests.conftest import Images, run, running_nginx
from tests.importer.test_import_formats import assert_same_content
from tests.support.commands import diskflow_import as diskflow
from tests.support.faultserver import FaultServer
from tests.support.stores import BUCKET, AuthS3, s3_client

pytest_plugins = ["tests.support.stores"]

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
    with pytest.raises(Failure) as caught:
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
    with pytest.raises(Failure) as caught:
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
    with pytest.raises(Failure) as caught:
        import_image(url, str(tmp_path / "disk.img"), options=options)
    assert "TOPSECRET" not in str(caught.value)


# --- Credentials as Kubernetes mounts them: Secrets and ConfigMaps as directories ----------

USER, PASSWORD = "importer", "pa55-mounted-never-printed"
API_KEY, TENANT = "k3y-mounted-never-printed", "t3nant-never-printed"


def mounted(directory: Path, files: dict[str, str | bytes]) -> Path:
    """`directory` laid out as the kubelet mounts a Secret or ConfigMap: the files in a
    hidden timestamped directory, `..data` linking to it, and each key a link through it."""
    version = directory / "..2025_01_01_00_00_00.000000001"
    version.mkdir(parents=True)
    for key, content in files.items():
        path = version / key
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        (directory / key).symlink_to(f"..data/{key}")
    (directory / "..data").symlink_to(version.name)
    return directory


@pytest.fixture(scope="module")
def guarded(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx serving the test images under /basic/ only with basic auth (USER, PASSWORD),
    and under /header/ only with the headers X-Api-Key: API_KEY and X-Tenant: TENANT."""
    prefix = tmp_path_factory.mktemp("guarded-nginx")
    htpasswd = prefix / "htpasswd"
    htpasswd.write_text(f"{USER}:{run('openssl', 'passwd', '-apr1', PASSWORD).strip()}\n")
    server = f"""
        location /basic/ {{
            auth_basic "diskflow";
            auth_basic_user_file {htpasswd};
            alias {images.dir}/;
        }}
        location /header/ {{
            if ($http_x_api_key != "{API_KEY}") {{ return 403; }}
            if ($http_x_tenant != "{TENANT}") {{ return 403; }}
            alias {images.dir}/;
        }}
    """
    with running_nginx(prefix, "access_log off;", server) as base:
        yield base


def assert_untold(done: subprocess.CompletedProcess[str], log: Path, *secrets: str) -> None:
    for text in (done.stdout, done.stderr, log.read_text() if log.exists() else ""):
        for secret in secrets:
            assert secret not in text


def test_secret_dir_is_basic_auth_for_http(guarded: str, images: Images, tmp_path: Path) -> None:
    secret = mounted(tmp_path / "secret", {"accessKeyId": USER, "secretKey": PASSWORD + "\n"})
    url, log = f"{guarded}/basic/disk.qcow2.gz", tmp_path / "termination-log"
    done = diskflow(url, tmp_path / "disk.img", "--secret-dir", secret, "--termination-log", log)
    assert done.returncode == 0, done.stderr
    assert_same_content(tmp_path / "disk.img", images.raw)
    assert_untold(done, log, PASSWORD)
    refused = diskflow(url, tmp_path / "other.img", "--progress", "json", "--termination-log", log)
    assert refused.returncode == 1 and "[Unauthorized]" in refused.stderr
    wrong = mounted(tmp_path / "wrong", {"accessKeyId": USER, "secretKey": PASSWORD + "-old"})
    done = diskflow(
        url, tmp_path / "other.img", "--secret-dir", wrong, "--progress", "json",
        "--termination-log", log,
    )  # fmt: skip
    assert done.returncode == 1 and "[Unauthorized]" in done.stderr
    assert_untold(done, log, PASSWORD)


def test_secret_dir_errors_name_the_directory_and_key_only(images: Images, tmp_path: Path) -> None:
    cases = [
        ({"accessKeyId": USER}, "has no secretKey file"),
        ({"accessKeyId": "", "secretKey": PASSWORD}, "accessKeyId in --secret-dir"),
        ({"accessKeyId": USER, "secretKey": f"{PASSWORD}\nmore"}, "more than one line"),
        ({"accessKeyId": USER, "secretKey": b"\xff" + PASSWORD.encode()}, "not UTF-8"),
    ]
    for n, (files, said) in enumerate(cases):
        secret = mounted(tmp_path / f"secret-{n}", files)
        log = tmp_path / f"log-{n}"
        done = diskflow(
            f"http://127.0.0.1:1/{images.raw.name}", tmp_path / "d.img", "--progress", "json",
            "--secret-dir", secret, "--termination-log", log,
        )  # fmt: skip
        assert done.returncode == 1 and "[InvalidArgument]" in done.stderr, done.stderr
        assert said in done.stderr and str(secret) in done.stderr, done.stderr
        assert_untold(done, log, PASSWORD)


def test_secret_dir_and_other_credentials_are_refused(images: Images, tmp_path: Path) -> None:
    secret = mounted(tmp_path / "secret", {"accessKeyId": USER, "secretKey": PASSWORD})
    auth = tmp_path / "auth"
    auth.write_text(f"{USER}:{PASSWORD}\n")
    for extra, env, other in (
        (["--auth-file", auth], {}, "--auth-file"),
        ([], {"DISKFLOW_HTTP_USER": USER}, "DISKFLOW_HTTP_USER/DISKFLOW_HTTP_PASSWORD"),
    ):
        done = diskflow(images.raw, tmp_path / "d.img", "--secret-dir", secret, *extra, env=env)
        assert done.returncode == 1, done.stderr
        assert f"--secret-dir and {other} both give credentials" in done.stderr
        assert PASSWORD not in done.stdout + done.stderr


def test_header_files_and_directories(guarded: str, images: Images, tmp_path: Path) -> None:
    headers = mounted(tmp_path / "headers", {"api-key": f"X-Api-Key: {API_KEY}\n"})
    tenant = tmp_path / "tenant"
    tenant.write_text(f"X-Tenant: {TENANT}\n")
    url, log = f"{guarded}/header/disk.raw.zst", tmp_path / "termination-log"
    done = diskflow(
        url, tmp_path / "disk.img", "--header-file", headers, "--header-file", tenant,
        "--termination-log", log,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_content(tmp_path / "disk.img", images.raw)
    assert_untold(done, log, API_KEY, TENANT)
    done = diskflow(url, tmp_path / "other.img", "--header-file", headers)  # no X-Tenant
    assert done.returncode == 1 and "[Forbidden]" in done.stderr, done.stderr


def test_header_directory_errors_never_quote_a_line(images: Images, tmp_path: Path) -> None:
    pasted = mounted(tmp_path / "pasted", {"a": "X-Ok: 1\n", "b": f"X-Fine: 2\n{API_KEY}\n"})
    done = diskflow(images.raw, tmp_path / "d.img", "--progress", "json", "--header-file", pasted)
    assert done.returncode == 1 and f"line 2 of {pasted / 'b'}" in done.stderr, done.stderr
    assert API_KEY not in done.stdout + done.stderr
    empty = mounted(tmp_path / "empty", {})
    done = diskflow(images.raw, tmp_path / "d.img", "--header-file", empty)
    assert done.returncode == 1 and f"--header-file {empty} is a directory with no file" in (
        done.stderr
    )


@pytest.fixture(scope="module")
def ca_signed(
    images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FaultServer, Path]]:
    """The fault server over TLS with a certificate for 127.0.0.1 signed by a test CA; yields
    it and the CA's certificate."""
    certs = tmp_path_factory.mktemp("ca")
    ca, ca_key = certs / "ca.pem", certs / "ca.key"
    cert, key, request = certs / "cert.pem", certs / "key.pem", certs / "cert.csr"
    extensions = certs / "extensions"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=diskflow test CA", "-keyout", ca_key, "-out", ca)  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", key, "-out", request)  # fmt: skip
    run("openssl", "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key,
        "-CAcreateserial", "-days", "1", "-extfile", extensions, "-out", cert)  # fmt: skip
    server = FaultServer(str(images.dir), tls=(str(cert), str(key)))
    yield server, ca
    server.close()


def test_ca_bundle_directory_trusts_every_certificate_in_it(
    ca_signed: tuple[FaultServer, Path], images: Images, tmp_path: Path
) -> None:
    server, ca = ca_signed
    other = tmp_path / "other"
    other.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=another CA", "-keyout", other / "key", "-out", other / "cert")  # fmt: skip
    # A ConfigMap as CDI's certConfigMap: any key names, other keys besides the certificates.
    bundle = mounted(
        tmp_path / "certs",
        {"a-other.crt": (other / "cert").read_text(), "b.crt": ca.read_text(), "notes": "hi"},
    )
    url = server.url(uuid.uuid4().hex, "disk.vmdk")
    done = diskflow(url, tmp_path / "disk.img", "--ca-bundle", bundle, "--retries", "0")
    assert done.returncode == 0, done.stderr
    assert_same_content(tmp_path / "disk.img", images.raw)
    done = diskflow(url, tmp_path / "d.img", "--ca-bundle", other / "cert", "--retries", "0")
    assert done.returncode == 1 and "[TLSError]" in done.stderr, done.stderr


def test_ca_bundle_directory_errors(images: Images, tmp_path: Path) -> None:
    none = mounted(tmp_path / "none", {"notes": "no certificate here"})
    body = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    broken = mounted(tmp_path / "broken", {"ca.crt": body})
    for directory, said in (
        (none, f"--ca-bundle {none} holds no PEM certificate"),
        (broken, f"{broken / 'ca.crt'} in --ca-bundle {broken} holds a malformed certificate"),
    ):
        done = diskflow(images.raw, tmp_path / "d.img", "--ca-bundle", directory)
        assert done.returncode == 1 and said in done.stderr, done.stderr
        assert "[InvalidArgument]" in done.stderr and "Traceback" not in done.stderr


def test_static_s3_keys(moto_auth: AuthS3, images: Images, tmp_path: Path) -> None:
    """moto checking signatures: the environment's keys are refused, the static pair works;
    the secret is never shown."""
    name = "static/disk.qcow2.gz"
    s3_client(moto_auth.endpoint, *moto_auth.admin).upload_file(
        str(images.path("qcow2", "gz")), BUCKET, name
    )
    access_key, secret_key = moto_auth.admin
    keys = S3Options(endpoint=moto_auth.endpoint, access_key=access_key, secret_key=secret_key)
    assert access_key not in repr(keys) and secret_key not in repr(keys)
    options = ImportOptions(s3=keys, http=HttpOptions(retries=0), scratch_dir=str(tmp_path))
    import_image(f"s3://{BUCKET}/{name}", str(tmp_path / "lib.img"), options=options)
    assert_same_content(tmp_path / "lib.img", images.raw)
    with pytest.raises(Failure) as caught:  # the environment's keys: no such user
        import_image(
            f"s3://{BUCKET}/{name}",
            str(tmp_path / "env.img"),
            options=ImportOptions(s3=S3Options(endpoint=moto_auth.endpoint)),
        )
    assert caught.value.reason in ("Unauthorized", "Forbidden"), caught.value.message
    with pytest.raises(Failure) as caught:
        S3Options(access_key=access_key)
    assert caught.value.reason == "InvalidArgument"

    log = tmp_path / "termination-log"
    for secret, code in ((secret_key, 0), (secret_key + "x", 1)):
        directory = mounted(
            tmp_path / f"secret-{code}", {"accessKeyId": access_key, "secretKey": secret}
        )
        done = diskflow(
            f"{moto_auth.endpoint}/{BUCKET}/{name}", tmp_path / f"cli-{code}.img", "--s3",
            "--secret-dir", directory, "--retries", "0", "--progress", "json",
            "--termination-log", log,
        )  # fmt: skip
        assert done.returncode == code, done.stderr
        assert_untold(done, log, secret_key)
    assert "[Unauthorized]" in done.stderr, done.stderr
    assert_same_content(tmp_path / "cli-0.img", images.raw)


def test_s3_honours_aws_ca_bundle(
    ca_signed: tuple[FaultServer, Path], images: Images, tmp_path: Path
) -> None:
    """As the aws CLI does, AWS_CA_BUNDLE is trusted for S3 without --ca-bundle (a pod's CA
    bundle from the Helm chart arrives this way); without it, the private CA is refused."""
    server, ca = ca_signed
    url = server.url(uuid.uuid4().hex, "disk.vmdk")  # https://host/BUCKET/KEY: CDI's S3 form
    args = ("--s3", "--retries", "0")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    done = diskflow(url, tmp_path / "trusted.img", *args, env=env | {"AWS_CA_BUNDLE": str(ca)})
    assert done.returncode == 0, done.stderr
    assert_same_content(tmp_path / "trusted.img", images.raw)
    done = diskflow(url, tmp_path / "untrusted.img", *args, env=env)
    assert done.returncode == 1 and "[TLSError]" in done.stderr, done.stderr
