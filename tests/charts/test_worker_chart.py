"""The diskflow-worker chart, rendered and linted by real Helm and validated against the
Kubernetes schemas: restricted pods with only the KVM device, the worker's settings as the
code reads them, the broker and publishing credentials from Secrets, the bundled Redis."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.publish.http import PASSWORD_ENV, TOKEN_ENV, USER_ENV
from pipelines.tasks import (
    BROKER_ENV,
    BUILD_MARGIN_SECONDS,
    CONCURRENCY_ENV,
    MAX_BUILD_TIMEOUT_ENV,
    VISIBILITY_ENV,
    InvalidSettings,
    WorkerSettings,
)
from pipelines.template import MEDIA_DIRS_ENV
from pipelines.virtinstall import LIBVIRT_URI_ENV
from tests.support.charts import Object, find, helm, lint, of_kind, pod_spec, render, validate

CHART = "diskflow-worker"
ALL_VALUES = yaml.safe_load((Path(__file__).parent / "worker-all-values.yaml").read_text())
# The all-values file points at its own broker; this is it with the bundled Redis instead.
ALL_WITH_REDIS = ALL_VALUES | {
    "redis": ALL_VALUES["redis"] | {"enabled": True},
    "broker": {"existingSecret": "", "key": "url"},
}
VALUES = [
    pytest.param({}, id="defaults"),
    pytest.param(ALL_VALUES, id="all-values"),
    pytest.param(ALL_WITH_REDIS, id="all-values-bundled-redis"),
]
STATE = "/var/lib/diskflow"


def workloads(objects: list[Object]) -> list[Object]:
    return of_kind(objects, "StatefulSet") + of_kind(objects, "Deployment")


def worker(objects: list[Object]) -> Object:
    return pod_spec(find(objects, "StatefulSet"))["containers"][0]


def env(container: Object) -> dict[str, Any]:
    """name → value, or the valueFrom of an EnvVar that has one."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secret_text(secret: Object, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def with_worker(**changes: Any) -> dict[str, Any]:
    return {"worker": changes}


@pytest.mark.parametrize("values", VALUES)
def test_renders_lints_and_validates(values: dict[str, Any]) -> None:
    assert lint(CHART, values) == []
    objects = render(CHART, values)
    validate(objects)
    assert not of_kind(objects, "DaemonSet")


