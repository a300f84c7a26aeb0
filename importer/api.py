"""The DataVolume API (diskflow.io/v1beta1) as plain data: spec and status as frozen
dataclasses, read from manifests and written back.

`DataVolume.from_manifest()` reads diskflow's manifests and CDI's (cdi.kubevirt.io/v1beta1),
whose spec diskflow's follows field for field for the sources it imports (http, s3, blank);
`to_manifest()` writes diskflow's. The controller reads DataVolumes and writes their status
through this module, the template pipeline emits its DataVolume through it, and
importer/controller/crd.yaml (`load_crd()`) declares the same fields to the API server.

Reading is strict: every field is checked and an unknown one is refused (a misspelt field
would otherwise be a setting silently ignored). Each error is a `ManifestError` naming the
field's path (`spec.source.http.url`) and never quoting a value that may hold a secret: a URL
(a presigned one carries its signature), a header.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from fractions import Fraction
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

from importer.capacity import DEFAULT_OVERHEAD, MiB, required_volume_size
from importer.checksum import Checksum
from importer.errors import FinalError
from importer.pipeline import ContentType
from importer.quantity import format_quantity, parse_quantity, parse_quantity_exact
from importer.reasons import Reason
from importer.sources.http_options import parse_header

GROUP = "diskflow.io"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DataVolume"
PLURAL = "datavolumes"
SHORT_NAME = "ddv"
CDI_API_VERSION = "cdi.kubevirt.io/v1beta1"

ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
DEFAULT_ACCESS_MODES = ("ReadWriteOnce",)
"""What a PVC made from `spec.storage` gets when the DataVolume names no access mode."""
VOLUME_MODES = ("Filesystem", "Block")
POD_RESOURCES = ("cpu", "memory", "ephemeral-storage")

KEEP_PVC = "diskflow.io/keep-pvc"
"""Annotation: "true" keeps the PVC when the DataVolume is deleted (CDI has no equivalent)."""
BIND_IMMEDIATELY = "cdi.kubevirt.io/storage.bind.immediate.requested"
"""CDI's annotation: its presence (any value, as CDI reads it) starts the import without
waiting for a first consumer on a WaitForFirstConsumer storage class."""
RETAIN_POD = "cdi.kubevirt.io/storage.pod.retainAfterCompletion"
"""CDI's annotation: "true" keeps the importer pod after the import (its logs, for debugging)."""

VolumeMode = Literal["Filesystem", "Block"]
StorageKind = Literal["storage", "pvc"]

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_REGION = re.compile(r"[A-Za-z0-9][-_.A-Za-z0-9]*")
_PROGRESS = re.compile(r"N/A|[0-9]{1,3}(\.[0-9]+)?%")
_CONNECTIONS = (1, 32)  # as `diskflow import --connections`

_SOURCES = ("http", "s3", "blank")
_REFUSED_SOURCES = {
    kind: f"diskflow does not import from {what}: it imports from http, s3 and blank sources"
    for kind, what in (
        ("gcs", "Google Cloud Storage (a public object: use http with its "
                "https://storage.googleapis.com/BUCKET/OBJECT URL)"),
        ("registry", "container registries"),
        ("pvc", "other PVCs (clones)"),
        ("snapshot", "VolumeSnapshots"),
        ("upload", "uploads"),
        ("imageio", "oVirt imageio"),
        ("vddk", "VMware (VDDK)"),
    )
}  # fmt: skip
_REFUSED_SPEC = {
    "sourceRef": "diskflow does not resolve DataSource references: name the image's source in "
    "spec.source (http, s3 or blank)",
    "checkpoints": "diskflow does not support multi-stage imports (checkpoints)",
    "finalCheckpoint": "diskflow does not support multi-stage imports (checkpoints)",
}
_POPULATED = "diskflow does not fill volumes populated from a data source"
_REFUSED_VOLUME = {
    "dataSource": _POPULATED,
    "dataSourceRef": _POPULATED,
    "volumeAttributesClassName": "diskflow does not support volume attributes classes",
}
_VOLUME_KINDS: tuple[StorageKind, ...] = ("storage", "pvc")
_VOLUME_FIELDS = (
    "accessModes", "resources", "storageClassName", "volumeMode", "volumeName", "selector"
)  # fmt: skip

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


