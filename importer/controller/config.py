"""What a cluster operator configures once for every DataVolume the controller handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval
from pydantic import BeforeValidator

from importer.capacity import DEFAULT_OVERHEAD
from importer.errors import FinalError
from importer.quantity import parse_duration


def _seconds(value: object) -> object:
    """A duration string in seconds, as the command line's options read it; anything else is
    left to the field's type to check."""
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value)
    except FinalError as e:
        raise ValueError(e.message) from None  # pydantic collects ValueErrors, per setting


# The types below are what `diskflow controller --config` checks a file against (pydantic);
# code constructing a ControllerConfig directly passes plain numbers.
Seconds = Annotated[float, BeforeValidator(_seconds), Ge(0)]
"""A time in seconds; the config file may also give it as a duration: 90s, 10m, 1h30m, 250ms."""
WholeSeconds = Annotated[int, BeforeValidator(_seconds), Ge(0)]
"""Seconds where Kubernetes takes only whole ones; a duration too (2m, not 1.5s)."""
Count = Annotated[int, Ge(0)]
Overhead = Annotated[float, Interval(ge=0, le=0.99)]
Port = Annotated[int, Interval(ge=1, le=65535)]


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """The controller's settings; every one has a default that works on a plain cluster."""

    image: str = "diskflow:latest"
    """The importer pods' image (holds `diskflow` and qemu-img)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
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
    filesystem_overhead: Overhead = DEFAULT_OVERHEAD
    storage_class_overheads: dict[str, Overhead] = field(default_factory=dict)
    """Filesystem overhead per storage class, where it differs from the default."""
    scratch_storage_class: str | None = None
    """Scratch space as a PVC of this class; None: an emptyDir with a size limit."""
    probe: bool = True
    """Open the source from the controller to learn whether scratch space is needed; off
    (no network from the controller): every non-blank, non-archive import gets scratch."""
    probe_timeout: Annotated[Seconds, Gt(0)] = 30.0
    max_imports: Count = 20
    """Importer pods at once, cluster-wide (0: no limit)."""
    max_imports_per_host: Count = 4
    """Importer pods at once reading from the same source host (0: no limit)."""
    retry_limit: Count = 5
    """Transient failures before a DataVolume fails; `spec.retryLimit` overrides."""
    backoff_base: Seconds = 10.0
    backoff_max: Seconds = 300.0
    stall_timeout: Annotated[Seconds, Ge(1)] = 600.0
    """Seconds an import may run without progress before it is ended and retried."""
    progress_interval: Annotated[Seconds, Ge(0.1)] = 2.0
    """Seconds between scrapes of a running importer's metrics."""
    status_interval: Seconds = 5.0
    """At most one progress-only status write per DataVolume in this many seconds."""
    importer_args: tuple[str, ...] = ()
    """Extra `diskflow import` options for every importer (e.g. --min-rate 1048576)."""
    metrics_port: Port = 8443
    """Where importer pods serve their metrics (on the pod IP)."""
    termination_grace: WholeSeconds = 30
    """Whole seconds an importer pod has to stop (its terminationGracePeriodSeconds)."""

    def overhead(self, storage_class: str | None) -> float:
        """The filesystem overhead of volumes of `storage_class`."""
        return self.storage_class_overheads.get(storage_class or "", self.filesystem_overhead)

    def backoff(self, restarts: int) -> float:
        """Seconds to wait before attempt `restarts` + 1: doubling, capped."""
        return min(self.backoff_max, self.backoff_base * 2 ** max(0, restarts - 1))
