"""`diskflow manifest convert`: CDI's DataVolumes, and the dataVolumeTemplates of KubeVirt's
VirtualMachines, rewritten to diskflow's API (diskflow.io/v1beta1).

A DataVolume is read by importer.api (so whatever diskflow cannot honour is refused, naming
the field) and written back in diskflow's API. A VirtualMachine cannot keep its templates:
KubeVirt makes a CDI DataVolume of every dataVolumeTemplate whatever apiVersion the template
says (the field is kept only for backward compatibility, and ignored). So each template
becomes a DataVolume of its own, placed before the VM, and the VM's `dataVolume` volumes name
its PVC instead (`persistentVolumeClaim.claimName`), which has the DataVolume's name.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from importer.api import (
    BIND_IMMEDIATELY,
    CDI_API_VERSION,
    KIND,
    RETAIN_POD,
    DataVolume,
    ManifestError,
)

manifest_app = typer.Typer(no_args_is_help=True)

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_HONOURED = (BIND_IMMEDIATELY, RETAIN_POD)
# Annotations CDI copies onto its importer pod (networks, service meshes); diskflow does not.
_CDI_POD_ANNOTATIONS = (
    "k8s.v1.cni.cncf.io/networks",
    "v1.multus-cni.io/default-network",
    "sidecar.istio.io/inject",
    "linkerd.io/inject",
)
_STARTS = ("Always", "RerunOnFailure", "Once")  # run strategies that start the VM unasked
# A line starting with --- or ... ends a YAML document wherever it is: YAML forbids it within.
_MARKER = re.compile(r"(---|\.\.\.)(?=[ \t]|$)")


@manifest_app.callback()
def manifest() -> None:
    """DataVolume manifests: CDI's and KubeVirt's to diskflow's."""


@manifest_app.command()
def convert(
    file: Annotated[
        str,
        typer.Argument(metavar="FILE", help="YAML manifests, several documents allowed; -: stdin."),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", dir_okay=False, help="Write here, not to standard output."),
    ] = None,
) -> None:
    """Rewrite CDI DataVolumes and KubeVirt VMs' dataVolumeTemplates to diskflow's API.

    Other documents pass through as they are. Says on stderr, a line per item, what is not
    carried over; exits 1 if a document could not be converted (it is written out as it was).
    """
    if file == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            text, source = Path(file).read_text(), file
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise typer.BadParameter(f"cannot read {file}: {why}", param_hint="FILE") from None
    result = convert_text(text, source=source)
    if output is None:
        sys.stdout.write(result.text)
    else:
        output.write_text(result.text)
    for line in result.messages:
        typer.echo(line, err=True)
    raise typer.Exit(1 if result.failed else 0)


@dataclass
class Conversion:
    """A YAML stream converted: its text, and a line per item not carried over."""

    text: str
    messages: list[str] = field(default_factory=list)
    """"error: ..." for a document left as it was, "warning: ..." for what a converted one
    lost or needs."""

    @property
    def failed(self) -> bool:
        """True when a document could not be converted."""
        return any(line.startswith("error:") for line in self.messages)


def convert_text(text: str, *, source: str) -> Conversion:
    """Convert every document of a YAML stream; `source` names it in messages."""
    documents = [_Document.read(chunk, f"{source}#{n}") for n, chunk in enumerate(_split(text), 1)]
    items = [item for document in documents for item in document.items]
    # DataVolumes first: a VM's volume naming one converted here then names its PVC.
    converted: set[tuple[str | None, str]] = set()
    for item in items:
        if _is_cdi_datavolume(item.data) and item.convert(_datavolume_document):
            meta = item.data["metadata"]
            converted.add((meta.get("namespace"), meta["name"]))
    for item in items:
        if _is_virtual_machine(item.data):
            item.convert(lambda vm: _virtual_machine(vm, converted))
    messages = [line for document in documents for line in document.messages()]
    return Conversion("---\n".join(document.write() for document in documents), messages)


@dataclass
class _Item:
    """An object to convert: a document, or an item of a List document."""

    label: str
    data: Any
    out: list[dict[str, Any]] | None = None
    """What replaces it; None: it stays as it is."""
    messages: list[str] = field(default_factory=list)

    def convert(self, how: Callable[[Any], tuple[list[dict[str, Any]] | None, list[str]]]) -> bool:
        """Replace the object by what `how` makes of it; False if it could not."""
        label = f"{self.label} {self.data['kind']} {_name(self.data)}"
        try:
            self.out, warnings = how(self.data)
        except ManifestError as exc:
            self.messages.append(f"error: {label}: {exc.message}; left as it was")
            return False
        self.messages += [f"warning: {label}: {warning}" for warning in warnings]
        return True


@dataclass
class _Document:
    """One document of the stream: its text as written, and what it holds."""

    text: str
    data: Any
    items: list[_Item]
    error: str | None = None

    @classmethod
    def read(cls, text: str, label: str) -> _Document:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # The problem and its line, not PyYAML's snippet: the line may hold a secret.
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "unreadable"
            return cls(
                text, None, [], f"error: {label}: not YAML ({problem}{where}); left as it was"
            )
        if _is_list(data):
            items = [_Item(f"{label} items[{n}]", item) for n, item in enumerate(data["items"])]
            return cls(text, data, items)
        return cls(text, data, [_Item(label, data)])

    def messages(self) -> list[str]:
        """What converting it said, in the order of its items."""
        return (
            [self.error] if self.error else [line for item in self.items for line in item.messages]
        )

    def write(self) -> str:
        """The document's text: as written unless something in it was converted."""
        if all(item.out is None for item in self.items):
            return self.text
        objects = [obj for item in self.items for obj in (item.out or [item.data])]
        head = re.match(r"(?:[ \t]*(?:#.*)?\n)*", self.text)
        comments = head.group(0) if head else ""
        if _is_list(self.data):
            return comments + _dump({**self.data, "items": objects})
        return "---\n".join([comments + _dump(objects[0]), *map(_dump, objects[1:])])


