"""The DataVolume controller end to end: the real operator process (`diskflow controller`)
against the emulated API server, importer pods run by the kubelet stand-in as real
`diskflow import` processes, images from real nginx / fault server / moto S3. What the
stand-ins emulate and what they do not: tests/support/kube/README.md."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from importer.controller.config import ControllerConfig
from tests.conftest import Images, MiB, run, sha256
from tests.controller.conftest import StartOperator
from tests.support.corpus import qcow2_repack
from tests.support.faultserver import FaultServer
from tests.support.installer import Installer, write_template
from tests.support.kube import KubeServer
from tests.support.kube.client import ApiError, poll
from tests.support.kube.kubelet import Kubelet
from tests.support.stores import ACCESS_KEY, BUCKET, SECRET_KEY

# Fast settings for tests: retries after a third of a second, progress every 0.2 s, and an
# importer that gives up on a failing server at once (so the controller's retry is what runs).
pytest_plugins = ["tests.support.installer", "tests.support.stores"]
# Every test here runs the operator with exactly the permissions the Helm chart grants it.
pytestmark = pytest.mark.rbac

FAST = (
    "--progress-interval",
    "0.2",
    "--status-interval",
    "0.5",
    "--backoff-base",
    "0.3",
    "--backoff-max",
    "1",
    "--importer-arg=--retries",
    "--importer-arg=0",
    "--importer-arg=--retry-backoff",
    "--importer-arg=0",
)
TIMEOUT = 90


def start(operator: StartOperator, namespace: str, *extra: str) -> Any:
    process = operator("diskflow", "controller", "--namespace", namespace, *FAST, *extra)
    return process


def datavolume(
    name: str,
    namespace: str,
    source: dict[str, Any],
    *,
    size: str = "64Mi",
    api: str = "cdi.kubevirt.io/v1beta1",
    **spec: Any,
) -> dict[str, Any]:
    """A DataVolume as CDI users write them (apiVersion rewritten to diskflow's)."""
    del api  # the emulator serves diskflow's API; CDI's manifests differ only in apiVersion
    annotations = spec.pop("annotations", {})
    return {
        "apiVersion": "diskflow.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "source": source,
            "storage": {"resources": {"requests": {"storage": size}}},
            **spec,
        },
    }


def phase_is(*phases: str) -> Any:
    return lambda dv: dv.get("status", {}).get("phase") in phases


