"""A CRD's structural schema applied as the API server applies it on every write: unknown
fields pruned, defaults filled in, then validation, whose errors name the field."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import jsonschema

# Fields the server owns on every object whatever the schema says.
_ROOT_FIELDS = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class Cause:
    """One field error, as a Kubernetes Status lists it in `details.causes`."""

    reason: str  # FieldValueRequired, FieldValueInvalid, FieldValueNotSupported, ...
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def as_status_cause(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


def _json_schema(schema: Any) -> Any:
    """OpenAPI v3 as JSON Schema draft 4: `nullable` and int-or-string made explicit."""
    if isinstance(schema, list):
        return [_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _json_schema(value) for key, value in schema.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out:
        out["type"] = ["integer", "string"]
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _shown(value: Any) -> str:
    """How the server quotes a bad value: scalars as JSON, containers by their type."""
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


class Schema:
    """The `openAPIV3Schema` of one CRD version."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._validator = jsonschema.Draft4Validator(_json_schema(schema))

    def admit(self, obj: dict[str, Any]) -> tuple[dict[str, Any], list[Cause]]:
        """The object as the server would store it, and what is wrong with it."""
        admitted = {key: obj[key] for key in _ROOT_FIELDS if key in obj}
        rest = {key: value for key, value in obj.items() if key not in _ROOT_FIELDS}
        admitted |= _prune(rest, self.schema)
        _default(admitted, self.schema)
        return admitted, self._causes(admitted)

    def _causes(self, obj: dict[str, Any]) -> list[Cause]:
        causes = []
        for error in sorted(self._validator.iter_errors(obj), key=lambda e: list(e.path)):
            if list(error.path)[:1] in (["metadata"], ["apiVersion"], ["kind"]):
                continue  # the server checks these itself
            causes.extend(self._explain(error))
        return causes

    def _explain(self, error: jsonschema.ValidationError) -> list[Cause]:
        field = _path(error.absolute_path)
        value, kind = error.instance, error.validator
        if kind == "required":
            missing = [name for name in error.validator_value if name not in (value or {})]
            return [
                Cause("FieldValueRequired", _path([*error.absolute_path, name]), "Required value")
                for name in missing
            ]
        if kind == "enum":
            allowed = ", ".join(json.dumps(v) for v in error.validator_value)
            return [
                Cause(
                    "FieldValueNotSupported",
                    field,
                    f"Unsupported value: {_shown(value)}: supported values: {allowed}",
                )
            ]
        if kind == "type":
            wanted = error.validator_value
            wanted = wanted if isinstance(wanted, str) else " or ".join(wanted)
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            return [
                Cause(
                    "FieldValueTypeInvalid",
                    field,
                    f'Invalid value: "{got}": {field} in body must be of type {wanted}: "{got}"',
                )
            ]
        if kind == "oneOf":
            valid = sum(
                jsonschema.Draft4Validator(sub).is_valid(value) for sub in error.validator_value
            )
            detail = (
                f"must validate one and only one schema (oneOf). Found {valid} valid alternatives"
            )
            return [Cause("FieldValueInvalid", field, f"Invalid value: {_shown(value)}: {detail}")]
        detail = _MESSAGES.get(kind, "{message}").format(
            field=field, bound=error.validator_value, message=error.message
        )
        return [Cause("FieldValueInvalid", field, f"Invalid value: {_shown(value)}: {detail}")]


_MESSAGES = {
    "pattern": "{field} in body should match '{bound}'",
    "minLength": "{field} in body should be at least {bound} chars long",
    "maxLength": "{field} in body may not be longer than {bound}",
    "minimum": "{field} in body should be greater than or equal to {bound}",
    "maximum": "{field} in body should be less than or equal to {bound}",
    "minItems": "{field} in body should have at least {bound} items",
    "maxItems": "{field} in body must have at most {bound} items",
    "not": "{field} in body must not validate the schema (not)",
    "anyOf": "{field} in body must validate at least one schema (anyOf)",
}


def _prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop what the schema does not declare, unless it preserves unknown fields."""
    if isinstance(value, list):
        items = schema.get("items")
        return [_prune(v, items) if isinstance(items, dict) else v for v in value]
    if not isinstance(value, dict):
        return value
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
    embedded = schema.get("x-kubernetes-embedded-resource")
    out = {}
    for key, item in value.items():
        if key in properties:
            out[key] = _prune(item, properties[key])
        elif isinstance(extra, dict):
            out[key] = _prune(item, extra)
        elif keep_unknown or (embedded and key in _ROOT_FIELDS):
            out[key] = item
    return out


def _default(value: Any, schema: dict[str, Any]) -> None:
    """Fill in `default`s of absent properties, in place, all the way down."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(item, schema["items"])
    if not isinstance(value, dict):
        return
    for key, sub in (schema.get("properties") or {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            _default(value[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in set(value) - set(schema.get("properties") or {}):
            _default(value[key], extra)
