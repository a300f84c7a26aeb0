"""The Kubernetes stand-in itself, over real HTTP: what tests/support/kube/README.md promises
(the API server's object rules, watches, garbage collection, schema checks, speed; a real kopf
operator logging in; the kubelet stand-in running pods as processes)."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest
import requests

from tests.controller.conftest import StartOperator
from tests.support.kube import ApiError, KubeServer, poll
from tests.support.kube.kubelet import Kubelet

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wg"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {
                                        "type": "string",
                                        "enum": ["red", "blue"],
                                        "default": "red",
                                    },
                                    "source": {
                                        "type": "object",
                                        "oneOf": [{"required": ["http"]}, {"required": ["blank"]}],
                                        "properties": {
                                            "http": {
                                                "type": "object",
                                                "required": ["url"],
                                                "properties": {"url": {"type": "string"}},
                                            },
                                            "blank": {"type": "object"},
                                        },
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}

Obj = dict[str, Any]


@pytest.fixture
def widgets(kube: KubeServer) -> KubeServer:
    kube.client.create(WIDGET_CRD)
    return kube


def widget(name: str, namespace: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"size": 1, **spec},
    }


def configmap(name: str, namespace: str, labels: dict[str, str] | None = None, **meta: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}, **meta},
    }


def owned_by(owner: Obj) -> list[Obj]:
    return [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def watch(kube: KubeServer, path: str, **params: Any) -> Iterator[Obj]:
    """Events of a watch stream as they arrive (a raw client, as kopf's)."""
    params = {"watch": "true", **params}
    with requests.get(kube.url + path, params=params, stream=True, timeout=10) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def names(events: list[Obj]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


# API server: object metadata


def test_objects_get_uid_resource_version_timestamp_generation(
    widgets: KubeServer, namespace: str
) -> None:
    client = widgets.client
    a = client.create(widget("a", namespace))
    b = client.create(widget("b", namespace))
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["metadata"]["creationTimestamp"])
    assert a["metadata"]["generation"] == 1
    relabelled = client.patch("wg", "a", {"metadata": {"labels": {"x": "y"}}}, namespace=namespace)
    assert relabelled["metadata"]["generation"] == 1  # metadata is not spec
    resized = client.patch("wg", "a", {"spec": {"size": 2}}, namespace=namespace)
    assert resized["metadata"]["generation"] == 2
    assert int(resized["metadata"]["resourceVersion"]) > int(
        relabelled["metadata"]["resourceVersion"]
    )
    status = client.patch(
        "wg", "a", {"status": {"phase": "Done"}}, namespace=namespace, subresource="status"
    )
    assert status["metadata"]["generation"] == 2
    assert (
        client.patch("wg", "a", {"spec": {"size": 2}}, namespace=namespace) == status
    )  # a no-op write


def test_generate_name(kube: KubeServer, namespace: str) -> None:
    made = kube.client.create(configmap("", namespace, generateName="importer-"))
    assert re.fullmatch(r"importer-[a-z0-9]{5}", made["metadata"]["name"])


def test_names_labels_and_namespaces_are_checked(kube: KubeServer, namespace: str) -> None:
    with pytest.raises(ApiError) as bad_name:
        kube.client.create(configmap("Not_A_Name", namespace))
    assert bad_name.value.code == 422 and "metadata.name" in bad_name.value.message
    with pytest.raises(ApiError) as bad_label:
        kube.client.create(configmap("a", namespace, labels={"x": "y" * 64}))
    assert bad_label.value.code == 422 and "metadata.labels[x]" in bad_label.value.message
    with pytest.raises(ApiError) as no_namespace:
        kube.client.create(configmap("a", "nowhere"))
    assert (
        no_namespace.value.code == 404
        and 'namespaces "nowhere" not found' in no_namespace.value.message
    )


# API server: selectors


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=db", ["a", "b"]),
        ("app==db", ["a", "b"]),
        ("app!=db", ["c", "d"]),
        ("app in (db,web),tier=1", ["a", "c"]),
        ("app notin (db)", ["c", "d"]),
        ("tier", ["a", "c"]),
        ("!tier", ["b", "d"]),
        ("app=db,!tier", ["b"]),
        ("tier>0,app!=db", ["c"]),
    ],
)
def test_label_selectors(
    kube: KubeServer, namespace: str, selector: str, expected: list[str]
) -> None:
    for name, labels in {
        "a": {"app": "db", "tier": "1"},
        "b": {"app": "db"},
        "c": {"app": "web", "tier": "1"},
        "d": {},
    }.items():
        kube.client.create(configmap(name, namespace, labels))
    found = kube.client.list("configmaps", namespace=namespace, labels=selector)
    assert [obj["metadata"]["name"] for obj in found] == expected


def test_field_selectors_and_bad_selectors(kube: KubeServer, namespace: str) -> None:
    kube.client.create(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"{namespace}-2"}}
    )
    for ns in (namespace, f"{namespace}-2"):
        for name in ("a", "b"):
            kube.client.create(configmap(name, ns))

    def found(fields: str) -> list[tuple[str, str]]:
        items = kube.client.list("configmaps", fields=fields)  # across namespaces
        return sorted(
            (o["metadata"]["namespace"], o["metadata"]["name"])
            for o in items
            if "test-" in o["metadata"]["namespace"]
        )

    assert found("metadata.name=a") == [(namespace, "a"), (f"{namespace}-2", "a")]
    assert found(f"metadata.namespace=={namespace},metadata.name!=a") == [(namespace, "b")]
    for bad in ({"labelSelector": "app in db"}, {"fieldSelector": "nonsense"}):
        with pytest.raises(ApiError) as refused:
            kube.client.request("GET", f"/api/v1/namespaces/{namespace}/configmaps", params=bad)
        assert refused.value.code == 400


