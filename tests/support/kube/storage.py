"""Volumes for the kubelet stand-in: it plays provisioner and PV controller in one, binding each
claim to a directory (Filesystem) or a loop device (Block) under its root directory."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.support.kube.store import TERMINAL, ApiError, Change, Store

SELECTED_NODE = "volume.kubernetes.io/selected-node"
_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "": 1,
}
_QUANTITY = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?)"
)

Emit = Callable[[dict[str, Any], str, str, str], None]  # (object, type, reason, message)


def parse_size(text: str) -> int:
    """Bytes in a storage quantity, rounded up (the harness's own parser, not the project's)."""
    match = _QUANTITY.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    number = Decimal(match[1])
    value = (
        number * Decimal(10) ** int(match[2][1:]) if match[2] else number * _UNITS[match[3] or ""]
    )
    return math.ceil(value)


def format_size(size: int) -> str:
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if size % _UNITS[suffix] == 0:
            return f"{size // _UNITS[suffix]}{suffix}"
    return str(size)


def claims_of(pod: dict[str, Any]) -> list[str]:
    volumes = pod.get("spec", {}).get("volumes") or []
    return [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")
    ]


@dataclass
class Volume:
    path: Path  # the directory of a Filesystem volume, the backing file of a Block one
    device: str | None = None  # the loop device of a Block volume


def block_volumes_possible() -> str | None:
    """None if Block volumes can be given loop devices here, else why not."""
    if os.geteuid() != 0:
        return "the harness gives Block volumes loop devices, which needs root"
    if not shutil.which("losetup"):
        return "the harness gives Block volumes loop devices, which needs losetup (util-linux)"
    return None


class Storage:
    """Binds claims as they appear (or, for WaitForFirstConsumer classes, once a pod uses
    them), releases their storage when they are deleted."""

    def __init__(
        self,
        store: Store,
        root: Path,
        emit: Emit,
        *,
        node_name: str,
        capacity_step: int,
        bound: Callable[[str], None],
    ) -> None:
        self.store = store
        self.root = root
        self.volumes: dict[str, Volume] = {}  # by claim uid
        self._emit = emit
        self._node_name = node_name
        self._capacity_step = capacity_step
        self._bound = bound  # told the namespace of every claim it binds
        self._dirty: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._released: list[Volume] = []

    def notice(self, change: Change) -> None:
        meta = change.obj["metadata"]
        if change.storage_key == "persistentvolumeclaims":
            if change.type == "DELETED":
                if (volume := self.volumes.pop(meta["uid"], None)) is not None:
                    self._released.append(volume)
            else:
                self._dirty.add((meta["namespace"], meta["name"]))
        elif change.storage_key == "pods" and change.type != "DELETED":
            self._dirty.update((meta["namespace"], claim) for claim in claims_of(change.obj))
        elif change.storage_key == "storageclasses.storage.k8s.io":
            self._dirty.update(_key(pvc) for pvc in self.store.items("persistentvolumeclaims"))
        else:
            return
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._released:
                await self._release(self._released.pop())
            dirty, self._dirty = self._dirty, set()
            for namespace, name in sorted(dirty):
                pvc = self.store.peek("persistentvolumeclaims", (namespace, name))
                if (
                    pvc is not None
                    and pvc.get("status", {}).get("phase") != "Bound"
                    and not pvc["metadata"].get("deletionTimestamp")
                ):
                    await self._bind(pvc)

    async def close(self) -> None:
        for volume in [*self.volumes.values(), *self._released]:
            await self._release(volume)
        self.volumes.clear()

    async def _bind(self, pvc: dict[str, Any]) -> None:
        spec, meta = pvc["spec"], pvc["metadata"]
        class_name = spec.get("storageClassName")
        if not class_name:
            self._emit(
                pvc,
                "Normal",
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
            )
            return
        storage_class = self.store.peek("storageclasses.storage.k8s.io", ("", class_name))
        if storage_class is None:
            self._emit(
                pvc,
                "Warning",
                "ProvisioningFailed",
                f'storageclass.storage.k8s.io "{class_name}" not found',
            )
            return
        waits = storage_class.get("volumeBindingMode") == "WaitForFirstConsumer"
        if waits and not self._consumer(pvc):
            self._emit(
                pvc,
                "Normal",
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )
            return
        try:
            size = parse_size(spec.get("resources", {}).get("requests", {}).get("storage", ""))
        except ValueError as exc:
            self._emit(pvc, "Warning", "ProvisioningFailed", str(exc))
            return
        capacity = math.ceil(size / self._capacity_step) * self._capacity_step
        volume = await self._provision(pvc, capacity)
        if volume is None:
            return
        self.volumes[meta["uid"]] = volume
        requested = spec["resources"]["requests"]["storage"]
        shown = requested if capacity == size else format_size(capacity)
        try:
            self._write_bound(pvc, shown, selected_node=waits)
        except ApiError:  # deleted while being provisioned
            await self._release(self.volumes.pop(meta["uid"]))
            return
        self._emit(
            pvc,
            "Normal",
            "ProvisioningSucceeded",
            f"Successfully provisioned volume pvc-{meta['uid']} ({shown})",
        )
        self._bound(meta["namespace"])

    def _consumer(self, pvc: dict[str, Any]) -> bool:
        name = pvc["metadata"]["name"]
        return any(
            name in claims_of(pod) and pod.get("status", {}).get("phase") not in TERMINAL
            for pod in self.store.items("pods", pvc["metadata"]["namespace"])
        )

    async def _provision(self, pvc: dict[str, Any], capacity: int) -> Volume | None:
        meta = pvc["metadata"]
        base = self.root / "volumes" / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        if pvc["spec"].get("volumeMode") != "Block":
            base.mkdir(parents=True)
            return Volume(base)
        if why := block_volumes_possible():
            self._emit(pvc, "Warning", "ProvisioningFailed", why)
            return None
        backing = base.with_suffix(".img")
        backing.parent.mkdir(parents=True, exist_ok=True)
        with backing.open("wb") as f:
            f.truncate(capacity)
        losetup = await asyncio.create_subprocess_exec(
            "losetup",
            "--find",
            "--show",
            str(backing),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await losetup.communicate()
        if losetup.returncode != 0:
            backing.unlink()
            self._emit(
                pvc, "Warning", "ProvisioningFailed", f"losetup failed: {err.decode().strip()}"
            )
            return None
        return Volume(backing, out.decode().strip())

    def _write_bound(self, pvc: dict[str, Any], capacity: str, *, selected_node: bool) -> None:
        meta = pvc["metadata"]
        rt = self.store.find("persistentvolumeclaims")

        def bind(obj: dict[str, Any]) -> None:
            annotations = obj["metadata"].setdefault("annotations", {})
            annotations["pv.kubernetes.io/bind-completed"] = "yes"
            annotations["pv.kubernetes.io/bound-by-controller"] = "yes"
            if selected_node:
                annotations[SELECTED_NODE] = self._node_name
            obj["spec"]["volumeName"] = f"pvc-{meta['uid']}"

        self.store.modify(rt, meta["namespace"], meta["name"], bind)
        status = {
            "phase": "Bound",
            "capacity": {"storage": capacity},
            "accessModes": pvc["spec"].get("accessModes") or ["ReadWriteOnce"],
        }
        self.store.patch(
            rt, meta["namespace"], meta["name"], "merge", {"status": status}, subresource="status"
        )

    async def _release(self, volume: Volume) -> None:
        if volume.device:
            detach = await asyncio.create_subprocess_exec("losetup", "--detach", volume.device)
            await detach.wait()
            volume.path.unlink(missing_ok=True)
        else:
            await asyncio.to_thread(shutil.rmtree, volume.path, True)


def _key(pvc: dict[str, Any]) -> tuple[str, str]:
    return pvc["metadata"]["namespace"], pvc["metadata"]["name"]
