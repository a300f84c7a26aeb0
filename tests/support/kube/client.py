"""A small synchronous client for tests, over real HTTP like any other client of the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from tests.support.kube.resources import ResourceType
from tests.support.kube.store import ApiError

HARNESS_AGENT = "diskflow-harness"  # the emulator leaves these requests out of its counts
T = TypeVar("T")
Obj = dict[str, Any]


def poll(
    fn: Callable[[], T], *, timeout: float, what: str | Callable[[], str], interval: float = 0.02
) -> T:
    """`fn()` once it returns something true; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout} s: {what() if callable(what) else what}")
        time.sleep(interval)


class KubeClient:
    """Resources are named as kubectl takes them: `pods`, `pvc`, `DataVolume`, `ddv`,
    `datavolumes.diskflow.io`. Failures raise `ApiError` with the server's code and reason."""

    def __init__(
        self, url: str, types: Callable[..., ResourceType], *, timeout: float = 30
    ) -> None:
        self.url = url
        self._lookup = types
        self._known: dict[tuple[str, str | None], ResourceType] = {}
        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["User-Agent"] = HARNESS_AGENT

    def path(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        base = "/api/v1" if not rt.group else f"/apis/{rt.group}/{rt.version}"
        parts = [
            base,
            *(["namespaces", namespace] if namespace and rt.namespaced else []),
            rt.plural,
        ]
        parts += [quote(name)] if name else []
        parts += [subresource] if subresource else []
        return "/".join(parts)

    def _types(self, name: str, api_version: str | None = None) -> ResourceType:
        """Remembered: types only come and go with CRDs, and a gone one answers 404 anyway."""
        if (name, api_version) not in self._known:
            self._known[name, api_version] = self._lookup(name, api_version)
        return self._known[name, api_version]

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Any request; a non-2xx answer raises ApiError."""
        response = self._session.request(method, self.url + path, timeout=self._timeout, **kwargs)
        if response.status_code >= 400:
            try:
                status = response.json()
            except ValueError:
                status = {"message": response.text}
            raise ApiError(
                response.status_code,
                status.get("reason", ""),
                status.get("message", ""),
                status.get("details"),
            )
        return response

    def create(self, obj: Obj, *, namespace: str | None = None) -> Obj:
        rt = self._types(obj["kind"], obj.get("apiVersion"))
        namespace = namespace or obj.get("metadata", {}).get("namespace")
        return self.request("POST", self.path(rt, namespace), json=obj).json()

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Obj:
        return self.request("GET", self.path(self._types(resource), namespace, name)).json()

    def find(self, resource: str, name: str, *, namespace: str | None = None) -> Obj | None:
        """The object, or None if it does not exist."""
        try:
            return self.get(resource, name, namespace=namespace)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        labels: str | None = None,
        fields: str | None = None,
    ) -> list[Obj]:
        params = {
            key: value
            for key, value in (("labelSelector", labels), ("fieldSelector", fields))
            if value
        }
        return self.request(
            "GET", self.path(self._types(resource), namespace), params=params
        ).json()["items"]

    def replace(self, obj: Obj, *, subresource: str | None = None) -> Obj:
        """PUT: the object as given, conditional on its resourceVersion if it carries one."""
        rt = self._types(obj["kind"], obj.get("apiVersion"))
        meta = obj["metadata"]
        return self.request(
            "PUT", self.path(rt, meta.get("namespace"), meta["name"], subresource), json=obj
        ).json()

    def patch(
        self,
        resource: str,
        name: str,
        patch: Obj | list[Obj],
        *,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Obj:
        """A merge patch (a dict) or a JSON patch (a list of operations)."""
        kind = (
            "application/json-patch+json"
            if isinstance(patch, list)
            else "application/merge-patch+json"
        )
        path = self.path(self._types(resource), namespace, name, subresource)
        return self.request("PATCH", path, json=patch, headers={"Content-Type": kind}).json()

    def delete(
        self,
        resource: str,
        name: str,
        *,
        namespace: str | None = None,
        propagation: str | None = None,
        grace_period: int | None = None,
        preconditions: Obj | None = None,
    ) -> Obj:
        """DELETE with DeleteOptions; returns the object (gone, or marked for deletion)."""
        options: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            options["propagationPolicy"] = propagation
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        if preconditions:
            options["preconditions"] = preconditions
        return self.request(
            "DELETE", self.path(self._types(resource), namespace, name), json=options
        ).json()

    def wait_for(
        self,
        resource: str,
        name: str,
        predicate: Callable[[Obj], Any] = bool,
        *,
        namespace: str | None = None,
        timeout: float = 10,
    ) -> Obj:
        """The object once it exists and `predicate(obj)` is true."""
        seen: list[Obj | None] = [None]

        def check() -> Obj | None:
            seen[0] = self.find(resource, name, namespace=namespace)
            return seen[0] if seen[0] is not None and predicate(seen[0]) else None

        return poll(
            check,
            timeout=timeout,
            what=lambda: f"{resource} {namespace}/{name} never matched; last seen: {seen[0]}",
        )

    def wait_gone(
        self, resource: str, name: str, *, namespace: str | None = None, timeout: float = 10
    ) -> None:
        poll(
            lambda: self.find(resource, name, namespace=namespace) is None,
            timeout=timeout,
            what=lambda: f"{resource} {namespace}/{name} still exists",
        )

    def log(self, name: str, *, namespace: str) -> str:
        """A pod's log (its process's stdout and stderr), from pods/log."""
        return self.request("GET", self.path(self._types("pods"), namespace, name, "log")).text

    def events(self, *, namespace: str, involving: str | None = None) -> list[Obj]:
        """core/v1 Events in a namespace, those about the object named `involving` if given."""
        fields = f"involvedObject.name={involving}" if involving else None
        return self.list("events", namespace=namespace, fields=fields)