def test_a_watch_sees_objects_enter_and_leave_its_selection(
    kube: KubeServer, namespace: str
) -> None:
    since = kube.client.create(configmap("a", namespace, {"app": "db"}))["metadata"][
        "resourceVersion"
    ]
    kube.client.patch("cm", "a", {"metadata": {"labels": {"app": "web"}}}, namespace=namespace)
    kube.client.patch("cm", "a", {"metadata": {"labels": {"app": "db"}}}, namespace=namespace)
    kube.client.create(configmap("b", namespace, {"app": "web"}))
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    events = list(
        watch(kube, path, resourceVersion=since, labelSelector="app=db", timeoutSeconds=1)
    )
    assert names(events) == [("DELETED", "a"), ("ADDED", "a")]


# API server: writes


def test_put_replaces_and_stale_resource_versions_conflict(
    widgets: KubeServer, namespace: str
) -> None:
    client = widgets.client
    first = client.create(widget("a", namespace, color="blue"))
    replaced = client.replace({**first, "spec": {"size": 5}})
    assert replaced["spec"] == {"size": 5, "color": "red"}  # replaced whole, then defaulted
    for stale_write in (
        lambda: client.replace({**first, "spec": {"size": 6}}),
        lambda: client.patch(
            "wg",
            "a",
            {
                "metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
                "spec": {"size": 7},
            },
            namespace=namespace,
        ),
        lambda: client.patch(
            "wg",
            "a",
            {
                "metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
                "status": {"x": 1},
            },
            namespace=namespace,
            subresource="status",
        ),
    ):
        with pytest.raises(ApiError) as stale:
            stale_write()
        assert stale.value.code == 409 and stale.value.reason == "Conflict"
    # kopf's JSON patches test the resourceVersion first and expect 422 when it moved on.
    stale_test = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": first["metadata"]["resourceVersion"],
        },
        {"op": "replace", "path": "/spec/size", "value": 8},
    ]
    with pytest.raises(ApiError) as failed_test:
        client.patch("wg", "a", stale_test, namespace=namespace)
    assert failed_test.value.code == 422
    no_version = {k: v for k, v in replaced.items() if k != "metadata"} | {
        "metadata": {"name": "a", "namespace": namespace}
    }
    with pytest.raises(ApiError) as unconditional:
        client.replace(no_version)
    assert (
        unconditional.value.code == 422
        and "metadata.resourceVersion" in unconditional.value.message
    )
    assert client.get("wg", "a", namespace=namespace)["spec"]["size"] == 5


SMP = {"Content-Type": "application/strategic-merge-patch+json"}


def test_patch_content_types_as_the_real_server(widgets: KubeServer, namespace: str) -> None:
    client = widgets.client
    client.create(configmap("a", namespace, finalizers=["x/a"]) | {"data": {"k": "v", "gone": "1"}})
    path = f"/api/v1/namespaces/{namespace}/configmaps/a"

    def finalizers() -> list[str]:
        return client.get("cm", "a", namespace=namespace)["metadata"]["finalizers"]

    # A strategic merge patch merges the lists Kubernetes declares mergeable...
    client.request("PATCH", path, json={"metadata": {"finalizers": ["x/b"]}}, headers=SMP)
    assert finalizers() == ["x/a", "x/b"]
    drop = {"metadata": {"$deleteFromPrimitiveList/finalizers": ["x/a"]}, "data": {"gone": None}}
    client.request("PATCH", path, json=drop, headers=SMP)
    assert finalizers() == ["x/b"]
    # ...where a merge patch replaces them.
    client.patch("cm", "a", {"metadata": {"finalizers": ["x/c"]}}, namespace=namespace)
    assert finalizers() == ["x/c"] and client.get("cm", "a", namespace=namespace)["data"] == {
        "k": "v"
    }
    for refused, code, body, kind in (
        ("a dict as a JSON patch", 400, {"data": {}}, "application/json-patch+json"),
        ("server-side apply", 415, {}, "application/apply-patch+yaml"),
    ):
        with pytest.raises(ApiError) as answer:
            client.request("PATCH", path, json=body, headers={"Content-Type": kind})
        assert answer.value.code == code, refused
    client.create(widget("w", namespace))
    with pytest.raises(ApiError) as custom:
        client.request(
            "PATCH", f"/apis/example.com/v1/namespaces/{namespace}/widgets/w", json={}, headers=SMP
        )
    assert custom.value.code == 415  # custom resources take no strategic merge patches


