"""The CRD (importer/controller/crd.yaml): a structural schema the API server accepts, that
declares the fields the model reads — no more, no less — and validates what the model, the
examples and the README write, refusing malformed manifests naming the field.

The API server applies the schema after pruning the fields it does not declare; `kubectl
apply` refuses those (strict field validation, its default). `schema_errors()` checks a
manifest the same way, offline: the schema with every object closed to undeclared fields.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from importer.api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    VERSION,
    DataVolume,
    ManifestError,
    crd_path,
    crd_schema,
    load_crd,
)
from tests.contracts.test_api import CDI_MANIFESTS, FULL, MALFORMED

REPO = Path(__file__).resolve().parents[2]
CRD = load_crd()
SCHEMA = crd_schema(CRD)
# Keywords the API server refuses in a CRD's schema, and those a structural schema may not
# use inside allOf, anyOf, oneOf or not.
FORBIDDEN = {"$ref", "$schema", "id", "definitions", "dependencies", "additionalItems",
             "patternProperties"}  # fmt: skip
NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
TYPES = ("object", "array", "string", "integer", "number", "boolean")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every object that declares its fields closed to others: what the API
    server prunes, kubectl's strict field validation refuses."""
    closed = copy.deepcopy(schema)

    def close(node: Any, *, under_metadata: bool = False) -> None:
        if isinstance(node, list):
            for item in node:
                close(item)
        if not isinstance(node, dict):
            return
        if (
            node.get("type") == "object"
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
            and not under_metadata
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for name, child in value.items():
                    close(child, under_metadata=node is closed and name == "metadata")
            else:
                close(value)

    close(closed)
    return closed


VALIDATOR = Draft4Validator(strict(SCHEMA))


def schema_errors(manifest: Any) -> list[str]:
    """ "path: message" of each error the API server (with kubectl's strict field validation)
    would refuse `manifest` for; empty when it accepts it."""
    return sorted(
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in VALIDATOR.iter_errors(manifest)
    )


def test_the_crd_is_diskflows_datavolume() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["kind"] == "CustomResourceDefinition"
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}" == "datavolumes.diskflow.io"
    spec = CRD["spec"]
    assert spec["group"] == GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == KIND and spec["names"]["plural"] == PLURAL
    assert spec["names"]["shortNames"] == [SHORT_NAME] == ["ddv"]
    [version] = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert f"{GROUP}/{VERSION}" == API_VERSION
    assert version["subresources"] == {"status": {}}


def test_printer_columns_are_cdis_plus_stage_and_reason() -> None:
    [version] = CRD["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == [
        "Phase",
        "Progress",
        "Restarts",
        "Stage",
        "Reason",
        "Age",
    ]
    for column in columns:
        assert column["type"] in ("string", "integer", "number", "boolean", "date")
        *parents, last = column["jsonPath"].lstrip(".").split(".")
        node = SCHEMA if parents != ["metadata"] else None
        for part in parents if node else ():
            node = node["properties"][part]
        assert node is None or last in node["properties"], column


def test_the_schema_is_valid_json_schema() -> None:
    Draft4Validator.check_schema(SCHEMA)


def test_the_schema_is_structural() -> None:
    problems: list[str] = []

    def walk(node: dict[str, Any], path: str, *, in_junctor: bool = False) -> None:
        problems.extend(f"{path}: {key}" for key in FORBIDDEN & set(node))
        if node.get("uniqueItems") is True:
            problems.append(f"{path}: uniqueItems")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties")
        int_or_string = node.get("x-kubernetes-int-or-string")
        typed = int_or_string or node.get("x-kubernetes-preserve-unknown-fields")
        if in_junctor:
            problems.extend(f"{path}: {key} in a junctor" for key in NOT_IN_JUNCTORS & set(node))
        elif not typed and node.get("type") not in TYPES:
            problems.append(f"{path}: no type")
        if int_or_string and node.get("anyOf") != [{"type": "integer"}, {"type": "string"}]:
            problems.append(f"{path}: int-or-string without anyOf integer, string")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}", in_junctor=in_junctor)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}", in_junctor=in_junctor)
        for junctor in JUNCTORS:
            branches = node.get(junctor, [])
            for n, branch in enumerate(branches if isinstance(branches, list) else [branches]):
                if int_or_string and junctor == "anyOf":
                    continue  # the one place a junctor holds types
                where = f"{path}.{junctor}[{n}]"
                walk(branch, where, in_junctor=True)
                if not in_junctor:  # _undeclared follows nested junctors itself
                    problems.extend(_undeclared(branch, node, where))

    walk(SCHEMA, "openAPIV3Schema")
    assert SCHEMA["type"] == "object"
    assert not problems, "\n".join(problems)


def _undeclared(branch: dict[str, Any], outside: dict[str, Any], where: str) -> list[str]:
    """Fields a junctor names that the schema around it does not declare (a structural
    schema must declare them outside too)."""
    declared = outside.get("properties", {})
    found = [f"{where}: {name}" for name in branch.get("required", []) if name not in declared]
    for name, child in branch.get("properties", {}).items():
        if name not in declared:
            found.append(f"{where}: {name}")
        else:
            found += _undeclared(child, declared[name], f"{where}.{name}")
    for junctor in JUNCTORS:
        branches = branch.get(junctor, [])
        for n, inner in enumerate(branches if isinstance(branches, list) else [branches]):
            found += _undeclared(inner, outside, f"{where}.{junctor}[{n}]")
    return found


