"""kmock's KubernetesEmulator, extended to behave as a real API server where the operator
can tell the difference (see README.md), and served over HTTP from a thread of its own.

Requests are routed straight to the object store (stock kmock matches every request against
every request it has ever recorded, which grows quadratically); reactions a test adds with
kmock's DSL (`kube.emulator["post", kmock.resource("v1/pods")] << 500`) still come first.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal.rendering import ReactionMismatchError

from tests.support.kube.client import HARNESS_AGENT
from tests.support.kube.rbac import Authorizer
from tests.support.kube.resources import VERBS, ResourceType
from tests.support.kube.selectors import SelectorError, field_selector, label_selector
from tests.support.kube.store import ApiError, Store

_VERBS = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "POST": "create"}
_ACTIONS = {
    "list": "LIST",
    "watch": "WATCH",
    "get": "FETCH",
    "create": "CREATE",
    "update": "UPDATE",
    "patch": "UPDATE",
    "delete": "DELETE",
}
_PATCH_KINDS = {
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/json-patch+json": "json",
}


@dataclass(frozen=True)
class Route:
    """A Kubernetes API path: `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/{sub}`."""

    group: str
    version: str | None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_route(path: str) -> Route | None:
    parts = [part for part in path.split("/") if part]
    if parts[:1] == ["api"]:
        group, rest = "", parts[1:]
    elif parts[:1] == ["apis"] and len(parts) > 1:
        group, rest = parts[1], parts[2:]
    else:
        return None
    if not rest:
        return Route(group, None)
    version, rest = rest[0], rest[1:]
    namespace = None
    # /namespaces/{name}[/status|/finalize] is a namespace itself, not a namespaced path.
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and rest[2:] not in (["status"], ["finalize"]):
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return Route(group, version)
    return Route(
        group, version, rest[0], namespace, *(rest[1:2] or [None]), "/".join(rest[2:]) or None
    )


def _truthy(value: str | None) -> bool:
    return value in ("true", "1", "True")


def _json(code: int, data: Any) -> aiohttp.web.Response:
    body = json.dumps(data, separators=(",", ":")).encode()
    return aiohttp.web.Response(status=code, body=body, content_type="application/json")


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """The API server: kmock's HTTP handling and discovery, in front of a `Store`."""

    store: Store = attrs.field(factory=Store)
    bookmark_interval: float = 10.0  # seconds between BOOKMARK events on idle watches
    window: int = 200  # recorded requests kept for kmock's DSL (and any still in flight)
    # pods/log: the kubelet stand-in says where a pod's log file is.
    pod_logs: Callable[[str, str], Path | None] | None = None
    counts: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter, init=False
    )
    failures: list[str] = attrs.field(factory=list, init=False)
    # RBAC: None lets every client do everything; else the operator's requests are authorized
    # as its service account's, refused with 403 as the real server does, and recorded.
    authorizer: Authorizer | None = None
    used: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)  # verb, group, resource
    denied: list[str] = attrs.field(factory=list, init=False)
    _inflight: set[kmock.Request] = attrs.field(factory=set, init=False)
    _served: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        """Deliberately not the stock fallbacks: `_handle` routes requests itself."""

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        route = parse_route(raw.path)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        request = kmock.Request(
            id=self._served,
            raw_request=raw,
            method=raw.method,
            url=raw.url,
            params=dict(raw.query),
            headers=dict(raw.headers),
            body=body,
            text=body.decode(errors="replace"),
            data=data,
            action=self._action(raw.method, route, raw.query.get("watch")),
            resource=None
            if route is None
            else kmock.resource(group=route.group, version=route.version, plural=route.plural),
            namespace=route and route.namespace,
            name=route and route.name,
            subresource=route and route.subresource,
        )
        self._served += 1
        self._requests.append(request)
        self._inflight.add(request)
        try:
            return await self._handle(request)
        except ApiError as exc:
            return _json(exc.code, exc.status())
        except Exception as exc:
            self.failures.append(f"{raw.method} {raw.path_qs}: {traceback.format_exc()}")
            return _json(500, ApiError(500, "InternalError", repr(exc)).status())
        finally:
            self._inflight.discard(request)
            if len(self._requests) > 2 * self.window:
                old = [r for r in self._requests[: -self.window] if r in self._inflight]
                self._requests[:] = old + self._requests[-self.window :]

    @staticmethod
    def _action(method: str, route: Route | None, watch: str | None) -> kmock.action | None:
        if route is None or route.plural is None:
            return None
        if method == "GET":
            return kmock.action("WATCH" if _truthy(watch) else "FETCH" if route.name else "LIST")
        return kmock.action(_ACTIONS[_VERBS[method]]) if method in _VERBS else None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        for reaction in self._reactions():
            if request in reaction._source and not reaction._disabled.is_set():
                try:
                    return await reaction(request)
                except ReactionMismatchError:
                    reaction._disabled.set()
                except NotImplementedError:
                    pass
        return await self._serve(request)

    def _reactions(self) -> list[kmock.Reaction]:
        """Reactions tests added with kmock's DSL, highest priority first (as kmock orders)."""
        if not self._payloads:
            return []
        width = max(len(p.priorities) for p in self._payloads)
        return sorted(
            self._payloads,
            key=lambda p: tuple(-x for x in p.priorities) + (0,) * (width - len(p.priorities)),
        )

    # Discovery

    def _get_resources(self) -> list[kmock.resource]:
        self._resources.clear()
        for rt in self.store.types():
            self._resources[
                kmock.resource(group=rt.group, version=rt.version, plural=rt.plural)
            ] = kmock.ResourceInfo(
                kind=rt.kind,
                singular=rt.singular,
                namespaced=rt.namespaced,
                verbs=VERBS,
                shortnames=rt.short_names,
                subresources=rt.subresources,
            )
        return super()._get_resources()

    async def _discover(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        if HARNESS_AGENT not in request.headers.get("User-Agent", ""):
            self.counts["get", "discovery"] += 1
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            return _json(
                200,
                {
                    "major": "1",
                    "minor": "31",
                    "gitVersion": "v1.31.0-diskflow-emulator",
                    "platform": "linux/amd64",
                },
            )
        serve = {"/": self._serve_root, "/api": self._serve_api, "/apis": self._serve_apis}.get(
            path
        )
        if serve is None and request.resource is not None:
            serve = self._serve_version if request.resource.version else self._serve_group
        if serve is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        try:
            return _json(200, await serve(request))
        except kmock.KubernetesNotFoundError as exc:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource"
            ) from exc

    # Objects

    async def _serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is None or resource.plural is None:
            return await self._discover(request)
        rt = self.store.resolve(resource.group, resource.version, resource.plural)
        namespace, name, sub = request.namespace, request.name, request.subresource
        if rt is None or (sub and sub not in rt.subresources) or (namespace and not rt.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and namespace is None and (name is not None or request.method != "GET"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = self._verb(request)
        if HARNESS_AGENT not in request.headers.get("User-Agent", ""):
            self.counts[verb, rt.storage_key + (f"/{sub}" if sub else "")] += 1
            self._authorize(verb, rt, sub, namespace, name)
        params = request.params
        dry_run = params.get("dryRun") == "All"
        if verb == "watch":
            return await self._watch(request, rt, namespace, name)
        if verb == "list":
            return _json(200, self._list(rt, namespace, params))
        if verb == "get" and sub == "log":
            return self._log(rt, namespace, name, params)
        if verb == "get":
            return _json(200, self.store.view(rt, self.store.get(rt, namespace, name)))
        if verb == "create":
            return _json(
                201,
                self.store.view(
                    rt, self.store.create(rt, namespace, request.data, dry_run=dry_run)
                ),
            )
        if verb == "update":
            obj = self.store.replace(
                rt, namespace, name, request.data, subresource=sub, dry_run=dry_run
            )
            return _json(200, self.store.view(rt, obj))
        if verb == "patch":
            obj = self.store.patch(
                rt,
                namespace,
                name,
                self._patch_kind(request),
                request.data,
                subresource=sub,
                dry_run=dry_run,
            )
            return _json(200, self.store.view(rt, obj))
        if verb == "delete":
            obj, gone = self.store.delete(
                rt, namespace, name, self._delete_options(request), dry_run=dry_run
            )
            return _json(200 if gone else 202, self.store.view(rt, obj))
        if verb == "deletecollection":
            return _json(200, self._delete_collection(rt, namespace, request))
        raise ApiError(
            405, "MethodNotAllowed", f"the server does not allow this method on {rt.storage_key}"
        )

    def _authorize(
        self, verb: str, rt: ResourceType, sub: str | None, namespace: str | None, name: str | None
    ) -> None:
        if self.authorizer is None:
            return
        resource = rt.plural + (f"/{sub}" if sub else "")
        if not self.authorizer.allows(verb, rt.group, resource, namespace, name):
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = (
                f'{rt.storage_key} is forbidden: User "{self.authorizer.user}" cannot {verb} '
                f'resource "{resource}" in API group "{rt.group}" {scope}'
            )
            self.denied.append(message)
            raise ApiError(403, "Forbidden", message)
        self.used.add((verb, rt.group, resource))

    @staticmethod
    def _verb(request: kmock.Request) -> str:
        method = request.method.value
        if method == "GET":
            if _truthy(request.params.get("watch")):
                return "watch"
            return "get" if request.name else "list"
        if request.name is None:
            return {"POST": "create", "DELETE": "deletecollection"}.get(method, "unsupported")
        return _VERBS.get(method, "unsupported") if method != "POST" else "unsupported"

    @staticmethod
    def _patch_kind(request: kmock.Request) -> str:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in _PATCH_KINDS:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"{', '.join(_PATCH_KINDS)} (server-side apply is not emulated)",
            )
        return _PATCH_KINDS[content_type]

    @staticmethod
    def _matcher(
        params: dict[str, str], name: str | None = None
    ) -> Callable[[dict[str, Any]], bool]:
        try:
            labels = label_selector(params.get("labelSelector"))
            fields = field_selector(params.get("fieldSelector"))
        except SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc
        return lambda obj: (
            (name is None or obj["metadata"]["name"] == name) and labels(obj) and fields(obj)
        )

    def _list(
        self, rt: ResourceType, namespace: str | None, params: dict[str, str]
    ) -> dict[str, Any]:
        matches = self._matcher(params)
        items = [obj for obj in self.store.items(rt.storage_key, namespace) if matches(obj)]
        if token := params.get("continue"):
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(token)))
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"invalid continue token {token!r}") from exc
            items = [
                obj
                for obj in items
                if (obj["metadata"].get("namespace", ""), obj["metadata"]["name"]) > after
            ]
        meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        limit = int(params.get("limit") or 0)
        if limit and len(items) > limit:
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
            last = items[-1]["metadata"]
            key = json.dumps([last.get("namespace", ""), last["name"]]).encode()
            meta["continue"] = base64.urlsafe_b64encode(key).decode()
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": [self.store.view(rt, obj) for obj in items],
        }

    def _delete_options(self, request: kmock.Request) -> dict[str, Any]:
        options = dict(request.data) if isinstance(request.data, dict) else {}
        params = request.params
        if "gracePeriodSeconds" in params:
            options["gracePeriodSeconds"] = int(params["gracePeriodSeconds"])
        if "propagationPolicy" in params:
            options["propagationPolicy"] = params["propagationPolicy"]
        if "orphanDependents" in params:
            options["orphanDependents"] = _truthy(params["orphanDependents"])
        if options.get("propagationPolicy") not in (None, "Background", "Foreground", "Orphan"):
            raise ApiError(
                400, "BadRequest", f"invalid propagationPolicy {options['propagationPolicy']!r}"
            )
        return options

    def _delete_collection(
        self, rt: ResourceType, namespace: str | None, request: kmock.Request
    ) -> dict:
        matches = self._matcher(request.params)
        options = self._delete_options(request)
        deleted = []
        for obj in self.store.items(rt.storage_key, namespace):
            if matches(obj):
                meta = obj["metadata"]
                deleted.append(
                    self.store.delete(rt, meta.get("namespace"), meta["name"], options)[0]
                )
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": deleted,
        }

    def _log(
        self, rt: ResourceType, namespace: str, name: str, params: dict[str, str]
    ) -> aiohttp.web.Response:
        self.store.get(rt, namespace, name)
        path = self.pod_logs(namespace, name) if self.pod_logs else None
        if path is None or not path.exists():
            raise ApiError(
                400,
                "BadRequest",
                f'container in pod "{name}" is waiting to start: ContainerCreating',
            )
        text = path.read_text(errors="replace")
        if "tailLines" in params:
            text = "".join(text.splitlines(keepends=True)[-int(params["tailLines"]) :])
        if "limitBytes" in params:
            text = text.encode()[: int(params["limitBytes"])].decode(errors="ignore")
        return aiohttp.web.Response(text=text)

    async def _watch(
        self, request: kmock.Request, rt: ResourceType, namespace: str | None, name: str | None
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        matches = self._matcher(params, name)
        initial = _truthy(params.get("sendInitialEvents"))
        bookmarks = _truthy(params.get("allowWatchBookmarks"))
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else math.inf
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        assert request._raw_request is not None  # always set for requests that came over HTTP
        await response.prepare(request._raw_request)
        try:
            watch, backlog = self.store.watch(
                rt, namespace, matches, None if initial else params.get("resourceVersion")
            )
        except ApiError as exc:
            await response.write(_event("ERROR", exc.status()))
            await response.write_eof()
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await response.write(
                b"".join(_event(kind, self.store.view(rt, obj)) for kind, obj in backlog)
            )
            if initial and bookmarks:
                await response.write(self._bookmark(rt, {"k8s.io/initial-events-end": "true"}))
            while (left := deadline - loop.time()) > 0:
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    item = await asyncio.wait_for(
                        watch.queue.get(), None if wait == math.inf else wait
                    )
                except TimeoutError:
                    if bookmarks and deadline > loop.time():
                        await response.write(self._bookmark(rt))
                    continue
                events = []
                while item is not None:  # send everything queued in one write
                    events.append(_event(item[0], self.store.view(rt, item[1])))
                    if watch.queue.empty():
                        break
                    item = watch.queue.get_nowait()
                if events:
                    await response.write(b"".join(events))
                if item is None:  # the server is closing its watches
                    break
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self.store.unwatch(watch)
        return response

    def _bookmark(self, rt: ResourceType, annotations: dict[str, str] | None = None) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        if annotations:
            meta["annotations"] = annotations
        return _event("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta})