def test_strategic_merge_patches_merge_conditions_by_type(kube: KubeServer, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    kube.client.create(pod)
    path = f"/api/v1/namespaces/{namespace}/pods/p/status"
    for condition in (
        {"type": "A", "status": "True"},
        {"type": "B", "status": "True"},
        {"type": "A", "status": "False"},
    ):
        kube.client.request(
            "PATCH", path, json={"status": {"conditions": [condition]}}, headers=SMP
        )
    conditions = kube.client.get("pods", "p", namespace=namespace)["status"]["conditions"]
    assert conditions == [{"type": "A", "status": "False"}, {"type": "B", "status": "True"}]


def test_the_kubernetes_client_works_with_the_kubeconfig(
    widgets: KubeServer, namespace: str
) -> None:
    """As an operator using it would: its dict patches go as strategic merge patches, and it
    takes owner references only to objects with a uid."""
    api = kubernetes.config.new_client_from_config(config_file=str(widgets.kubeconfig))
    owner = widgets.client.create(widget("w", namespace))
    core = kubernetes.client.CoreV1Api(api)
    made = core.create_namespaced_config_map(
        namespace,
        kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(
                name="owned",
                finalizers=["x/a"],
                owner_references=[
                    kubernetes.client.V1OwnerReference(
                        api_version="example.com/v1",
                        kind="Widget",
                        name="w",
                        uid=owner["metadata"]["uid"],
                    )
                ],
            )
        ),
    )
    assert made.metadata.uid and made.metadata.resource_version
    patched = core.patch_namespaced_config_map(
        "owned", namespace, {"metadata": {"finalizers": ["x/b"]}}
    )
    assert patched.metadata.finalizers == ["x/a", "x/b"]
    listed = core.list_namespaced_config_map(namespace, label_selector="")
    assert [cm.metadata.name for cm in listed.items] == ["owned"]