def test_patterns_are_re2() -> None:
    # The API server compiles patterns with Go's RE2: no lookaround, no back-references.
    patterns = re.findall(r"pattern: '([^']*(?:''[^']*)*)'", crd_path().read_text())
    assert patterns
    for pattern in patterns:
        pattern = pattern.replace("''", "'")
        re.compile(pattern)
        assert not re.search(r"\(\?[=!<]|\\[1-9]", pattern), pattern


@pytest.mark.parametrize("dv", FULL, ids=lambda dv: dv.name)
def test_what_the_model_writes_validates(dv: DataVolume) -> None:
    assert schema_errors(dv.to_manifest()) == []


def test_the_schema_declares_no_field_the_model_does_not_write() -> None:
    # Each field the schema declares for spec and status appears in one of FULL's manifests
    # (and strict validation above shows the model writes no undeclared one).
    unseen: set[str] = set()
    for part in ("spec", "status"):
        declared = _fields(SCHEMA["properties"][part], part)
        written: set[str] = set()
        for dv in FULL:
            written |= _written(dv.to_manifest().get(part), part)
        unseen |= declared - written
    assert not unseen, sorted(unseen)


def _fields(schema: dict[str, Any], path: str) -> set[str]:
    found = {path}
    for name, child in schema.get("properties", {}).items():
        found |= _fields(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found |= _fields(schema["items"], f"{path}[]")
    return found


def _written(value: Any, path: str) -> set[str]:
    found = {path}
    if isinstance(value, dict):
        for name, child in value.items():
            found |= _written(child, f"{path}.{name}")
    elif isinstance(value, list):
        for item in value:
            found |= _written(item, f"{path}[]")
    return found


@pytest.mark.parametrize("name", sorted(CDI_MANIFESTS))
def test_cdi_manifests_validate_in_diskflows_api(name: str) -> None:
    manifest = yaml.safe_load(CDI_MANIFESTS[name])
    assert schema_errors(manifest | {"apiVersion": API_VERSION}) == []
    assert schema_errors(DataVolume.from_manifest(manifest).to_manifest()) == []


def shipped_datavolumes() -> list[Any]:
    """Every DataVolume in examples/*.yaml and in the README's YAML blocks."""
    found = []
    texts = [
        (str(path.relative_to(REPO)), path.read_text())
        for path in sorted(REPO.glob("examples/*.yaml"))
    ]
    readme = (REPO / "README.md").read_text()
    fenced = re.findall(r"^```ya?ml\n(.*?)^```", readme, re.M | re.S)
    indented = re.findall(r"(?:^\n)((?:    .*\n|\n)+)", readme, re.M)
    blocks = fenced + [re.sub(r"^    ", "", block, flags=re.M) for block in indented]
    texts += [("README.md", block) for block in blocks if "kind: DataVolume" in block]
    for where, text in texts:
        for n, document in enumerate(yaml.safe_load_all(text)):
            if isinstance(document, dict) and document.get("kind") == KIND:
                found.append(pytest.param(document, id=f"{where}#{n}"))
    return found


@pytest.mark.parametrize("manifest", shipped_datavolumes())
def test_every_shipped_or_documented_datavolume_validates(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == API_VERSION
    assert schema_errors(manifest) == []
    DataVolume.from_manifest(manifest)


def test_examples_and_readme_show_datavolumes() -> None:
    found = {param.id.split("#")[0] for param in shipped_datavolumes()}
    assert "README.md" in found and len(found) >= 5


# What the schema does not check, the model refuses: the API server checks metadata and
# routes by apiVersion and kind itself; sizes under 1Mi written as text, a request above its
# limit, a port out of range, fields that contradict each other are beyond JSON schema.
MODEL_ONLY = {
    "not an object", "another apiVersion", "another kind", "no name", "bad name",
    "bad namespace", "annotation not a string", "keep-pvc neither true nor false",
    "url with a bad port", "insecure with a CA", "s3 endpoint with an https url",
    "size under 1Mi", "request above limit",
}  # fmt: skip


@pytest.mark.parametrize(
    ("manifest", "field", "words"), [case for case in MALFORMED if case.id not in MODEL_ONLY]
)
def test_the_schema_refuses_what_the_model_refuses_naming_the_field(
    manifest: Any, field: str, words: str
) -> None:
    manifest = copy.deepcopy(manifest) | {"apiVersion": API_VERSION}
    errors = schema_errors(manifest)
    assert errors, "the schema accepts it"
    # The error's path or message names the field (the last part of it, less any index).
    last = re.sub(r"\[.*?\]", "", field.rsplit(".", 1)[-1])
    assert any(last in error for error in errors), errors
    with pytest.raises(ManifestError):
        DataVolume.from_manifest(manifest)


@pytest.mark.parametrize(
    "manifest", [case.values[0] for case in MALFORMED if case.id in MODEL_ONLY - {"not an object"}]
)
def test_the_schema_leaves_to_the_model_only_what_it_cannot_check(manifest: Any) -> None:
    assert schema_errors(manifest | {"apiVersion": API_VERSION}) == []
    assert {case.id for case in MALFORMED} >= MODEL_ONLY


def test_the_wheel_ships_the_crd() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["package-data"]
    assert "controller/crd.yaml" in data["importer"]
    assert crd_path().is_file()
