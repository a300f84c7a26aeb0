"""A build in a store: what is written where, in which order, and how to find it again.

    <template>/<build_id>/<template>.qcow2          the image
    <template>/<build_id>/<template>.qcow2.sha256   its checksum, in sha256sum's format
    <template>/<build_id>/manifest.json             the build's manifest, written last
    <template>/latest.json                          a copy of the newest manifest

The manifest is the commit point: it is written only after the image and its checksum are
in place and verified, so a reader that finds it finds a complete build. `latest.json` is
written after it, for readers that cannot list a store (HTTP) or do not know the build id;
when two builds of one template publish at once, the one that finishes last is "latest".
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from importer.errors import FinalError
from importer.progress import Progress
from pipelines.manifest import BuildManifest, ImportSource, PublishedImage, PublishedRecord
from pipelines.publish.base import Store

log = logging.getLogger("diskflow.publish")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, kw_only=True)
class Published:
    """A published build: where its image is and how a cluster imports it."""

    template: str
    build_id: str
    image_url: str
    """Where the image is, in the store's terms (s3://, https://, file://)."""
    sha256: str
    size: int
    manifest_url: str
    source: ImportSource | None
    """How a cluster fetches the image; None for a local directory nothing serves."""
    virtual_size: int | None
    """The disk's size as the guest sees it, from the manifest's `output.virtual_size`."""
    manifest: BuildManifest
    """The manifest as published, `published` section included."""

    @classmethod
    def from_manifest(cls, manifest: BuildManifest) -> Published:
        """The build a published manifest (from `find_published`) describes."""
        section = manifest.published
        if section is None:
            raise FinalError("InvalidManifest", "the manifest has no 'published' section")
        return cls(
            template=section.template,
            build_id=section.build_id,
            image_url=section.image.url,
            sha256=section.image.sha256,
            size=section.image.size,
            manifest_url=section.manifest_url,
            source=section.source,
            virtual_size=manifest.output.virtual_size if manifest.output else None,
            manifest=manifest,
        )


def image_name(template: str) -> str:
    return f"{template}.qcow2"


def build_key(template: str, build_id: str, name: str) -> str:
    """The key of `name` in a build's folder."""
    return f"{_segment('template name', template)}/{_segment('build id', build_id)}/{name}"


def latest_key(template: str) -> str:
    return f"{_segment('template name', template)}/latest.json"


def _segment(what: str, value: str) -> str:
    """`value`, checked to be one safe path segment in every kind of store."""
    if not _NAME.fullmatch(value):
        raise FinalError(
            "InvalidArgument",
            f"{what} {value!r} must be 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return value


def publish_build(
    store: Store,
    image: Path,
    manifest: BuildManifest,
    progress: Progress | None = None,
    *,
    sha256: str | None = None,
) -> Published:
    """Upload the image, then its `.sha256`, then the manifest (with a `published` section
    added), then `latest.json`, under the manifest's template name and build id. With `sha256`
    (from the build's checksum step), an image that no longer matches it fails before anything
    is committed."""
    template_name, build_id = manifest.template, manifest.build_id
    image = Path(image)
    if not image.is_file():
        raise FinalError("NotFound", f"{image}: no such image file")
    name = image_name(template_name)
    image_key = build_key(template_name, build_id, name)
    manifest_key = build_key(template_name, build_id, "manifest.json")
    size = image.stat().st_size
    if progress is not None:
        progress.stage("publish", total=size)
    log.debug("publishing %s to %s", image, store.url(image_key))
    stored = store.put_file(image_key, image, sha256=sha256, progress=progress)
    store.put_bytes(
        image_key + ".sha256", f"{stored.sha256}  {name}\n".encode(), content_type="text/plain"
    )
    published = PublishedRecord(
        template=template_name,
        build_id=build_id,
        image=PublishedImage(store.url(image_key), stored.sha256, stored.size),
        checksum_url=store.url(image_key + ".sha256"),
        manifest_url=store.url(manifest_key),
        source=store.import_source(image_key),
        published_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
    document = replace(manifest, published=published)
    data = (json.dumps(document.to_json(), indent=2, sort_keys=True) + "\n").encode()
    store.put_bytes(manifest_key, data, content_type="application/json")
    store.put_bytes(latest_key(template_name), data, content_type="application/json")
    return Published.from_manifest(document)


def find_published(store: Store, template_name: str, build_id: str) -> BuildManifest | None:
    """The manifest of a build already in the store, or None. A manifest whose image is gone
    or has another size counts as not published (the build runs and publishes again)."""
    manifest = _read_manifest(store, build_key(template_name, build_id, "manifest.json"))
    if manifest is None:
        return None
    published = Published.from_manifest(manifest)
    image_key = build_key(template_name, build_id, image_name(template_name))
    if store.size(image_key) != published.size:
        log.warning(
            "%s has a manifest but its image is missing or changed; publishing it again",
            store.url(image_key),
        )
        return None
    return manifest


def _read_manifest(store: Store, key: str) -> BuildManifest | None:
    data = store.get_bytes(key)
    return None if data is None else BuildManifest.parse(data, store.url(key))