@pytest.mark.parametrize("resource", ["wg", "pods", "pvc"])
def test_status_is_written_only_through_its_subresource(
    widgets: KubeServer, namespace: str, resource: str
) -> None:
    client = widgets.client
    body = {
        "wg": widget("a", namespace),
        "pods": {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": namespace},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        },
        "pvc": claim("a", namespace, "1Gi"),
    }[resource]
    created = client.create(body | {"status": {"phase": "Forged"}})
    assert created.get("status", {}).get("phase") != "Forged"  # status cannot be set on create
    main = client.patch(
        resource,
        "a",
        {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Forged"}},
        namespace=namespace,
    )
    assert main["metadata"]["labels"] == {"a": "b"} and main.get("status") == created.get("status")
    status = client.patch(
        resource,
        "a",
        {"metadata": {"labels": {"a": "c"}}, "status": {"phase": "Real"}},
        namespace=namespace,
        subresource="status",
    )
    assert status["status"]["phase"] == "Real" and status["metadata"]["labels"] == {"a": "b"}
    assert client.replace({**status, "status": {"phase": "Forged"}})["status"]["phase"] == "Real"


# API server: watches


def test_watch_from_a_resource_version_sees_only_later_changes(
    kube: KubeServer, namespace: str
) -> None:
    client = kube.client
    client.create(configmap("a", namespace))
    client.create(configmap("b", namespace))
    listed = client.request("GET", f"/api/v1/namespaces/{namespace}/configmaps").json()
    since = listed["metadata"]["resourceVersion"]
    assert int(since) >= max(int(o["metadata"]["resourceVersion"]) for o in listed["items"])
    client.patch("cm", "a", {"data": {"k": "v"}}, namespace=namespace)
    client.delete("cm", "b", namespace=namespace)
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    assert names(list(watch(kube, path, resourceVersion=since, timeoutSeconds=1))) == [
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert names(list(watch(kube, path, timeoutSeconds=1))) == [
        ("ADDED", "a")
    ]  # no version: current state


def test_a_watch_from_a_forgotten_version_gets_410(kube: KubeServer, namespace: str) -> None:
    since = kube.client.create(configmap("a", namespace))["metadata"]["resourceVersion"]
    kube.client.patch("cm", "a", {"data": {"k": "v"}}, namespace=namespace)
    kube.compact()  # as etcd compacts, and the watch cache's window moves on
    [event] = watch(kube, f"/api/v1/namespaces/{namespace}/configmaps", resourceVersion=since)
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


def test_watch_bookmarks_initial_events_and_timeout(kube: KubeServer, namespace: str) -> None:
    kube.call(setattr, kube.emulator, "bookmark_interval", 0.2)
    kube.client.create(configmap("a", namespace))
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    started = time.monotonic()
    events = list(
        watch(kube, path, sendInitialEvents="true", allowWatchBookmarks="true", timeoutSeconds=1)
    )
    assert time.monotonic() - started < 5  # the server ended the stream
    assert names(events[:1]) == [("ADDED", "a")]
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert [e["type"] for e in events[2:]] == ["BOOKMARK"] * len(events[2:]) and len(events) >= 4


def test_closing_watches_ends_streams(kube: KubeServer, namespace: str) -> None:
    stream = watch(kube, f"/api/v1/namespaces/{namespace}/configmaps")
    kube.client.create(configmap("a", namespace))
    assert next(stream)["type"] == "ADDED"
    kube.close_watches()
    assert list(stream) == []


# API server: deletion


def test_finalizers_hold_deletion_until_removed(kube: KubeServer, namespace: str) -> None:
    client = kube.client
    client.create(configmap("a", namespace, finalizers=["example.com/hold"]))
    held = client.delete("cm", "a", namespace=namespace)
    assert held["metadata"]["deletionTimestamp"]
    assert client.get("cm", "a", namespace=namespace)["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiError) as refused:
        client.patch(
            "cm",
            "a",
            {"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}},
            namespace=namespace,
        )
    assert refused.value.code == 422
    client.patch("cm", "a", {"metadata": {"finalizers": None}}, namespace=namespace)
    assert client.find("cm", "a", namespace=namespace) is None


def test_delete_preconditions(kube: KubeServer, namespace: str) -> None:
    kube.client.create(configmap("a", namespace))
    with pytest.raises(ApiError) as refused:
        kube.client.delete("cm", "a", namespace=namespace, preconditions={"uid": "not-its-uid"})
    assert refused.value.code == 409


def _chain(kube: KubeServer, namespace: str, name: str, *, hold: bool) -> tuple[Obj, Obj, Obj]:
    """A DataVolume-like owner → its PVC → the PVC's pod, as the operator builds them; `hold`
    puts a finalizer of the test's on the pod."""
    owner = kube.client.create(widget(name, namespace))
    pvc = claim(name, namespace, "1Gi")
    pvc["metadata"]["ownerReferences"] = owned_by(owner)
    pvc = kube.client.create(pvc)
    pod = kube.client.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"importer-{name}",
                "namespace": namespace,
                "ownerReferences": owned_by(pvc),
                "finalizers": ["example.com/hold"] if hold else [],
            },
            "spec": {
                "containers": [{"name": "c", "image": "x"}],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": name}}],
            },
        }
    )
    return owner, pvc, pod


def test_garbage_collection_cascades_in_the_background(widgets: KubeServer, namespace: str) -> None:
    client = widgets.client
    owner, _, _ = _chain(widgets, namespace, "a", hold=False)
    client.create(configmap("settings", namespace, ownerReferences=owned_by(owner)))
    client.delete("wg", "a", namespace=namespace)
    assert client.find("wg", "a", namespace=namespace) is None  # the owner goes first
    client.wait_gone("cm", "settings", namespace=namespace)
    pvc = client.wait_for(
        "pvc", "a", lambda p: p["metadata"].get("deletionTimestamp"), namespace=namespace
    )
    assert pvc["metadata"]["finalizers"] == ["kubernetes.io/pvc-protection"]
    # As in a real cluster: the PVC stays while a pod may use it, and that pod stays while its
    # owner (the PVC) exists: whoever deletes a DataVolume mid-import must end its pod.
    assert not client.get("pods", "importer-a", namespace=namespace)["metadata"].get(
        "deletionTimestamp"
    )
    client.delete("pods", "importer-a", namespace=namespace)
    client.wait_gone("pvc", "a", namespace=namespace)


def test_foreground_deletion_waits_for_dependents(widgets: KubeServer, namespace: str) -> None:
    client = widgets.client
    _chain(widgets, namespace, "a", hold=True)
    client.delete("wg", "a", namespace=namespace, propagation="Foreground")
    client.wait_for(
        "pods", "importer-a", lambda p: p["metadata"].get("deletionTimestamp"), namespace=namespace
    )
    owner = client.get("wg", "a", namespace=namespace)
    assert (
        owner["metadata"]["deletionTimestamp"]
        and "foregroundDeletion" in owner["metadata"]["finalizers"]
    )
    assert (
        "foregroundDeletion"
        in client.get("pvc", "a", namespace=namespace)["metadata"]["finalizers"]
    )
    client.patch("pods", "importer-a", {"metadata": {"finalizers": None}}, namespace=namespace)
    client.wait_gone("wg", "a", namespace=namespace)
    assert client.find("pvc", "a", namespace=namespace) is None


def test_orphaned_dependents_stay_and_dangling_ones_go(widgets: KubeServer, namespace: str) -> None:
    client = widgets.client
    owner = client.create(widget("a", namespace))
    client.create(configmap("kept", namespace, ownerReferences=owned_by(owner)))
    client.delete("wg", "a", namespace=namespace, propagation="Orphan")
    client.wait_gone("wg", "a", namespace=namespace)
    assert "ownerReferences" not in client.get("cm", "kept", namespace=namespace)["metadata"]
    dangling = owned_by(owner)  # that owner is gone now
    client.create(configmap("dangling", namespace, ownerReferences=dangling))
    client.wait_gone("cm", "dangling", namespace=namespace)


def test_deleting_a_namespace_deletes_what_is_in_it(kube: KubeServer, namespace: str) -> None:
    client = kube.client
    client.create(configmap("a", namespace))
    client.create(configmap("held", namespace, finalizers=["example.com/hold"]))
    client.delete("namespaces", namespace)
    client.wait_gone("cm", "a", namespace=namespace)
    assert client.get("namespaces", namespace)["status"]["phase"] == "Terminating"
    with pytest.raises(ApiError) as refused:
        client.create(configmap("b", namespace))
    assert refused.value.code == 403
    client.patch("cm", "held", {"metadata": {"finalizers": None}}, namespace=namespace)
    client.wait_gone("namespaces", namespace)


def test_list_pages_dry_runs_and_delete_collection(kube: KubeServer, namespace: str) -> None:
    client = kube.client
    for name in "abcde":
        client.create(configmap(name, namespace, {"batch": "1" if name < "d" else "2"}))
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    pages, params = [], {"limit": "2"}
    while True:
        page = client.request("GET", path, params=params).json()
        pages.append([obj["metadata"]["name"] for obj in page["items"]])
        if not page["metadata"].get("continue"):
            break
        params["continue"] = page["metadata"]["continue"]
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    dry = client.request("POST", path, params={"dryRun": "All"}, json=configmap("f", namespace))
    assert (
        dry.json()["metadata"]["name"] == "f"
        and client.find("cm", "f", namespace=namespace) is None
    )
    client.request("DELETE", path, params={"labelSelector": "batch=1"})
    assert [o["metadata"]["name"] for o in client.list("cm", namespace=namespace)] == ["d", "e"]


def test_reactions_added_with_kmocks_dsl_come_first(kube: KubeServer, namespace: str) -> None:
    kube.call(lambda: kube.emulator["post", kmock.resource("v1/configmaps")][:1] << 503)
    with pytest.raises(ApiError) as injected:
        kube.client.create(configmap("a", namespace))
    assert injected.value.code == 503
    kube.client.create(configmap("a", namespace))  # only the first one


# API server: custom resources


def test_schema_validation_names_the_field(widgets: KubeServer, namespace: str) -> None:
    client = widgets.client
    cases = {
        "spec.size: Required value": {"spec": {}},
        'spec.color: Unsupported value: "green": supported values: "red", "blue"': {
            "spec": {"size": 1, "color": "green"}
        },
        'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"': {
            "spec": {"size": "big"}
        },
        'spec.source: Invalid value: "object": must validate one and only one schema (oneOf). '
        "Found 2 valid alternatives": {
            "spec": {"size": 1, "source": {"http": {"url": "u"}, "blank": {}}}
        },
        "spec.source.http.url: Required value": {"spec": {"size": 1, "source": {"http": {}}}},
    }
    for message, body in cases.items():
        with pytest.raises(ApiError) as refused:
            client.create(widget("w", namespace) | body)
        assert refused.value.code == 422 and refused.value.reason == "Invalid"
        assert refused.value.message == f'Widget.example.com "w" is invalid: {message}'
        assert refused.value.details["causes"][0]["field"] == message.split(":")[0]
    created = client.create(widget("w", namespace, extra="pruned"))
    assert created["spec"] == {"size": 1, "color": "red"}  # unknown fields pruned, defaults set
    with pytest.raises(ApiError) as patched:
        client.patch("wg", "w", {"spec": {"size": 0}}, namespace=namespace)
    assert "spec.size in body should be greater than or equal to 1" in patched.value.message


def test_the_project_crd_is_served(kube: KubeServer, namespace: str) -> None:
    crds = [crd for crd in kube.client.list("crd") if crd["spec"]["group"] == "diskflow.io"]
    if not crds:
        pytest.skip("importer/controller/crd.yaml does not exist yet")
    assert kube.client.list("ddv", namespace=namespace) == []
    with pytest.raises(ApiError) as refused:
        kube.client.create(
            {
                "apiVersion": "diskflow.io/v1beta1",
                "kind": "DataVolume",
                "metadata": {"name": "x", "namespace": namespace},
                "spec": {},
            }
        )
    assert (
        refused.value.code == 422
        and 'DataVolume.diskflow.io "x" is invalid: ' in refused.value.message
    )
    assert "spec.source: Required value" in refused.value.message


def test_discovery_lists_builtin_and_custom_resources(widgets: KubeServer) -> None:
    core = requests.get(widgets.url + "/api/v1", timeout=10).json()
    assert {"pods", "pods/status", "pods/log", "persistentvolumeclaims/status", "namespaces"} <= {
        r["name"] for r in core["resources"]
    }
    groups = {g["name"] for g in requests.get(widgets.url + "/apis", timeout=10).json()["groups"]}
    assert {
        "example.com",
        "kopf.dev",
        "events.k8s.io",
        "storage.k8s.io",
        "coordination.k8s.io",
    } <= groups
    kopf = requests.get(widgets.url + "/apis/kopf.dev/v1", timeout=10).json()
    assert {(r["name"], r["namespaced"]) for r in kopf["resources"]} == {
        ("kopfpeerings", True),
        ("clusterkopfpeerings", False),
    }


# API server: speed and accounting


def test_requests_stay_fast_as_objects_pile_up(widgets: KubeServer, namespace: str) -> None:
    """Stock kmock slows down with every request it has served; this must not."""
    session = requests.Session()
    url = f"{widgets.url}/apis/example.com/v1/namespaces/{namespace}/widgets"
    took = []
    for i in range(2000):
        body = json.dumps(widget(f"w{i}", namespace))
        started = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": "application/json"})
        took.append(time.perf_counter() - started)
        assert response.status_code == 201
    # The fastest tenth: other load on the machine slows some requests, not all of them.
    first, last = (statistics.quantiles(took[s], n=10)[0] for s in (slice(100), slice(-100, None)))
    assert last < 2 * first, f"creates went from {first * 1e3:.2f} ms to {last * 1e3:.2f} ms"


def test_requests_are_counted_by_verb_and_resource(kube: KubeServer, namespace: str) -> None:
    kube.client.create(configmap("by-the-harness", namespace))  # not counted
    kube.reset_request_counts()
    path = f"{kube.url}/api/v1/namespaces/{namespace}/configmaps"
    requests.post(path, json=configmap("a", namespace), timeout=10)
    requests.get(f"{path}/a", timeout=10)
    requests.patch(
        f"{path}/a",
        json={"data": {}},
        headers={"Content-Type": "application/merge-patch+json"},
        timeout=10,
    )
    requests.get(path, timeout=10)
    assert kube.request_counts() == {
        ("create", "configmaps"): 1,
        ("get", "configmaps"): 1,
        ("patch", "configmaps"): 1,
        ("list", "configmaps"): 1,
    }


# A real operator


OPERATOR = """
import kopf

@kopf.on.create("example.com", "v1", "widgets")
def created(spec, patch, logger, **_):
    logger.info(f"widget of size {spec['size']} created")
    patch.status["seen"] = spec["size"]
"""


def test_a_kopf_operator_logs_in_with_the_kubeconfig(
    widgets: KubeServer, namespace: str, operator: StartOperator, tmp_path: Path
) -> None:
    (tmp_path / "op.py").write_text(OPERATOR)
    process = operator(
        "kopf", "run", "--standalone", "--namespace", namespace, str(tmp_path / "op.py")
    )
    widgets.client.create(widget("w", namespace, size=3))
    process.wait_for_output("widget of size 3 created")
    assert "Activity 'login_via_client' succeeded" in process.output()  # from KUBECONFIG
    widgets.client.wait_for(
        "wg", "w", lambda w: w.get("status", {}).get("seen") == 3, namespace=namespace
    )
    assert widgets.request_counts()["patch", "widgets.example.com/status"] >= 1  # kopf used /status
    assert process.stop() == 0


# The kubelet stand-in


def claim(name: str, namespace: str, storage: str, **spec: Any) -> Obj:
    """A PVC asking for `storage`; `spec` adds to its spec (storageClassName, volumeMode...)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"resources": {"requests": {"storage": storage}}, **spec},
    }


def python_pod(name: str, namespace: str, script: str, *args: str, **spec: Any) -> Obj:
    """A pod whose one container runs a Python script; `spec` adds to the container's spec,
    except `volumes`, `grace` (terminationGracePeriodSeconds) and `restartPolicy`."""
    volumes = spec.pop("volumes", [])
    pod_spec = {
        "restartPolicy": spec.pop("restartPolicy", "Never"),
        "volumes": volumes,
        "containers": [
            {
                "name": "main",
                "image": "python",
                "command": ["python3", "-c", script],
                "args": list(args),
                **spec,
            }
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": pod_spec,
    }


def phase(*phases: str) -> Any:
    return lambda pod: pod["status"].get("phase") in phases


def container_state(pod: Obj) -> Obj:
    return pod["status"].get("containerStatuses", [{}])[0].get("state", {})


WRITER = """
import os, sys
token_file, message_option, data_dir = sys.argv[1:]
message_file = message_option.removeprefix("--message=")
print("password", os.environ["PASSWORD"], "ip", os.environ["POD_IP"], "pod", os.environ["POD_NAME"])
token = open(token_file).read()
open(os.path.join(data_dir, "disk.img"), "w").write(token)
open(message_file, "w").write("imported " + token + " " + "x" * 5000)
"""


def test_a_pod_runs_its_command_with_secrets_volumes_and_termination_message(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": namespace},
            "data": {"token": base64.b64encode(b"t0ken").decode()},
            "stringData": {"password": "hunter2"},
        }
    )
    client.create(claim("disk", namespace, "1Gi", accessModes=["ReadWriteOnce"]))
    client.create(
        python_pod(
            "importer",
            namespace,
            WRITER,
            "/etc/creds/token",
            "--message=/dev/termination-log",
            "/data",
            env=[
                {
                    "name": "PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
                },
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            volumeMounts=[
                {"name": "data", "mountPath": "/data"},
                {"name": "creds", "mountPath": "/etc/creds"},
            ],
            volumes=[
                {"name": "data", "persistentVolumeClaim": {"claimName": "disk"}},
                {
                    "name": "creds",
                    "secret": {"secretName": "creds", "items": [{"key": "token", "path": "token"}]},
                },
            ],
        )
    )
    pod = client.wait_for("pods", "importer", phase("Succeeded", "Failed"), namespace=namespace)
    terminated = container_state(pod)["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == (
        "Succeeded",
        0,
        "Completed",
    )
    assert (
        terminated["message"].startswith("imported t0ken xxx")
        and len(terminated["message"]) == 4096
    )
    assert (kubelet.volume_path(namespace, "disk") / "disk.img").read_text() == "t0ken"
    ip = pod["status"]["podIP"]
    assert client.log("importer", namespace=namespace) == f"password hunter2 ip {ip} pod importer\n"
    assert client.get("pvc", "disk", namespace=namespace)["status"] == {
        "phase": "Bound",
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
    }
    assert [p.returncode for p in kubelet.processes(namespace)] == [0]


LISTENER = """
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
server = socket.socket()
server.bind((os.environ["POD_IP"], 18443))
server.listen()
print("listening", flush=True)
signal.pause()
"""
POD_IP_ENV = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]


def test_pods_get_their_own_address_and_sigterm_on_deletion(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    for name in ("one", "two"):
        client.create(python_pod(name, namespace, LISTENER, env=POD_IP_ENV))
    for name in ("one", "two"):
        poll(
            lambda name=name: "listening" in client.log(name, namespace=namespace),
            timeout=10,
            what=f"{name} listens",
        )
    ips = {
        client.get("pods", name, namespace=namespace)["status"]["podIP"] for name in ("one", "two")
    }
    assert len(ips) == 2 and all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    for name in ("one", "two"):
        client.delete("pods", name, namespace=namespace)
        client.wait_gone("pods", name, namespace=namespace)
    assert [p.returncode for p in kubelet.processes(namespace)] == [0, 0]
    assert all("got SIGTERM" in p.log.read_text() for p in kubelet.processes(namespace))


STUBBORN = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
signal.pause()
"""


def test_sigkill_after_the_grace_period(kube: KubeServer, kubelet: Kubelet, namespace: str) -> None:
    pod = python_pod("stubborn", namespace, STUBBORN)
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    kube.client.create(pod)
    poll(
        lambda: "ignoring" in kube.client.log("stubborn", namespace=namespace),
        timeout=10,
        what="started",
    )
    started = time.monotonic()
    kube.client.delete("pods", "stubborn", namespace=namespace)
    assert (
        kube.client.get("pods", "stubborn", namespace=namespace)["metadata"][
            "deletionGracePeriodSeconds"
        ]
        == 1
    )
    kube.client.wait_gone("pods", "stubborn", namespace=namespace)
    assert time.monotonic() - started >= 0.9
    assert [p.returncode for p in kubelet.processes(namespace)] == [137]


def test_missing_secrets_keep_pods_pending_as_the_kubelet_does(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(
        python_pod(
            "env",
            namespace,
            "print('ran')",
            env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "x"}}}],
        )
    )
    client.create(
        python_pod(
            "files",
            namespace,
            "print('ran')",
            volumeMounts=[{"name": "s", "mountPath": "/s"}],
            volumes=[{"name": "s", "secret": {"secretName": "later"}}],
        )
    )
    waiting = {"env": "CreateContainerConfigError", "files": "ContainerCreating"}
    for name, reason in waiting.items():
        pod = client.wait_for(
            "pods",
            name,
            lambda p, r=reason: container_state(p).get("waiting", {}).get("reason") == r,
            namespace=namespace,
        )
        assert pod["status"]["phase"] == "Pending"
    events = {
        (e["involvedObject"]["name"], e["reason"], e["message"])
        for e in client.events(namespace=namespace)
    }
    assert ("env", "Failed", 'secret "later" not found') in events
    assert (
        "files",
        "FailedMount",
        'MountVolume.SetUp failed for volume "s" : secret "later" not found',
    ) in events
    assert kubelet.processes(namespace) == []
    client.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later", "namespace": namespace},
            "stringData": {"x": "1"},
        }
    )
    for name in waiting:
        client.wait_for("pods", name, phase("Succeeded"), namespace=namespace)


