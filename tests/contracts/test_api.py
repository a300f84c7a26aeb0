"""The DataVolume model: CDI's manifests read as CDI means them, diskflow's written and read
back unchanged, and every malformed manifest refused with an error that names the field and
never quotes a secret."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import yaml

from importer.api import (
    API_VERSION,
    CDI_API_VERSION,
    BlankSource,
    Condition,
    DataVolume,
    HttpSource,
    ImportSummary,
    ManifestError,
    Phase,
    S3Source,
    Spec,
    Status,
    Storage,
)
from importer.capacity import MiB, required_volume_size, usable_size
from importer.errors import FinalError
from importer.pipeline import ContentType
from importer.quantity import format_quantity
from importer.reasons import Reason

SHA256 = "e3c1b309d9203604922d6e255c2c5d098a309c2d46215d8fc026954f3c5c27a0"

# CDI's documentation (doc/datavolumes.md, manifests/example/), as users copy it: empty strings
# for the optional fields, odd indentation, quoted sizes.
CDI_MANIFESTS = {
    "http with secret, CA and checksum": f"""
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: "example-import-dv-with-checksum"
spec:
  source:
      http:
         url: "https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img"
         secretRef: endpoint-secret
         certConfigMap: tls-certs
         checksum: "sha256:{SHA256}"
  storage:
    resources:
      requests:
        storage: "64Mi"
""",
    "http with the optional fields empty, Block": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: "example-import-dv"
spec:
  source:
      http:
         url: "https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img" # S3 or GCS
         secretRef: "" # Optional
         certConfigMap: "" # Optional
         checksum: "" # Optional, e.g., "sha256:abc123..."
  storage:
    volumeMode: Block
    resources:
      requests:
        storage: "64Mi"
""",
    "http with headers": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: "example-import-dv"
spec:
  source:
      http:
         url: "http://server/archive.tar"
         extraHeaders:
           - "X-Auth-Token: 12345"
           - "X-Another-Header: abcde"
         secretExtraHeaders:
           - "first-secret"
           - "second-secret"
         checksum: "" # Optional
  storage:
    resources:
      requests:
        storage: "64Mi"
""",
    "http skipping TLS verification": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: my-data-volume
spec:
  source:
      http:
         url: "https://172.16.15.6/iso/cirros-0.4.0-x86_64-disk.img"
         insecureSkipVerify: true
  storage:
    resources:
      requests:
        storage: 500Mi
""",
    "s3": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: s3-import
  namespace: vms
spec:
  source:
    s3:
      url: "https://s3.us-west-2.amazonaws.com/images/fedora/disk.qcow2"
      secretRef: s3-credentials
  storage:
    accessModes:
      - ReadWriteMany
    storageClassName: ceph-rbd
    resources:
      requests:
        storage: 10Gi
""",
    "blank": """
# This example assumes you are using a default storage class
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-image-datavolume
spec:
  source:
      blank: {}
  storage:
    resources:
      requests:
        storage: 500Mi
""",
    "blank with pvc": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: blank-dv-with-pvc
spec:
  source:
    blank: {}
  pvc:
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 1Gi
""",
    "archive": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: import-archive-datavolume
spec:
  source:
      http:
         url: "http://geolite.maxmind.com/download/geoip/database/GeoLite2-Country.tar.gz"
  contentType: archive
  storage:
    resources:
      requests:
        storage: 500Mi
""",
    "pvc with Block, priority class and preallocation": """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: import-kubevirt-block-datavolume
  annotations:
    cdi.kubevirt.io/storage.bind.immediate.requested: "true"
spec:
  priorityClassName: kubevirt
  preallocation: true
  source:
    http:
      url: "http://distro.ibiblio.org/tinycorelinux/9.x/x86/release/Core-current.iso"
  pvc:
    storageClassName: local
    volumeMode: Block
    accessModes:
      - ReadWriteOnce
    resources:
      requests:
        storage: 1Gi
