"""The controller's picture of the cluster: DataVolumes, their PVCs and importer pods, as
the watches and the controller's own writes last showed them.

Watch events can lag behind the controller's own writes (the event of an earlier change may
arrive after the response of a later one), so an object is replaced only by a newer
resourceVersion; a deletion leaves a tombstone so that a late event cannot revive it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from importer.controller.plan import DV_UID_LABEL

Body = dict[str, Any]


class Store:
    """Objects by uid, and a DataVolume's PVC and pods by the DataVolume's uid."""

    def __init__(self) -> None:
        self.datavolumes: dict[str, Body] = {}
        self._owned: dict[str, dict[str, Body]] = defaultdict(dict)  # dv uid → {name: obj}
        self._versions: dict[str, int] = {}  # uid → newest resourceVersion seen
        self._gone: set[str] = set()
        self._pods: dict[str, Body] = {}  # every importer pod by uid, for admission's count

    def put(self, obj: Body) -> bool:
        """Record `obj` unless a newer version of it is known; True if recorded."""
        meta = obj["metadata"]
        uid = meta["uid"]
        version = _version(meta)
        if uid in self._gone or version < self._versions.get(uid, -1):
            return False
        self._versions[uid] = version
        if obj.get("kind") == "DataVolume":
            self.datavolumes[uid] = obj
        elif owner := meta.get("labels", {}).get(DV_UID_LABEL):
            self._owned[owner][f"{obj['kind']}/{meta['name']}"] = obj
            if obj["kind"] == "Pod":
                self._pods[uid] = obj
        return True

    def known(self, obj: Body) -> bool:
        """True when this very version is recorded: a watch's echo of the controller's own
        write, nothing new."""
        version = _version(obj["metadata"])
        return version >= 0 and self._versions.get(obj["metadata"]["uid"]) == version

    def remove(self, obj: Body) -> None:
        """Forget a deleted object for good."""
        meta = obj["metadata"]
        uid = meta["uid"]
        self._gone.add(uid)
        self._versions.pop(uid, None)
        self._pods.pop(uid, None)
        if self.datavolumes.pop(uid, None) is not None:
            self._owned.pop(uid, None)
        elif owner := meta.get("labels", {}).get(DV_UID_LABEL):
            self._owned.get(owner, {}).pop(f"{obj['kind']}/{meta['name']}", None)

    def owned(self, dv_uid: str, kind: str) -> dict[str, Body]:
        """The DataVolume's objects of `kind` by name."""
        prefix = f"{kind}/"
        return {
            key.removeprefix(prefix): obj
            for key, obj in self._owned.get(dv_uid, {}).items()
            if key.startswith(prefix)
        }

    def pods(self) -> list[Body]:
        """Every importer pod known."""
        return list(self._pods.values())


def _version(meta: Body) -> int:
    # resourceVersions are opaque by contract, but every API server numbers them from etcd's
    # revision; an unparsable one never blocks an update.
    try:
        return int(meta.get("resourceVersion", ""))
    except ValueError:
        return -1