def test_wait_for_first_consumer(kube: KubeServer, kubelet: Kubelet, namespace: str) -> None:
    client = kube.client
    client.create(claim("late", namespace, "1Mi", storageClassName="wffc"))
    poll(
        lambda: any(
            e["reason"] == "WaitForFirstConsumer"
            for e in client.events(namespace=namespace, involving="late")
        ),
        timeout=10,
        what="a WaitForFirstConsumer event",
    )
    assert client.get("pvc", "late", namespace=namespace)["status"]["phase"] == "Pending"
    client.create(
        python_pod(
            "consumer",
            namespace,
            "print('ran')",
            volumeMounts=[{"name": "d", "mountPath": "/d"}],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "late"}}],
        )
    )
    client.wait_for("pods", "consumer", phase("Succeeded"), namespace=namespace)
    pvc = client.get("pvc", "late", namespace=namespace)
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == kubelet.node_name


def test_capacity_rounded_up_as_a_storage_class_may(
    kube: KubeServer, namespace: str, tmp_path: Path
) -> None:
    with Kubelet(kube, tmp_path / "node", capacity_step=1 << 30):
        kube.client.create(claim("odd", namespace, "1500Mi"))
        pvc = kube.client.wait_for("pvc", "odd", phase("Bound"), namespace=namespace)
    assert pvc["status"]["capacity"] == {"storage": "2Gi"}