""",
}


def cdi(name: str) -> dict[str, Any]:
    return yaml.safe_load(CDI_MANIFESTS[name])


SELECTOR = {
    "matchLabels": {"tier": "hdd"},
    "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b", "c"]}],
}
# Every field of the API set, over a few DataVolumes (the sources and storage kinds exclude
# each other): what test_crd checks the schema declares, no more, no less.
FULL = (
    DataVolume(
        name="fedora",
        namespace="vms",
        uid="8d3e7c61-5b0a-4f55-9d8e-2f1b7a9c0e11",
        labels={"app": "fedora"},
        annotations={"diskflow.io/keep-pvc": "true"},
        spec=Spec(
            source=HttpSource(
                url="https://mirror.example/fedora.qcow2.xz?token=x",
                secret_ref="mirror-auth",
                cert_config_map="mirror-ca",
                extra_headers=("X-Client: diskflow",),
                secret_extra_headers=("license-header",),
                checksum=f"sha256:{SHA256}",
            ),
            storage=Storage(
                request=10 << 30,
                storage_class_name="fast",
                access_modes=("ReadWriteOnce", "ReadWriteMany"),
                volume_mode="Filesystem",
                volume_name="pv-0001",
                selector={
                    "matchLabels": {"tier": "ssd"},
                    "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}],
                },
            ),
            content_type=ContentType.ARCHIVE,
            preallocation=True,
            priority_class_name="batch",
            service_account_name="importer",
            resources={
                "requests": {"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "64Mi"},
                "limits": {"cpu": "2", "memory": "1Gi", "ephemeral-storage": "1Gi"},
            },
            retry_limit=3,
            connections=8,
        ),
        status=Status(
            phase=Phase.SUCCEEDED,
            progress="100.00%",
            restart_count=1,
            claim_name="fedora",
            conditions=(
                Condition(
                    type="Ready",
                    status="True",
                    reason="Completed",
                    message="the import succeeded",
                    last_transition_time="2026-11-30T12:00:00Z",
                    last_heartbeat_time="2026-11-30T12:00:01Z",
                ),
            ),
            stage="resize",
            bytes_done=600 * MiB,
            bytes_total=600 * MiB,
            throughput=90 * MiB,
            reason="ConnectionLost",
            message="the server closed the connection with 5 bytes still to come",
            result=ImportSummary(
                format="qcow2",
                compression="xz",
                checksum_verified=True,
                size=10 << 30,
                bytes_downloaded=600 * MiB,
                path="scratch",
                fallback="the qcow2 image is encrypted (crypt_method 2)",
            ),
        ),
    ),
    DataVolume(
        name="centos",
        spec=Spec(
            source=S3Source(
                url="s3://images/centos.qcow2",
                secret_ref="s3-keys",
                cert_config_map="minio-ca",
                endpoint="https://minio.example:9000",
                region="eu-west-1",
                checksum=f"sha256:{SHA256}",
            ),
            storage=Storage(
                request=20 << 30,
                storage_class_name="",
                access_modes=("ReadWriteOnce",),
                volume_mode="Block",
                volume_name="pv-0002",
                selector=SELECTOR,
                kind="pvc",
            ),
        ),
    ),
    DataVolume(
        name="empty",
        spec=Spec(
            source=HttpSource(url="https://x.example/a.img", insecure_skip_verify=True),
            storage=Storage(request=MiB),
        ),
    ),
    DataVolume(
        name="blank", spec=Spec(source=BlankSource(), storage=Storage(request=MiB)), status=Status()
    ),
)


def test_cdi_http_manifest_is_read_as_cdi_means_it() -> None:
    dv = DataVolume.from_manifest(cdi("http with secret, CA and checksum"))
    assert dv.name == "example-import-dv-with-checksum" and dv.namespace is None
    assert dv.spec.source == HttpSource(
        url="https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img",
        secret_ref="endpoint-secret",
        cert_config_map="tls-certs",
        checksum=f"sha256:{SHA256}",
    )
    assert dv.spec.storage == Storage(request=64 * MiB)
    assert dv.spec.content_type is ContentType.KUBEVIRT and not dv.spec.preallocation
    assert dv.status is None and not dv.keep_pvc and not dv.bind_immediately


def test_cdis_empty_strings_are_unset_fields() -> None:
    dv = DataVolume.from_manifest(cdi("http with the optional fields empty, Block"))
    source = dv.spec.source
    assert isinstance(source, HttpSource)
    assert (source.secret_ref, source.cert_config_map, source.checksum) == (None, None, None)
    assert dv.spec.storage.block and dv.spec.storage.volume_mode == "Block"


def test_every_cdi_source_and_storage_kind() -> None:
    headers = DataVolume.from_manifest(cdi("http with headers")).spec.source
    assert isinstance(headers, HttpSource)
    assert headers.extra_headers == ("X-Auth-Token: 12345", "X-Another-Header: abcde")
    assert headers.secret_extra_headers == ("first-secret", "second-secret")
    insecure = DataVolume.from_manifest(cdi("http skipping TLS verification")).spec.source
    assert isinstance(insecure, HttpSource) and insecure.insecure_skip_verify
    s3 = DataVolume.from_manifest(cdi("s3"))
    assert s3.namespace == "vms"
    assert s3.spec.source == S3Source(
        url="https://s3.us-west-2.amazonaws.com/images/fedora/disk.qcow2",
        secret_ref="s3-credentials",
    )
    assert s3.spec.storage == Storage(
        request=10 << 30, storage_class_name="ceph-rbd", access_modes=("ReadWriteMany",)
    )
    blank = DataVolume.from_manifest(cdi("blank")).spec
    assert blank.source == BlankSource() and blank.storage == Storage(request=500 * MiB)
    pvc = DataVolume.from_manifest(cdi("blank with pvc")).spec.storage
    assert pvc == Storage(request=1 << 30, access_modes=("ReadWriteOnce",), kind="pvc")
    archive = DataVolume.from_manifest(cdi("archive")).spec
    assert archive.content_type is ContentType.ARCHIVE
    block = DataVolume.from_manifest(cdi("pvc with Block, priority class and preallocation"))
    assert block.spec.storage.kind == "pvc" and block.spec.storage.block
    assert block.spec.storage.storage_class_name == "local"
    assert block.spec.priority_class_name == "kubevirt" and block.spec.preallocation
    assert block.bind_immediately


@pytest.mark.parametrize("name", sorted(CDI_MANIFESTS))
def test_a_cdi_manifest_becomes_the_same_spec_in_diskflows_api(name: str) -> None:
    manifest = cdi(name)
    dv = DataVolume.from_manifest(manifest)
    written = dv.to_manifest()
    assert written["apiVersion"] == API_VERSION == "diskflow.io/v1beta1"
    assert written["kind"] == "DataVolume"
    assert DataVolume.from_manifest(written) == dv
    # Field for field: CDI's spec less its empty strings, sizes as written.
    assert written["spec"] == _without_empty(manifest["spec"])


def _without_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v != ""}
    return value


@pytest.mark.parametrize("dv", FULL, ids=lambda dv: dv.name)
def test_round_trip(dv: DataVolume) -> None:
    manifest = dv.to_manifest()
    assert DataVolume.from_manifest(manifest) == dv
    assert DataVolume.from_manifest(yaml.safe_load(yaml.safe_dump(manifest))) == dv
    # A CDI manifest of the same spec is the same DataVolume.
    assert DataVolume.from_manifest(manifest | {"apiVersion": CDI_API_VERSION}) == dv


def test_the_manifest_keeps_kubernetes_order_and_leaves_defaults_out() -> None:
    manifest = FULL[2].to_manifest()
    assert list(manifest) == ["apiVersion", "kind", "metadata", "spec"]
    assert manifest["metadata"] == {"name": "empty"}
    assert manifest["spec"] == {
        "source": {"http": {"url": "https://x.example/a.img", "insecureSkipVerify": True}},
        "storage": {"resources": {"requests": {"storage": "1Mi"}}},
    }


def test_server_metadata_is_read_past() -> None:
    manifest = cdi("blank")
    manifest["metadata"] |= {
        "uid": "u-1",
        "resourceVersion": "4711",
        "generation": 1,
        "creationTimestamp": "2026-11-30T12:00:00Z",
        "managedFields": [{"manager": "kubectl"}],
        "finalizers": ["diskflow.io/cleanup"],
    }
    dv = DataVolume.from_manifest(manifest)
    assert dv.uid == "u-1"
    assert set(dv.to_manifest()["metadata"]) == {"name", "uid"}


def test_pvc_spec_and_size() -> None:
    storage = DataVolume.from_manifest(cdi("blank")).spec.storage
    # spec.storage: ReadWriteOnce by default, and room for the filesystem's overhead.
    assert storage.pvc_size() == required_volume_size(500 * MiB)
    assert storage.pvc_spec(storage.pvc_size()) == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": format_quantity(required_volume_size(500 * MiB))}},
    }
    assert storage.pvc_size(overhead=0) == 500 * MiB
    # A Block volume is the device: not inflated.
    block = Storage(request=10 << 30, volume_mode="Block", storage_class_name="")
    assert block.pvc_size() == 10 << 30
    assert block.pvc_spec(block.pvc_size()) == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "10Gi"}},
        "storageClassName": "",
        "volumeMode": "Block",
    }
    # spec.pvc is CDI's verbatim PVC spec: its request is the PVC's size.
    pvc = FULL[1].spec.storage
    assert pvc.pvc_size() == 20 << 30
    assert pvc.pvc_spec(pvc.pvc_size()) == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "20Gi"}},
        "storageClassName": "",
        "volumeMode": "Block",
        "volumeName": "pv-0002",
        "selector": SELECTOR,
    }


def test_cdis_fs_overhead_test_image_gets_a_volume_it_fits_in() -> None:
    # CDI's own test image: 819.2 MiB virtual, requested as `storage: 858993459`.
    manifest = cdi("blank")
    manifest["spec"]["storage"]["resources"]["requests"]["storage"] = 858993459
    storage = DataVolume.from_manifest(manifest).spec.storage
    assert storage.request == 858993459
    assert usable_size(storage.pvc_size()) >= int(819.2 * MiB)


def test_behaviour_annotations() -> None:
    manifest = cdi("blank")
    assert not DataVolume.from_manifest(manifest).retain_pod
    manifest["metadata"]["annotations"] = {
        "diskflow.io/keep-pvc": "true",
        "cdi.kubevirt.io/storage.bind.immediate.requested": "",  # CDI reads its presence
        "cdi.kubevirt.io/storage.pod.retainAfterCompletion": "true",
    }
    dv = DataVolume.from_manifest(manifest)
    assert dv.keep_pvc and dv.bind_immediately and dv.retain_pod
    manifest["metadata"]["annotations"] = {"diskflow.io/keep-pvc": "false"}
    assert not DataVolume.from_manifest(manifest).keep_pvc


def test_status_is_written_as_cdi_writes_it() -> None:
    status = FULL[0].status
    assert status is not None
    written = status.to_dict()
    assert written == {
        "phase": "Succeeded",
        "progress": "100.00%",
        "restartCount": 1,
        "claimName": "fedora",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Completed",
                "message": "the import succeeded",
                "lastTransitionTime": "2026-11-30T12:00:00Z",
                "lastHeartbeatTime": "2026-11-30T12:00:01Z",
            }
        ],
        "stage": "resize",
        "bytesDone": 600 * MiB,
        "bytesTotal": 600 * MiB,
        "throughput": 90 * MiB,
        "reason": "ConnectionLost",
        "message": "the server closed the connection with 5 bytes still to come",
        "result": {
            "format": "qcow2",
            "compression": "xz",
            "checksumVerified": True,
            "size": 10 << 30,
            "bytesDownloaded": 600 * MiB,
            "path": "scratch",
            "fallback": "the qcow2 image is encrypted (crypt_method 2)",
        },
    }
    assert Status.from_dict(written) == status
    assert Status.from_dict(yaml.safe_load(yaml.safe_dump(written))) == status
    assert Status().to_dict() == {"progress": "N/A", "restartCount": 0}
    assert Status.from_dict({}) == Status()
    # What the controller writes, it reads back equal: an empty message stays empty.
    running = Status(conditions=(Condition(type="Running", status="True", reason="", message=""),))
    assert Status.from_dict(running.to_dict()) == running


def test_a_status_patch_clears_what_is_no_longer_set() -> None:
    before = Status(phase=Phase.IMPORT_SCHEDULED, reason="WaitingForImportSlot", message="8 run")
    after = Status(phase=Phase.IMPORT_IN_PROGRESS, progress="12.50%", stage="download")
    assert after.to_patch(before) == {
        "reason": None,
        "message": None,
        "phase": "ImportInProgress",
        "progress": "12.50%",
        "stage": "download",
    }
    assert after.to_patch() == after.to_dict()
    assert after.to_patch(after) == {}


HTTP = "spec.source.http"
GOOD = cdi("http with secret, CA and checksum")


def changed(path: str, value: Any, base: dict[str, Any] = GOOD) -> dict[str, Any]:
    """`base` with the field at dotted `path` set to `value` (DELETE: removed)."""
    manifest = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return manifest


DELETE = object()
SIZE = "spec.storage.resources.requests.storage"
BLANK_SOURCE = {"blank": {}}

# The manifest, the field the error names, words the error says.
MALFORMED = [
    pytest.param([GOOD], "the manifest", "must be an object", id="not an object"),
    pytest.param(
        changed("apiVersion", "cdi.kubevirt.io/v1alpha1"),
        "apiVersion",
        "v1beta1",
        id="another apiVersion",
    ),
    pytest.param(changed("kind", "PersistentVolumeClaim"), "kind", "DataVolume", id="another kind"),
    pytest.param(changed("extra", 1), "extra", "unknown field", id="unknown top-level field"),
    pytest.param(changed("metadata.name", DELETE), "metadata.name", "required", id="no name"),
    pytest.param(
        changed("metadata.name", "Fedora_40"), "metadata.name", "Kubernetes name", id="bad name"
    ),
    pytest.param(
        changed("metadata.namespace", "a.b"),
        "metadata.namespace",
        "Kubernetes name",
        id="bad namespace",
    ),
    pytest.param(
        changed("metadata.annotations", {"cdi.kubevirt.io/storage.bind.immediate.requested": True}),
        "metadata.annotations[cdi.kubevirt.io/storage.bind.immediate.requested]",
        '"true"',
        id="annotation not a string",
    ),
    pytest.param(
        changed("metadata.annotations", {"diskflow.io/keep-pvc": "yes"}),
        "metadata.annotations[diskflow.io/keep-pvc]",
        '"true" or "false"',
        id="keep-pvc neither true nor false",
    ),
    pytest.param(changed("spec", DELETE), "spec", "required", id="no spec"),
    pytest.param(changed("spec.source", DELETE), "spec.source", "required", id="no source"),
    pytest.param(changed("spec.source", {}), "spec.source", "exactly one", id="no source kind"),
    pytest.param(
        changed("spec.source.blank", {}), "spec.source", "http and blank", id="two sources"
    ),
    pytest.param(
        changed("spec.source", {"registry": {"url": "docker://quay.io/containerdisks/fedora"}}),
        "spec.source.registry",
        "container registries",
        id="registry",
    ),
    pytest.param(
        changed("spec.source", {"gcs": {"url": "gs://b/o"}}),
        "spec.source.gcs",
        "storage.googleapis.com",
        id="gcs",
    ),
    pytest.param(
        changed("spec.source", {"pvc": {"name": "a", "namespace": "b"}}),
        "spec.source.pvc",
        "clones",
        id="pvc clone",
    ),
    pytest.param(
        changed("spec.source", {"snapshot": {"name": "a"}}),
        "spec.source.snapshot",
        "VolumeSnapshots",
        id="snapshot",
    ),
    pytest.param(
        changed("spec.source", {"upload": {}}), "spec.source.upload", "uploads", id="upload"
    ),
    pytest.param(
        changed("spec.source", {"imageio": {"url": "https://e"}}),
        "spec.source.imageio",
        "imageio",
        id="imageio",
    ),
    pytest.param(
        changed("spec.source", {"vddk": {"url": "https://v"}}),
        "spec.source.vddk",
        "VDDK",
        id="vddk",
    ),
    pytest.param(
        changed("spec.sourceRef", {"kind": "DataSource", "name": "fedora"}),
        "spec.sourceRef",
        "DataSource",
        id="sourceRef",
    ),
    pytest.param(
        changed("spec.checkpoints", [{"current": "s1"}]),
        "spec.checkpoints",
        "multi-stage",
        id="checkpoints",
    ),
    pytest.param(changed(f"{HTTP}.url", DELETE), f"{HTTP}.url", "required", id="no url"),
    pytest.param(changed(f"{HTTP}.url", ""), f"{HTTP}.url", "required", id="empty url"),
    pytest.param(
        changed(f"{HTTP}.url", ["https://a/b"]), f"{HTTP}.url", "a string", id="url not a string"
    ),
    pytest.param(
        changed(f"{HTTP}.url", "ftp://mirror/disk.img"), f"{HTTP}.url", "http://", id="ftp url"
    ),
    pytest.param(
        changed(f"{HTTP}.url", "HTTPS://mirror/disk.img"),
        f"{HTTP}.url",
        "https://",
        id="upper-case scheme",
    ),
    pytest.param(
        changed(f"{HTTP}.url", "https:///disk.img"), f"{HTTP}.url", "no host", id="url without host"
    ),
    pytest.param(
        changed(f"{HTTP}.url", "https://mirror:99999/d"),
        f"{HTTP}.url",
        "port",
        id="url with a bad port",
    ),
    pytest.param(
        changed(f"{HTTP}.url", "https://mirror/a disk.img"),
        f"{HTTP}.url",
        "white space",
        id="url with a space",
    ),
    pytest.param(
        changed(f"{HTTP}.secretref", "s"), f"{HTTP}.secretref", "secretRef", id="misspelt field"
    ),
    pytest.param(
        changed(f"{HTTP}.secretRef", "My Secret"),
        f"{HTTP}.secretRef",
        "Kubernetes name",
        id="bad secret name",
    ),
    pytest.param(
        changed(f"{HTTP}.extraHeaders", ["X-A: 1", "X-Token 42"]),
        f"{HTTP}.extraHeaders[1]",
        "'Name: value'",
        id="header without a colon",
    ),
    pytest.param(
        changed(f"{HTTP}.extraHeaders", [7]),
        f"{HTTP}.extraHeaders[0]",
        "a string",
        id="header not a string",
    ),
    pytest.param(
        changed(f"{HTTP}.secretExtraHeaders", [""]),
        f"{HTTP}.secretExtraHeaders[0]",
        "Kubernetes name",
        id="bad secret header name",
    ),
    pytest.param(
        changed(f"{HTTP}.checksum", SHA256),
        f"{HTTP}.checksum",
        "ALG:HEX",
        id="checksum without algorithm",
    ),
    pytest.param(
        changed(f"{HTTP}.checksum", "sha256:abcd"),
        f"{HTTP}.checksum",
        "64 hex",
        id="short checksum",
    ),
    pytest.param(
        changed(f"{HTTP}.insecureSkipVerify", True),
        f"{HTTP}.insecureSkipVerify",
        "certConfigMap",
        id="insecure with a CA",
    ),
    pytest.param(
        changed(f"{HTTP}.insecureSkipVerify", "true", changed(f"{HTTP}.certConfigMap", DELETE)),
        f"{HTTP}.insecureSkipVerify",
        "true or false",
        id="insecure not a flag",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "https://s3.example/bucket"}}),
        "spec.source.s3.url",
        "bucket and a key",
        id="s3 url without key",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "s3://bucket/"}}),
        "spec.source.s3.url",
        "bucket and a key",
        id="s3:// url without key",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "gs://bucket/key"}}),
        "spec.source.s3.url",
        "s3://",
        id="s3 url of another scheme",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "https://h/b/k", "endpoint": "https://minio:9000"}}),
        "spec.source.s3.endpoint",
        "s3:// url",
        id="s3 endpoint with an https url",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "s3://b/k", "endpoint": "https://minio:9000/s3"}}),
        "spec.source.s3.endpoint",
        "no path",
        id="s3 endpoint with a path",
    ),
    pytest.param(
        changed("spec.source", {"s3": {"url": "s3://b/k", "region": "eu west"}}),
        "spec.source.s3.region",
        "region",
        id="s3 region",
    ),
    pytest.param(
        changed("spec.source", {"blank": {"size": "1Gi"}}),
        "spec.source.blank.size",
        "unknown",
        id="blank with fields",
    ),
    pytest.param(changed("spec.storage", DELETE), "spec", "storage and pvc", id="no storage"),
    pytest.param(
        changed("spec.pvc", GOOD["spec"]["storage"]),
        "spec",
        "storage and pvc",
        id="storage and pvc",
    ),
    pytest.param(changed(SIZE, DELETE), SIZE, "required", id="no size"),
    pytest.param(
        changed("spec.storage.resources", DELETE),
        "spec.storage.resources",
        "required",
        id="no resources",
    ),
    pytest.param(changed(SIZE, "10GB"), SIZE, "quantity", id="bad size"),
    pytest.param(changed(SIZE, "-1Gi"), SIZE, "positive", id="negative size"),
    pytest.param(changed(SIZE, True), SIZE, "quantity", id="size a flag"),
    pytest.param(changed(SIZE, 1.5e9), SIZE, "quantity", id="size a fraction"),
    pytest.param(changed(SIZE, "512Ki"), SIZE, "1Mi", id="size under 1Mi"),
    pytest.param(
        changed("spec.storage.resources.limits", {"storage": "2Gi"}),
        "spec.storage.resources.limits",
        "requests.storage",
        id="storage limits",
    ),
    pytest.param(
        changed("spec.storage.dataSourceRef", {"kind": "VolumeSnapshot", "name": "s"}),
        "spec.storage.dataSourceRef",
        "data source",
        id="populated from a data source",
    ),
    pytest.param(
        changed("spec.storage.volumeMode", "FromStorageProfile"),
        "spec.storage.volumeMode",
        "Filesystem, Block",
        id="bad volume mode",
    ),
    pytest.param(
        changed("spec.storage.accessModes", ["RWO"]),
        "spec.storage.accessModes[0]",
        "ReadWriteOnce",
        id="bad access mode",
    ),
    pytest.param(
        changed(
            "spec.storage",
            DELETE,
            changed("spec.pvc", {"resources": {"requests": {"storage": "1Gi"}}}),
        ),
        "spec.pvc.accessModes",
        "access mode",
        id="pvc without access modes",
    ),
    pytest.param(
        changed("spec.storage.selector", {"matchExpressions": [{"key": "k", "operator": "Is"}]}),
        "spec.storage.selector.matchExpressions[0].operator",
        "In, NotIn",
        id="bad selector operator",
    ),
    pytest.param(
        changed("spec.contentType", "iso"),
        "spec.contentType",
        "kubevirt, archive",
        id="bad content type",
    ),
    pytest.param(
        changed("spec.contentType", "archive", changed("spec.source", BLANK_SOURCE)),
        "spec.contentType",
        "blank",
        id="blank archive",
    ),
    pytest.param(
        changed("spec.contentType", "archive", changed("spec.storage.volumeMode", "Block")),
        "spec.contentType",
        "Block",
        id="archive on Block",
    ),
    pytest.param(
        changed("spec.preallocation", "yes"),
        "spec.preallocation",
        "true or false",
        id="preallocation not a flag",
    ),
    pytest.param(
        changed("spec.priorityClassName", "High"),
        "spec.priorityClassName",
        "Kubernetes name",
        id="bad priority class",
    ),
    pytest.param(
        changed("spec.retryLimit", -1), "spec.retryLimit", "at least 0", id="negative retry limit"
    ),
    pytest.param(
        changed("spec.retryLimit", True), "spec.retryLimit", "whole number", id="retry limit a flag"
    ),
    pytest.param(
        changed("spec.connections", 33),
        "spec.connections",
        "from 1 to 32",
        id="too many connections",
    ),
    pytest.param(
        changed("spec.connections", 0), "spec.connections", "from 1 to 32", id="no connection"
    ),
    pytest.param(
        changed("spec.resources", {"requests": {"gpu": "1"}}),
        "spec.resources.requests.gpu",
        "unknown",
        id="unknown pod resource",
    ),
    pytest.param(
        changed("spec.resources", {"limits": {"memory": "lots"}}),
        "spec.resources.limits.memory",
        "quantity",
        id="bad pod quantity",
    ),
    pytest.param(
        changed("spec.resources", {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
        "spec.resources.requests.memory",
        "above its limit",
        id="request above limit",
    ),
    pytest.param(
        changed("spec.serviceAccountName", "-sa"),
        "spec.serviceAccountName",
        "Kubernetes name",
        id="serviceAccountName",
    ),
    pytest.param(
        changed("status", {"phase": "CloneScheduled"}),
        "status.phase",
        "ImportInProgress",
        id="unknown phase",
    ),
    pytest.param(
        changed("status", {"progress": "half"}), "status.progress", "NN.NN%", id="bad progress"
    ),
    pytest.param(
        changed("status", {"restartCount": -1}),
        "status.restartCount",
        "at least 0",
        id="negative restarts",
    ),
    pytest.param(
        changed("status", {"conditions": [{"type": "Ready", "status": "true"}]}),
        "status.conditions[0].status",
        "True, False, Unknown",
        id="condition status",
    ),
    pytest.param(
        changed("status", {"conditions": [{"status": "True"}]}),
        "status.conditions[0].type",
        "required",
        id="condition without type",
    ),
    pytest.param(
        changed("status", {"result": {"format": "raw"}}),
        "status.result.compression",
        "required",
        id="incomplete result",
    ),
]


@pytest.mark.parametrize(("manifest", "field", "words"), MALFORMED)
def test_a_malformed_manifest_is_refused_naming_the_field(
    manifest: Any, field: str, words: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        DataVolume.from_manifest(manifest)
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert words in error.problem, error.problem
    assert error.reason == Reason.INVALID_MANIFEST and error.final


def test_errors_never_quote_a_secret() -> None:
    password, signature = "s3cr3t-pa55", "X-Amz-Signature=0a1b2c3d4e5f"
    for url in (
        f"https://user:{password}@mirror.example/disk.img",
        f"ftp://mirror.example/disk.img?{signature}",
        f"https://mirror.example:99999/disk.img?{signature}",
        f"https://mirror.example/a disk.img?{signature}",
    ):
        with pytest.raises(ManifestError) as caught:
            DataVolume.from_manifest(changed(f"{HTTP}.url", url))
        assert password not in str(caught.value) and signature not in str(caught.value)
    token = "Bearer eyJhbGciOiJIUzI1NiJ9"
    for header in (f"Authorization {token}", f"Authorization: {token}\r\nX: y"):
        with pytest.raises(ManifestError) as caught:
            DataVolume.from_manifest(changed(f"{HTTP}.extraHeaders", [header]))
        assert token not in str(caught.value)


def test_a_manifest_error_is_a_final_error_that_survives_pickling() -> None:
    error = ManifestError("spec.source.http.url", "must be a URL starting with http://")
    assert isinstance(error, FinalError)
    again = pickle.loads(pickle.dumps(error))
    assert (again.field, again.problem, again.message) == (
        error.field,
        error.problem,
        error.message,
    )
