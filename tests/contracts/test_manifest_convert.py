"""`diskflow manifest convert`: CDI DataVolumes and KubeVirt VMs in, diskflow's API out, every
DataVolume it writes passing the CRD's schema; what cannot be carried over said on stderr, a
line per item; other documents written back exactly as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner, Result

from diskflow.manifest_cli import manifest_app
from importer.api import API_VERSION, DataVolume
from tests.contracts.test_crd import schema_errors

SECRET = """\
# CDI's endpoint-secret example: kept as written, comments and all.
apiVersion: v1
kind: Secret
metadata:
  name: endpoint-secret
  labels:
    app: containerized-data-importer
type: Opaque
data:
  accessKeyId: ""  # <optional: your key or user name, base64 encoded>
  secretKey:    "" # <optional: your secret or password, base64 encoded>
"""
HTTP_DV = """\
# This example assumes you are using a default storage class
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: my-data-volume
  namespace: vms
spec:
  source:
      http:
         url: "https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img"
         secretRef: endpoint-secret #If you are using the endpoint-secret.yaml example.
         certConfigMap: "" # Optional
  storage:
    resources:
      requests:
        storage: 500Mi
"""
REGISTRY_DV = """\
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: registry-image-datavolume
spec:
  source:
    registry:
      url: "docker://kubevirt/fedora-cloud-registry-disk-demo"
  storage:
    resources:
      requests:
        storage: 5Gi
"""
# KubeVirt's user-guide VM with two templates (a Fedora import and a blank data disk).
VM = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: fedora-vm
  namespace: vms
  labels:
    kubevirt.io/vm: fedora-vm
spec:
  runStrategy: Always
  dataVolumeTemplates:
  - apiVersion: cdi.kubevirt.io/v1beta1
    kind: DataVolume
    metadata:
      creationTimestamp: null
      name: fedora-root
    spec:
      storage:
        accessModes:
        - ReadWriteOnce
        resources:
          requests:
            storage: 10Gi
      source:
        http:
          url: https://download.fedoraproject.org/pub/fedora/linux/releases/40/Cloud/x86_64/images/Fedora-Cloud-Base-Generic.x86_64-40-1.14.qcow2
          checksum: sha256:ac58f3c35b73272d5986fa6d3bc44fd246b45df4c334e99a07b3bbd00684adee
  - metadata:
      name: fedora-data
      annotations:
        cdi.kubevirt.io/storage.usePopulator: "false"
    spec:
      pvc:
        accessModes:
        - ReadWriteOnce
        volumeMode: Block
        resources:
          requests:
            storage: 20Gi
      source:
        blank: {}
  template:
    metadata:
      labels:
        kubevirt.io/vm: fedora-vm
    spec:
      domain:
        devices:
          disks:
          - name: rootdisk
            disk:
              bus: virtio
          - name: datadisk
            disk:
              bus: virtio
          - name: cloudinitdisk
            disk:
              bus: virtio
        resources:
          requests:
            memory: 2Gi
      volumes:
      - name: rootdisk
        dataVolume:
          name: fedora-root
      - name: datadisk
        dataVolume:
          name: fedora-data
          hotpluggable: true
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #cloud-config
            password: fedora
"""
# A VM of OpenShift's templates: its template names a DataSource, which diskflow cannot follow.
VM_SOURCE_REF = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: rhel9
spec:
  running: false
  dataVolumeTemplates:
  - metadata:
      name: rhel9-root
    spec:
      sourceRef:
        kind: DataSource
        name: rhel9
        namespace: openshift-virtualization-os-images
      storage:
        resources:
          requests:
            storage: 30Gi
  template:
    spec:
      domain:
        devices: {}
      volumes:
      - name: rootdisk
        dataVolume:
          name: rhel9-root
