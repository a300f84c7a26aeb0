"""RBAC as the API server's authorizer applies it, for one service account: the rules of the
Roles and ClusterRoles bound to it, and whether a request is allowed by one of them. Given
the objects a Helm chart renders, controller tests run the operator with exactly the
permissions the chart grants it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Grant:
    """One rule of a bound role; `namespace` None: granted in every namespace and for
    cluster-scoped resources (a ClusterRoleBinding)."""

    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]
    namespace: str | None

    def allows(
        self, verb: str, group: str, resource: str, namespace: str | None, name: str | None
    ) -> bool:
        return (
            _has(self.verbs, verb)
            and _has(self.groups, group)
            and _has(self.resources, resource)
            and (self.namespace is None or self.namespace == namespace)
            and (not self.names or name in self.names)
        )


def _has(allowed: frozenset[str], value: str) -> bool:
    return "*" in allowed or value in allowed


class Authorizer:
    """What the service account `namespace`/`name` may do, from the RBAC objects among
    `objects` (any others are ignored)."""

    def __init__(self, objects: Iterable[dict[str, Any]], *, namespace: str, name: str) -> None:
        objects = list(objects)
        self.user = f"system:serviceaccount:{namespace}:{name}"
        roles = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o.get("rules", [])
            for o in objects
            if o["kind"] in ("Role", "ClusterRole")
        }
        self.grants: list[Grant] = []
        for binding in objects:
            if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            subject = {"kind": "ServiceAccount", "namespace": namespace, "name": name}
            subjects = [
                {"kind": s["kind"], "namespace": s.get("namespace"), "name": s["name"]}
                for s in binding.get("subjects", [])
            ]
            if subject not in subjects:
                continue
            where = (
                binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            )
            ref = binding["roleRef"]
            role_namespace = where if ref["kind"] == "Role" else None
            for rule in roles.get((ref["kind"], role_namespace, ref["name"]), []):
                self.grants.append(
                    Grant(
                        frozenset(rule.get("apiGroups", [])),
                        frozenset(rule.get("resources", [])),
                        frozenset(rule.get("verbs", [])),
                        frozenset(rule.get("resourceNames", [])),
                        where,
                    )
                )

    def allows(
        self, verb: str, group: str, resource: str, namespace: str | None, name: str | None = None
    ) -> bool:
        """Whether one grant allows `verb` on `resource` ("pods", "datavolumes/status") of
        API group `group` ("" for core) in `namespace` (None: cluster-wide or cluster-scoped)."""
        return any(g.allows(verb, group, resource, namespace, name) for g in self.grants)

    def granted(self) -> set[tuple[str, str, str]]:
        """Every (verb, group, resource) some grant names (wildcards as written)."""
        return {
            (v, g, r)
            for grant in self.grants
            for v in grant.verbs
            for g in grant.groups
            for r in grant.resources
        }