@pytest.mark.parametrize("hook", ["evict", "oom_kill", "vanish"])
def test_hooks_end_a_running_pod(
    kube: KubeServer, kubelet: Kubelet, namespace: str, hook: str
) -> None:
    client = kube.client
    client.create(python_pod("victim", namespace, STUBBORN))
    running = client.wait_for("pods", "victim", phase("Running"), namespace=namespace)
    assert container_state(running)["running"]["startedAt"]
    poll(
        lambda: "ignoring" in client.log("victim", namespace=namespace), timeout=10, what="started"
    )
    getattr(kubelet, hook)(namespace, "victim")
    assert [p.returncode for p in kubelet.processes(namespace)] == [137]
    if hook == "vanish":
        path = f"/api/v1/namespaces/{namespace}/pods"
        since = running["metadata"]["resourceVersion"]
        events = list(watch(kube, path, resourceVersion=since, timeoutSeconds=1))
        assert [e["type"] for e in events] == ["DELETED"]  # and no terminated status before it
        assert events[0]["object"]["status"]["phase"] == "Running"
        return
    pod = client.get("pods", "victim", namespace=namespace)
    terminated = container_state(pod)["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"]) == ("Failed", 137)
    if hook == "evict":
        assert pod["status"]["reason"] == "Evicted"
    else:
        assert terminated["reason"] == "OOMKilled"


