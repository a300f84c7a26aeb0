"""The objects a DataVolume needs: its PVC sized as CDI sizes it, and importer pods that run
`diskflow import` with restricted Pod Security and no secret in their arguments."""

from __future__ import annotations

from typing import Any

import pytest

from importer.api import DataVolume
from importer.capacity import usable_size
from importer.controller.config import ControllerConfig
from importer.controller.plan import (
    CA_DIR,
    SECRET_DIR,
    Scratch,
    importer_args,
    plan_pod,
    plan_pvc,
    pod_name,
)
from importer.quantity import parse_quantity

CONFIG = ControllerConfig(image="diskflow:test")


def manifest(source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    storage = spec.pop("storage", {"resources": {"requests": {"storage": "858993459"}}})
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "fedora", "namespace": "vms", "uid": "uid-1"},
        "spec": {"source": source, "storage": storage, **spec},
    }


def pvc_of(dv: DataVolume) -> dict[str, Any]:
    pvc = plan_pvc(dv, CONFIG)
    pvc["metadata"]["uid"] = "pvc-uid"
    return pvc


def test_the_pvc_holds_cdis_fs_overhead_test_image_and_is_owned_by_the_datavolume() -> None:
    dv = DataVolume.from_manifest(manifest({"http": {"url": "https://example.com/disk.img"}}))
    pvc = plan_pvc(dv, CONFIG)
    size = parse_quantity(pvc["spec"]["resources"]["requests"]["storage"])
    assert size == 911_422_260
    assert usable_size(size) >= int(819.2 * (1 << 20))  # the image's virtual size
    owner = pvc["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DataVolume" and owner["uid"] == "uid-1" and owner["controller"]
    assert pvc["metadata"]["name"] == "fedora"  # a VM names the claim by the DataVolume


def test_a_block_volume_is_not_inflated() -> None:
    storage = {"volumeMode": "Block", "resources": {"requests": {"storage": "10Gi"}}}
    dv = DataVolume.from_manifest(manifest({"blank": {}}, storage=storage))
    assert plan_pvc(dv, CONFIG)["spec"]["resources"]["requests"]["storage"] in (
        "10Gi",
        str(10 << 30),
    )


def test_the_importer_pod_is_restricted_and_owned_by_the_pvc() -> None:
    dv = DataVolume.from_manifest(manifest({"http": {"url": "https://example.com/disk.img"}}))
    pod = plan_pod(dv, pvc_of(dv), attempt=0, size=911_422_260, scratch=None, config=CONFIG)
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "PersistentVolumeClaim"
    assert container["command"] == ["diskflow", "import"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert pod["metadata"]["name"] == "importer-fedora-0"


def test_credentials_reach_the_pod_as_mounted_files_never_as_arguments() -> None:
    source = {
        "http": {
            "url": "https://example.com/disk.qcow2",
            "secretRef": "mirror-auth",
            "certConfigMap": "mirror-ca",
            "secretExtraHeaders": ["token-header"],
            "extraHeaders": ["X-Trace: 1"],
            "checksum": "sha256:" + "0" * 64,
        }
    }
    dv = DataVolume.from_manifest(manifest(source))
    pod = plan_pod(dv, pvc_of(dv), attempt=2, size=1 << 30, scratch=Scratch(1 << 30), config=CONFIG)
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--secret-dir") + 1] == SECRET_DIR
    assert args[args.index("--ca-bundle") + 1] == CA_DIR
    assert "--header-file" in args and "X-Trace: 1" in args
    assert "--scratch-dir" in args
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["secret"]["secret"]["secretName"] == "mirror-auth"
    assert volumes["ca"]["configMap"]["name"] == "mirror-ca"
    assert volumes["headers-0"]["secret"]["secretName"] == "token-header"
    assert "sizeLimit" in volumes["scratch"]["emptyDir"]
    assert not any("mirror-auth" in arg or "token-header" in arg for arg in args)
    assert pod["metadata"]["name"] == "importer-fedora-2"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"blank": {}}, ["blank:", "/data/disk.img"]),
        (
            {"s3": {"url": "https://minio.local:9000/images/disk.img", "region": "eu-1"}},
            ["https://minio.local:9000/images/disk.img", "/data/disk.img"],
        ),
        (
            {"s3": {"url": "s3://images/disk.img", "endpoint": "https://minio.local:9000"}},
            ["s3://images/disk.img", "/data/disk.img"],
        ),
    ],
)
def test_the_argument_builder_covers_each_source(
    source: dict[str, Any], expected: list[str]
) -> None:
    dv = DataVolume.from_manifest(manifest(source))
    args = importer_args(dv, size=1 << 30, scratch=None, config=CONFIG)
    assert args[:2] == expected
    assert args[args.index("--size") + 1] == str(1 << 30)
    assert args[args.index("--filesystem-overhead") + 1] == "0.06"
    assert args[args.index("--metrics-addr") + 1] == "$(POD_IP)"
    # The ownerUID label of CDI's progress metric: the DataVolume's UID, as CDI's importer has.
    assert args[args.index("--owner-uid") + 1] == "uid-1"
    if "s3" in source and source["s3"]["url"].startswith("https:"):
        assert "--s3" in args and args[args.index("--s3-region") + 1] == "eu-1"
    elif "s3" in source:
        assert "--s3" not in args
        assert args[args.index("--s3-endpoint") + 1] == "https://minio.local:9000"


