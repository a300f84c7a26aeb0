"""Artifact stores for publish tests, all reached over real HTTP: moto's S3 server (one open,
one that checks credentials), nginx as a WebDAV store, and a PUT server that fails on demand.

Test modules load the fixtures with `pytest_plugins = ["tests.support.stores"]`, after importing its
helpers, so pytest cannot rewrite its asserts; it has none (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
import requests
from moto.server import ThreadedMotoServer

from tests.conftest import MiB, free_port, run, running_nginx, wait_for_http

BUCKET = "golden"
ACCESS_KEY, SECRET_KEY = "AKIDPUBLISH", "publish-s3cr3t-never-printed"
DAV_USER, DAV_PASSWORD, DAV_TOKEN = "publisher", "dav-pa55word-never-printed", "t0ken-never-printed"


@dataclass(frozen=True)
class Image:
    path: Path
    sha256: str
    virtual_size: int


@pytest.fixture(scope="session")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A real qcow2 (64 MiB virtual) holding 14 MiB of random data: about three 5 MiB parts."""
    root = tmp_path_factory.mktemp("publish-image")
    raw, image = root / "disk.raw", root / "disk.qcow2"
    rng = __import__("random").Random(7)
    with raw.open("wb") as f:
        f.truncate(64 * MiB)
        for offset, length in ((0, 8 * MiB), (30 * MiB, 6 * MiB - 4096)):
            f.seek(offset)
            f.write(rng.randbytes(length))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return Image(image, digest, 64 * MiB)


@pytest.fixture(scope="module")
def s3_env() -> Iterator[None]:
    """Static test keys in the environment, as boto3's chain reads them; no metadata service."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        yield


@pytest.fixture(scope="module")
def moto_s3(s3_env: None) -> Iterator[str]:
    """moto's S3 server on loopback with an empty bucket BUCKET; yields its endpoint."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def s3_client(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
    """A plain boto3 client: the independent reader the tests check a store with."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def aws_cli(endpoint: str) -> list[str]:
    return [str(Path(sys.executable).parent / "aws"), "--endpoint-url", endpoint, "s3"]


@dataclass(frozen=True)
class AuthS3:
    endpoint: str
    powerless: tuple[str, str]  # a real user's key pair, with no permission to do anything
    admin: tuple[str, str]  # a user allowed everything: the tests' independent reader


@pytest.fixture(scope="module")
def moto_auth(s3_env: None) -> Iterator[AuthS3]:
    """moto's S3 server checking signatures and IAM policies, in its own process (moto's
    switch is process-wide). The bucket and a powerless user are made before it is turned on."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint + "/")
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        keys = {}
        for user in ("powerless", "admin"):
            iam.create_user(UserName=user)
            made = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (made["AccessKeyId"], made["SecretAccessKey"])
        allow_all = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="admin", PolicyName="all", PolicyDocument=json.dumps(allow_all)
        )
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
        yield AuthS3(endpoint, keys["powerless"], keys["admin"])
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass(frozen=True)
class Dav:
    base: str  # http://127.0.0.1:PORT
    root: Path  # what nginx serves
    access_log: Path  # "METHOD URI STATUS" per request, in the order nginx finished them

    def requests(self, under: str, *, count: int) -> list[tuple[str, str, int]]:
        """(method, uri, status) of every request below `under`, in order, once there are at
        least `count`: nginx logs a request after its response is sent, so the client may
        have its answer before the line is there."""
        end = time.monotonic() + 10
        while True:
            lines = self.access_log.read_text().splitlines()
            found = [tuple(line.split(" ")) for line in lines]
            seen = [(m, u, int(s)) for m, u, s in found if u.startswith(under)]
            if len(seen) >= count or time.monotonic() > end:
                return seen
            time.sleep(0.05)


