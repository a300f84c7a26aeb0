"""charts/diskflow rendered by real Helm: valid objects, restricted pods, least-privilege
RBAC, the controller's own CRD, its settings reaching the importer pods, and bad values
refused at install time with a message naming them. (That the chart's controller runs and
imports under exactly this RBAC: tests/controller/test_chart_install.py.)"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from diskflow.controller_cli import _read_config
from importer.api import DataVolume, load_crd
from importer.controller.config import ControllerConfig
from importer.controller.plan import plan_pod
from importer.errors import FinalError
from tests.support.charts import find, helm, lint, of_kind, pod_spec, render, validate
from tests.support.kube.selectors import label_selector

ALL_VALUES = yaml.safe_load((Path(__file__).parent / "controller-all-values.yaml").read_text())
CASES = {"defaults": {}, "every value": ALL_VALUES}


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_renders_lints_and_validates(values: dict[str, Any]) -> None:
    assert lint("diskflow", values) == []
    objects = render("diskflow", values)
    validate(objects)
    kinds = {o["kind"] for o in objects}
    assert "DaemonSet" not in kinds
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ConfigMap"} <= kinds
    assert ("ServiceMonitor" in kinds) == bool(values.get("metrics", {}).get("serviceMonitor"))
    assert ("PodMonitor" in kinds) == bool(values.get("metrics", {}).get("podMonitor"))


def test_the_crd_is_the_one_the_controller_and_its_tests_load() -> None:
    crd = find(render("diskflow"), "CustomResourceDefinition")
    assert crd == load_crd()


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_the_controller_pod_is_restricted(values: dict[str, Any]) -> None:
    spec = pod_spec(find(render("diskflow", values), "Deployment"))
    security = spec["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    assert not any("hostPath" in volume for volume in spec["volumes"])
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and not context.get("privileged")
        assert context["capabilities"] == {"drop": ["ALL"]}  # NET_RAW included
        assert context["readOnlyRootFilesystem"] and context["runAsNonRoot"]


def test_every_value_reaches_the_controller_and_its_importer_pods() -> None:
    objects = render("diskflow", ALL_VALUES)
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    assert container["image"] == "registry.example.com/diskflow@sha256:" + "0123456789abcdef" * 4
    assert container["imagePullPolicy"] == "Always"
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "registry-login"}]
    assert spec["serviceAccountName"] == "importer-controller"
    assert spec["tolerations"][0]["key"] == "infra" and "podAntiAffinity" in spec["affinity"]
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "platform"
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert "checksum/config" in meta["annotations"]  # a changed config rolls the pods
    args = container["args"]
    assert "--namespace=vms" in args and "--namespace=templates" in args
    assert "--lease-namespace=diskflow-system" in args  # 2 replicas: one acts
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.example.com:3128"
    assert env["REQUESTS_CA_BUNDLE"] == env["AWS_CA_BUNDLE"] == "/etc/diskflow/ca/bundle.pem"
    assert env["PYTHONFAULTHANDLER"] == "1"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca-bundle"]["configMap"]["name"] == "corporate-ca"
    assert find(objects, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"

    config = controller_config(objects)
    assert config.max_imports == 50 and config.retry_limit == 3 and config.probe is False
    # Times as durations, numbers of seconds, and strings of seconds.
    assert config.backoff_base == 5 and config.backoff_max == 120 and config.stall_timeout == 5400
    assert config.probe_timeout == 10 and config.progress_interval == 0.25
    assert config.status_interval == 3
    assert config.storage_class_overheads == {"ceph-rbd": 0.03}
    assert config.scratch_storage_class == "local-scratch"
    pod = importer_pod(config)
    importer = pod["spec"]["containers"][0]
    assert importer["image"] == "registry.example.com/diskflow-importer:0.1.0"
    assert importer["resources"]["limits"]["memory"] == "2Gi"
    assert pod["spec"]["priorityClassName"] == "imports"
    assert pod["spec"]["nodeSelector"] == {"storage": "fast"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-login"}]
    assert pod["metadata"]["labels"]["team"] == "vms"
    importer_env = {e["name"]: e.get("value") for e in importer["env"]}
    assert importer_env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    assert importer_env["TZ"] == "UTC"
    assert {"name": "ca", "configMap": {"name": "mirror-ca"}} in pod["spec"]["volumes"]
    assert importer["args"][-2:] == ["--min-rate", "1048576"]
    assert importer["ports"][0]["containerPort"] == 9443


def importer_pod(config: ControllerConfig) -> dict[str, Any]:
    """The pod the controller would start, with `config`, for a DataVolume in `vms`."""
    dv = DataVolume.from_manifest(
        {
            "apiVersion": "diskflow.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "fedora", "namespace": "vms", "uid": "u1"},
            "spec": {
                "source": {"http": {"url": "https://mirror.example.com/fedora.img"}},
                "storage": {"resources": {"requests": {"storage": "1Gi"}}},
            },
        }
    )
    pvc = {"metadata": {"name": "fedora", "uid": "u2"}}
    return plan_pod(dv, pvc, attempt=0, size=1 << 30, scratch=None, config=config)


def controller_config(objects: list[dict[str, Any]]) -> ControllerConfig:
    """The chart's config file, read by the controller's own reader."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "controller.yaml"
        path.write_text(find(objects, "ConfigMap")["data"]["controller.yaml"])
        return ControllerConfig(**_read_config(path))


