"""Plain helpers over object dicts: timestamps, metadata checks, merge and JSON patches."""

from __future__ import annotations

import base64
import copy
import datetime
import random
import re
from typing import Any

import jsonpatch

from tests.support.kube.schema import Cause

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# Kinds whose names must be DNS labels (63 characters), not subdomains (253).
_LABEL_NAMED = {"Namespace", "Service"}
# What generateName appends: the alphabet of Kubernetes' utilrand.String.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now(offset: float = 0) -> str:
    """An RFC 3339 timestamp with whole seconds, as the API server writes them."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def generated_name(prefix: str) -> str:
    return prefix + "".join(random.choices(_SUFFIX_ALPHABET, k=5))


def _name_causes(kind: str, name: str) -> list[Cause]:
    if kind in _LABEL_NAMED:
        ok, what, limit = _LABEL.fullmatch(name), "RFC 1123 label", 63
    else:
        ok, what, limit = _SUBDOMAIN.fullmatch(name), "RFC 1123 subdomain", 253
    if ok and len(name) <= limit:
        return []
    return [
        Cause(
            "FieldValueInvalid",
            "metadata.name",
            f'Invalid value: "{name}": a lowercase {what} must consist of lower case '
            f"alphanumeric characters, '-' or '.', and be at most {limit} characters",
        )
    ]


def _qualified_name_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.fullmatch(name))


def metadata_causes(kind: str, obj: dict[str, Any]) -> list[Cause]:
    """What the server refuses in any object's metadata: bad names, labels, owners."""
    meta = obj["metadata"]
    causes = _name_causes(kind, meta["name"])
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name_ok(key):
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    f"metadata.labels[{key}]",
                    f'Invalid value: "{key}": name part must be at most 63 valid characters',
                )
            )
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    f"metadata.labels[{key}]",
                    f'Invalid value: "{value}": a valid label must be an empty string or '
                    "consist of at most 63 alphanumeric characters, '-', '_' or '.'",
                )
            )
    for key in meta.get("annotations") or {}:
        if not _qualified_name_ok(key):
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    "metadata.annotations",
                    f'Invalid value: "{key}": name part must be at most 63 valid characters',
                )
            )
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                causes.append(
                    Cause(
                        "FieldValueRequired",
                        f"metadata.ownerReferences[{i}].{field}",
                        "Required value",
                    )
                )
    return causes


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# Lists a strategic merge patch merges rather than replaces (Kubernetes' patchStrategy
# "merge"), by path in built-in objects: the merge key of their items, or None for a list of
# scalars merged as a set.
_MERGE_KEYS: dict[str, str | None] = {
    "metadata.finalizers": None,
    "metadata.ownerReferences": "uid",
    "spec.containers": "name",
    "spec.initContainers": "name",
    "spec.volumes": "name",
    "spec.imagePullSecrets": "name",
    "spec.containers[].env": "name",
    "spec.containers[].volumeMounts": "mountPath",
    "spec.containers[].volumeDevices": "devicePath",
    "spec.containers[].ports": "containerPort",
    "spec.ports": "port",
    "status.conditions": "type",
    "status.addresses": "type",
}


def strategic_merge_patch(target: Any, patch: Any, path: str = "") -> Any:
    """Kubernetes' strategic merge patch for built-in objects: a merge patch, except that
    the lists above merge by key, and the `$patch` (replace, delete) and
    `$deleteFromPrimitiveList` directives apply; ordering hints are ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {key: copy.deepcopy(value) for key, value in patch.items() if key != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        where = f"{path}.{key}" if path else key
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.partition("/")[2]
            out[field] = [item for item in out.get(field) or [] if item not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder, $retainKeys
        elif value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            out.pop(key, None)
        elif isinstance(value, list) and where in _MERGE_KEYS:
            out[key] = _merge_list(out.get(key) or [], value, _MERGE_KEYS[where], where)
        else:
            out[key] = strategic_merge_patch(out.get(key), value, where)
    return out


def _merge_list(current: list[Any], items: list[Any], key: str | None, path: str) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in items):
        return [
            copy.deepcopy(item)
            for item in items
            if not (isinstance(item, dict) and "$patch" in item)
        ]
    merged = list(current)
    for item in items:
        if key is None:
            if item not in merged:
                merged.append(item)
            continue
        at = next((n for n, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del merged[at]
        else:
            merged_item = strategic_merge_patch(
                None if at is None else merged[at], item, f"{path}[]"
            )
            if at is None:
                merged.append(merged_item)
            else:
                merged[at] = merged_item
    return merged


def json_patch(target: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """RFC 6902 JSON patch; raises ValueError (the server's 422) when it does not apply."""
    try:
        return jsonpatch.apply_patch(target, operations)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
        raise ValueError(str(exc)) from exc


def without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in keys}


def fold_string_data(secret: dict[str, Any]) -> None:
    """A Secret's write-only `stringData` goes into `data`, base64-encoded, as the API does."""
    strings = secret.pop("stringData", None) or {}
    if strings:
        data = secret.setdefault("data", {})
        for key, value in strings.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    secret.setdefault("type", "Opaque")