@pytest.fixture(scope="session")
def webdav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dav]:
    """nginx as a WebDAV artifact store, started from its own config. Locations:
    /dav/ (create_full_put_path; without it nginx answers a PUT into a missing folder with 500,
    not RFC 4918's 409), /basic/ (basic auth), /bearer/ (a bearer token), /readonly/ (PUT
    forbidden), /broken/ (PUT of *.qcow2 answers 500), /local/ (plain files: what serves a
    local directory store)."""
    prefix = tmp_path_factory.mktemp("webdav")
    root = prefix / "root"
    for folder in ("dav", "basic", "bearer", "readonly", "broken", "local"):
        (root / folder).mkdir(parents=True)
    hashed = subprocess.run(
        ["openssl", "passwd", "-5", "-stdin"],
        input=DAV_PASSWORD,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (prefix / "htpasswd").write_text(f"{DAV_USER}:{hashed}\n")
    dav = "dav_methods PUT DELETE MKCOL; create_full_put_path on;"
    http = f"""
        log_format publish '$request_method $uri $status';
        access_log {prefix}/access.log publish;
        client_max_body_size 0;
        """
    server = f"""
        root {root};
        location /dav/ {{ {dav} }}
        location /basic/ {{
            auth_basic "publish";
            auth_basic_user_file {prefix}/htpasswd;
            {dav}
        }}
        location /bearer/ {{
            if ($http_authorization != "Bearer {DAV_TOKEN}") {{ return 401; }}
            {dav}
        }}
        location /readonly/ {{ limit_except GET HEAD {{ deny all; }} }}
        location /broken/ {{
            {dav}
            location ~ \\.qcow2$ {{ if ($request_method = PUT) {{ return 500; }} }}
        }}
        location /local/ {{ }}
        """
    with running_nginx(prefix, http, server) as base:
        yield Dav(base, root, prefix / "access.log")


@dataclass
class FlakyPutServer:
    """A PUT/GET/HEAD object server whose first `failures` PUTs fail: `drop` closes the
    connection half-way through the body, `503` reads it all and answers 503. Like
    Artifactory, it reports the stored object's sha256 in X-Checksum-Sha256 (`lie` reports a
    wrong one). With `collections`, it is a strict WebDAV server: a PUT or MKCOL into a
    folder not made by MKCOL (or listed in `folders`) is answered 409. `puts` records each
    PUT's path and X-Checksum-Sha256 header; a body cut short is not stored."""

    failures: int = 0
    mode: str = "drop"
    lie: bool = False
    collections: bool = False
    folders: set[str] = field(default_factory=lambda: {""})
    objects: dict[str, bytes] = field(default_factory=dict)
    puts: list[tuple[str, str | None]] = field(default_factory=list)
    mkcols: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                server.puts.append((self.path, self.headers.get("X-Checksum-Sha256")))
                length = int(self.headers["Content-Length"])
                if server.failures and server.mode == "drop":
                    server.failures -= 1
                    self.rfile.read(length // 2)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(length)
                if server.failures:
                    server.failures -= 1
                    self._answer(503)
                elif server.collections and self._parent() not in server.folders:
                    self._answer(409)
                elif len(body) == length:
                    server.objects[self.path] = body
                    self._answer(201)

            def do_MKCOL(self) -> None:
                path = self.path.rstrip("/")
                status = 201
                if path in server.folders:
                    status = 405
                elif self._parent() not in server.folders:
                    status = 409
                else:
                    server.folders.add(path)
                server.mkcols.append((path, status))
                self._answer(status)

            def _parent(self) -> str:
                return self.path.rstrip("/").rsplit("/", 1)[0]

            def do_HEAD(self) -> None:
                self._serve(with_body=False)

            def do_GET(self) -> None:
                self._serve(with_body=True)

            def _serve(self, *, with_body: bool) -> None:
                body = server.objects.get(self.path)
                if body is None:
                    self._answer(404)
                    return
                digest = hashlib.sha256(body + (b"lie" if server.lie else b"")).hexdigest()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Checksum-Sha256", digest)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def flaky() -> Iterator[FlakyPutServer]:
    server = FlakyPutServer()
    yield server
    server.close()