@pytest.mark.parametrize("values", VALUES)
def test_every_pod_is_restricted_and_needs_no_privilege(values: dict[str, Any]) -> None:
    objects = render(CHART, values)
    assert len(workloads(objects)) == (2 if values.get("redis", {}).get("enabled", True) else 1)
    for workload in workloads(objects):
        pod = pod_spec(workload)
        where = workload["metadata"]["name"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), (where, host)
        assert all("hostPath" not in volume for volume in pod["volumes"]), where
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["runAsNonRoot"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where  # nothing added
            assert not security.get("privileged"), where
    worker_pod = pod_spec(find(objects, "StatefulSet"))
    assert worker_pod["securityContext"]["runAsUser"] == 107  # the image's user
    assert worker_pod["securityContext"].get("supplementalGroups") == values.get("worker", {}).get(
        "supplementalGroups"
    )
    account = find(objects, "ServiceAccount", worker_pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("values", "resource"),
    [({}, "devices.kubevirt.io/kvm"), (ALL_VALUES, "devices.example.com/kvm")],
)
def test_the_worker_requests_and_limits_one_kvm_device(
    values: dict[str, Any], resource: str
) -> None:
    resources = worker(render(CHART, values))["resources"]
    assert resources["requests"][resource] == resources["limits"][resource] == "1"
    configured = values.get("worker", {}).get("resources", {})
    for kind in ("requests", "limits"):
        for name, quantity in configured.get(kind, {}).items():
            assert resources[kind][name] == quantity


def test_the_worker_settings_are_the_ones_the_code_reads() -> None:
    container = worker(render(CHART, ALL_VALUES))
    given = env(container)
    assert given[CONCURRENCY_ENV] == "2"
    assert given[VISIBILITY_ENV] == "7800"
    assert given[MAX_BUILD_TIMEOUT_ENV] == "7200"
    assert given[MEDIA_DIRS_ENV] == "/media/isos:/media/kernels"
    assert given[LIBVIRT_URI_ENV] == "qemu:///session"
    assert given["LIBGUESTFS_BACKEND"] == "direct"
    # The worker accepts them as the chart writes them.
    plain = {name: value for name, value in given.items() if isinstance(value, str)}
    assert WorkerSettings.from_environment(plain) == WorkerSettings(
        concurrency=2, visibility_timeout=7800, max_build_timeout=7200,
        media_dirs=("/media/isos", "/media/kernels"),
    )  # fmt: skip
    # The chart's defaults are the worker's own.
    defaults = {k: v for k, v in env(worker(render(CHART))).items() if isinstance(v, str)}
    assert WorkerSettings.from_environment(defaults) == WorkerSettings()
    # A stable Celery node name, from the pod's name; the entrypoint sets up session libvirt.
    assert container["command"] == ["diskflow-worker-entrypoint"]
    assert container["args"][:2] == ["--hostname", "diskflow@$(POD_NAME)"]
    assert given["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["args"][2:] == ["--log-level", "DEBUG"]


def test_the_charts_timeout_rule_is_the_workers() -> None:
    """The chart refuses what the worker would refuse to start with, and nothing more."""
    build = 4000 - BUILD_MARGIN_SECONDS
    WorkerSettings.from_environment({VISIBILITY_ENV: "4000", MAX_BUILD_TIMEOUT_ENV: str(build)})
    render(CHART, with_worker(visibilityTimeout=4000, buildTimeout=build))
    with pytest.raises(InvalidSettings):
        WorkerSettings.from_environment({VISIBILITY_ENV: "3999", MAX_BUILD_TIMEOUT_ENV: str(build)})
    with pytest.raises(helm.HelmRenderError, match=r"worker\.visibilityTimeout \(3999\)"):
        render(CHART, with_worker(visibilityTimeout=3999, buildTimeout=build))


def test_the_work_volume_is_the_pods_own_and_holds_builds() -> None:
    objects = render(CHART, ALL_VALUES)
    statefulset = find(objects, "StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    service = find(objects, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast-local"
    container = pod_spec(statefulset)["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == STATE
    # A queued build's relative --output and its install disk (the default --workdir) land
    # on the volume; the entrypoint keeps libvirt's and libguestfs' state there too.
    assert container["workingDir"] == STATE
    assert env(container)["TMPDIR"] == env(container)["DISKFLOW_STATE_DIR"] == STATE
    default_claim = find(render(CHART), "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    assert default_claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in default_claim["spec"]


def test_the_bundled_redis_is_the_broker_with_a_password_kept_out_of_pod_specs() -> None:
    objects = render(CHART)
    secret = find(objects, "Secret")
    password = secret_text(secret, "password")
    assert len(password) >= 32
    service = find(objects, "Service", secret["metadata"]["name"])
    assert secret_text(secret, "url") == f"redis://:{password}@{service['metadata']['name']}:6379/0"
    assert env(worker(objects))[BROKER_ENV] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "url"}
    }
    config = secret_text(secret, "diskflow.conf").splitlines()
    for line in ("bind 0.0.0.0", "protected-mode yes", f"requirepass {password}", 'save ""',
                 "appendonly no"):  # fmt: skip
        assert line in config
    redis = pod_spec(find(objects, "Deployment"))
    (mount,) = [m for m in redis["containers"][0]["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/redis/diskflow.conf"  # the image's CMD reads it
    assert redis["securityContext"]["runAsUser"] == 999  # the image's redis user
    # The password is in the Secret only: not in argv, env values or annotations.
    for other in (o for o in objects if o["kind"] != "Secret"):
        assert password not in yaml.safe_dump(other), other["kind"]


def test_a_changed_redis_config_rolls_both_pods() -> None:
    """Offline rendering finds no Secret to keep, so each render has a new password."""
    first, second = render(CHART), render(CHART)
    checksums = [
        {pod_spec_metadata(w)["annotations"]["checksum/redis-config"] for w in workloads(objects)}
        for objects in (first, second)
    ]
    assert all(len(c) == 1 for c in checksums)  # the worker and Redis agree
    assert checksums[0] != checksums[1]


def pod_spec_metadata(workload: Object) -> Object:
    return workload["spec"]["template"]["metadata"]


def test_redis_objects_only_when_enabled() -> None:
    bundled = render(CHART)
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in bundled} == {
        "worker", "redis"
    }  # fmt: skip
    own = render(CHART, ALL_VALUES)
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in own} == {"worker"}
    assert not of_kind(own, "Secret") and not of_kind(own, "Deployment")
    assert env(worker(own))[BROKER_ENV] == {
        "secretKeyRef": {"name": "diskflow-broker", "key": "redis-url"}
    }


def test_publishing_credentials_come_from_secrets() -> None:
    given = env(worker(render(CHART, ALL_VALUES)))
    assert given["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "access-key"}
    }
    assert given["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "secret-key"}
    }
    for name, key in ((USER_ENV, "username"), (PASSWORD_ENV, "password"), (TOKEN_ENV, "token")):
        assert given[name] == {
            "secretKeyRef": {"name": "artifactory-credentials", "key": key, "optional": True}
        }
    default = env(worker(render(CHART)))
    assert not {"AWS_ACCESS_KEY_ID", USER_ENV, PASSWORD_ENV, TOKEN_ENV} & default.keys()


def test_proxy_and_ca_bundle_reach_both_pods() -> None:
    objects = render(CHART, ALL_WITH_REDIS)
    for workload in workloads(objects):
        pod = pod_spec(workload)
        container = pod["containers"][0]
        given = env(container)
        assert given["HTTPS_PROXY"] == given["https_proxy"] == "http://proxy.example.com:3128"
        assert given["NO_PROXY"].endswith(",10.96.0.0/12")
        mount = next(m for m in container["volumeMounts"] if m["name"] == "ca-bundle")
        assert mount["readOnly"] is True
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
            assert given[name] == f"{mount['mountPath']}/bundle.pem"
        volume = next(v for v in pod["volumes"] if v["name"] == "ca-bundle")
        assert volume["configMap"]["name"] == "corporate-ca"
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert env(worker(objects))["DISKFLOW_EXTRA"] == "worker"


def changed(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (default: no values) with the dotted `path` set to `value`."""
    values = copy.deepcopy(base or {})
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


@pytest.mark.parametrize(
    ("values", "named"),
    [
        pytest.param(changed("worker.concurrency", "two"), "concurrency", id="wrong type"),
        pytest.param(changed("worker.concurency", 2), "concurency", id="unknown key"),
        pytest.param(changed("worker.concurrency", 0), "concurrency", id="no concurrency"),
        pytest.param(changed("worker.buildTimeout", 0), "buildTimeout", id="no build time"),
        pytest.param(changed("worker.mediaDirs", ["media"]), "mediaDirs", id="relative media"),
        pytest.param(changed("worker.workVolume.size", "lots"), "size", id="bad size"),
        pytest.param(changed("redis.image.digest", "latest"), "digest", id="bad digest"),
        pytest.param(changed("publish.s3.secret", "x"), "secret", id="unknown nested key"),
    ],
)
def test_bad_values_are_refused_naming_them(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(CHART, values)
    assert named in str(refused.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            with_worker(visibilityTimeout=3600, buildTimeout=3500),
            r"worker\.visibilityTimeout \(3600\) must be at least worker\.buildTimeout \(3500\) "
            r"\+ 600 s .*lower worker\.buildTimeout to 3000 or raise worker\.visibilityTimeout "
            r"to 4100",
            id="visibility shorter than a build",
        ),
        pytest.param(
            {"redis": {"enabled": False}},
            r"no broker: set redis\.enabled=true .* or broker\.existingSecret",
            id="no broker",
        ),
        pytest.param(
            {"broker": {"existingSecret": "mine"}},
            r"redis\.enabled and broker\.existingSecret are both set",
            id="two brokers",
        ),
    ],
)
def test_values_that_cannot_work_fail_with_the_rule(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(CHART, values)