def _split(text: str) -> list[str]:
    """The documents of a YAML stream as written, without their --- lines; blank ones left out."""
    chunks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if marker := _MARKER.match(line):
            chunks.append([])
            rest = line[marker.end() :].strip()
            if marker.group(1) == "---" and rest and not rest.startswith("#"):
                chunks[-1].append(rest + "\n")  # content on the --- line: `--- {a: 1}`
            continue
        chunks[-1].append(line)
    texts = ["".join(lines) for lines in chunks]
    return [t if t.endswith("\n") else t + "\n" for t in texts if t.strip()]


def _datavolume_document(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    dv, warnings = _datavolume({key: value for key, value in data.items() if key != "status"})
    if data["metadata"].get("ownerReferences"):
        warnings.append("metadata.ownerReferences are not carried over (they name objects by uid)")
    return [dv.to_manifest()], warnings


def _datavolume(manifest: dict[str, Any]) -> tuple[DataVolume, list[str]]:
    """The diskflow DataVolume a CDI one becomes, and what of it diskflow does not honour. Its
    status, uid and the API server's metadata are the old object's and stay behind."""
    dv = DataVolume.from_manifest(manifest)
    warnings = [
        f"annotation {key} has no effect in diskflow (kept)"
        for key in dv.annotations
        if (key.startswith("cdi.kubevirt.io/") and key not in _HONOURED)
        or key in _CDI_POD_ANNOTATIONS
    ]
    annotations = {key: value for key, value in dv.annotations.items() if key != LAST_APPLIED}
    return replace(dv, uid=None, status=None, annotations=annotations), warnings


def _virtual_machine(
    vm: dict[str, Any], converted: set[tuple[str | None, str]]
) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """The DataVolumes of a VM's templates, then the VM naming their PVCs (and those of the
    DataVolumes in `converted`, (namespace, name), in its namespace); None: nothing to do."""
    namespace = (vm.get("metadata") or {}).get("namespace")
    spec = vm.get("spec") or {}
    dvs, warnings = [], []
    for n, template in enumerate(spec.get("dataVolumeTemplates") or []):
        where = f"spec.dataVolumeTemplates[{n}]"
        try:
            dv, notes = _datavolume(_template_manifest(template, namespace))
        except ManifestError as exc:
            raise ManifestError(f"{where}.{exc.field}".rstrip("."), exc.problem) from None
        dvs.append(dv)
        warnings += [f"{where}: {note}" for note in notes]
    names = {dv.name for dv in dvs} | {name for ns, name in converted if ns == namespace}
    vm = copy.deepcopy(vm)
    renamed = 0
    volumes = (((vm.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes")
    for n, volume in enumerate(volumes or []):
        ref = volume.get("dataVolume") if isinstance(volume, dict) else None
        if not isinstance(ref, dict):
            continue
        if ref.get("name") not in names:
            warnings.append(
                f"volume {volume.get('name')} keeps CDI DataVolume {ref.get('name')} (not in this "
                f"input); for a diskflow DataVolume use persistentVolumeClaim.claimName"
            )
            continue
        claim = {"claimName": ref["name"]} | {k: v for k, v in ref.items() if k == "hotpluggable"}
        volumes[n] = {
            ("persistentVolumeClaim" if key == "dataVolume" else key): (
                claim if key == "dataVolume" else value
            )
            for key, value in volume.items()
        }
        renamed += 1
    if not dvs and not renamed:
        return None, warnings
    vm["spec"].pop("dataVolumeTemplates", None)
    strategy = "running: true" if spec.get("running") is True else spec.get("runStrategy")
    if strategy == "running: true" or strategy in _STARTS:
        warnings.append(
            f"starts at once ({strategy}) but KubeVirt does not wait for diskflow imports: "
            "set runStrategy: Halted, and start it when its DataVolumes are Succeeded"
        )
    return [dv.to_manifest() for dv in dvs] + [vm], warnings


def _template_manifest(template: Any, namespace: str | None) -> dict[str, Any]:
    """A dataVolumeTemplate as a CDI DataVolume of the VM's namespace (KubeVirt reads only a
    template's name, labels, annotations and spec)."""
    if not isinstance(template, dict):
        raise ManifestError("", "must be an object")
    meta = template.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ManifestError("metadata", "must be an object")
    metadata = {key: meta[key] for key in ("name", "labels", "annotations") if key in meta}
    return {
        "apiVersion": CDI_API_VERSION,
        "kind": KIND,
        "metadata": metadata | ({"namespace": namespace} if namespace else {}),
        "spec": template.get("spec"),
    }


def _is_cdi_datavolume(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and str(data.get("apiVersion", "")).startswith("cdi.kubevirt.io/")
        and data.get("kind") == KIND
    )


def _is_virtual_machine(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and str(data.get("apiVersion", "")).startswith("kubevirt.io/")
        and data.get("kind") == "VirtualMachine"
    )


def _is_list(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and data.get("kind") == "List"
        and isinstance(data.get("items"), list)
    )


def _name(data: dict[str, Any]) -> str:
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    name = str(meta.get("name") or "(no name)")
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else name


def _dump(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
