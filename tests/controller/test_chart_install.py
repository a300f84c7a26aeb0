"""The Helm chart and the controller cannot drift apart: the chart's own CRD served by the
emulated API server, the controller run exactly as the chart's Deployment runs it (its
command, arguments and rendered config file) with exactly the chart's RBAC enforced, and
imports through it. Every permission the chart grants is used, and nothing else is asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import Images, free_port, run
from tests.controller.conftest import POD_GRACE_PERIOD, add_storage_classes
from tests.controller.test_e2e import datavolume, disk, same_content, wait_event, wait_phase
from tests.support.charts import chart_authorizer, find, of_kind, pod_spec, render
from tests.support.kube import KubeServer
from tests.support.kube.kubelet import Kubelet
from tests.support.kube.operator import OperatorProcess

NAMESPACE = "vms"
# Fast settings, as the other controller tests use; every other value is the chart's default.
VALUES = {
    "watchNamespaces": [NAMESPACE],
    "controller": {
        "progressInterval": "200ms",
        "statusInterval": "500ms",
        "backoffBase": 0.3,
        "backoffMax": "1s",
    },
    "importer": {"extraArgs": ["--retries", "0"], "podLabels": {"team": "vms"}},
}


def controller_argv(objects: list[dict[str, Any]], workdir: Path) -> list[str]:
    """The chart's controller command line, its config file written where this process can
    read it, and its ports moved to free ones on loopback."""
    config = find(objects, "ConfigMap")["data"]["controller.yaml"]
    (workdir / "controller.yaml").write_text(config)
    container = pod_spec(find(objects, "Deployment"))["containers"][0]
    rewrite = {
        "--config": str(workdir / "controller.yaml"),
        "--metrics-port": str(free_port()),
        "--health-port": str(free_port()),
    }
    args = []
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        args.append(f"{name}={rewrite.get(name, value)}")
    return [*container["command"], *args]


def operator_name(objects: list[dict[str, Any]]) -> str:
    """The Lease the chart's controller holds: --lease-name."""
    args = pod_spec(find(objects, "Deployment"))["containers"][0]["args"]
    return next(a.partition("=")[2] for a in args if a.startswith("--lease-name="))


def ca_certificate(directory: Path) -> str:
    key, cert = directory / "ca.key", directory / "ca.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=mirror CA", "-keyout", key, "-out", cert)  # fmt: skip
    return cert.read_text()


def test_the_chart_installs_and_imports_with_exactly_its_rbac(
    tmp_path: Path, images: Images, nginx: str
) -> None:
    objects = render("diskflow", VALUES, namespace=NAMESPACE)
    crds = of_kind(objects, "CustomResourceDefinition")
    authorizer = chart_authorizer(objects)
    with (
        KubeServer(
            crds=crds, workdir=tmp_path, pod_grace_period=POD_GRACE_PERIOD, authorizer=authorizer
        ) as kube,
        Kubelet(kube, tmp_path / "kubelet") as kubelet,
    ):
        client = kube.client
        client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        add_storage_classes(client)
        operator = OperatorProcess(
            controller_argv(objects, tmp_path),
            kubeconfig=kube.kubeconfig,
            log=tmp_path / "operator.log",
        ).start()
        try:
            # An import that waits for its Secret and CA ConfigMap, then runs and succeeds.
            source = {
                "http": {
                    "url": f"{nginx}/disk.raw.gz",
                    "secretRef": "mirror-login",
                    "certConfigMap": "mirror-ca",
                }
            }
            client.create(datavolume("fedora", NAMESPACE, source))
            wait_event(kube, NAMESPACE, "fedora", "WaitingForObjects")
            client.create(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "mirror-login", "namespace": NAMESPACE},
                    "stringData": {"accessKeyId": "user", "secretKey": "password"},
                }
            )
            client.create(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "mirror-ca", "namespace": NAMESPACE},
                    "data": {"ca.crt": ca_certificate(tmp_path)},
                }
            )
            done = wait_phase(kube, NAMESPACE, "fedora", "Succeeded", "Failed")
            assert done["status"]["phase"] == "Succeeded", done["status"]
            assert same_content(disk(kubelet, NAMESPACE, "fedora"), images.raw)
            client.wait_gone("pods", "importer-fedora-0", namespace=NAMESPACE)

            # A blank disk on a WaitForFirstConsumer class, bound at once as asked, whose PVC
            # outlives the DataVolume (keep-pvc).
            annotations = {
                "diskflow.io/keep-pvc": "true",
                "cdi.kubevirt.io/storage.bind.immediate.requested": "true",
            }
            blank = datavolume("scratchpad", NAMESPACE, {"blank": {}}, annotations=annotations)
            blank["spec"]["storage"]["storageClassName"] = "wffc"
            client.create(blank)
            made = wait_phase(kube, NAMESPACE, "scratchpad", "Succeeded", "Failed")
            assert made["status"]["phase"] == "Succeeded", made["status"]
            client.delete("datavolumes", "scratchpad", namespace=NAMESPACE)
            client.wait_gone("datavolumes", "scratchpad", namespace=NAMESPACE, timeout=30)
            kept = client.get("persistentvolumeclaims", "scratchpad", namespace=NAMESPACE)
            assert not kept["metadata"].get("ownerReferences")

            # The leader renews its Lease (one replica here; the chart always elects one).
            lease = client.get("leases", operator_name(objects), namespace=NAMESPACE)
            client.wait_for(
                "leases", lease["metadata"]["name"],
                lambda renewed: renewed["spec"]["renewTime"] != lease["spec"]["renewTime"],
                namespace=NAMESPACE, timeout=30,
            )  # fmt: skip
        finally:
            code = operator.stop()
            print(f"--- the operator exited {code}; its output:\n{operator.output()}")
        assert not kube.denied(), "\n".join(kube.denied())
        assert not kubelet.errors, kubelet.errors
        used, granted = kube.used_permissions(), authorizer.granted()
        # Granted for paths this import does not take; the rbac-marked tests in test_e2e.py
        # run the operator under the same RBAC, so a missing grant fails there.
        other_paths = {
            ("get", "", "persistentvolumeclaims"): "a create that conflicts reads what exists",
            ("get", "", "pods"): "a pod missing from the watch is read before it is lost",
            ("list", "storage.k8s.io", "storageclasses"): "a pending PVC naming no class: "
            "which class is the default (binds on first consumer?)",
        }
        assert used <= granted
        assert granted - used <= set(other_paths), (
            f"granted but never used: {sorted(granted - used - set(other_paths))}"
        )