"""


def convert(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(manifest_app, ["convert", *args], input=stdin)


def documents(text: str) -> list[Any]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def written(path: Path, *texts: str) -> Path:
    path.write_text("---\n".join(texts))
    return path


def assert_diskflow(manifest: dict[str, Any]) -> DataVolume:
    assert manifest["apiVersion"] == API_VERSION
    assert schema_errors(manifest) == []
    return DataVolume.from_manifest(manifest)


def test_cdi_datavolumes_become_diskflows_and_the_rest_stays_as_written(tmp_path: Path) -> None:
    blank = HTTP_DV.replace("my-data-volume", "blank").split("spec:")[0] + (
        "spec:\n  source:\n    blank: {}\n  pvc:\n    accessModes: [ReadWriteOnce]\n"
        "    resources:\n      requests:\n        storage: 1Gi\n"
    )
    result = convert(str(written(tmp_path / "in.yaml", SECRET, HTTP_DV, blank)))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    secret, http, empty = result.stdout.split("---\n")
    assert secret == SECRET  # byte for byte
    assert http.startswith("# This example assumes you are using a default storage class\n")
    dv = assert_diskflow(yaml.safe_load(http))
    assert (dv.name, dv.namespace) == ("my-data-volume", "vms")
    assert yaml.safe_load(http)["spec"] == {
        "source": {
            "http": {
                "url": "https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img",
                "secretRef": "endpoint-secret",
            }
        },
        "storage": {"resources": {"requests": {"storage": "500Mi"}}},
    }
    assert assert_diskflow(yaml.safe_load(empty)).spec.storage.kind == "pvc"


def test_stdin_and_an_output_file(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    result = convert("-", "-o", str(out), stdin=HTTP_DV)
    assert result.exit_code == 0 and result.stdout == ""
    [manifest] = documents(out.read_text())
    assert_diskflow(manifest)
    assert convert("-", stdin=HTTP_DV).stdout == out.read_text()


def test_unsupported_sources_are_left_as_they_were_and_said(tmp_path: Path) -> None:
    path = written(tmp_path / "dvs.yaml", REGISTRY_DV, HTTP_DV)
    result = convert(str(path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {path}#1 DataVolume registry-image-datavolume: spec.source.registry: "
        "diskflow does not import from container registries: it imports from http, s3 and "
        "blank sources; left as it was"
    ]
    registry, http = result.stdout.split("---\n")
    assert registry == REGISTRY_DV
    assert_diskflow(yaml.safe_load(http))


def test_a_vms_templates_become_datavolumes_and_its_volumes_name_their_pvcs(
    tmp_path: Path,
) -> None:
    path = written(tmp_path / "vm.yaml", VM)
    result = convert(str(path))
    assert result.exit_code == 0, result.stderr
    root, data, vm = documents(result.stdout)
    root_dv, data_dv = assert_diskflow(root), assert_diskflow(data)
    assert (root_dv.name, root_dv.namespace) == ("fedora-root", "vms")
    assert root_dv.spec.storage.request == 10 << 30
    assert (data_dv.name, data_dv.spec.storage.kind, data_dv.spec.storage.block) == (
        "fedora-data",
        "pvc",
        True,
    )
    original = yaml.safe_load(VM)
    assert "dataVolumeTemplates" not in vm["spec"]
    assert vm["metadata"] == original["metadata"] and vm["apiVersion"] == "kubevirt.io/v1"
    assert vm["spec"]["template"]["spec"]["volumes"] == [
        {"name": "rootdisk", "persistentVolumeClaim": {"claimName": "fedora-root"}},
        {
            "name": "datadisk",
            "persistentVolumeClaim": {"claimName": "fedora-data", "hotpluggable": True},
        },
        original["spec"]["template"]["spec"]["volumes"][2],
    ]
    assert (
        vm["spec"]["template"]["spec"]["domain"] == original["spec"]["template"]["spec"]["domain"]
    )
    label = f"warning: {path}#1 VirtualMachine vms/fedora-vm"
    assert result.stderr.splitlines() == [
        f"{label}: spec.dataVolumeTemplates[1]: annotation cdi.kubevirt.io/storage.usePopulator "
        "has no effect in diskflow (kept)",
        f"{label}: starts at once (Always) but KubeVirt does not wait for diskflow imports: set "
        "runStrategy: Halted, and start it when its DataVolumes are Succeeded",
    ]


def test_a_vm_whose_template_cannot_be_converted_is_left_as_it_was(tmp_path: Path) -> None:
    path = written(tmp_path / "vm.yaml", VM_SOURCE_REF, HTTP_DV)
    result = convert(str(path))
    assert result.exit_code == 1
    vm, http = result.stdout.split("---\n")
    assert vm == VM_SOURCE_REF
    assert_diskflow(yaml.safe_load(http))
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"error: {path}#1 VirtualMachine rhel9: spec.dataVolumeTemplates[0].spec.sourceRef: "
        "diskflow does not resolve DataSource references"
    )


def test_a_vm_naming_a_datavolume_converted_alongside_names_its_pvc(tmp_path: Path) -> None:
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "cirros", "namespace": "vms"},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "spec": {
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": "my-data-volume"}},
                        {"name": "old", "dataVolume": {"name": "elsewhere"}},
                    ]
                }
            },
        },
    }
    path = written(tmp_path / "all.yaml", yaml.safe_dump(vm), HTTP_DV)
    result = convert(str(path))
    assert result.exit_code == 0
    converted, http = documents(result.stdout)
    assert converted["spec"]["template"]["spec"]["volumes"] == [
        {"name": "root", "persistentVolumeClaim": {"claimName": "my-data-volume"}},
        {"name": "old", "dataVolume": {"name": "elsewhere"}},
    ]
    assert_diskflow(http)
    assert result.stderr.splitlines() == [
        f"warning: {path}#1 VirtualMachine vms/cirros: volume old keeps CDI DataVolume "
        "elsewhere (not in this input); for a diskflow DataVolume use "
        "persistentVolumeClaim.claimName"
    ]


def test_what_kubectl_get_gives_is_converted_without_the_servers_fields(tmp_path: Path) -> None:
    item = yaml.safe_load(HTTP_DV)
    item["metadata"] |= {
        "uid": "3f1c2b7e-0000-4000-8000-000000000001",
        "resourceVersion": "123456",
        "creationTimestamp": "2026-11-30T10:00:00Z",
        "generation": 1,
        "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update"}],
        "ownerReferences": [
            {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm", "uid": "u"}
        ],
        "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": '{"kind":"DataVolume"}',
            "cdi.kubevirt.io/storage.usePopulator": "true",
            "cdi.kubevirt.io/storage.bind.immediate.requested": "true",
            "k8s.v1.cni.cncf.io/networks": "storage-net",
        },
    }
    item["status"] = {"phase": "CloneScheduled", "progress": "N/A", "claimName": "my-data-volume"}
    listed = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}}
    path = written(tmp_path / "list.yaml", yaml.safe_dump(listed | {"items": [item, SECRET_OBJ]}))
    result = convert(str(path))
    assert result.exit_code == 0, result.stderr
    [converted] = documents(result.stdout)
    assert converted["kind"] == "List" and converted["items"][1] == SECRET_OBJ
    manifest = converted["items"][0]
    assert manifest["metadata"] == {
        "name": "my-data-volume",
        "namespace": "vms",
        "annotations": {
            "cdi.kubevirt.io/storage.usePopulator": "true",
            "cdi.kubevirt.io/storage.bind.immediate.requested": "true",
            "k8s.v1.cni.cncf.io/networks": "storage-net",
        },
    }
    assert "status" not in manifest and assert_diskflow(manifest).bind_immediately
    label = f"warning: {path}#1 items[0] DataVolume vms/my-data-volume"
    assert result.stderr.splitlines() == [
        f"{label}: annotation cdi.kubevirt.io/storage.usePopulator has no effect in diskflow "
        "(kept)",
        f"{label}: annotation k8s.v1.cni.cncf.io/networks has no effect in diskflow (kept)",
        f"{label}: metadata.ownerReferences are not carried over (they name objects by uid)",
    ]


SECRET_OBJ = yaml.safe_load(SECRET)


def test_a_document_that_is_no_yaml_is_said_without_its_text(tmp_path: Path) -> None:
    broken = 'apiVersion: v1\nkind: Secret\nstringData:\n  token: "hunter2-secret\n  x: [\n'
    path = written(tmp_path / "mixed.yaml", HTTP_DV, broken)
    result = convert(str(path))
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}#2: not YAML (") and line.endswith("; left as it was")
    assert "hunter2" not in result.stderr
    http, kept = result.stdout.split("---\n")
    assert kept == broken
    assert_diskflow(yaml.safe_load(http))


def test_errors_never_quote_a_presigned_url(tmp_path: Path) -> None:
    signature = "X-Amz-Signature=9f86d081884c7d659a2feaa0c55ad015"
    dv = HTTP_DV.replace(
        "https://download.cirros-cloud.net/0.4.0/cirros-0.4.0-x86_64-disk.img",
        f"ftp://bucket.s3.amazonaws.com/disk.img?{signature}",
    )
    result = convert("-", stdin=dv)
    assert result.exit_code == 1 and "spec.source.http.url" in result.stderr
    assert signature not in result.stderr


def test_a_file_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    result = convert(str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_nothing_to_convert_is_nothing_changed(tmp_path: Path) -> None:
    text = "# only a comment\n---\n" + SECRET + "...\n"
    result = convert(str(written(tmp_path / "plain.yaml", text)))
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == "# only a comment\n---\n" + SECRET
