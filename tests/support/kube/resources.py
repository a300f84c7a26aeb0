"""The resource types the emulated API server serves: built-in ones and those a CRD declares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

VERBS = frozenset(
    {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
)


@dataclass(frozen=True)
class ResourceType:
    """One served group/version/plural, as discovery describes it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    # Custom resources: schema-checked (None: no schema, everything kept), and a PUT must
    # carry a resourceVersion, as the real server's custom-resource strategy demands.
    custom: bool = False
    schema: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def storage_key(self) -> str:
        """The name all versions of this resource share: `pods`, `datavolumes.diskflow.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_kind(self) -> str:
        """How error messages name the kind: `Pod`, `DataVolume.diskflow.io`."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def singular(self) -> str:
        return self.kind.lower()


def _builtin(
    api_version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    sub: tuple[str, ...] = (),
) -> ResourceType:
    group, _, version = api_version.rpartition("/")
    return ResourceType(group, version, plural, kind, namespaced, short, frozenset(sub))


BUILTIN = (
    _builtin("v1", "pods", "Pod", short=("po",), sub=("status", "log")),
    _builtin(
        "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), sub=("status",)
    ),
    _builtin("v1", "secrets", "Secret"),
    _builtin("v1", "configmaps", "ConfigMap", short=("cm",)),
    _builtin("v1", "events", "Event", short=("ev",)),
    _builtin("v1", "services", "Service", short=("svc",), sub=("status",)),
    _builtin("v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
    _builtin("v1", "namespaces", "Namespace", namespaced=False, short=("ns",), sub=("status",)),
    _builtin("v1", "nodes", "Node", namespaced=False, short=("no",), sub=("status",)),
    _builtin("events.k8s.io/v1", "events", "Event", short=("ev",)),
    _builtin(
        "storage.k8s.io/v1", "storageclasses", "StorageClass", namespaced=False, short=("sc",)
    ),
    _builtin("coordination.k8s.io/v1", "leases", "Lease"),
    _builtin(
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short=("crd", "crds"),
        sub=("status",),
    ),
)


def _peering_crd(plural: str, kind: str, scope: str) -> dict[str, Any]:
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


# kopf's own peering resources (kopf/_cogs/structs/references.py), installed as CRDs are.
KOPF_PEERING_CRDS = (
    _peering_crd("kopfpeerings", "KopfPeering", "Namespaced"),
    _peering_crd("clusterkopfpeerings", "ClusterKopfPeering", "Cluster"),
)


def types_from_crd(crd: dict[str, Any]) -> Iterator[ResourceType]:
    """One resource type per served version of a CustomResourceDefinition manifest."""
    spec = crd["spec"]
    names = spec["names"]
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        yield ResourceType(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames", ())),
            subresources=frozenset(version.get("subresources") or {}),
            custom=True,
            schema=schema,
        )
