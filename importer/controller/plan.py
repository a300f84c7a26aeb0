"""The objects a DataVolume needs, as plain manifests: its PVC and one importer pod per
attempt. Pure functions of the DataVolume, the controller's settings and what was decided
(the PVC's size, whether scratch space is needed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from importer.api import API_VERSION, KIND, BlankSource, DataVolume, HttpSource, S3Source
from importer.controller.config import ControllerConfig
from importer.pipeline import ContentType
from importer.quantity import format_quantity

MANAGED_BY = {"app.kubernetes.io/managed-by": "diskflow"}
DV_NAME_LABEL = "diskflow.io/datavolume"
DV_UID_LABEL = "diskflow.io/datavolume-uid"
ATTEMPT_LABEL = "diskflow.io/attempt"
SOURCE_HOST_ANNOTATION = "diskflow.io/source-host"

# Where things are inside the importer pod.
DATA_DIR = "/data"
BLOCK_DEVICE = "/dev/diskflow-target"
SCRATCH_DIR = "/scratch"
SECRET_DIR = "/var/run/diskflow/secret"
HEADERS_DIR = "/var/run/diskflow/headers"
CA_DIR = "/var/run/diskflow/ca"
TERMINATION_LOG = "/dev/termination-log"
IMPORTER_UID = 107  # CDI's importer user: volumes made for CDI's pods stay writable


@dataclass(frozen=True)
class Scratch:
    """Scratch space for an import that must convert: None when it streams."""

    size: int
    """Bytes: the largest the image (as downloaded and decompressed) may be."""


def claim_name(dv: DataVolume) -> str:
    """The PVC of a DataVolume has its name, as in CDI (a VM names the claim by it)."""
    return dv.name


def pod_name(dv: DataVolume, attempt: int) -> str:
    """`importer-NAME-ATTEMPT`, shortened with a hash when that passes 63 characters."""
    name = f"importer-{dv.name}-{attempt}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(dv.name.encode()).hexdigest()[:10]
    return f"importer-{dv.name[:40].rstrip('-.')}-{digest}-{attempt}"


def volume_size(dv: DataVolume, config: ControllerConfig) -> int:
    """Bytes the PVC asks for: the request, inflated by the storage class's overhead."""
    storage = dv.spec.storage
    return storage.pvc_size(overhead=config.overhead(storage.storage_class_name))