def test_the_default_config_is_the_controllers_default() -> None:
    """With the chart's defaults the controller behaves as `diskflow controller` with none:
    the chart documents the same numbers the code has."""
    config = controller_config(render("diskflow"))
    default = ControllerConfig()
    for field in ("max_imports", "max_imports_per_host", "retry_limit", "backoff_base",
                  "backoff_max", "stall_timeout", "probe", "probe_timeout",
                  "filesystem_overhead", "progress_interval", "status_interval",
                  "metrics_port", "termination_grace", "importer_resources"):  # fmt: skip
        assert getattr(config, field) == getattr(default, field), field


def rules(objects: list[dict[str, Any]], kind: str, namespace: str | None = None) -> list[Any]:
    return [
        rule
        for role in of_kind(objects, kind)
        if namespace in (None, role["metadata"].get("namespace"))
        for rule in role["rules"]
    ]


def test_rbac_is_cluster_wide_only_when_every_namespace_is_watched() -> None:
    cluster_wide = render("diskflow")
    granted = rules(cluster_wide, "ClusterRole")
    assert {"datavolumes", "pods", "persistentvolumeclaims"} <= {
        r for rule in granted for r in rule["resources"]
    }
    namespaced = render("diskflow", {"watchNamespaces": ["vms", "templates"]})
    (cluster_rule,) = rules(namespaced, "ClusterRole")
    assert cluster_rule["resources"] == ["storageclasses"]  # cluster-scoped: nothing else
    for namespace in ("vms", "templates"):
        role = rules(namespaced, "Role", namespace)
        assert {r for rule in role for r in rule["resources"]} >= {"datavolumes", "pods"}
        binding = find(
            [
                b
                for b in of_kind(namespaced, "RoleBinding")
                if b["metadata"]["namespace"] == namespace
            ],
            "RoleBinding",
        )
        assert binding["subjects"][0]["namespace"] == "diskflow-system"
    for objects in (cluster_wide, namespaced):
        for rule in rules(objects, "ClusterRole") + rules(objects, "Role"):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            if {"secrets", "configmaps"} & set(rule["resources"]):
                assert rule["verbs"] == ["get"]  # never listed: only "does it exist yet?"
        lease = rules(objects, "Role", "diskflow-system")
        assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "create", "update"]} in lease  # fmt: skip


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"controller": {"replicas": "two"}}, "/controller/replicas"),
        ({"controller": {"maxImport": 3}}, "maxImport"),
        ({"importer": {"resources": {"limits": {"memory": "lots"}}}}, "/importer/resources"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "Not_A_Namespace"),
        ({"controller": {"filesystemOverhead": 1.5}}, "/controller/filesystemOverhead"),
        ({"controller": {"image": {"digest": "md5:abc"}}}, "/controller/image/digest"),
        ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "/metrics/serviceMonitor"),
        ({"importer": {"extraEnv": [{"value": "x"}]}}, "/importer/extraEnv/0"),
        ({"controller": {"stallTimeout": "soon"}}, "/controller/stallTimeout"),
        ({"controller": {"backoffMax": -1}}, "/controller/backoffMax"),
        ({"controller": {"stallTimeoutSeconds": 600}}, "stallTimeoutSeconds"),  # the old name
        ({"metrics": {"podMonitor": {"interval": "soon"}}}, "/metrics/podMonitor"),
    ],
)
def test_bad_values_are_refused_naming_them(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render("diskflow", values)
    assert named in str(refused.value)


def test_a_service_monitor_without_its_service_is_refused() -> None:
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(helm.HelmRenderError, match=r"needs metrics\.service\.enabled"):
        render("diskflow", values)


def test_a_time_the_schema_passes_but_the_controller_refuses_is_named() -> None:
    """The schema checks a duration's form; its least value the controller's reader checks."""
    objects = render("diskflow", {"controller": {"stallTimeout": "500ms"}})
    with pytest.raises(FinalError, match=r"controller\.yaml: stall_timeout: '500ms': .*1"):
        controller_config(objects)


def test_the_pod_monitor_is_off_by_default() -> None:
    assert of_kind(render("diskflow"), "PodMonitor") == []


@pytest.mark.parametrize(
    ("watched", "namespaces"),
    [([], {"any": True}), (["vms", "templates"], {"matchNames": ["vms", "templates"]})],
)
def test_the_pod_monitor_scrapes_the_importer_pods_the_controller_starts(
    watched: list[str], namespaces: dict[str, Any]
) -> None:
    values = {"watchNamespaces": watched, "metrics": {"podMonitor": {"enabled": True}}}
    objects = render("diskflow", values)
    monitor = find(objects, "PodMonitor")["spec"]
    assert monitor["namespaceSelector"] == namespaces
    assert set(monitor["selector"]) == {"matchLabels"}  # all that the matcher below reads
    selects = label_selector(
        ",".join(f"{key}={value}" for key, value in monitor["selector"]["matchLabels"].items())
    )
    pod = importer_pod(controller_config(objects))
    assert selects(pod)
    assert not selects(find(objects, "Deployment")["spec"]["template"])  # the controller
    (endpoint,) = monitor["podMetricsEndpoints"]
    (port,) = pod["spec"]["containers"][0]["ports"]
    assert endpoint["port"] == port["name"]
    assert endpoint["interval"] == "15s"
