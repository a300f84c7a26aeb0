"""Label and field selectors, parsed and matched as the API server does for list and watch."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Matcher = Callable[[dict[str, Any]], bool]

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"({_KEY})\s+(in|notin)\s+\(([^()]*)\)")
_EQUALITY = re.compile(rf"({_KEY})\s*(==|!=|=)\s*({_VALUE})")
_NUMERIC = re.compile(rf"({_KEY})\s*([<>])\s*(-?[0-9]+)")
_EXISTS = re.compile(rf"(!?)\s*({_KEY})")
_FIELD = re.compile(r"([A-Za-z0-9_.\[\]'\"/-]+?)\s*(==|!=|=)\s*(.*)")


class SelectorError(ValueError):
    """A selector the API server would refuse with 400 Bad Request."""


def _split(text: str) -> list[str]:
    """Requirements are comma-separated, but `in (a,b)` holds commas of its own."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _label_requirement(text: str) -> Matcher:
    if match := _SET.fullmatch(text):
        key, op = match[1], match[2]
        values = {v.strip() for v in match[3].split(",") if v.strip()}
        if not values or any(not re.fullmatch(_VALUE, v) for v in values):
            raise SelectorError(f"invalid values in label selector {text!r}")
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQUALITY.fullmatch(text):
        key, op, value = match[1], match[2], match[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _NUMERIC.fullmatch(text):
        key, op, bound = match[1], match[2], int(match[3])

        def numeric(labels: dict[str, str]) -> bool:
            try:
                number = int(labels[key])
            except (KeyError, ValueError):
                return False
            return number > bound if op == ">" else number < bound

        return numeric
    if match := _EXISTS.fullmatch(text):
        negated, key = match[1] == "!", match[2]
        return lambda labels: (key in labels) != negated
    raise SelectorError(f"unable to parse requirement {text!r} of a label selector")


def label_selector(text: str | None) -> Matcher:
    """A matcher of objects for `labelSelector` (equality- and set-based requirements)."""
    requirements = [_label_requirement(part) for part in _split(text or "")]

    def matches(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(requirement(labels) for requirement in requirements)

    return matches


def field_value(obj: dict[str, Any], path: str) -> str:
    """A field as a field selector compares it: a string, "" when absent."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None or isinstance(value, dict | list) else str(value)


def field_selector(text: str | None) -> Matcher:
    """A matcher for `fieldSelector`: `=`, `==`, `!=` over any dotted path (see README)."""
    requirements = []
    for part in _split(text or ""):
        match = _FIELD.fullmatch(part)
        if not match:
            raise SelectorError(f"invalid field selector requirement {part!r}")
        path, op, value = match[1], match[2], match[3].strip()
        requirements.append((path, op == "!=", value))

    def matches(obj: dict[str, Any]) -> bool:
        return all((field_value(obj, p) == v) != negated for p, negated, v in requirements)

    return matches
