"""What the API server does with objects, over an in-memory etcd.

One global resourceVersion counter; uids, creation timestamps, generations and generated
names; `/status` kept apart where a resource declares it; 409 on a stale resourceVersion;
finalizers and graceful pod deletion; a watch history per resource (as the server's watch
cache) with 410 for versions older than it keeps. Every change is published to the watches
and to in-process listeners (the controllers and the kubelet stand-in).

Everything here runs on the server's event loop thread and never awaits, so each operation
is atomic without locks; stored objects are never mutated, only replaced.
"""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.kube import objects
from tests.support.kube.objects import now
from tests.support.kube.resources import BUILTIN, ResourceType, types_from_crd
from tests.support.kube.schema import Cause, Schema
from tests.support.kube.selectors import Matcher

Key = tuple[str, str]  # (namespace or "", name)
TERMINAL = ("Succeeded", "Failed")
PVC_PROTECTION = "kubernetes.io/pvc-protection"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


class ApiError(Exception):
    """A failure the server answers with a Kubernetes Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def _details(rt: ResourceType, name: str) -> dict[str, str]:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.storage_key} "{name}" not found', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.storage_key} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(rt, name),
    )


def invalid(rt: ResourceType, name: str, causes: list[Cause]) -> ApiError:
    listed = str(causes[0]) if len(causes) == 1 else "[" + ", ".join(map(str, causes)) + "]"
    details = {
        "name": name,
        "group": rt.group,
        "kind": rt.kind,
        "causes": [cause.as_status_cause() for cause in causes],
    }
    return ApiError(422, "Invalid", f'{rt.qualified_kind} "{name}" is invalid: {listed}', details)


def clone(obj: Any) -> Any:
    """A deep copy of JSON data (faster than copy.deepcopy for it)."""
    return json.loads(json.dumps(obj))


@dataclass(slots=True)
class Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    storage_key: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(eq=False)
class Watch:
    """One open watch: what it selects, and the queue its stream drains (None: close)."""

    rt: ResourceType
    namespace: str | None
    matches: Matcher
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = field(default_factory=asyncio.Queue)

    def translate(self, change: Change) -> tuple[str, dict[str, Any]] | None:
        """The event this watch sees, if any: objects entering or leaving its selection
        arrive as ADDED or DELETED, as the server's watch cache sends them."""
        if self.namespace is not None and change.obj["metadata"].get("namespace") != self.namespace:
            return None
        now_in = self.matches(change.obj)
        if change.type == "MODIFIED" and change.old is not None:
            was_in = self.matches(change.old)
            if now_in != was_in:
                return ("ADDED" if now_in else "DELETED"), change.obj
        return (change.type, change.obj) if now_in else None


@dataclass
class Bucket:
    """All versions of one resource share their objects, history and watches."""

    types: dict[str, ResourceType]
    history: collections.deque[Change]
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    dropped: int = 0  # the newest resourceVersion no longer in history
    watches: set[Watch] = field(default_factory=set)
    schemas: dict[str, Schema] = field(default_factory=dict)


