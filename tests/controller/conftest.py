"""Fixtures for controller tests: an emulated API server, a kubelet stand-in, a namespace of the
test's own, and the operator as a real process (tests/support/kube/README.md says what the
stand-in proves and what it does not)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import KubeServer
from tests.support.kube.client import KubeClient
from tests.support.kube.kubelet import Kubelet
from tests.support.kube.operator import OperatorProcess

PROJECT_CRD = Path(__file__).parents[2] / "importer" / "controller" / "crd.yaml"
POD_GRACE_PERIOD = 2  # the default terminationGracePeriodSeconds: 30 s would slow every deletion
STORAGE_CLASSES = (
    {
        "metadata": {
            "name": "standard",
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "volumeBindingMode": "Immediate",
    },
    {"metadata": {"name": "wffc"}, "volumeBindingMode": "WaitForFirstConsumer"},
)

StartOperator = Callable[..., OperatorProcess]


def project_crds() -> list[dict[str, Any]]:
    """The project's CRDs (importer/controller/crd.yaml), once that file exists."""
    if not PROJECT_CRD.exists():
        return []
    docs = yaml.safe_load_all(PROJECT_CRD.read_text())
    return [doc for doc in docs if doc and doc.get("kind") == "CustomResourceDefinition"]


def add_storage_classes(client: KubeClient) -> None:
    """STORAGE_CLASSES, as a cluster's administrator made them."""
    for storage_class in STORAGE_CLASSES:
        client.create(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "provisioner": "harness.diskflow.io",
                **storage_class,
            }
        )


@pytest.fixture
def namespace_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kube(
    tmp_path: Path, request: pytest.FixtureRequest, namespace_name: str
) -> Iterator[KubeServer]:
    """A fresh API server per test (it starts in ~10 ms), serving the project's CRDs, with a
    default StorageClass `standard` (Immediate) and `wffc` (WaitForFirstConsumer).

    Marked `rbac`: the operator's requests are authorized as the Helm chart's RBAC allows
    (the chart installed in the test's namespace, watching it), and a refused one fails the
    test: the chart grants every call the controller makes."""
    authorizer = None
    if request.node.get_closest_marker("rbac"):
        from tests.support.charts import chart_authorizer, render

        values = {"watchNamespaces": [namespace_name]}
        authorizer = chart_authorizer(render("diskflow", values, namespace=namespace_name))
    with KubeServer(
        crds=project_crds(),
        workdir=tmp_path,
        pod_grace_period=POD_GRACE_PERIOD,
        authorizer=authorizer,
    ) as server:
        add_storage_classes(server.client)
        yield server
        assert not server.failures(), "the emulated API server failed:\n" + "\n".join(
            server.failures()
        )
        assert not server.denied(), "the chart's RBAC refused the operator:\n" + "\n".join(
            server.denied()
        )


@pytest.fixture
def namespace(kube: KubeServer, namespace_name: str) -> str:
    """A namespace of the test's own, as tests sharing a real cluster would use."""
    kube.client.create(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace_name}}
    )
    return namespace_name


@pytest.fixture
def kubelet(kube: KubeServer, tmp_path: Path) -> Iterator[Kubelet]:
    """The kubelet stand-in; a test fails if it had to refuse a pod (see `Kubelet.errors`)."""
    with Kubelet(kube, tmp_path / "kubelet") as node:
        yield node
    assert not node.errors, "the kubelet stand-in refused or failed:\n" + "\n".join(node.errors)


@pytest.fixture
def operator(kube: KubeServer, tmp_path: Path) -> Iterator[StartOperator]:
    """`operator(*argv, env={...})` starts the command as the operator, KUBECONFIG pointing at
    `kube`; each is stopped (SIGTERM, then SIGKILL) at the end and its output printed, which
    pytest shows when the test fails."""
    started: list[OperatorProcess] = []

    def start(
        *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> OperatorProcess:
        log = tmp_path / f"operator-{len(started)}.log"
        process = OperatorProcess(list(argv), kubeconfig=kube.kubeconfig, log=log, env=env, cwd=cwd)
        started.append(process.start())
        return process

    yield start
    for process in started:
        code = process.stop()
        print(f"--- operator {process.argv} exited {code}; its output:\n{process.output()}")
