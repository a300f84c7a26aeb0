"""The DataVolume that imports a published image: diskflow's API (diskflow.io/v1beta1), whose
spec is CDI's field for field, plus the image's checksum on the http and s3 sources."""

from __future__ import annotations

import re
from typing import Any

import yaml

from importer.capacity import MiB
from importer.errors import FinalError
from importer.quantity import format_quantity
from pipelines.publish.publication import Published

API_VERSION = "diskflow.io/v1beta1"
VOLUME_MODES = ("Filesystem", "Block")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def datavolume(
    name: str,
    published: Published,
    *,
    namespace: str | None = None,
    storage_class: str | None = None,
    volume_mode: str | None = None,
    secret_ref: str | None = None,
) -> dict[str, Any]:
    """A DataVolume importing `published`: its URL and checksum, and a volume just large
    enough for its virtual size. `secret_ref` names a Secret with the store's credentials."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise FinalError(
            "InvalidArgument",
            f"DataVolume name {name!r} must be lowercase letters, digits, '-' and '.' "
            "(a DNS subdomain name, at most 253 characters)",
        )
    if volume_mode is not None and volume_mode not in VOLUME_MODES:
        raise FinalError("InvalidArgument", f"volume mode must be one of {', '.join(VOLUME_MODES)}")
    if published.source is None:
        raise FinalError(
            "InvalidArgument",
            f"{published.image_url} is in a local directory, which no cluster can fetch from: "
            "publish with a public URL (the HTTP base that serves the directory)",
        )
    if published.virtual_size is None:
        raise FinalError(
            "InvalidArgument", "the manifest has no output.virtual_size to size the volume from"
        )
    source: dict[str, Any] = {"url": published.source.url, "checksum": f"sha256:{published.sha256}"}
    if secret_ref:
        source["secretRef"] = secret_ref
    storage: dict[str, Any] = {
        "resources": {"requests": {"storage": storage_request(published.virtual_size)}}
    }
    if storage_class:
        storage["storageClassName"] = storage_class
    if volume_mode:
        storage["volumeMode"] = volume_mode
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["annotations"] = {
        "diskflow.io/template": published.template,
        "diskflow.io/build-id": published.build_id,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "DataVolume",
        "metadata": metadata,
        "spec": {"source": {published.source.kind: source}, "storage": storage},
    }


def storage_request(virtual_size: int) -> str:
    """The storage request for an image of `virtual_size` bytes: the image's own size, as CDI
    means it (the controller adds the filesystem overhead when it sizes the PVC)."""
    return format_quantity(max(virtual_size, MiB))


def to_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML for `kubectl apply -f`, keys in the order Kubernetes shows them."""
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