def test_restart_policies_other_than_never_are_refused(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    kube.client.create(python_pod("always", namespace, "print('ran')", restartPolicy="Always"))
    pod = kube.client.wait_for(
        "pods", "always", lambda p: container_state(p).get("waiting"), namespace=namespace
    )
    assert container_state(pod)["waiting"]["reason"] == "HarnessUnsupported"
    assert kubelet.processes() == [] and len(kubelet.errors) == 1
    assert "restartPolicy Always" in kubelet.errors[0]
    kubelet.errors.clear()  # expected here; any other refusal fails the test


def test_pvc_in_use_stays_until_its_pod_ends(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(claim("d", namespace, "1Mi"))
    client.create(
        python_pod(
            "user",
            namespace,
            STUBBORN,
            volumeMounts=[{"name": "d", "mountPath": "/d"}],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "d"}}],
        )
    )
    client.wait_for("pods", "user", phase("Running"), namespace=namespace)
    host_dir = kubelet.volume_path(namespace, "d")
    client.delete("pvc", "d", namespace=namespace)
    assert client.get("pvc", "d", namespace=namespace)["metadata"]["deletionTimestamp"]
    client.delete("pods", "user", namespace=namespace, grace_period=0)
    client.wait_gone("pvc", "d", namespace=namespace)
    poll(lambda: not host_dir.exists(), timeout=10, what="the volume's directory removed")


