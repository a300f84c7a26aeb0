"""The build manifest: what a template build was made from and what it made, as typed records.

The contract between a build's steps, the processes that run them (Celery carries the manifest
as JSON) and every reader of `manifest.json`, locally or in a store. Each step adds its part
with `dataclasses.replace`; a part is None until its step ran and is then absent from the
JSON. `to_json()` writes the schema `diskflow.io/template-build/v1` and `from_json()` reads it
back, refusing what does not fit with an `InvalidManifest` that names the field.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from importer.errors import FinalError
from pipelines.accel import Accel
from pipelines.finalize import QcowCompression

SCHEMA = "diskflow.io/template-build/v1"

_NON_EMPTY = "non-empty"
Key = Annotated[str, _NON_EMPTY]
"""A string that names a file, a store key or a checksum: an empty one would name nothing."""

_Record = TypeVar("_Record")


@dataclass(frozen=True)
class KickstartRecord:
    """The kickstart as the installer got it (%includes flattened)."""

    file: str
    version: str  # pykickstart's syntax version
    sha256: str


@dataclass(frozen=True)
class MediaFile:
    """A local installer file (iso, kernel, initrd), identified by content."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TreeRecord:
    """An install tree, identified by its .treeinfo."""

    url: str
    treeinfo_sha256: str | None  # None: the tree has none, or diskflow cannot fetch it


@dataclass(frozen=True)
class Inputs:
    """The install media: what the template's [install] table names."""

    iso: MediaFile | None = None
    kernel: MediaFile | None = None
    initrd: MediaFile | None = None
    location: TreeRecord | None = None
    kernel_args: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _dump(self)


@dataclass(frozen=True)
class Settings:
    """The virtual machine the template was installed in."""

    os_variant: str
    disk_size: int  # bytes
    memory: int  # bytes
    vcpus: int


@dataclass(frozen=True)
class AccelRecord:
    """The accelerator the install ran with (KVM or TCG), and why."""

    used: Accel
    reason: str


@dataclass(frozen=True)
class OutputRecord:
    """The finished image."""

    file: Key
    format: str
    compression: QcowCompression
    sealed: bool
    size: int
    virtual_size: int
    sha256: Key


@dataclass(frozen=True)
class BootTestRecord:
    """Whether the finished image was booted once, and how (only when it was)."""

    tested: bool
    method: str | None = None
    accel: Accel | None = None
    boot: Literal["kernel", "bootloader"] | None = None


@dataclass(frozen=True)
class ImportSource:
    """How a cluster fetches an object: a DataVolume source kind and its URL."""

    kind: Literal["http", "s3"]
    url: str


@dataclass(frozen=True)
class PublishedImage:
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class PublishedRecord:
    """Where a store holds the build: its URLs, and how a cluster imports the image."""

    template: str
    build_id: str
    image: PublishedImage
    checksum_url: str
    manifest_url: str
    source: ImportSource | None  # None: a local directory nothing serves
    published_at: str


@dataclass(frozen=True)
class BuildManifest:
    """A build's manifest; validate makes it, every later step adds its part."""

    template: Key
    build_id: Key
    kickstart: KickstartRecord
    inputs: Inputs
    settings: Settings
    tools: dict[str, str]  # tool → version line
    durations: dict[str, float]  # step → seconds
    accel: AccelRecord | None = None  # the install's
    builder: str | None = None  # the host the install ran on
    built_at: str | None = None  # ISO 8601, UTC
    output: OutputRecord | None = None
    boot_test: BootTestRecord | None = None
    published: PublishedRecord | None = None

    def timed(self, step: str, seconds: float) -> BuildManifest:
        """This manifest with `step`'s duration recorded."""
        return replace(self, durations=self.durations | {step: round(seconds, 3)})

    def finished(self, source: str = "the manifest") -> OutputRecord:
        """The finished image's record; a manifest without one is not a finished build's."""
        if self.output is None:
            raise FinalError(
                "InvalidManifest", f"{source} is not a finished build's manifest: no output"
            )
        return self.output

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **_dump(self)}

    @classmethod
    def from_json(cls, data: Any, source: str = "the manifest") -> BuildManifest:
        """The manifest `data` holds; `source` (a path, a URL) is what an error names."""
        if not isinstance(data, dict):
            raise FinalError("InvalidManifest", f"{source} is not a JSON object")
        schema = data.get("schema")
        if schema != SCHEMA:
            problem = "is missing" if schema is None else f"is {schema!r}, not {SCHEMA!r}"
            raise _Invalid("schema", problem).at(source)
        try:
            return _load(cls, data, "")
        except _Invalid as e:
            raise e.at(source) from None

    @classmethod
    def parse(cls, text: str | bytes, source: str) -> BuildManifest:
        """The manifest in a manifest.json's text."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise FinalError("InvalidManifest", f"{source} is not JSON: {e}") from None
        return cls.from_json(data, source)


def _dump(record: Any) -> dict[str, Any]:
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        # A part whose step did not run (or that this build has not) is absent, not null.
        if value is None and f.default is None:
            continue
        out[f.name] = _dump_value(value)
    return out


def _dump_value(value: Any) -> Any:
    if is_dataclass(value):
        return _dump(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _dump_value(item) for key, item in value.items()}
    return value


class _Invalid(Exception):
    """A field that does not fit, before the error knows which manifest it is in."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, problem)
        self.where, self.problem = where, problem

    def at(self, source: str) -> FinalError:
        return FinalError("InvalidManifest", f"{source}: {self.where} {self.problem}")


def _load(cls: type[_Record], data: Any, path: str) -> _Record:
    """A `cls` record from its JSON object at `path`; keys the record does not know are left."""
    if not isinstance(data, dict):
        raise _Invalid(path, f"is {_kind(data)}, not an object")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for f in fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], where)
        elif f.default is MISSING:
            raise _Invalid(where, "is missing")
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        (kind,) = (arg for arg in args if arg is not type(None))
        return None if value is None else _value(kind, value, where)
    if origin is Annotated:
        text = _value(args[0], value, where)
        if _NON_EMPTY in args[1:] and not text:
            raise _Invalid(where, "is empty")
        return text
    if origin is Literal:
        if value not in args:
            raise _Invalid(where, f"is {value!r}, not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_kind(value)}, not an object")
        return {key: _value(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if is_dataclass(hint):
        return _load(hint, value, where)
    if issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in hint)
            raise _Invalid(where, f"is {value!r}, not one of {choices}") from None
    # bool is an int to Python, not to JSON; a whole number of seconds is a number all the same.
    wanted = {bool: bool, int: int, float: (int, float), str: str}[hint]
    if isinstance(value, bool) is not (hint is bool) or not isinstance(value, wanted):
        raise _Invalid(where, f"is {_kind(value)}, not {_KINDS[hint]}")
    return float(value) if hint is float else value


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    return _KINDS.get(type(value), type(value).__name__)


_KINDS = {
    type(None): "null", bool: "true or false", int: "an integer", float: "a number",
    str: "a string", list: "a list", dict: "an object",
}  # fmt: skip