def _key(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def _deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


class Store:
    """The objects, their resource types, and the rules for changing them."""

    def __init__(self, *, history: int = 10_000, pod_grace_period: int = 30) -> None:
        self.rv = 0
        self.history = history
        self.pod_grace_period = pod_grace_period
        self.buckets: dict[str, Bucket] = {}
        self.by_uid: dict[str, tuple[str, Key]] = {}
        self.dependents: dict[str, set[tuple[str, Key]]] = collections.defaultdict(set)
        self.listeners: list[Callable[[Change], None]] = []
        for rt in BUILTIN:
            self.register(rt)

    # Resource types

    def register(self, rt: ResourceType) -> None:
        bucket = self.buckets.get(rt.storage_key)
        if bucket is None:
            history = collections.deque(maxlen=self.history)
            bucket = self.buckets[rt.storage_key] = Bucket({}, history)
        bucket.types[rt.version] = rt
        if rt.schema is not None:
            bucket.schemas[rt.version] = Schema(rt.schema)

    def types(self) -> Iterable[ResourceType]:
        for bucket in self.buckets.values():
            yield from bucket.types.values()

    def resolve(self, group: str, version: str, plural: str) -> ResourceType | None:
        bucket = self.buckets.get(f"{plural}.{group}" if group else plural)
        return bucket.types.get(version) if bucket else None

    def type_of(self, storage_key: str) -> ResourceType:
        return next(iter(self.buckets[storage_key].types.values()))

    def find(self, name: str) -> ResourceType:
        """A type by plural, `plural.group`, short name or kind, as kubectl takes them."""
        lowered = name.lower()
        for rt in self.types():
            if lowered in (rt.storage_key, rt.plural, rt.kind.lower(), *rt.short_names):
                return rt
        raise KeyError(f"no resource type {name!r}")

    # Reading

    def peek(self, storage_key: str, key: Key) -> dict[str, Any] | None:
        bucket = self.buckets.get(storage_key)
        return bucket.objects.get(key) if bucket else None

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.peek(rt.storage_key, (namespace or "", name))
        if obj is None:
            raise not_found(rt, name)
        return obj

    def items(self, storage_key: str, namespace: str | None = None) -> list[dict[str, Any]]:
        objs = self.buckets[storage_key].objects
        keys = sorted(k for k in objs if namespace is None or k[0] == namespace)
        return [objs[k] for k in keys]

    def view(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as the requested version shows it (versions share one schema here)."""
        return (
            obj
            if obj.get("apiVersion") == rt.api_version
            else {**obj, "apiVersion": rt.api_version}
        )

    # Writing

    def create(
        self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        obj = clone(body)
        self._check_type(rt, obj)
        meta = obj.setdefault("metadata", {})
        if meta.get("resourceVersion"):
            raise ApiError(
                400, "BadRequest", "resourceVersion should not be set on objects to be created"
            )
        if rt.namespaced:
            namespace = self._creation_namespace(rt, namespace, meta)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                cause = Cause(
                    "FieldValueRequired",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
                raise invalid(rt, "", [cause])
            meta["name"] = self._generate_name(rt, namespace, meta["generateName"])
        name = meta["name"]
        if self.peek(rt.storage_key, (namespace or "", name)) is not None:
            message = f'{rt.storage_key} "{name}" already exists'
            raise ApiError(409, "AlreadyExists", message, _details(rt, name))
        for system in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(system, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if self._has_generation(rt):
            meta["generation"] = 1
        if "status" in rt.subresources:
            obj.pop("status", None)  # only the status subresource writes status
        obj = self._admit(rt, self._default_on_create(rt, obj))
        if dry_run:
            return obj
        return self._commit(rt, "ADDED", obj, None)

    def replace(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        old = self.get(rt, namespace, name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        meta = body.get("metadata") or {}
        if meta.get("name", name) != name:
            message = (
                f"the name of the object ({meta['name']}) does not match "
                f"the name on the URL ({name})"
            )
            raise ApiError(400, "BadRequest", message)
        if meta.get("resourceVersion"):
            if meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
        elif rt.custom:
            cause = Cause(
                "FieldValueInvalid",
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            )
            raise invalid(rt, name, [cause])
        return self._update(rt, old, clone(body), subresource, dry_run=dry_run)

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        kind: str,
        patch: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """`kind` is "merge", "strategic" or "json"."""
        old = self.get(rt, namespace, name)
        if kind == "strategic" and rt.custom:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml (strategic merge patches do not apply to "
                "custom resources)",
            )
        if kind == "json":
            if not isinstance(patch, list):
                raise ApiError(
                    400,
                    "BadRequest",
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                )
            try:
                patched = objects.json_patch(old, patch)
            except ValueError as exc:
                raise ApiError(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: {exc}",
                ) from exc
            if (
                patched.get("metadata", {}).get("resourceVersion")
                != old["metadata"]["resourceVersion"]
            ):
                raise conflict(rt, name)
        else:
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
            merge = objects.strategic_merge_patch if kind == "strategic" else objects.merge_patch
            patched = merge(clone(old), patch)
        return self._update(rt, old, patched, subresource, dry_run=dry_run)

    def modify(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[dict[str, Any]], None],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """An in-process writer's update (the kubelet's, the controllers'): `change` edits a
        copy of the current object, which is then written as an update would be."""
        old = self.get(rt, namespace, name)
        new = clone(old)
        change(new)
        return self._update(rt, old, new, subresource)

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Delete as the API does; returns the object and whether it is gone already."""
        old = self.get(rt, namespace, name)
        options = options or {}
        preconditions = options.get("preconditions") or {}
        for field_name in ("uid", "resourceVersion"):
            wanted = preconditions.get(field_name)
            if wanted and wanted != old["metadata"][field_name]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field_name} in precondition: "
                    f"{wanted}, {field_name} in object meta: {old['metadata'][field_name]}",
                )
        grace = self._grace_period(rt, old, options.get("gracePeriodSeconds"))
        new = clone(old)
        meta = new["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        policy = options.get("propagationPolicy") or "Background"
        if options.get("orphanDependents") is True:
            policy = "Orphan"
        extra = {"Orphan": "orphan", "Foreground": "foregroundDeletion"}.get(policy)
        if extra and extra not in finalizers and not _deleting(old):
            finalizers.append(extra)
        if rt.storage_key == "namespaces":
            new.setdefault("status", {})["phase"] = "Terminating"
        spec_finalizers = rt.storage_key == "namespaces" and (new.get("spec") or {}).get(
            "finalizers"
        )
        if not finalizers and not spec_finalizers and grace == 0:
            if not dry_run:
                self._commit(rt, "DELETED", new, old)
            return new, True
        if _deleting(old) and grace >= (meta.get("deletionGracePeriodSeconds") or 0):
            return old, False  # already being deleted; a later delete only shortens a grace
        meta["deletionTimestamp"] = now(grace)
        meta["deletionGracePeriodSeconds"] = grace
        meta["finalizers"] = finalizers
        if dry_run:
            return new, False
        return self._commit(rt, "MODIFIED", new, old), False

    def remove(self, rt: ResourceType, namespace: str | None, name: str) -> None:
        """Take an object out whatever its finalizers say (an etcd delete: for tests)."""
        old = self.get(rt, namespace, name)
        self._commit(rt, "DELETED", clone(old), old)

    # Watching

    def watch(
        self, rt: ResourceType, namespace: str | None, matches: Matcher, since: str | None
    ) -> tuple[Watch, list[tuple[str, dict[str, Any]]]]:
        """A registered watch and its backlog: every matching object as ADDED when `since`
        is unset or "0", else the history after `since` (410 if it no longer has it)."""
        bucket = self.buckets[rt.storage_key]
        watch = Watch(rt, namespace, matches)
        if since in (None, "", "0"):
            objs = self.items(rt.storage_key, namespace)
            backlog = [("ADDED", obj) for obj in objs if matches(obj)]
        else:
            try:
                start = int(since)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resource version {since!r}") from None
            if start < bucket.dropped:
                message = f"too old resource version: {start} ({bucket.dropped})"
                raise ApiError(410, "Expired", message)
            events = (watch.translate(change) for change in bucket.history if change.rv > start)
            backlog = [event for event in events if event is not None]
        bucket.watches.add(watch)
        return watch, backlog

    def unwatch(self, watch: Watch) -> None:
        self.buckets[watch.rt.storage_key].watches.discard(watch)

    def close_watches(self) -> None:
        """End every open watch stream, as an API server restart does."""
        for bucket in self.buckets.values():
            for watch in bucket.watches:
                watch.queue.put_nowait(None)

    def compact(self) -> None:
        """Forget all watch history: resuming any watch from an old version gets 410."""
        for bucket in self.buckets.values():
            bucket.history.clear()
            bucket.dropped = self.rv

    # Rules

    def _check_type(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        for field_name, expected in (("apiVersion", rt.api_version), ("kind", rt.kind)):
            given = obj.setdefault(field_name, expected)
            if given != expected:
                message = (
                    f"the {field_name} in the data ({given}) does not match the expected "
                    f"{field_name} ({expected})"
                )
                raise ApiError(400, "BadRequest", message)
        if not isinstance(obj.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")

    def _creation_namespace(self, rt: ResourceType, namespace: str | None, meta: dict) -> str:
        given = meta.get("namespace")
        if namespace and given and given != namespace:
            message = (
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
            raise ApiError(400, "BadRequest", message)
        namespace = namespace or given
        if not namespace:
            raise ApiError(400, "BadRequest", "a namespaced object needs a namespace")
        ns = self.peek("namespaces", ("", namespace))
        if ns is None:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        if _deleting(ns):
            message = (
                f"unable to create new content in namespace {namespace} because it is "
                "being terminated"
            )
            raise ApiError(403, "Forbidden", message)
        return namespace

    def _generate_name(self, rt: ResourceType, namespace: str | None, prefix: str) -> str:
        while True:
            name = objects.generated_name(prefix)
            if self.peek(rt.storage_key, (namespace or "", name)) is None:
                return name

    @staticmethod
    def _has_generation(rt: ResourceType) -> bool:
        return rt.custom or rt.storage_key in (
            "pods",
            "customresourcedefinitions.apiextensions.k8s.io",
        )

    def _default_on_create(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Defaults and admission plugins of the real server that tests may rely on."""
        spec = (
            obj.setdefault("spec", {})
            if rt.storage_key in ("pods", "persistentvolumeclaims")
            else None
        )
        if rt.storage_key == "pods":
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", self.pod_grace_period)
            for container in spec.get("containers") or []:
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                container.setdefault("imagePullPolicy", "IfNotPresent")
            obj["status"] = {"phase": "Pending"}
        elif rt.storage_key == "persistentvolumeclaims":
            spec.setdefault("volumeMode", "Filesystem")
            if "storageClassName" not in spec and (default := self._default_storage_class()):
                spec["storageClassName"] = default  # the DefaultStorageClass admission plugin
            finalizers = obj["metadata"].setdefault("finalizers", [])
            if PVC_PROTECTION not in finalizers:
                finalizers.append(PVC_PROTECTION)
            obj["status"] = {"phase": "Pending"}
        elif rt.storage_key == "namespaces":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj[
                "metadata"
            ]["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        elif rt.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            conditions = [
                {"type": kind, "status": "True", "reason": kind, "lastTransitionTime": now()}
                for kind in ("NamesAccepted", "Established")
            ]
            obj["status"] = {
                "conditions": conditions,
                "acceptedNames": (obj.get("spec") or {}).get("names", {}),
            }
        return obj

    def _default_storage_class(self) -> str | None:
        for sc in self.items("storageclasses.storage.k8s.io"):
            if (sc["metadata"].get("annotations") or {}).get(DEFAULT_CLASS) == "true":
                return sc["metadata"]["name"]
        return None

    def _admit(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Prune, default and validate against the schema; check metadata; 422 if wrong."""
        if rt.storage_key == "secrets":
            objects.fold_string_data(obj)
        causes = objects.metadata_causes(rt.kind, obj)
        schema = self.buckets[rt.storage_key].schemas.get(rt.version)
        if schema is not None:
            obj, schema_causes = schema.admit(obj)
            causes += schema_causes
        if rt.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            causes += self._crd_causes(obj)
        if causes:
            raise invalid(rt, obj["metadata"].get("name", ""), causes)
        return obj

    def _crd_causes(self, crd: dict[str, Any]) -> list[Cause]:
        try:
            names = crd["spec"]["names"]
            expected = f"{names['plural']}.{crd['spec']['group']}"
            list(types_from_crd(crd))
        except (KeyError, TypeError) as exc:
            return [Cause("FieldValueRequired", f"spec.{exc}", "Required value")]
        if crd["metadata"]["name"] != expected:
            return [
                Cause(
                    "FieldValueInvalid",
                    "metadata.name",
                    f'Invalid value: "{crd["metadata"]["name"]}": '
                    'must be spec.names.plural+"."+spec.group',
                )
            ]
        return []

    def _update(
        self,
        rt: ResourceType,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if subresource == "status":
            status = new.get("status")
            new = clone(old)
            new.pop("status", None)
            if status is not None:
                new["status"] = status
        else:
            if "status" in rt.subresources:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = clone(old["status"])
            new.setdefault("apiVersion", old["apiVersion"])
            new.setdefault("kind", old["kind"])
            meta = new.setdefault("metadata", {})
            for system in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ):
                meta.pop(system, None)
                if system in old["metadata"]:
                    meta[system] = old["metadata"][system]
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added and _deleting(old):
                cause = Cause(
                    "FieldValueForbidden",
                    "metadata.finalizers",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                )
                raise invalid(rt, old["metadata"]["name"], [cause])
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new = self._admit(rt, new)
        if self._has_generation(rt) and objects.without(
            new, "metadata", "status"
        ) != objects.without(old, "metadata", "status"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        if new == old or dry_run:
            return new  # a no-op write changes nothing, not even the resourceVersion
        meta = new["metadata"]
        if (
            _deleting(new)
            and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds")
            and not (rt.storage_key == "namespaces" and (new.get("spec") or {}).get("finalizers"))
        ):
            return self._commit(rt, "DELETED", new, old)
        return self._commit(rt, "MODIFIED", new, old)

    def _grace_period(self, rt: ResourceType, obj: dict[str, Any], asked: Any) -> int:
        """Only pods on a node that are still running wait for a grace period."""
        if rt.storage_key != "pods":
            return 0
        if not obj["spec"].get("nodeName") or obj.get("status", {}).get("phase") in TERMINAL:
            return 0
        if asked is None:
            return int(obj["spec"].get("terminationGracePeriodSeconds", self.pod_grace_period))
        return max(int(asked), 0)

    def _commit(
        self, rt: ResourceType, kind: str, new: dict[str, Any], old: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        bucket = self.buckets[rt.storage_key]
        key = _key(new)
        uid = new["metadata"]["uid"]
        if old is not None:
            for ref in old["metadata"].get("ownerReferences") or []:
                if (dependents := self.dependents.get(ref["uid"])) is not None:
                    dependents.discard((rt.storage_key, key))
                    if not dependents:
                        del self.dependents[ref["uid"]]
        if kind == "DELETED":
            del bucket.objects[key]
            del self.by_uid[uid]
        else:
            bucket.objects[key] = new
            self.by_uid[uid] = (rt.storage_key, key)
            for ref in new["metadata"].get("ownerReferences") or []:
                self.dependents[ref["uid"]].add((rt.storage_key, key))
        change = Change(self.rv, kind, rt.storage_key, new, old)
        if len(bucket.history) == bucket.history.maxlen:
            bucket.dropped = bucket.history[0].rv
        bucket.history.append(change)
        for watch in bucket.watches:
            if (event := watch.translate(change)) is not None:
                watch.queue.put_nowait(event)
        if rt.storage_key == "customresourcedefinitions.apiextensions.k8s.io":
            self._crd_changed(change)
        for listener in self.listeners:
            listener(change)
        return new

    def _crd_changed(self, change: Change) -> None:
        """A CRD's types are served from its creation on; its deletion drops its objects."""
        if change.type != "DELETED":
            for rt in types_from_crd(change.obj):
                self.register(rt)
            return
        spec = change.obj["spec"]
        storage_key = f"{spec['names']['plural']}.{spec['group']}"
        bucket = self.buckets.get(storage_key)
        if bucket is None:
            return
        rt = self.type_of(storage_key)
        for obj in list(bucket.objects.values()):
            self._commit(rt, "DELETED", clone(obj), obj)
        for watch in bucket.watches:
            watch.queue.put_nowait(None)
        del self.buckets[storage_key]
