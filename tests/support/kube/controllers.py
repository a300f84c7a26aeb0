"""The kube-controller-manager loops the tests depend on, run beside the emulated API server:
the garbage collector (ownerReferences, propagation policies), the namespace controller
and the PVC protection controller. Like the real ones they act after the write that
triggered them, not within it."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from tests.support.kube.store import PVC_PROTECTION, TERMINAL, ApiError, Change, Key, Store

Work = tuple[str, Any]  # ("owner", uid) | ("namespace", name) | ("claim", (namespace, name))


def _claims(pod: dict[str, Any]) -> list[str]:
    volumes = pod.get("spec", {}).get("volumes") or []
    return [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")
    ]


class Controllers:
    """Listens to every change, queues what to look at, and works the queue in a task."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: collections.deque[Work] = collections.deque()
        self._wake = asyncio.Event()
        store.listeners.append(self._notice)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            done = 0
            while self._queue:
                self._work(self._queue.popleft())
                done += 1
                if done % 100 == 0:
                    await asyncio.sleep(0)  # let requests in during a big cascade

    def _enqueue(self, item: Work) -> None:
        self._queue.append(item)
        self._wake.set()

    def _notice(self, change: Change) -> None:
        meta = change.obj["metadata"]
        if change.type == "DELETED":
            self._enqueue(("owner", meta["uid"]))
        for ref in meta.get("ownerReferences") or []:
            if change.type == "DELETED" or ref["uid"] not in self.store.by_uid:
                self._enqueue(("owner", ref["uid"]))
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp") and {"orphan", "foregroundDeletion"} & set(finalizers):
            self._enqueue(("owner", meta["uid"]))
        namespace = meta.get("namespace")
        if change.storage_key == "namespaces" and meta.get("deletionTimestamp"):
            self._enqueue(("namespace", meta["name"]))
        elif namespace and change.type == "DELETED":
            ns = self.store.peek("namespaces", ("", namespace))
            if ns is not None and ns["metadata"].get("deletionTimestamp"):
                self._enqueue(("namespace", namespace))
        if change.storage_key == "persistentvolumeclaims" and meta.get("deletionTimestamp"):
            self._enqueue(("claim", (namespace, meta["name"])))
        if change.storage_key == "pods" and (
            change.type == "DELETED" or change.obj.get("status", {}).get("phase") in TERMINAL
        ):
            for claim in _claims(change.obj):
                self._enqueue(("claim", (namespace, claim)))

    def _work(self, item: Work) -> None:
        kind, subject = item
        try:
            if kind == "owner":
                self._owner(subject)
            elif kind == "namespace":
                self._namespace(subject)
            else:
                self._claim(subject)
        except ApiError as exc:
            if exc.code not in (404, 409):  # gone or changed meanwhile: a later change re-queues
                raise

    # Garbage collector

    def _owner(self, uid: str) -> None:
        """An owner is gone or being deleted: orphan, delete or wait for its dependents."""
        located = self.store.by_uid.get(uid)
        owner = self.store.peek(*located) if located else None
        dependents = list(self.store.dependents.get(uid, ()))
        if owner is None:
            for storage_key, key in dependents:
                self._dependent(storage_key, key)
            return
        if not owner["metadata"].get("deletionTimestamp"):
            return
        finalizers = owner["metadata"].get("finalizers") or []
        if "orphan" in finalizers:
            for storage_key, key in dependents:
                self._drop_refs(storage_key, key, {uid})
            self._drop_finalizer(located, "orphan")
        elif "foregroundDeletion" in finalizers:
            for storage_key, key in dependents:
                self._dependent(storage_key, key)
            left = self.store.dependents.get(uid, ())
            if not any(self._blocks(storage_key, key, uid) for storage_key, key in left):
                self._drop_finalizer(located, "foregroundDeletion")

    def _blocks(self, storage_key: str, key: Key, uid: str) -> bool:
        obj = self.store.peek(storage_key, key)
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        return any(ref["uid"] == uid and ref.get("blockOwnerDeletion") for ref in refs)

    def _dependent(self, storage_key: str, key: Key) -> None:
        """The garbage collector's attemptToDeleteItem: delete a dependent whose owners are
        all gone, or unlink the gone ones while a live owner remains."""
        obj = self.store.peek(storage_key, key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        solid, gone, waiting = [], set(), set()
        for ref in obj["metadata"].get("ownerReferences") or []:
            located = self.store.by_uid.get(ref["uid"])
            owner = self.store.peek(*located) if located else None
            if owner is None:
                gone.add(ref["uid"])
            elif owner["metadata"].get("deletionTimestamp") and "foregroundDeletion" in (
                owner["metadata"].get("finalizers") or []
            ):
                waiting.add(ref["uid"])
            else:
                solid.append(ref["uid"])
        if not gone and not waiting:
            return
        if solid:
            self._drop_refs(storage_key, key, gone | waiting)
            return
        rt = self.store.type_of(storage_key)
        finalizers = obj["metadata"].get("finalizers") or []
        if waiting and self.store.dependents.get(obj["metadata"]["uid"]):
            policy = "Foreground"
        elif "orphan" in finalizers:
            policy = "Orphan"
        elif "foregroundDeletion" in finalizers:
            policy = "Foreground"
        else:
            policy = "Background"
        self.store.delete(rt, key[0] or None, key[1], {"propagationPolicy": policy})

    def _drop_refs(self, storage_key: str, key: Key, uids: set[str]) -> None:
        def unlink(obj: dict[str, Any]) -> None:
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r["uid"] not in uids]
            obj["metadata"]["ownerReferences"] = refs
            if not refs:
                del obj["metadata"]["ownerReferences"]

        self.store.modify(self.store.type_of(storage_key), key[0] or None, key[1], unlink)

    def _drop_finalizer(self, located: tuple[str, Key], finalizer: str) -> None:
        storage_key, (namespace, name) = located

        def drop(obj: dict[str, Any]) -> None:
            obj["metadata"]["finalizers"] = [
                f for f in obj["metadata"]["finalizers"] if f != finalizer
            ]

        self.store.modify(self.store.type_of(storage_key), namespace or None, name, drop)

    # Namespace controller

    def _namespace(self, name: str) -> None:
        """Delete everything in a terminating namespace; remove it once it is empty."""
        ns = self.store.peek("namespaces", ("", name))
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        namespaced = [key for key in self.store.buckets if self.store.type_of(key).namespaced]
        for storage_key in namespaced:
            rt = self.store.type_of(storage_key)
            for obj in self.store.items(storage_key, name):
                if not obj["metadata"].get("deletionTimestamp"):
                    self.store.delete(rt, name, obj["metadata"]["name"])
        if not any(self.store.items(storage_key, name) for storage_key in namespaced):
            self.store.remove(self.store.type_of("namespaces"), None, name)

    # PVC protection controller

    def _claim(self, key: tuple[str, str]) -> None:
        """A deleted claim keeps its protection finalizer while a running pod uses it."""
        namespace, name = key
        pvc = self.store.peek("persistentvolumeclaims", (namespace, name))
        if pvc is None or not pvc["metadata"].get("deletionTimestamp"):
            return
        if PVC_PROTECTION not in (pvc["metadata"].get("finalizers") or []):
            return
        for pod in self.store.items("pods", namespace):
            if pod.get("status", {}).get("phase") not in TERMINAL and name in _claims(pod):
                return
        self._drop_finalizer(("persistentvolumeclaims", (namespace, name)), PVC_PROTECTION)
