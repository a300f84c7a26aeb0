"""What a cluster operator configures once for every DataVolume the controller handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from importer.capacity import DEFAULT_OVERHEAD


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """The controller's settings; every one has a default that works on a plain cluster."""

    image: str = "diskflow:latest"
    """The importer pods' image (holds `diskflow` and qemu-img)."""
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    """Secrets to pull the importer image with (each must exist in the DataVolume's namespace)."""
    importer_resources: dict[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        }
    )
    """Requests and limits of an importer pod; a DataVolume's `spec.resources` overrides."""
    importer_env: tuple[dict[str, Any], ...] = ()
    """Extra environment of every importer container (Kubernetes EnvVar objects): proxy
    settings (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), ..."""
    importer_pod_labels: dict[str, str] = field(default_factory=dict)
    importer_pod_annotations: dict[str, str] = field(default_factory=dict)
    """Added to every importer pod; the controller's own labels and annotations win."""
    default_cert_config_map: str | None = None
    """CA certificates for http and s3 sources that name no `certConfigMap`: a ConfigMap of
    this name in the DataVolume's namespace (as trust-manager distributes one), used exactly
    as a `certConfigMap` would be (mounted, `--ca-bundle`, waited for while absent)."""
    priority_class_name: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    filesystem_overhead: float = DEFAULT_OVERHEAD
    storage_class_overheads: dict[str, float] = field(default_factory=dict)
    """Filesystem overhead per storage class, where it differs from the default."""
    scratch_storage_class: str | None = None
    """Scratch space as a PVC of this class; None: an emptyDir with a size limit."""
    probe: bool = True
    """Open the source from the controller to learn whether scratch space is needed; off
    (no network from the controller): every non-blank, non-archive import gets scratch."""
    probe_timeout: float = 30.0
    max_imports: int = 20
    """Importer pods at once, cluster-wide (0: no limit)."""
    max_imports_per_host: int = 4
    """Importer pods at once reading from the same source host (0: no limit)."""
    retry_limit: int = 5
    """Transient failures before a DataVolume fails; `spec.retryLimit` overrides."""
    backoff_base: float = 10.0
    backoff_max: float = 300.0
    stall_timeout: float = 600.0
    """Seconds an import may run without progress before it is ended and retried."""
    progress_interval: float = 2.0
    """Seconds between scrapes of a running importer's metrics."""
    status_interval: float = 5.0
    """At most one progress-only status write per DataVolume in this many seconds."""
    importer_args: tuple[str, ...] = ()
    """Extra `diskflow import` options for every importer (e.g. --min-rate 1048576)."""
    metrics_port: int = 8443
    """Where importer pods serve their metrics (on the pod IP)."""
    termination_grace: int = 30

    def overhead(self, storage_class: str | None) -> float:
        """The filesystem overhead of volumes of `storage_class`."""
        return self.storage_class_overheads.get(storage_class or "", self.filesystem_overhead)

    def backoff(self, restarts: int) -> float:
        """Seconds to wait before attempt `restarts` + 1: doubling, capped."""
        return min(self.backoff_max, self.backoff_base * 2 ** max(0, restarts - 1))