class ManifestError(FinalError):
    """A manifest diskflow cannot use; `field` is the path of what is wrong
    (`spec.source.http.url`), and the message starts with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(Reason.INVALID_MANIFEST, f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[ManifestError], tuple[str, str]]:
        return type(self), (self.field, self.problem)


# --- spec -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HttpSource:
    """CDI's http source."""

    KIND: ClassVar[str] = "http"
    url: str
    secret_ref: str | None = None
    """A Secret whose `accessKeyId` and `secretKey` are the basic-auth user and password."""
    cert_config_map: str | None = None
    """A ConfigMap holding the CA bundle to trust."""
    extra_headers: tuple[str, ...] = ()
    """"Name: value" lines, sent with every request (redirects included)."""
    secret_extra_headers: tuple[str, ...] = ()
    """Secrets whose values are header lines, sent only to the URL's own host."""
    checksum: str | None = None
    """ALG:HEX of the bytes as downloaded."""
    insecure_skip_verify: bool = False

    def to_manifest(self) -> dict[str, Any]:
        """The source's fields as CDI writes them."""
        return _plain(self, drop_falsy=True)


@dataclass(frozen=True, kw_only=True)
class S3Source:
    """CDI's s3 source (url, secretRef, certConfigMap) plus diskflow's endpoint, region and
    checksum. The url is CDI's https://host/bucket/key, or s3://bucket/key at `endpoint`."""

    KIND: ClassVar[str] = "s3"
    url: str
    secret_ref: str | None = None
    """A Secret with `accessKeyId` and `secretKey`; without it, the pod's ambient credentials."""
    cert_config_map: str | None = None
    endpoint: str | None = None
    """The store of an s3:// url (default AWS)."""
    region: str | None = None
    checksum: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The source's fields as CDI writes them, diskflow's additions after."""
        return _plain(self, drop_falsy=True)


@dataclass(frozen=True, kw_only=True)
class BlankSource:
    """An empty disk of the requested size."""

    KIND: ClassVar[str] = "blank"

    def to_manifest(self) -> dict[str, Any]:
        """`{}`, as CDI writes it."""
        return {}


Source = HttpSource | S3Source | BlankSource


@dataclass(frozen=True, kw_only=True)
class Storage:
    """The volume to fill: CDI's `spec.storage` (kind "storage") or `spec.pvc` (kind "pvc", a
    PVC spec used as written)."""

    request: int
    """Bytes of `resources.requests.storage`: the space the image needs."""
    storage_class_name: str | None = None
    """None: the default class; "": no class (bind to a PV without one)."""
    access_modes: tuple[str, ...] = ()
    volume_mode: VolumeMode | None = None
    """None: Filesystem, Kubernetes' default."""
    volume_name: str | None = None
    selector: dict[str, Any] | None = None
    kind: StorageKind = "storage"

    @property
    def block(self) -> bool:
        """True for a Block volume: the image goes to the raw device, not to disk.img."""
        return self.volume_mode == "Block"

    def pvc_size(self, *, overhead: float = DEFAULT_OVERHEAD) -> int:
        """Bytes the PVC asks for. From `spec.storage`: the request plus the filesystem's
        overhead on a Filesystem volume (importer.capacity). From `spec.pvc`: the request as
        written — CDI copies a pvc spec verbatim, so its importer may get less than the
        request, as in CDI."""
        if self.kind == "pvc":
            return self.request
        return required_volume_size(self.request, overhead=overhead, block=self.block)

    def pvc_spec(self, size: int) -> dict[str, Any]:
        """The spec of the PVC to create, asking for `size` bytes (see `pvc_size`)."""
        spec: dict[str, Any] = {
            "accessModes": list(self.access_modes or DEFAULT_ACCESS_MODES),
            "resources": {"requests": {"storage": format_quantity(size)}},
        }
        return spec | self._claim_fields()

    def to_manifest(self) -> dict[str, Any]:
        """`spec.storage` or `spec.pvc` (see `kind`) as written."""
        manifest: dict[str, Any] = (
            {"accessModes": list(self.access_modes)} if self.access_modes else {}
        )
        manifest["resources"] = {"requests": {"storage": format_quantity(self.request)}}
        return manifest | self._claim_fields()

    def _claim_fields(self) -> dict[str, Any]:
        claim: dict[str, Any] = {}
        if self.storage_class_name is not None:
            claim["storageClassName"] = self.storage_class_name
        if self.volume_mode:
            claim["volumeMode"] = self.volume_mode
        if self.volume_name:
            claim["volumeName"] = self.volume_name
        if self.selector:
            claim["selector"] = copy.deepcopy(self.selector)  # the model stays as it is
        return claim


