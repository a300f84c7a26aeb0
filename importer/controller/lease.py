"""Leader election with a coordination.k8s.io Lease, so that of several controller replicas
exactly one acts: the others wait until the holder stops renewing."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from importer.controller.kube import Kube

log = logging.getLogger("diskflow.controller")


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lease:
    """One Lease object; `acquire()` returns once this replica holds it, `hold()` renews it
    and returns only when it was lost (the caller then stops acting)."""

    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, duration: int = 15
    ) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity, self.duration = identity, duration

    async def acquire(self) -> None:
        """Wait until this replica holds the lease."""
        announced = False
        while not await self._try():
            if not announced:
                log.info(
                    "waiting for lease %s/%s (another replica leads)", self.namespace, self.name
                )
                announced = True
            await asyncio.sleep(self.duration / 3)  # a retry period, as client-go's
        log.info("holding lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def hold(self) -> None:
        """Renew the lease every third of its duration; return when a renewal fails for
        longer than the lease lasts (another replica may act from then on)."""
        renewed = time.time()
        while True:
            await asyncio.sleep(self.duration / 3)
            try:
                if await self._try():
                    renewed = time.time()
                    continue
                log.error("lease %s/%s was taken by another replica", self.namespace, self.name)
                return
            except (ApiException, OSError) as exc:
                log.warning("cannot renew lease %s/%s: %s", self.namespace, self.name, exc)
            if time.time() - renewed > self.duration:
                return

    async def _try(self) -> bool:
        return await asyncio.to_thread(self._try_sync)

    def _try_sync(self) -> bool:
        api = self.kube.coordination
        now = time.time()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _stamp(now),
        }
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _stamp(now)},
            }
            try:
                api.create_namespaced_lease(self.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:
                    return False  # another replica created it first
                raise
            return True
        held = lease.spec.holder_identity
        renew = lease.spec.renew_time.timestamp() if lease.spec.renew_time else 0.0
        expired = now > renew + (lease.spec.lease_duration_seconds or self.duration)
        if held not in (None, self.identity) and not expired:
            return False
        if held != self.identity:
            spec["acquireTime"] = _stamp(now)
            spec["leaseTransitions"] = (lease.spec.lease_transitions or 0) + 1
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": spec,
        }
        try:
            api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False  # changed since read: someone else renewed or took it
            raise
        return True