def test_an_archive_extracts_into_the_volume_and_a_block_volume_is_the_device() -> None:
    archive = DataVolume.from_manifest(
        manifest({"http": {"url": "https://example.com/a.tar"}}, contentType="archive")
    )
    args = importer_args(archive, size=1 << 30, scratch=None, config=CONFIG)
    assert args[1] == "/data" and "--content-type" in args
    storage = {"volumeMode": "Block", "resources": {"requests": {"storage": "1Gi"}}}
    block = DataVolume.from_manifest(manifest({"blank": {}}, storage=storage))
    pod = plan_pod(block, pvc_of(block), attempt=0, size=None, scratch=None, config=CONFIG)
    container = pod["spec"]["containers"][0]
    assert container["volumeDevices"][0]["devicePath"] == container["args"][1]
    assert "--size" not in container["args"]


def test_long_names_give_pod_names_kubernetes_accepts() -> None:
    long = manifest({"blank": {}})
    long["metadata"]["name"] = "a" * 120
    dv = DataVolume.from_manifest(long)
    names = {pod_name(dv, n) for n in range(3)}
    assert len(names) == 3 and all(len(n) <= 63 for n in names)


def test_per_datavolume_resources_and_priority_override_the_defaults() -> None:
    resources = {"limits": {"memory": "4Gi"}, "requests": {"memory": "2Gi"}}
    dv = DataVolume.from_manifest(
        manifest({"blank": {}}, resources=resources, priorityClassName="imports")
    )
    pod = plan_pod(dv, pvc_of(dv), attempt=0, size=1 << 30, scratch=None, config=CONFIG)
    assert pod["spec"]["containers"][0]["resources"] == resources
    assert pod["spec"]["priorityClassName"] == "imports"


def test_cluster_defaults_for_importer_pods_from_the_chart() -> None:
    """What the Helm chart sets for every importer: pull secrets, proxy environment, pod
    labels and annotations (the controller's own win), and a default CA ConfigMap that an
    http or s3 source's own certConfigMap replaces."""
    proxy = {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}
    config = ControllerConfig(
        image="diskflow:test",
        image_pull_secrets=("registry",),
        importer_env=(proxy,),
        importer_pod_labels={"team": "vms", "app.kubernetes.io/managed-by": "someone"},
        importer_pod_annotations={"sidecar.istio.io/inject": "false"},
        default_cert_config_map="cluster-ca",
    )
    dv = DataVolume.from_manifest(manifest({"http": {"url": "https://example.com/disk.img"}}))
    pod = plan_pod(dv, pvc_of(dv), attempt=0, size=1 << 30, scratch=None, config=config)
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert container["env"][0] == proxy and container["env"][-1]["name"] == "POD_IP"
    labels = pod["metadata"]["labels"]
    assert labels["team"] == "vms" and labels["app.kubernetes.io/managed-by"] == "diskflow"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["ca"]["configMap"] == {"name": "cluster-ca"}
    assert container["args"][container["args"].index("--ca-bundle") + 1] == CA_DIR

    own = DataVolume.from_manifest(
        manifest({"http": {"url": "https://example.com/d.img", "certConfigMap": "mirror-ca"}})
    )
    pod = plan_pod(own, pvc_of(own), attempt=0, size=1 << 30, scratch=None, config=config)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["ca"]["configMap"] == {"name": "mirror-ca"}
    blank = DataVolume.from_manifest(manifest({"blank": {}}))
    pod = plan_pod(blank, pvc_of(blank), attempt=0, size=1 << 30, scratch=None, config=config)
    assert "ca" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert "--ca-bundle" not in pod["spec"]["containers"][0]["args"]