def wait_phase(
    kube: KubeServer, namespace: str, name: str, *phases: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    return kube.client.wait_for(
        "datavolumes", name, phase_is(*phases), namespace=namespace, timeout=timeout
    )


def running_import(
    kube: KubeServer,
    operator: StartOperator,
    namespace: str,
    name: str,
    faults: FaultServer,
    images: Images,
    *,
    seconds: int,
    times: int,
) -> Any:
    """DataVolume `name` importing the xz raw image, its first `times` downloads throttled
    to last about `seconds` s each, the operator started: returned once the import runs."""
    source = images.path("raw", "xz")
    rate = source.stat().st_size // seconds
    url = faults.url(uuid.uuid4().hex, source.name, rate=rate, times=times)
    kube.client.create(datavolume(name, namespace, {"http": {"url": url}}))
    process = start(operator, namespace)
    wait_phase(kube, namespace, name, "ImportInProgress")
    return process


def wait_event(kube: KubeServer, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """The first Event about `name` with `reason`: kopf posts events in the background, so
    one may arrive a little after the status it goes with."""

    def find() -> dict[str, Any] | None:
        events = kube.client.events(namespace=namespace, involving=name)
        return next((e for e in events if e["reason"] == reason), None)

    return poll(find, timeout=30, what=lambda: f"no {reason} event about {name}")


def disk(kubelet: Kubelet, namespace: str, claim: str) -> Path:
    return kubelet.volume_path(namespace, claim) / "disk.img"


def same_content(path: Path, reference: Path) -> bool:
    """The raw image holds the reference's bytes, then zeros up to its (larger) size."""
    with path.open("rb") as made, reference.open("rb") as want:
        while chunk := want.read(MiB):
            if made.read(len(chunk)) != chunk:
                return False
        return not made.read(MiB * 64).strip(b"\0")


def test_http_import_shows_progress_and_fills_the_volume(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    images: Images,
    faults: FaultServer,
) -> None:
    source = images.path("raw", "xz")
    # Slow enough that progress shows up in status while it runs.
    url = faults.url(uuid.uuid4().hex, source.name, rate=source.stat().st_size // 3, times=99)
    kube.client.create(
        datavolume(
            "fedora", namespace, {"http": {"url": url, "checksum": f"sha256:{sha256(source)}"}}
        )
    )
    start(operator, namespace)
    running = kube.client.wait_for(
        "datavolumes",
        "fedora",
        lambda dv: (
            dv.get("status", {}).get("bytesDone", 0) > 0
            and dv["status"]["phase"] == "ImportInProgress"
        ),
        namespace=namespace,
        timeout=TIMEOUT,
    )
    assert running["status"]["progress"].endswith("%") and running["status"]["stage"] == "download"
    assert running["status"]["bytesTotal"] == source.stat().st_size
    # What Prometheus finds on the importer pod: CDI's progress, under the DataVolume's UID.
    ip = kube.client.get("pods", "importer-fedora-0", namespace=namespace)["status"]["podIP"]
    url = f"http://{ip}:{ControllerConfig().metrics_port}/metrics"
    page = text_string_to_metric_families(requests.get(url, timeout=5).text)
    (cdi,) = (family for family in page if family.name == "kubevirt_cdi_import_progress")
    assert cdi.type == "counter" and len(cdi.samples) == 1
    assert cdi.samples[0].labels == {"ownerUID": running["metadata"]["uid"]}
    done = wait_phase(kube, namespace, "fedora", "Succeeded", "Failed")
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "100.00%" and status["restartCount"] == 0
    assert status["claimName"] == "fedora"
    assert status["result"]["checksumVerified"] is True and status["result"]["format"] == "raw"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Bound": "True", "Running": "False", "Ready": "True"}
    assert same_content(disk(kubelet, namespace, "fedora"), images.raw)
    # The completed pod is gone; the PVC stays, owned by the DataVolume.
    kube.client.wait_gone("pods", "importer-fedora-0", namespace=namespace)
    pvc = kube.client.get("persistentvolumeclaims", "fedora", namespace=namespace)
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
    wait_event(kube, namespace, "fedora", "ImportScheduled")
    wait_event(kube, namespace, "fedora", "Succeeded")


def test_what_streams_gets_no_scratch_space_and_what_turns_out_not_to_gets_it_next(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    images: Images,
    nginx: str,
    tmp_path: Path,
) -> None:
    tables_last = images.dir / "tables-last.qcow2"  # 4 MiB of data before its L2 tables
    if not tables_last.exists():
        data = qcow2_repack(images.path("qcow2").read_bytes(), "l2-after-data", seed=1)
        tables_last.write_bytes(data)
    sources = {"q": "disk.qcow2.gz", "r": "disk.raw.zst", "x": "disk.vhdx", "t": tables_last.name}
    for name, source in sources.items():
        kube.client.create(datavolume(name, namespace, {"http": {"url": f"{nginx}/{source}"}}))
    # A spill limit below the data that comes before the tables: `t` cannot stream.
    start(operator, namespace, "--importer-arg=--spill-limit", "--importer-arg=1Mi")
    results = {}
    for name in sources:
        status = wait_phase(kube, namespace, name, "Succeeded", "Failed")["status"]
        assert status["phase"] == "Succeeded", status
        results[name] = status
    argv = {p.pod: p.argv for p in kubelet.processes(namespace)}
    # qcow2 and raw stream (the probe says so): no scratch volume, and the importer knows.
    for pod in ("importer-q-0", "importer-r-0", "importer-t-0"):
        assert "--no-scratch" in argv[pod] and "--scratch-dir" not in argv[pod]
    # vhdx does not stream: scratch from the start.
    assert "--scratch-dir" in argv["importer-x-0"]
    # The tables-last qcow2 found out mid-stream, failed NeedsScratch, and got scratch next.
    assert "--scratch-dir" in argv["importer-t-1"]
    assert results["t"]["restartCount"] == 1
    wait_event(kube, namespace, "t", "NeedsScratch")
    paths = {name: status["result"]["path"] for name, status in results.items()}
    assert paths == {"q": "stream", "r": "stream", "x": "scratch", "t": "scratch"}
    assert "before the tables" in results["t"]["result"]["fallback"]
    for name in ("q", "t"):
        assert same_content(disk(kubelet, namespace, name), images.reference("qcow2", tmp_path))
    assert same_content(disk(kubelet, namespace, "r"), images.raw)
    assert same_content(disk(kubelet, namespace, "x"), images.reference("vhdx", tmp_path))


def test_blank_and_archive(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
    images: Images,
) -> None:
    import tarfile

    archive = images.dir / "controller-archive.tar"
    if not archive.exists():
        with tarfile.open(archive, "w") as tar:
            tar.add(images.path("raw"), arcname="inside/disk.raw")
    kube.client.create(datavolume("blank", namespace, {"blank": {}}, size="16Mi"))
    kube.client.create(
        datavolume(
            "tar", namespace, {"http": {"url": f"{nginx}/{archive.name}"}}, contentType="archive"
        )
    )
    start(operator, namespace)
    for name in ("blank", "tar"):
        assert wait_phase(kube, namespace, name, "Succeeded", "Failed")["status"]["phase"] == (
            "Succeeded"
        )
    blank = disk(kubelet, namespace, "blank")
    assert blank.stat().st_size >= 16 * MiB and not blank.read_bytes().strip(b"\0")
    extracted = kubelet.volume_path(namespace, "tar") / "inside" / "disk.raw"
    assert sha256(extracted) == sha256(images.path("raw"))
    # A finished DataVolume is not imported again: a spec change is ignored, saying so.
    kube.client.patch(
        "datavolumes", "blank", {"spec": {"preallocation": True}}, namespace=namespace
    )
    wait_event(kube, namespace, "blank", "SpecChangeIgnored")
    assert kube.client.get("datavolumes", "blank", namespace=namespace)["status"]["phase"] == (
        "Succeeded"
    )
    assert len(kubelet.processes(namespace)) == 2


def test_s3_with_a_secret_in_cdis_layout(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    images: Images,
    moto_s3: str,
) -> None:
    bucket, key = f"b{uuid.uuid4().hex[:10]}", "images/disk.qcow2.xz"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="s3cr3t",
    )
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(images.path("qcow2", "xz")), bucket, key)
    secret = {"accessKeyId": "AKIDEXAMPLE", "secretKey": "s3cr3t-never-shown"}
    kube.client.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        }
    )
    kube.client.create(
        datavolume(
            "s3", namespace, {"s3": {"url": f"{moto_s3}/{bucket}/{key}", "secretRef": "s3-creds"}}
        )
    )
    start(operator, namespace)
    done = wait_phase(kube, namespace, "s3", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    pod_args = " ".join(kubelet.processes(namespace)[0].argv)
    assert "s3cr3t" not in pod_args and "AKIDEXAMPLE" not in pod_args
    assert "s3cr3t" not in str(done) and "s3cr3t" not in str(
        kube.client.events(namespace=namespace)
    )


@pytest.mark.parametrize(
    ("fault", "reason"),
    [({"status": 404, "times": 99}, "NotFound"), ({"html": 1, "times": 99}, "HtmlInsteadOfImage")],
)
def test_final_failures_fail_at_once_without_retry(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    fault: dict[str, Any],
    reason: str,
) -> None:
    url = faults.url(uuid.uuid4().hex, "disk.raw.xz", **fault)
    kube.client.create(datavolume("bad", namespace, {"http": {"url": url}}))
    start(operator, namespace)
    status = wait_phase(kube, namespace, "bad", "Failed", "Succeeded")["status"]
    assert status["phase"] == "Failed" and status["reason"] == reason
    assert status["restartCount"] == 0 and len(kubelet.processes(namespace)) == 1
    assert wait_event(kube, namespace, "bad", reason)["type"] == "Warning"


def test_checksum_mismatch_and_an_image_too_large_for_its_volume(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
) -> None:
    kube.client.create(
        datavolume(
            "sum",
            namespace,
            {"http": {"url": f"{nginx}/disk.raw.gz", "checksum": "sha256:" + "0" * 64}},
        )
    )
    kube.client.create(
        datavolume("small", namespace, {"http": {"url": f"{nginx}/disk.raw.gz"}}, size="8Mi")
    )
    start(operator, namespace)
    checksum = wait_phase(kube, namespace, "sum", "Failed", "Succeeded")["status"]
    assert checksum["reason"] == "ChecksumMismatch"
    small = wait_phase(kube, namespace, "small", "Failed", "Succeeded")["status"]
    assert small["reason"] == "ImageTooLarge" and small["restartCount"] == 0
    assert not disk(kubelet, namespace, "sum").exists()  # nothing half-written looks complete


def test_a_transient_failure_is_retried_with_a_new_pod(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    url = faults.url(uuid.uuid4().hex, "disk.raw.xz", status=503, times=1)
    kube.client.create(datavolume("flaky", namespace, {"http": {"url": url}}))
    start(operator, namespace, "--no-probe")  # the probe would take the one failure
    status = wait_phase(kube, namespace, "flaky", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded" and status["restartCount"] == 1
    assert [p.pod for p in kubelet.processes(namespace)] == [
        "importer-flaky-0",
        "importer-flaky-1",
    ]
    assert same_content(disk(kubelet, namespace, "flaky"), images.raw)
    wait_event(kube, namespace, "flaky", "ServerError")


def test_the_retry_limit_ends_in_failed(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
) -> None:
    url = faults.url(uuid.uuid4().hex, "disk.raw.xz", status=503, times=99)
    kube.client.create(datavolume("down", namespace, {"http": {"url": url}}, retryLimit=1))
    start(operator, namespace)
    status = wait_phase(kube, namespace, "down", "Failed", "Succeeded")["status"]
    assert status["reason"] == "RetryLimitExceeded" and "[ServerError]" in status["message"]
    assert status["restartCount"] == 1 and len(kubelet.processes(namespace)) == 2


def test_a_pod_deleted_mid_import_is_replaced(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    running_import(kube, operator, namespace, "gone", faults, images, seconds=4, times=1)
    kubelet.vanish(namespace, "importer-gone-0")
    status = wait_phase(kube, namespace, "gone", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded" and status["restartCount"] == 1
    wait_event(kube, namespace, "gone", "PodLost")


def test_deleting_a_datavolume_mid_import_leaves_nothing(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    running_import(kube, operator, namespace, "bye", faults, images, seconds=10, times=9)
    kube.client.delete("datavolumes", "bye", namespace=namespace)
    kube.client.wait_gone("datavolumes", "bye", namespace=namespace)
    kube.client.wait_gone("persistentvolumeclaims", "bye", namespace=namespace, timeout=30)
    kube.client.wait_gone("pods", "importer-bye-0", namespace=namespace, timeout=30)
    poll(lambda: not kubelet.running(namespace), timeout=30, what="the importer still runs")


def test_a_restarted_controller_adopts_the_running_pod(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    first = running_import(kube, operator, namespace, "adopt", faults, images, seconds=4, times=9)
    first.kill()
    start(operator, namespace)
    status = wait_phase(kube, namespace, "adopt", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded" and status["restartCount"] == 0
    assert [p.pod for p in kubelet.processes(namespace)] == ["importer-adopt-0"]


def test_the_admission_limit_makes_the_next_one_wait_then_run(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    source = images.path("raw", "xz")
    token = uuid.uuid4().hex
    slow = faults.url(token, source.name, rate=source.stat().st_size // 8, times=99)
    for name in ("one", "two"):
        kube.client.create(datavolume(name, namespace, {"http": {"url": slow}}))
    start(operator, namespace, "--max-imports", "1")

    def one_waits() -> dict[str, Any] | None:
        """Whichever PVC bound second waits for the other's slot."""
        for dv in kube.client.list("datavolumes", namespace=namespace):
            conditions = dv.get("status", {}).get("conditions", [])
            if any(c["reason"] == "WaitingForImportSlot" for c in conditions):
                return dv
        return None

    waiting = poll(one_waits, timeout=TIMEOUT, what="no DataVolume waited for a slot")
    assert waiting["status"]["phase"] == "ImportScheduled"
    assert "1 of at most 1" in waiting["status"]["message"]
    for name in ("one", "two"):
        assert wait_phase(kube, namespace, name, "Succeeded", "Failed")["status"]["phase"] == (
            "Succeeded"
        )
    assert len(kubelet.processes(namespace)) == 2, [
        (e["involvedObject"]["name"], e["reason"], e["message"])
        for e in kube.client.events(namespace=namespace)
    ]


def test_a_missing_secret_is_a_condition_until_it_appears(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
) -> None:
    kube.client.create(
        datavolume(
            "auth", namespace, {"http": {"url": f"{nginx}/disk.raw.gz", "secretRef": "later"}}
        )
    )
    start(operator, namespace)
    waiting = kube.client.wait_for(
        "datavolumes",
        "auth",
        lambda dv: "Secret" in dv.get("status", {}).get("message", ""),
        namespace=namespace,
        timeout=TIMEOUT,
    )
    assert f"Secret {namespace}/later" in waiting["status"]["message"]
    assert not kubelet.processes(namespace)  # no crash-looping pod
    wait_event(kube, namespace, "auth", "WaitingForObjects")
    data = {
        "accessKeyId": base64.b64encode(b"u").decode(),
        "secretKey": base64.b64encode(b"p").decode(),
    }
    kube.client.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later", "namespace": namespace},
            "data": data,
        }
    )
    status = wait_phase(kube, namespace, "auth", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded", status  # nginx ignores the credentials


def test_wait_for_first_consumer_is_honoured_unless_immediate_binding_is_asked(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
) -> None:
    source = {"http": {"url": f"{nginx}/disk.raw.gz"}}
    waits = datavolume("waits", namespace, source)
    waits["spec"]["storage"]["storageClassName"] = "wffc"
    now = datavolume(
        "now",
        namespace,
        source,
        annotations={"cdi.kubevirt.io/storage.bind.immediate.requested": "true"},
    )
    now["spec"]["storage"]["storageClassName"] = "wffc"
    kube.client.create(waits)
    kube.client.create(now)
    start(operator, namespace)
    assert (
        wait_phase(kube, namespace, "now", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    )
    assert wait_phase(kube, namespace, "waits", "WaitForFirstConsumer")
    assert [p.pod for p in kubelet.processes(namespace)] == ["importer-now-0"]


def test_the_schema_refuses_malformed_datavolumes_naming_the_field(
    kube: KubeServer,
    namespace: str,
) -> None:
    two = datavolume("two", namespace, {"http": {"url": "https://x/y"}, "blank": {}})
    with pytest.raises(ApiError) as caught:
        kube.client.create(two)
    assert caught.value.code == 422 and "spec.source" in str(caught.value)
    mode = datavolume("mode", namespace, {"blank": {}})
    mode["spec"]["storage"]["volumeMode"] = "block"
    with pytest.raises(ApiError) as caught:
        kube.client.create(mode)
    assert "volumeMode" in str(caught.value)


def test_only_the_lease_holder_acts(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
) -> None:
    import requests

    from tests.conftest import free_port

    lease = ("--lease-namespace", namespace)
    leader = start(operator, namespace, *lease)
    leader.wait_for_output("holding lease")
    health = free_port()
    follower = start(operator, namespace, *lease, "--health-addr", "127.0.0.1",
                     "--health-port", str(health))  # fmt: skip
    follower.wait_for_output("waiting for lease")

    # A waiting replica is alive: its liveness probe passes (else Kubernetes restarts it).
    def alive() -> bool | None:
        try:
            return requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5).ok or None
        except requests.ConnectionError:
            return None  # not listening yet

    poll(alive, timeout=30, what="the waiting replica's /healthz never answered")
    kube.client.create(datavolume("one", namespace, {"http": {"url": f"{nginx}/disk.raw.gz"}}))
    assert (
        wait_phase(kube, namespace, "one", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    )
    assert [p.pod for p in kubelet.processes(namespace)] == ["importer-one-0"]
    leader.kill()
    follower.wait_for_output("holding lease", timeout=60)
    kube.client.create(datavolume("two", namespace, {"http": {"url": f"{nginx}/disk.raw.gz"}}))
    assert (
        wait_phase(kube, namespace, "two", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    )


def test_the_template_pipelines_datavolume_applied_as_is(
    kube: KubeServer,
    operator: StartOperator,
    minimal_installer: Installer,
    vm_dir: Path,
    tmp_path: Path,
    moto_s3: str,
    namespace: str,
) -> None:
    """A template built with the test installer and published to S3; the datavolume.yaml the
    build wrote is applied unchanged, and the volume ends up holding the published image."""
    from importer import S3Options
    from pipelines.accel import Accel
    from pipelines.steps import BuildRequest, PublishOptions, build_template
    from pipelines.virtinstall import BuildOptions

    kickstart = write_template(tmp_path, minimal_installer, "golden")
    build = BuildOptions(accel=Accel.TCG, network="none", timeout=180, no_output_timeout=60)
    publish = PublishOptions(s3=S3Options(endpoint=moto_s3), namespace=namespace)
    state = build_template(
        BuildRequest(
            kickstart=str(kickstart),
            output=str(tmp_path / "out"),
            workdir=str(vm_dir),
            build=build,
            publish_to=f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}",
            publish=publish,
        )
    )
    manifest = yaml.safe_load((tmp_path / "out/golden/datavolume.yaml").read_text())
    assert manifest["metadata"]["namespace"] == namespace
    kube.client.create(manifest)
    start(operator, namespace)
    name = manifest["metadata"]["name"]
    # The DataVolume names no Secret: its pods read S3 with the node's ambient identity.
    ambient = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with Kubelet(kube, tmp_path / "node", extra_env=ambient) as kubelet:
        status = wait_phase(kube, namespace, name, "Succeeded", "Failed")["status"]
        assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
        assert status["result"]["format"] == "qcow2" and status["result"]["checksumVerified"]
        published = tmp_path / "published.raw"
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", state.image or "", published)
        assert same_content(disk(kubelet, namespace, name), published)


def test_keep_pvc_survives_the_datavolume_and_metrics_and_health_are_served(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
) -> None:
    import requests

    from tests.conftest import free_port

    metrics, health = free_port(), free_port()
    kube.client.create(
        datavolume(
            "kept",
            namespace,
            {"http": {"url": f"{nginx}/disk.raw.gz"}},
            annotations={"diskflow.io/keep-pvc": "true"},
        )
    )
    start(
        operator,
        namespace,
        "--metrics-addr",
        "127.0.0.1",
        "--metrics-port",
        str(metrics),
        "--health-addr",
        "127.0.0.1",
        "--health-port",
        str(health),
    )
    assert wait_phase(kube, namespace, "kept", "Succeeded", "Failed")["status"]["phase"] == (
        "Succeeded"
    )

    def counted() -> str | None:
        text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        return text if 'diskflow_controller_datavolumes{phase="Succeeded"} 1.0' in text else None

    page = poll(counted, timeout=30, what="the controller's metrics never counted the DataVolume")
    assert "diskflow_controller_reconcile_seconds_count" in page
    assert requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5).status_code == 200
    kube.client.delete("datavolumes", "kept", namespace=namespace)
    kube.client.wait_gone("datavolumes", "kept", namespace=namespace, timeout=30)
    pvc = kube.client.get("persistentvolumeclaims", "kept", namespace=namespace)
    assert not pvc["metadata"].get("ownerReferences")
    assert disk(kubelet, namespace, "kept").exists()


def test_an_oom_killed_importer_is_retried(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    faults: FaultServer,
    images: Images,
) -> None:
    running_import(kube, operator, namespace, "oom", faults, images, seconds=4, times=1)
    kubelet.oom_kill(namespace, "importer-oom-0")
    status = wait_phase(kube, namespace, "oom", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded" and status["restartCount"] == 1
    assert "memory limit of 1Gi" in wait_event(kube, namespace, "oom", "OOMKilled")["message"]


@pytest.mark.loop
def test_a_block_volume_gets_the_raw_image_on_the_device(
    kube: KubeServer,
    kubelet: Kubelet,
    operator: StartOperator,
    namespace: str,
    nginx: str,
    images: Images,
) -> None:
    dv = datavolume("dev", namespace, {"http": {"url": f"{nginx}/disk.raw.zst"}}, size="64Mi")
    dv["spec"]["storage"]["volumeMode"] = "Block"
    kube.client.create(dv)
    start(operator, namespace)
    status = wait_phase(kube, namespace, "dev", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded", (status.get("reason"), status.get("message"))
    pvc = kube.client.get("persistentvolumeclaims", "dev", namespace=namespace)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "64Mi"  # not inflated
    args = kubelet.processes(namespace)[0].argv
    assert "--size" not in args  # the device is the capacity
    device = kubelet.volume_path(namespace, "dev")
    size = images.raw.stat().st_size
    with open(device, "rb") as made, open(images.raw, "rb") as want:
        assert made.read(size) == want.read()
