"""The Helm charts under test: rendered and linted by real Helm (helm-python-sdk, Helm's Go
SDK in-process, no cluster), each object checked against the Kubernetes OpenAPI schemas
(kubernetes-validate, offline)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube.rbac import Authorizer

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
helm.disable_logging()  # its INFO line for every symlink (the library chart, the CRD)

CHARTS = Path(__file__).resolve().parents[2] / "charts"
RELEASE = "diskflow"
NAMESPACE = "diskflow-system"
# The oldest Kubernetes the charts support (their Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows: every rendered object must be valid for both.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
# API groups of custom resources the charts may render: no OpenAPI schema to check them against.
CUSTOM_GROUPS = frozenset({"monitoring.coreos.com"})

Object = dict[str, Any]


def render(
    chart: str, values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE
) -> list[Object]:
    """Every object `chart` renders for `values` (its CRDs first), as Helm would install them.

    Bad values raise helm's HelmValuesError (the schema) or HelmRenderError (a `fail`)."""
    loaded = helm.Chart.load(CHARTS / chart)
    try:
        texts = [crd["data"] for crd in loaded.crds]
        rendered = loaded.render(values or {}, name=RELEASE, namespace=namespace)
        texts += [text for path, text in rendered.items() if not path.endswith("NOTES.txt")]
    finally:
        loaded.close()
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def lint(chart: str, values: dict[str, Any] | None = None) -> list[str]:
    """`helm lint --strict` findings at warning level or worse, as "path: message"."""
    report = helm.lint(CHARTS / chart, values, strict=True, namespace=NAMESPACE)
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


def validate(objects: Iterable[Object]) -> None:
    """Every built-in object is valid for each of KUBE_VERSIONS (kubernetes-validate raises
    naming the object and the field); custom resources are checked by their own tests."""
    for obj in objects:
        if obj["apiVersion"].rpartition("/")[0] in CUSTOM_GROUPS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def find(objects: Iterable[Object], kind: str, name: str | None = None) -> Object:
    """The one object of `kind` (and `name`), or a failure listing what there is."""
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"].get("name"))]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} among " + ", ".join(
        f"{o['kind']}/{o['metadata'].get('name')}" for o in objects
    )
    return found[0]


def of_kind(objects: Iterable[Object], kind: str) -> list[Object]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: Object) -> Object:
    """The pod spec of a Deployment, StatefulSet or Job."""
    return workload["spec"]["template"]["spec"]


def chart_authorizer(objects: list[Object]) -> Authorizer:
    """The RBAC that the diskflow chart's rendered `objects` give its controller's service
    account, as the emulated API server enforces it."""
    deployment = find(objects, "Deployment")
    account = pod_spec(deployment)["serviceAccountName"]
    return Authorizer(objects, namespace=deployment["metadata"]["namespace"], name=account)
