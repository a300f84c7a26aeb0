"""The install tree's .treeinfo in the build id, fetched from real servers on loopback."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from importer.errors import FinalError, TransientError
from pipelines.finalize import FinalizeOptions
from pipelines.manifest import Inputs, TreeRecord
from pipelines.provenance import build_id, inputs
from pipelines.template import InstallSource, Template
from tests.conftest import free_port
from tests.support.faultserver import FaultServer

TREEINFO = b"[general]\nfamily = CentOS Stream\nversion = 9\n[tree]\nbuild_timestamp = 1700000000\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultServer, Path]]:
    """A server for an install tree in a directory of its own; each test writes the
    .treeinfo it needs and sets its faults on a token of its own."""
    root = tmp_path_factory.mktemp("tree")
    server = FaultServer(str(root))
    yield server, root
    server.close()


def template(location: str) -> Template:
    return Template(
        name="centos9",
        kickstart=Path("centos9.ks"),
        metadata=Path("centos9.toml"),
        version="RHEL9",
        os_variant="centos-stream9",
        disk_size=10 << 30,
        memory=2 << 30,
        vcpus=2,
        install=InstallSource(location=location),
    )


def location(server: FaultServer, token: str | None = None) -> str:
    return server.url(token or uuid.uuid4().hex, "")  # the tree's .treeinfo is /<token>/.treeinfo


def test_served_treeinfo_is_identified_by_its_sha256(tree: tuple[FaultServer, Path]) -> None:
    server, root = tree
    (root / ".treeinfo").write_bytes(TREEINFO)
    url = location(server)
    found = inputs(template(url))
    assert found.location == TreeRecord(url, hashlib.sha256(TREEINFO).hexdigest())


def test_a_new_compose_changes_the_digest_and_the_build_id(tree: tuple[FaultServer, Path]) -> None:
    server, root = tree
    url = location(server)
    tools = {"diskflow": "1"}

    def build() -> tuple[str, str]:
        media = inputs(template(url))
        assert media.location is not None
        return media.location.treeinfo_sha256, build_id(
            "k" * 64, template(url), media, tools, FinalizeOptions()
        )

    (root / ".treeinfo").write_bytes(TREEINFO)
    first = build()
    assert build() == first  # the same compose: the same id
    (root / ".treeinfo").write_bytes(TREEINFO.replace(b"1700000000", b"1700086400"))
    second = build()
    assert second[0] != first[0] and second[1] != first[1]


@pytest.mark.parametrize("status", [404, 410])
def test_a_tree_without_treeinfo_is_recorded_as_none(
    status: int, tree: tuple[FaultServer, Path]
) -> None:
    server, _ = tree
    token = uuid.uuid4().hex
    server.configure(token, status=status)
    assert inputs(template(location(server, token))).location == TreeRecord(
        location(server, token), None
    )


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_server_error_is_transient(status: int, tree: tuple[FaultServer, Path]) -> None:
    server, root = tree
    (root / ".treeinfo").write_bytes(TREEINFO)
    token = uuid.uuid4().hex
    server.configure(token, status=status)
    url = location(server, token)
    with pytest.raises(TransientError) as caught:
        inputs(template(url))
    assert caught.value.reason == "SourceUnreachable"
    assert caught.value.message.startswith(f"cannot read {url}.treeinfo: HTTP {status}")


@pytest.mark.parametrize(("status", "reason"), [(403, "Forbidden"), (400, "HttpError")])
def test_other_client_errors_are_final_and_name_the_status(
    status: int, reason: str, tree: tuple[FaultServer, Path]
) -> None:
    server, _ = tree
    token = uuid.uuid4().hex
    server.configure(token, status=status)
    with pytest.raises(FinalError) as caught:
        inputs(template(location(server, token)))
    assert caught.value.reason == reason
    assert f"HTTP {status}" in caught.value.message


def test_connection_refused_is_transient_and_keeps_credentials_out() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(TransientError) as caught:
        inputs(template(f"http://builder:s3cret@127.0.0.1:{port}/centos/9/os/"))
    assert caught.value.reason == "SourceUnreachable"
    assert caught.value.message.startswith(
        f"cannot read http://127.0.0.1:{port}/centos/9/os/.treeinfo: "
    )
    assert "s3cret" not in caught.value.message and "builder" not in caught.value.message


def test_a_location_diskflow_cannot_fetch_itself_has_no_digest() -> None:
    media = inputs(template("nfs:nfs.example.com:/exports/centos9"))
    assert media == Inputs(location=TreeRecord("nfs:nfs.example.com:/exports/centos9", None))


def test_typed_inputs_give_the_build_id_the_manifest_dicts_gave() -> None:
    # Stores find a build by its id: a new id for the same inputs would rebuild every template.
    url = "https://mirror.example/centos/9/os/"
    media = Inputs(location=TreeRecord(url, "c" * 64), kernel_args="inst.text")
    tools = {"diskflow": "1"}
    assert build_id("k" * 64, template(url), media, tools, FinalizeOptions()) == (
        "07b60ed9954b7261b31d"  # what the dict-assembling code computed for these inputs
    )