@dataclass(frozen=True, kw_only=True)
class Spec:
    """What to import into which volume, and how."""

    source: Source
    storage: Storage
    content_type: ContentType = ContentType.KUBEVIRT
    preallocation: bool = False
    priority_class_name: str | None = None
    service_account_name: str | None = None
    """The importer pod's service account: S3 credentials from its identity (IRSA, workload
    identity) instead of a Secret."""
    resources: dict[str, dict[str, str]] | None = None
    """diskflow: the importer pod's {"requests": {...}, "limits": {...}} (cpu, memory,
    ephemeral-storage); None: the controller's defaults."""
    retry_limit: int | None = None
    """diskflow: transient failures retried before the import fails; None: the controller's."""
    connections: int | None = None
    """diskflow: parallel ranged GETs (`diskflow import --connections`); None: its default."""

    @classmethod
    def from_manifest(cls, spec: Any) -> Spec:
        """The spec of a DataVolume manifest (diskflow's or CDI's)."""
        if spec is None:
            raise ManifestError("spec", "is required")
        known = (*_VOLUME_KINDS, "source", "contentType", "preallocation", "priorityClassName",
                 "serviceAccountName", "resources", "retryLimit", "connections")  # fmt: skip
        r = _Fields(spec, "spec", known, refused=_REFUSED_SPEC)
        source = _source(r.child("source", _SOURCES, refused=_REFUSED_SOURCES, required=True))
        storage = _storage(r)
        content_type = r.enum("contentType", ContentType) or ContentType.KUBEVIRT
        if content_type is ContentType.ARCHIVE and isinstance(source, BlankSource):
            raise ManifestError(
                r.at("contentType"),
                "archive goes with an http or s3 source: a blank disk holds no archive",
            )
        if content_type is ContentType.ARCHIVE and storage.block:
            raise ManifestError(
                r.at("contentType"),
                "archive is extracted into a filesystem: not into a Block volume",
            )
        return cls(
            source=source,
            storage=storage,
            content_type=content_type,
            preallocation=r.flag("preallocation") or False,
            priority_class_name=r.name("priorityClassName"),
            service_account_name=r.name("serviceAccountName"),
            resources=_pod_resources(r.child("resources", ("requests", "limits"))),
            retry_limit=r.number("retryLimit", low=0),
            connections=r.number("connections", low=_CONNECTIONS[0], high=_CONNECTIONS[1]),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The spec as a manifest writes it: CDI's fields, then diskflow's; defaults left out."""
        spec: dict[str, Any] = {
            "source": {self.source.KIND: self.source.to_manifest()},
            self.storage.kind: self.storage.to_manifest(),
        }
        if self.content_type is not ContentType.KUBEVIRT:
            spec["contentType"] = str(self.content_type)
        optional = {
            "preallocation": self.preallocation or None,
            "priorityClassName": self.priority_class_name,
            "serviceAccountName": self.service_account_name,
            "resources": copy.deepcopy(self.resources),
            "retryLimit": self.retry_limit,
            "connections": self.connections,
        }
        return spec | {key: value for key, value in optional.items() if value is not None}


# --- status -----------------------------------------------------------------------------


class Phase(StrEnum):
    """CDI's DataVolume phases, those of an import."""

    PENDING = "Pending"
    WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"
    PVC_BOUND = "PVCBound"
    IMPORT_SCHEDULED = "ImportScheduled"
    IMPORT_IN_PROGRESS = "ImportInProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PAUSED = "Paused"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, kw_only=True)
class Condition:
    """One of CDI's conditions: Bound, Running, Ready."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    """RFC 3339, as Kubernetes writes times."""
    last_heartbeat_time: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Condition:
        """A condition as the status holds it."""
        r = _Fields(data, path, _camel_fields(cls))
        return cls(
            type=r.text("type", required=True),
            status=r.choice("status", ("True", "False", "Unknown"), required=True),
            reason=r.text("reason", keep_empty=True),
            message=r.text("message", keep_empty=True),
            last_transition_time=r.text("lastTransitionTime"),
            last_heartbeat_time=r.text("lastHeartbeatTime"),
        )


@dataclass(frozen=True, kw_only=True)
class ImportSummary:
    """What a successful import did (from the importer's termination message)."""

    format: str
    compression: str
    checksum_verified: bool
    size: int
    """Bytes of the image written (an archive: of file data extracted)."""
    bytes_downloaded: int
    path: str = "stream"
    """"stream" (written as it downloaded) or "scratch" (through scratch space and qemu-img)."""
    fallback: str | None = None
    """Why an image of a format that streams went through scratch space."""

    @classmethod
    def from_dict(cls, data: Any, path: str) -> ImportSummary:
        """The summary as the status holds it."""
        r = _Fields(data, path, _camel_fields(cls))
        return cls(
            format=r.text("format", required=True),
            compression=r.text("compression", required=True),
            checksum_verified=r.flag("checksumVerified", required=True),
            size=r.number("size", low=0, required=True),
            bytes_downloaded=r.number("bytesDownloaded", low=0, required=True),
            path=r.text("path") or "stream",
            fallback=r.text("fallback"),
        )


@dataclass(frozen=True, kw_only=True)
class Status:
    """CDI's status fields, then diskflow's."""

    phase: Phase | None = None
    """None until the controller first writes one (CDI's empty phase)."""
    progress: str = "N/A"
    """"NN.NN%", or "N/A" while the size is unknown."""
    restart_count: int = 0
    claim_name: str | None = None
    conditions: tuple[Condition, ...] = ()
    stage: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    throughput: int | None = None
    """Bytes per second."""
    reason: str | None = None
    """An importer.reasons.Reason, or a reason of the controller's (waiting, retrying)."""
    message: str | None = None
    result: ImportSummary | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "status") -> Status:
        """The status as the API server holds it (camelCase). Its strings are read as written,
        "" included, so that what the controller wrote compares equal to what it reads back."""
        r = _Fields(data, path, _camel_fields(cls))
        progress = r.text("progress") or "N/A"
        if not _PROGRESS.fullmatch(progress):
            raise ManifestError(r.at("progress"), f"must be NN.NN% or N/A, not {progress!r}")
        result = r.get("result")
        return cls(
            phase=r.enum("phase", Phase),
            progress=progress,
            restart_count=r.number("restartCount", low=0) or 0,
            claim_name=r.text("claimName"),
            conditions=tuple(
                Condition.from_dict(item, f"{r.at('conditions')}[{n}]")
                for n, item in enumerate(r.items("conditions"))
            ),
            stage=r.text("stage", keep_empty=True),
            bytes_done=r.number("bytesDone", low=0),
            bytes_total=r.number("bytesTotal", low=0),
            throughput=r.number("throughput", low=0),
            reason=r.text("reason", keep_empty=True),
            message=r.text("message", keep_empty=True),
            result=None if result is None else ImportSummary.from_dict(result, r.at("result")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The status as the API server holds it: camelCase, unset fields left out."""
        return _plain(self)

    def to_patch(self, before: Status | None = None) -> dict[str, Any]:
        """A JSON merge patch from `before` to this status: changed fields, and null for those
        no longer set — a merge patch leaves out a field it does not name, so a reason or
        message cleared in the model would otherwise stay on the object."""
        now, then = self.to_dict(), before.to_dict() if before else {}
        patch: dict[str, Any] = {key: None for key in then if key not in now}
        return patch | {key: value for key, value in now.items() if then.get(key) != value}


# --- the object -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataVolume:
    """A DataVolume: its identity, the annotations that carry behaviour, spec and status."""

    name: str
    spec: Spec
    namespace: str | None = None
    uid: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    status: Status | None = None

    @classmethod
    def from_manifest(cls, manifest: Any) -> DataVolume:
        """A DataVolume from diskflow's manifest or CDI's; ManifestError names what is wrong.
        Of `metadata` only name, namespace, uid, labels and annotations are read: the rest is
        the API server's."""
        r = _Fields(manifest, "", ("apiVersion", "kind", "metadata", "spec", "status"))
        if (api_version := r.get("apiVersion")) not in (API_VERSION, CDI_API_VERSION):
            raise ManifestError(
                "apiVersion",
                f"must be {API_VERSION} or CDI's {CDI_API_VERSION}, not {api_version!r}",
            )
        if (kind := r.get("kind")) != KIND:
            raise ManifestError("kind", f"must be {KIND}, not {kind!r}")
        meta = r.child("metadata", None, required=True)
        annotations = meta.strings("annotations")
        if annotations.get(KEEP_PVC, "false") not in ("true", "false"):
            raise ManifestError(f"metadata.annotations[{KEEP_PVC}]", 'must be "true" or "false"')
        status = r.get("status")
        return cls(
            name=meta.name("name", required=True),
            namespace=meta.name("namespace", pattern=_DNS_LABEL, limit=63),
            uid=meta.text("uid"),
            labels=meta.strings("labels"),
            annotations=annotations,
            spec=Spec.from_manifest(r.get("spec")),
            status=None if status is None else Status.from_dict(status),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The manifest in diskflow's API (diskflow.io/v1beta1), keys in the order Kubernetes
        shows them."""
        metadata: dict[str, Any] = {"name": self.name}
        for key, value in (
            ("namespace", self.namespace),
            ("uid", self.uid),
            ("labels", self.labels),
            ("annotations", self.annotations),
        ):
            if value:
                metadata[key] = dict(value) if isinstance(value, dict) else value
        manifest = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": metadata,
            "spec": self.spec.to_manifest(),
        }
        return manifest | ({"status": self.status.to_dict()} if self.status else {})

    @property
    def keep_pvc(self) -> bool:
        """Keep the PVC when the DataVolume is deleted (annotation diskflow.io/keep-pvc)."""
        return self.annotations.get(KEEP_PVC) == "true"

    @property
    def bind_immediately(self) -> bool:
        """Import without waiting for a first consumer (CDI's bind.immediate.requested)."""
        return BIND_IMMEDIATELY in self.annotations

    @property
    def retain_pod(self) -> bool:
        """Keep the importer pod after the import (CDI's pod.retainAfterCompletion)."""
        return self.annotations.get(RETAIN_POD) == "true"


def is_dns_subdomain(name: str) -> bool:
    """True for a valid name of a Kubernetes object (a DataVolume, a PVC, a Secret)."""
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


# --- the CRD ----------------------------------------------------------------------------


def crd_path() -> Traversable:
    """importer/controller/crd.yaml, wherever the package is installed."""
    return resources.files("importer") / "controller" / "crd.yaml"


def load_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of diskflow.io's DataVolume, as its file has it."""
    import yaml  # for the controller and tools: an importer pod never reads the CRD

    return yaml.safe_load(crd_path().read_text())


def crd_schema(crd: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's served version (`crd` or `load_crd()`)."""
    versions = (crd or load_crd())["spec"]["versions"]
    return next(v for v in versions if v["name"] == VERSION)["schema"]["openAPIV3Schema"]


# --- reading ----------------------------------------------------------------------------


class _Fields:
    """One object of a manifest, read field by field: each getter names the field it refuses.
    `known` are its fields (None: any); a field of `refused` is refused with its message."""

    def __init__(
        self,
        value: Any,
        path: str,
        known: Iterable[str] | None,
        *,
        refused: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        if not isinstance(value, dict):
            raise ManifestError(path or "the manifest", f"must be an object, not {_what(value)}")
        self._value: dict[Any, Any] = value
        for key in value:
            if refused and key in refused:
                raise ManifestError(self.at(key), refused[key])
        if known is not None:
            names = tuple(known)
            for key in value:
                if key not in names:
                    raise ManifestError(self.at(key), f"unknown field (known: {', '.join(names)})")

    def at(self, key: object) -> str:
        """The path of field `key`."""
        return f"{self.path}.{key}" if self.path else str(key)

    def get(self, key: str) -> Any:
        """The raw value; None when absent or null (the API server drops nulls)."""
        return self._value.get(key)

    def typed(self, key: str, kind: type[T], what: str, *, required: bool = False) -> T | None:
        """The value if of `kind` (`what` names it in errors); None when absent."""
        value = self.get(key)
        if value is None:
            if required:
                raise ManifestError(self.at(key), "is required")
            return None
        # YAML's true is an int to Python: a flag is no number, a number no flag.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(self.at(key), f"must be {what}, not {_what(value)}")
        return value

    def text(self, key: str, *, required: bool = False, keep_empty: bool = False) -> Any:
        """A string; "" is absent (as CDI reads it) unless `keep_empty`."""
        value = self.typed(key, str, "a string", required=required)
        if value == "" and not keep_empty:
            if required:
                raise ManifestError(self.at(key), "is required")
            return None
        return value

    def name(
        self, key: str, *, required: bool = False, pattern: re.Pattern[str] = _DNS_SUBDOMAIN,
        limit: int = 253,
    ) -> Any:  # fmt: skip
        """The name of a Kubernetes object."""
        value = self.text(key, required=required)
        if value is not None:
            _check_name(self.at(key), value, pattern, limit)
        return value

    def flag(self, key: str, *, required: bool = False) -> Any:
        """A boolean."""
        return self.typed(key, bool, "true or false", required=required)

    def number(self, key: str, *, low: int, high: int | None = None, required: bool = False) -> Any:
        """A whole number from `low` to `high`."""
        value = self.typed(key, int, "a whole number", required=required)
        if value is not None and (value < low or (high is not None and value > high)):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ManifestError(self.at(key), f"must be {bounds}, not {value}")
        return value

    def choice(self, key: str, allowed: Iterable[str], *, required: bool = False) -> Any:
        """One of the strings `allowed` ("" is no more allowed than any other)."""
        value = self.typed(key, str, "a string", required=required)
        if value is not None and value not in allowed:
            choices = ", ".join(allowed)
            raise ManifestError(self.at(key), f"must be one of {choices}, not {value!r}")
        return value

    def enum(self, key: str, kind: type[E]) -> E | None:
        """A member of an enumeration, by value."""
        value = self.choice(key, [str(member.value) for member in kind])
        return None if value is None else kind(value)

    def items(self, key: str) -> list[Any]:
        """A list (empty when absent)."""
        return self.typed(key, list, "a list") or []

    def texts(self, key: str) -> tuple[str, ...]:
        """A list of strings."""
        found = self.items(key)
        for n, item in enumerate(found):
            if not isinstance(item, str):
                raise ManifestError(f"{self.at(key)}[{n}]", f"must be a string, not {_what(item)}")
        return tuple(found)

    def strings(self, key: str) -> dict[str, str]:
        """A map of strings to strings (labels, annotations)."""
        found = self.typed(key, dict, "an object") or {}
        for name, value in found.items():
            if not isinstance(value, str):
                hint = (
                    f' (quote it: "{str(value).lower()}")' if isinstance(value, bool | int) else ""
                )
                raise ManifestError(f"{self.at(key)}[{name}]", f"must be a string{hint}")
        return dict(found)

    def child(
        self,
        key: str,
        known: Iterable[str] | None,
        *,
        refused: Mapping[str, str] | None = None,
        required: bool = False,
    ) -> Any:
        """A nested object, or None when absent."""
        value = self.get(key)
        if value is None:
            if required:
                raise ManifestError(self.at(key), "is required")
            return None
        return _Fields(value, self.at(key), known, refused=refused)


def _source(r: _Fields) -> Source:
    given = [kind for kind in _SOURCES if r.get(kind) is not None]
    if len(given) != 1:
        problem = "has none" if not given else f"has {' and '.join(given)}"
        raise ManifestError(r.path, f"needs exactly one of http, s3 and blank: {problem}")
    kind = given[0]
    if kind == "blank":
        r.child("blank", ())
        return BlankSource()
    if kind == "http":
        http = r.child("http", (
            "url", "secretRef", "certConfigMap", "extraHeaders", "secretExtraHeaders",
            "checksum", "insecureSkipVerify",
        ))  # fmt: skip
        source = HttpSource(
            url=_url(http, ("http", "https"))[0],
            secret_ref=http.name("secretRef"),
            cert_config_map=http.name("certConfigMap"),
            extra_headers=tuple(
                _header(f"{http.at('extraHeaders')}[{n}]", line)
                for n, line in enumerate(http.texts("extraHeaders"))
            ),
            secret_extra_headers=_names(http, "secretExtraHeaders"),
            checksum=_checksum(http),
            insecure_skip_verify=http.flag("insecureSkipVerify") or False,
        )
        if source.insecure_skip_verify and source.cert_config_map:
            raise ManifestError(
                http.at("insecureSkipVerify"), "verifying nothing contradicts certConfigMap"
            )
        return source
    s3 = r.child("s3", ("url", "secretRef", "certConfigMap", "endpoint", "region", "checksum"))
    text, url = _url(s3, ("https", "http", "s3"))
    bucket, _, key = (
        url.netloc + url.path if url.scheme == "s3" else url.path.lstrip("/")
    ).partition("/")
    if not bucket or not key.strip("/"):
        raise ManifestError(
            s3.at("url"), "must name a bucket and a key: https://HOST/BUCKET/KEY or s3://BUCKET/KEY"
        )
    endpoint = None
    if s3.text("endpoint") is not None:
        endpoint = _url(s3, ("https", "http"), key="endpoint", origin=True)[0]
    if endpoint and url.scheme != "s3":
        raise ManifestError(
            s3.at("endpoint"), "is for an s3:// url: an https:// url names its store itself"
        )
    region = s3.text("region")
    if region is not None and not _REGION.fullmatch(region):
        raise ManifestError(s3.at("region"), f"{region!r} is not a region name")
    return S3Source(
        url=text,
        secret_ref=s3.name("secretRef"),
        cert_config_map=s3.name("certConfigMap"),
        endpoint=endpoint,
        region=region,
        checksum=_checksum(s3),
    )


def _url(
    r: _Fields, schemes: tuple[str, ...], *, key: str = "url", origin: bool = False
) -> tuple[str, SplitResult]:
    """The URL at `key`, and its parts; errors never quote it (a presigned URL's query is a
    credential)."""
    path, url = r.at(key), r.text(key, required=True)
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in schemes:
        starts = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ManifestError(path, f"must be a URL starting with {starts}")
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ManifestError(path, "has white space or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a property that checks the port)
    except ValueError:
        raise ManifestError(path, "is not a valid URL (its host or port)") from None
    if "@" in parts.netloc:
        raise ManifestError(
            path, "carries a user name or password: put them in a Secret named by secretRef"
        )
    if not parts.netloc:
        raise ManifestError(path, "has no host" if scheme != "s3" else "has no bucket")
    if origin and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ManifestError(path, "must be SCHEME://HOST[:PORT] with no path or query")
    return url, parts


def _header(path: str, line: str) -> str:
    name, value = _parsed(path, lambda text: parse_header(text, where="this entry"), line)
    return f"{name}: {value}"


def _checksum(r: _Fields) -> str | None:
    text = r.text("checksum")
    return None if text is None else str(_parsed(r.at("checksum"), Checksum.parse, text))


def _names(r: _Fields, key: str) -> tuple[str, ...]:
    found = r.texts(key)
    for n, name in enumerate(found):
        _check_name(f"{r.at(key)}[{n}]", name, _DNS_SUBDOMAIN, 253)
    return found


def _check_name(path: str, name: str, pattern: re.Pattern[str], limit: int) -> None:
    if len(name) > limit or not pattern.fullmatch(name):
        dots = "" if pattern is _DNS_LABEL else " and '.'"
        raise ManifestError(
            path,
            f"{name!r} is not a Kubernetes name (lowercase letters, digits, '-'{dots}; "
            f"at most {limit} characters)",
        )


def _storage(spec: _Fields) -> Storage:
    given = [kind for kind in _VOLUME_KINDS if spec.get(kind) is not None]
    if len(given) != 1:
        problem = "has neither" if not given else "has both"
        raise ManifestError(spec.path, f"needs exactly one of storage and pvc: {problem}")
    kind = given[0]
    r = spec.child(kind, _VOLUME_FIELDS, refused=_REFUSED_VOLUME)
    resources = r.child("resources", ("requests",), required=True, refused={
        "limits": "diskflow sizes a volume by requests.storage alone",
    })  # fmt: skip
    requests = resources.child("requests", ("storage",), required=True)
    modes = r.texts("accessModes")
    for n, mode in enumerate(modes):
        if mode not in ACCESS_MODES:
            raise ManifestError(
                f"{r.at('accessModes')}[{n}]", f"must be one of {', '.join(ACCESS_MODES)}"
            )
    if kind == "pvc" and not modes:
        raise ManifestError(r.at("accessModes"), "a PVC spec needs at least one access mode")
    return Storage(
        request=_request(requests),
        storage_class_name=r.text("storageClassName", keep_empty=True),
        access_modes=modes,
        volume_mode=r.choice("volumeMode", VOLUME_MODES),
        volume_name=r.text("volumeName"),
        selector=_selector(r.child("selector", ("matchLabels", "matchExpressions"))),
        kind=kind,
    )


def _request(requests: _Fields) -> int:
    path, value = requests.at("storage"), requests.get("storage")
    if value is None:
        raise ManifestError(path, "is required: the size the image needs (10Gi)")
    size = _parsed(path, parse_quantity, _quantity_text(path, value))
    if size < MiB:
        raise ManifestError(path, f"{value} is under the 1Mi a volume needs at least")
    return size


def _quantity_text(path: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ManifestError(
            path, f"must be a quantity (10Gi) or a whole number, not {_what(value)}"
        )
    return str(value)


def _selector(r: _Fields | None) -> dict[str, Any] | None:
    if r is None:
        return None
    selector: dict[str, Any] = {}
    if labels := r.strings("matchLabels"):
        selector["matchLabels"] = labels
    expressions = []
    for n, item in enumerate(r.items("matchExpressions")):
        e = _Fields(item, f"{r.at('matchExpressions')}[{n}]", ("key", "operator", "values"))
        operator = e.choice("operator", ("In", "NotIn", "Exists", "DoesNotExist"), required=True)
        expression = {"key": e.text("key", required=True), "operator": operator}
        expressions.append(
            expression | ({"values": list(values)} if (values := e.texts("values")) else {})
        )
    if expressions:
        selector["matchExpressions"] = expressions
    return selector


def _pod_resources(r: _Fields | None) -> dict[str, dict[str, str]] | None:
    if r is None:
        return None
    found: dict[str, dict[str, str]] = {}
    exact: dict[tuple[str, str], Fraction] = {}
    for kind in ("requests", "limits"):
        amounts = r.child(kind, POD_RESOURCES)
        if amounts is None:
            continue
        found[kind] = {}
        for resource in POD_RESOURCES:
            value = amounts.get(resource)
            if value is None:
                continue
            path = amounts.at(resource)
            text = _quantity_text(path, value)
            exact[kind, resource] = _parsed(path, parse_quantity_exact, text)
            if exact[kind, resource] < 0:
                raise ManifestError(path, "must not be negative")
            found[kind][resource] = text
    for resource in POD_RESOURCES:
        limit = exact.get(("limits", resource))
        if limit is not None and exact.get(("requests", resource), 0) > limit:
            raise ManifestError(r.at(f"requests.{resource}"), "is above its limit")
    return found


def _parsed(path: str, parse: Callable[[str], T], text: str) -> T:
    """`parse(text)` with its error moved to the field at `path`."""
    try:
        return parse(text)
    except ManifestError:
        raise
    except FinalError as exc:
        raise ManifestError(path, exc.message) from None


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --- writing ----------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _camel_fields(cls: type) -> tuple[str, ...]:
    return tuple(_camel(f.name) for f in fields(cls))


def _plain(obj: Any, *, drop_falsy: bool = False) -> dict[str, Any]:
    """A dataclass as a camelCase dict of plain values, unset (None) fields and empty lists left
    out, and with `drop_falsy` also empty strings and false (CDI's omitempty)."""
    plain: dict[str, Any] = {}
    for f in fields(obj):
        value = _plain_value(getattr(obj, f.name))
        if value is None or value == [] or (drop_falsy and not value):
            continue
        plain[_camel(f.name)] = value
    return plain


def _plain_value(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(value)
    if isinstance(value, tuple):
        return [_plain_value(item) for item in value]
    if isinstance(value, Enum):
        return str(value.value)
    return value