BLOCK_WRITER = """
import sys
with open(sys.argv[1], "r+b") as device:
    device.write(b"written through the device")
"""


@pytest.mark.loop
@pytest.mark.root
def test_block_volumes_get_a_loop_device(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(claim("raw", namespace, "4Mi", volumeMode="Block"))
    client.create(
        python_pod(
            "writer",
            namespace,
            BLOCK_WRITER,
            "/dev/disk",
            volumeDevices=[{"name": "raw", "devicePath": "/dev/disk"}],
            volumes=[{"name": "raw", "persistentVolumeClaim": {"claimName": "raw"}}],
        )
    )
    client.wait_for("pods", "writer", phase("Succeeded"), namespace=namespace)
    device = kubelet.volume_path(namespace, "raw")
    assert str(device).startswith("/dev/loop")
    with open(device, "rb") as f:
        assert f.read(26) == b"written through the device"


FAILING = """
import os, sys
print("greeting", sys.argv[1], "level", os.environ["CFG_level"], open(sys.argv[2]).read())
sys.exit(3)
"""


def test_config_maps_env_from_and_messages_from_logs(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": namespace},
            "data": {"level": "debug", "greeting": "hello", "ca.pem": "PEM"},
        }
    )
    client.create(
        python_pod(
            "failing",
            namespace,
            FAILING,
            "$(GREETING)",
            "/certs/bundle/ca.pem",
            envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            env=[
                {
                    "name": "GREETING",
                    "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}},
                }
            ],
            terminationMessagePolicy="FallbackToLogsOnError",
            volumeMounts=[{"name": "certs", "mountPath": "/certs"}],
            volumes=[
                {
                    "name": "certs",
                    "configMap": {
                        "name": "cfg",
                        "items": [{"key": "ca.pem", "path": "bundle/ca.pem"}],
                    },
                }
            ],
        )
    )
    pod = client.wait_for("pods", "failing", phase("Failed"), namespace=namespace)
    terminated = container_state(pod)["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert terminated["message"] == "greeting hello level debug PEM\n"  # from the log


def test_diskflow_commands_run_from_the_checkout(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    pod = python_pod("version", namespace, "")
    pod["spec"]["containers"][0]["command"] = ["diskflow", "--version"]
    kube.client.create(pod)
    kube.client.wait_for("pods", "version", phase("Succeeded"), namespace=namespace)
    assert kubelet.processes(namespace)[0].argv[:3] == [sys.executable, "-m", "diskflow"]
    assert re.search(r"\d+\.\d+", kube.client.log("version", namespace=namespace))


def test_pods_and_claims_wait_for_what_they_lack(
    kube: KubeServer, kubelet: Kubelet, namespace: str
) -> None:
    client = kube.client
    client.create(claim("classless", namespace, "1Mi", storageClassName="nope"))
    client.create(
        python_pod(
            "orphan",
            namespace,
            "print('ran')",
            volumeMounts=[{"name": "d", "mountPath": "/d"}],
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "ghost"}}],
        )
    )

    def reasons() -> set[tuple[str, str, str]]:
        events = client.events(namespace=namespace)
        return {(e["involvedObject"]["name"], e["reason"], e["message"]) for e in events}

    expected = {
        ("classless", "ProvisioningFailed", 'storageclass.storage.k8s.io "nope" not found'),
        (
            "orphan",
            "FailedScheduling",
            '0/1 nodes are available: persistentvolumeclaim "ghost" not found.',
        ),
    }
    poll(lambda: expected <= reasons(), timeout=10, what=lambda: f"events {reasons()}")
    pod = client.get("pods", "orphan", namespace=namespace)
    assert pod["status"]["conditions"][0]["reason"] == "Unschedulable"
    assert client.get("pvc", "classless", namespace=namespace)["status"]["phase"] == "Pending"