def plan_pvc(dv: DataVolume, config: ControllerConfig) -> dict[str, Any]:
    """The DataVolume's PVC, owned by it."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(dv),
            "namespace": dv.namespace,
            "labels": {**MANAGED_BY, DV_NAME_LABEL: dv.name, DV_UID_LABEL: dv.uid},
            "ownerReferences": [_owner(API_VERSION, KIND, dv.name, dv.uid)],
        },
        "spec": dv.spec.storage.pvc_spec(volume_size(dv, config)),
    }


def source_host(dv: DataVolume) -> str | None:
    """The host an import reads from, for the per-host admission limit."""
    source = dv.spec.source
    if isinstance(source, BlankSource):
        return None
    if isinstance(source, S3Source) and source.endpoint:
        return urlsplit(source.endpoint).hostname
    return urlsplit(source.url).hostname


def cert_config_map(source: HttpSource | S3Source, config: ControllerConfig) -> str | None:
    """The ConfigMap of CA certificates an import of `source` trusts: its own
    `certConfigMap`, else the controller's default; None: the image's trust store."""
    return source.cert_config_map or config.default_cert_config_map


def importer_args(
    dv: DataVolume, *, size: int | None, scratch: Scratch | None, config: ControllerConfig
) -> list[str]:
    """The `diskflow import` arguments of an importer pod; credentials only as paths of
    mounted files, never their values."""
    spec, source = dv.spec, dv.spec.source
    block = spec.storage.block
    archive = spec.content_type is ContentType.ARCHIVE
    dest = BLOCK_DEVICE if block else DATA_DIR if archive else f"{DATA_DIR}/disk.img"
    location = "blank:" if isinstance(source, BlankSource) else source.url
    args = [
        location,
        dest,
        "--progress",
        "json",
        "--termination-log",
        TERMINATION_LOG,
        "--metrics-addr",
        "$(POD_IP)",
        "--metrics-port",
        str(config.metrics_port),
    ]
    if dv.uid:
        # The ownerUID of CDI's progress metric: the DataVolume's, as CDI's importer has it.
        args += ["--owner-uid", dv.uid]
    if size is not None and not block:
        overhead = config.overhead(spec.storage.storage_class_name)
        args += ["--size", str(size), "--filesystem-overhead", f"{overhead:g}"]
    if archive:
        args += ["--content-type", "archive"]
    if spec.preallocation:
        args.append("--preallocate")
    if spec.connections:
        args += ["--connections", str(spec.connections)]
    if scratch is not None:
        args += ["--scratch-dir", SCRATCH_DIR]
    elif not isinstance(source, BlankSource) and not archive:
        # No scratch volume: an image that needs one after all fails with NeedsScratch, and
        # the next attempt gets one (rather than filling the pod's small /tmp).
        args.append("--no-scratch")
    if isinstance(source, HttpSource | S3Source):
        if source.checksum:
            args += ["--checksum", source.checksum]
        if source.secret_ref:
            args += ["--secret-dir", SECRET_DIR]
        if cert_config_map(source, config):
            args += ["--ca-bundle", CA_DIR]
    if isinstance(source, HttpSource):
        for header in source.extra_headers:
            args += ["--header", header]
        for n, _ in enumerate(source.secret_extra_headers):
            args += ["--header-file", f"{HEADERS_DIR}/{n}"]
        if source.insecure_skip_verify:
            args.append("--insecure")
    if isinstance(source, S3Source):
        if not source.url.startswith("s3://"):
            args.append("--s3")  # CDI's form: https://host/bucket/key
        if source.endpoint:
            args += ["--s3-endpoint", source.endpoint]
        if source.region:
            args += ["--s3-region", source.region]
    return [*args, *config.importer_args]


def plan_pod(
    dv: DataVolume,
    pvc: dict[str, Any],
    *,
    attempt: int,
    size: int | None,
    scratch: Scratch | None,
    config: ControllerConfig,
) -> dict[str, Any]:
    """Importer pod number `attempt` of `dv`, owned by its PVC; restricted Pod Security."""
    spec, source = dv.spec, dv.spec.source
    block = spec.storage.block
    volumes: list[dict[str, Any]] = [
        {"name": "target", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    devices: list[dict[str, Any]] = []
    if block:
        devices.append({"name": "target", "devicePath": BLOCK_DEVICE})
    else:
        mounts.append({"name": "target", "mountPath": DATA_DIR})
    if scratch is not None:
        volumes.append(_scratch_volume(scratch, config))
        mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})

    def mount(name: str, path: str, volume: dict[str, Any]) -> None:
        volumes.append({"name": name, **volume})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})

    if isinstance(source, HttpSource | S3Source):
        if source.secret_ref:
            mount("secret", SECRET_DIR, {"secret": {"secretName": source.secret_ref}})
        if ca := cert_config_map(source, config):
            mount("ca", CA_DIR, {"configMap": {"name": ca}})
    if isinstance(source, HttpSource):
        for n, secret in enumerate(source.secret_extra_headers):
            mount(f"headers-{n}", f"{HEADERS_DIR}/{n}", {"secret": {"secretName": secret}})
    container: dict[str, Any] = {
        "name": "importer",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["diskflow", "import"],
        "args": importer_args(dv, size=size, scratch=scratch, config=config),
        "env": [
            *config.importer_env,
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [{"name": "metrics", "containerPort": config.metrics_port}],
        "resources": spec.resources or config.importer_resources,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if devices:
        container["volumeDevices"] = devices
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": IMPORTER_UID,
            "runAsGroup": IMPORTER_UID,
            "fsGroup": IMPORTER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name:
        # For ambient S3 credentials (IRSA, workload identity): their token is projected by
        # the cluster's webhook, not the automounted API token, which stays off.
        pod_spec["serviceAccountName"] = spec.service_account_name
    priority = spec.priority_class_name or config.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        pod_spec["tolerations"] = list(config.tolerations)
    if config.affinity:
        pod_spec["affinity"] = config.affinity
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    host = source_host(dv)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(dv, attempt),
            "namespace": dv.namespace,
            "labels": {
                **config.importer_pod_labels,
                **MANAGED_BY,
                DV_NAME_LABEL: dv.name,
                DV_UID_LABEL: dv.uid,
                ATTEMPT_LABEL: str(attempt),
            },
            "annotations": {
                **config.importer_pod_annotations,
                **({SOURCE_HOST_ANNOTATION: host} if host else {}),
            },
            "ownerReferences": [
                _owner(
                    "v1", "PersistentVolumeClaim", pvc["metadata"]["name"], pvc["metadata"]["uid"]
                )
            ],
        },
        "spec": pod_spec,
    }


def _scratch_volume(scratch: Scratch, config: ControllerConfig) -> dict[str, Any]:
    size = format_quantity(scratch.size)
    if config.scratch_storage_class is None:
        return {"name": "scratch", "emptyDir": {"sizeLimit": size}}
    # A generic ephemeral volume: a PVC made for the pod and deleted with it.
    claim = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": config.scratch_storage_class,
        "resources": {"requests": {"storage": size}},
    }
    return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}


def _owner(api_version: str, kind: str, name: str, uid: str | None) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
