"""The few Kubernetes calls the controller makes, over the `kubernetes` client, as plain dicts.

Responses are read as JSON rather than the client's model classes: the controller only needs
a few fields, and building models for thousands of objects costs more CPU than the rest of
a reconcile. Blocking calls run in worker threads so the operator's event loop stays free.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from importer.api import GROUP, PLURAL, VERSION
from importer.errors import FinalError

MERGE_PATCH = "application/merge-patch+json"


class Kube:
    """Create, read, patch and delete the objects a DataVolume owns."""

    def __init__(self) -> None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise FinalError(
                    "InvalidArgument",
                    "no Kubernetes API to connect to: not in a pod with a service account, and "
                    f"no usable kubeconfig (KUBECONFIG or ~/.kube/config): {exc}",
                ) from None
        self.client = client.ApiClient()
        self.core = client.CoreV1Api(self.client)
        self.storage = client.StorageV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.coordination = client.CoordinationV1Api(self.client)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create a PVC or pod; None when one of that name already exists."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        method = {
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Pod": self.core.create_namespaced_pod,
        }[kind]
        return await _call(method, ns, obj, exists_ok=True)

    async def read(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A Pod, PVC, Secret, ConfigMap or StorageClass; None when it does not exist."""
        if kind == "StorageClass":
            return await _call(self.storage.read_storage_class, name)
        method = {
            "Pod": self.core.read_namespaced_pod,
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
            "Secret": self.core.read_namespaced_secret,
            "ConfigMap": self.core.read_namespaced_config_map,
        }[kind]
        return await _call(method, name, namespace)

    async def storage_classes(self) -> list[dict[str, Any]]:
        """Every StorageClass (to find the default one)."""
        listed = await _call(self.storage.list_storage_class)
        return (listed or {}).get("items", [])

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod; nothing when it is already gone."""
        await _call(self.core.delete_namespaced_pod, name, namespace)

    async def patch_pvc(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await _call(self.core.patch_namespaced_persistent_volume_claim, name, namespace, patch)

    async def patch_datavolume(
        self, namespace: str, name: str, patch: dict[str, Any], *, status: bool = False
    ) -> dict[str, Any] | None:
        """Merge-patch a DataVolume (its status subresource with `status`); None if gone."""
        method = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        return await _call(method, GROUP, VERSION, namespace, PLURAL, name, patch)


async def _call(
    method: Callable[..., Any], *args: Any, exists_ok: bool = False
) -> dict[str, Any] | None:
    def run() -> dict[str, Any] | None:
        try:
            response = method(*args, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404 or (exists_ok and exc.status == 409):
                return None
            raise
        return json.loads(response.data)

    return await asyncio.to_thread(run)
