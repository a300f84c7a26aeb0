"""DataVolume manifests for published images: the URL a cluster fetches really serves the image,
the checksum is the image's, the volume is just large enough for diskflow's importer, and the
manifest survives YAML, is what importer.api reads, and passes the CRD's schema."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from importer import Checksum, HttpOptions, ImportOptions, S3Options, import_image
from importer.api import DataVolume
from importer.capacity import required_volume_size, usable_size
from importer.errors import FinalError
from importer.quantity import parse_quantity
from pipelines.datavolume import datavolume, storage_request, to_yaml
from pipelines.publish import Published, find_published, open_store, publish_build
from pipelines.publish.s3 import S3Store
from tests.conftest import GiB, MiB, run
from tests.contracts.test_crd import schema_errors
from tests.pipelines.manifests import finished
from tests.support.stores import BUCKET, DAV_PASSWORD, DAV_USER, Dav, Image

pytest_plugins = ["tests.support.stores"]

FAST = HttpOptions(retries=2, backoff=0.01, stall_timeout=5.0, connect_timeout=2.0)
TEMPLATE = "centos9"


def publish(
    url: str, image: Image, *, s3: S3Options | None = None, public_url: str | None = None
) -> Published:
    store = open_store(url, http=FAST, s3=s3, public_url=public_url)
    manifest = finished(TEMPLATE, uuid.uuid4().hex, image.virtual_size)
    return publish_build(store, image.path, manifest)


def fetched_sha256(url: str) -> str:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return hashlib.sha256(response.content).hexdigest()


def round_trip(manifest: dict) -> dict:
    text = to_yaml(manifest)
    assert yaml.safe_load(text) == manifest
    assert schema_errors(manifest) == []
    assert DataVolume.from_manifest(manifest).to_manifest() == manifest
    return manifest


def test_http_store_datavolume(webdav: Dav, qcow2: Image) -> None:
    base = f"{webdav.base}/dav/{uuid.uuid4().hex[:12]}"
    published = publish(base, qcow2)
    dv = round_trip(datavolume("centos9-golden", published, namespace="vms", storage_class="fast"))
    assert dv["apiVersion"] == "diskflow.io/v1beta1" and dv["kind"] == "DataVolume"
    assert dv["metadata"]["name"] == "centos9-golden" and dv["metadata"]["namespace"] == "vms"
    assert dv["metadata"]["annotations"]["diskflow.io/build-id"] == published.build_id
    source = dv["spec"]["source"]["http"]
    assert source == {
        "url": f"{base}/{TEMPLATE}/{published.build_id}/{TEMPLATE}.qcow2",
        "checksum": f"sha256:{qcow2.sha256}",
    }
    assert fetched_sha256(source["url"]) == qcow2.sha256
    # 64 MiB virtual: 1 GiB is plenty; no volumeMode unless asked.
    assert dv["spec"]["storage"] == {
        "resources": {"requests": {"storage": "64Mi"}},
        "storageClassName": "fast",
    }


def test_http_store_url_never_carries_credentials(webdav: Dav, qcow2: Image) -> None:
    base = f"{webdav.base}/basic/{uuid.uuid4().hex[:12]}"
    published = publish(base.replace("//", f"//{DAV_USER}:{DAV_PASSWORD}@", 1), qcow2)
    dv = round_trip(datavolume("centos9", published, secret_ref="artifactory-credentials"))
    text = to_yaml(dv)
    assert DAV_PASSWORD not in text and DAV_USER not in text
    assert dv["spec"]["source"]["http"]["url"].startswith(base + "/")
    assert dv["spec"]["source"]["http"]["secretRef"] == "artifactory-credentials"


def test_s3_store_datavolume_imports_with_diskflow(
    moto_s3: str, qcow2: Image, tmp_path: Path
) -> None:
    prefix = uuid.uuid4().hex[:12]
    published = publish(f"s3://{BUCKET}/{prefix}", qcow2, s3=S3Options(endpoint=moto_s3))
    dv = round_trip(datavolume("centos9", published, volume_mode="Block"))
    source = dv["spec"]["source"]["s3"]
    key = f"{prefix}/{TEMPLATE}/{published.build_id}/{TEMPLATE}.qcow2"
    assert source["url"] == f"{moto_s3}/{BUCKET}/{key}"  # CDI's path-style form
    assert source["checksum"] == f"sha256:{qcow2.sha256}"
    assert dv["spec"]["storage"] == {
        "resources": {"requests": {"storage": "64Mi"}},
        "volumeMode": "Block",
    }
    # What diskflow's importer does with an s3 source (moto refuses anonymous GETs): the URL
    # read in CDI's form, the download checked against the checksum, the qcow2 converted.
    dest = tmp_path / "disk.img"
    import_image(
        source["url"],
        str(dest),
        options=ImportOptions(
            s3=S3Options(cdi_url=True),
            http=FAST,
            checksum=Checksum.parse(source["checksum"]),
            scratch_dir=str(tmp_path),
        ),
    )
    reference = tmp_path / "reference.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2.path, reference)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == (
        hashlib.sha256(reference.read_bytes()).hexdigest()
    )


def test_aws_url_without_an_endpoint(s3_env: None) -> None:
    store = S3Store("s3://golden-images/templates", S3Options(region="eu-west-3"), FAST)
    assert store.import_source("centos9/b1/centos9.qcow2").url == (
        "https://s3.eu-west-3.amazonaws.com/golden-images/templates/centos9/b1/centos9.qcow2"
    )


def test_local_store_needs_a_public_url(webdav: Dav, qcow2: Image, tmp_path: Path) -> None:
    with pytest.raises(FinalError) as caught:
        datavolume("centos9", publish(str(tmp_path), qcow2))
    assert caught.value.reason == "InvalidArgument" and "public URL" in caught.value.message
    # The directory nginx serves at /local/: what the DataVolume names is really there.
    published = publish(str(webdav.root / "local"), qcow2, public_url=f"{webdav.base}/local")
    url = datavolume("centos9", published)["spec"]["source"]["http"]["url"]
    assert url == f"{webdav.base}/local/{TEMPLATE}/{published.build_id}/{TEMPLATE}.qcow2"
    assert fetched_sha256(url) == qcow2.sha256


def test_a_found_build_gives_the_same_datavolume(webdav: Dav, qcow2: Image) -> None:
    base = f"{webdav.base}/dav/{uuid.uuid4().hex[:12]}"
    published = publish(base, qcow2)
    manifest = find_published(open_store(base, http=FAST), TEMPLATE, published.build_id)
    assert manifest is not None
    again = Published.from_manifest(manifest)
    assert again == published
    assert datavolume("centos9", again) == datavolume("centos9", published)


@pytest.mark.parametrize(
    "virtual_size", [1, 500 * MiB, 967 * MiB + 1, GiB, 10 * GiB, 20 * GiB - 5, 100 * GiB + 1]
)
def test_storage_request_is_the_image_size_and_the_volume_made_from_it_holds_the_image(
    virtual_size: int,
) -> None:
    request = parse_quantity(storage_request(virtual_size))
    assert request == max(virtual_size, MiB)
    assert usable_size(required_volume_size(request)) >= virtual_size
    assert required_volume_size(request, block=True) >= virtual_size


def test_bad_arguments_are_refused(webdav: Dav, qcow2: Image) -> None:
    published = publish(f"{webdav.base}/dav/{uuid.uuid4().hex[:12]}", qcow2)
    for name, mode in (("Centos_9", None), ("x" * 254, None), ("centos9", "block")):
        with pytest.raises(FinalError) as caught:
            datavolume(name, published, volume_mode=mode)
        assert caught.value.reason == "InvalidArgument"
    sizeless = dataclasses.replace(published, virtual_size=None)
    with pytest.raises(FinalError):
        datavolume("centos9", sizeless)
