"""The DataVolume that imports a published build: importer.api's model (diskflow.io/v1beta1,
CDI's spec field for field) filled from the build, with the image's checksum on its http or
s3 source, written out as a manifest."""

from __future__ import annotations

from typing import Any

import yaml

from importer.api import (
    VOLUME_MODES,
    DataVolume,
    HttpSource,
    S3Source,
    Spec,
    Storage,
    is_dns_subdomain,
)
from importer.capacity import MiB
from importer.errors import FinalError
from importer.quantity import format_quantity
from pipelines.publish.publication import Published

_SOURCES = {HttpSource.KIND: HttpSource, S3Source.KIND: S3Source}


def datavolume(
    name: str,
    published: Published,
    *,
    namespace: str | None = None,
    storage_class: str | None = None,
    volume_mode: str | None = None,
    secret_ref: str | None = None,
) -> dict[str, Any]:
    """The manifest of a DataVolume importing `published`: its URL and checksum, and a volume
    just large enough for its virtual size. `secret_ref` names a Secret with the store's
    credentials."""
    if not is_dns_subdomain(name):
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
    source = _SOURCES[published.source.kind](
        url=published.source.url, secret_ref=secret_ref, checksum=f"sha256:{published.sha256}"
    )
    storage = Storage(
        request=_request(published.virtual_size),
        storage_class_name=storage_class,
        volume_mode=volume_mode,
    )
    model = DataVolume(
        name=name,
        namespace=namespace,
        annotations={
            "diskflow.io/template": published.template,
            "diskflow.io/build-id": published.build_id,
        },
        spec=Spec(source=source, storage=storage),
    )
    return model.to_manifest()


def storage_request(virtual_size: int) -> str:
    """The storage request for an image of `virtual_size` bytes: the image's own size, as CDI
    means it (the controller adds the filesystem overhead when it sizes the PVC)."""
    return format_quantity(_request(virtual_size))


def _request(virtual_size: int) -> int:
    # A volume is at least 1 MiB (CDI refuses smaller requests); a tiny image gets that.
    return max(virtual_size, MiB)


def to_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML for `kubectl apply -f`, keys in the order Kubernetes shows them."""
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
