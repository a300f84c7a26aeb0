"""The steps of a template build, as plain functions over a JSON-ready state.

validate → install → finalize → boot test → publish. The CLI runs them one after the other
in-process; Celery runs each as a task of a chain and passes the state along as JSON. Every
step takes the state the previous one returned, so both engines share every line of build
logic.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from importer.errors import FinalError
from importer.progress import EventReporter, Progress, reporting
from importer.sources.http import HttpOptions, redact_url
from importer.sources.http_options import check_ca_bundle
from importer.sources.s3_options import S3Options
from pipelines import kickstart, provenance
from pipelines.accel import Accel
from pipelines.boottest import CONSOLE_LOG, METHOD, boot_test
from pipelines.bundle import Bundle, pack, unpacked
from pipelines.datavolume import datavolume, to_yaml
from pipelines.events import Emit, discard, relay
from pipelines.finalize import FinalizeOptions, QcowCompression, finalize
from pipelines.manifest import (
    AccelRecord,
    BootTestRecord,
    BuildManifest,
    KickstartRecord,
    OutputRecord,
    Settings,
)
from pipelines.publish import Published, Store, find_published, open_store, publish_build
from pipelines.template import Template, load_template
from pipelines.virtinstall import BuildOptions, OnError, install, kept

PROGRESS_SECONDS = 2.0
LOGS = ("console.log", "installer.log")
# Besides NAME.qcow2[.sha256]; manifest.json is written last, once the image passed its boot
# test: a directory without one holds no finished build.
OUTPUT_FILES = ("manifest.json", "datavolume.yaml", *LOGS, CONSOLE_LOG)


@dataclass(frozen=True)
class PublishOptions:
    """How to reach the store; secrets come from the environment or files, never from here."""

    s3: S3Options = field(default_factory=S3Options)
    auth_file: str | None = None  # user:password for an http(s) store
    ca_bundle: str | None = None  # CAs to trust for an S3 or https store; none: the environment's
    public_url: str | None = None  # the HTTP base that serves a local directory store
    namespace: str | None = None  # for the DataVolume manifest
    storage_class: str | None = None
    secret_ref: str | None = None
    volume_mode: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishOptions:
        return cls(**(data | {"s3": S3Options(**data["s3"])}))

    def store(self, url: str) -> Store:
        """The store at `url`, reached with these options."""
        parts = urlsplit(url)
        if parts.username or parts.password:
            # A build's store URL travels in argv, Celery messages and manifests.
            raise FinalError(
                "InvalidArgument",
                f"the store URL {redact_url(url)} must not carry credentials: use --auth-file, "
                "or DISKFLOW_PUBLISH_USER/DISKFLOW_PUBLISH_PASSWORD or DISKFLOW_PUBLISH_TOKEN",
            )
        if self.ca_bundle:
            if parts.scheme not in ("s3", "https"):
                raise FinalError(
                    "InvalidArgument", "--ca-bundle applies to an s3:// or https:// store"
                )
            check_ca_bundle(self.ca_bundle)
        return open_store(
            url,
            s3=self.s3,
            http=HttpOptions(ca_bundle=self.ca_bundle),
            auth_file=self.auth_file,
            public_url=self.public_url,
        )


@dataclass(frozen=True)
class BuildRequest:
    """What to build and where its results go."""

    kickstart: str
    output: str = "build"  # the template's files land in OUTPUT/NAME/
    publish_to: str | None = None
    force: bool = False  # build even when the same build id is already published
    workdir: str | None = None  # where the install disk lives meanwhile (default: $TMPDIR)
    # The tree %include may read from (default: the kickstart's git repository, else its
    # directory); nothing outside it is read.
    kickstart_root: str | None = None
    boot_test: bool = True  # boot the finished image once before publishing it
    build: BuildOptions = field(default_factory=BuildOptions)
    finalize: FinalizeOptions = field(default_factory=FinalizeOptions)
    publish: PublishOptions = field(default_factory=PublishOptions)
    bundle: Bundle | None = None  # the files themselves, for a build queued elsewhere

    def packed(self) -> BuildRequest:
        """This request carrying its kickstart's files, ready to run on another machine."""
        root = Path(self.kickstart_root) if self.kickstart_root else None
        return replace(self, bundle=pack(Path(self.kickstart), root))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildRequest:
        build = dict(data["build"], accel=Accel(data["build"]["accel"]),
                     on_error=OnError(data["build"].get("on_error", OnError.CLEANUP)))  # fmt: skip
        fin = dict(data["finalize"], compression=QcowCompression(data["finalize"]["compression"]))
        bundle = Bundle(**data["bundle"]) if data.get("bundle") else None
        return cls(
            **(data | {"build": BuildOptions(**build), "finalize": FinalizeOptions(**fin),
                       "publish": PublishOptions.from_json(data["publish"]), "bundle": bundle}),
        )  # fmt: skip


@dataclass
class BuildState:
    """What the steps have found and made so far; JSON-ready so Celery can carry it."""

    request: BuildRequest
    template: Template
    kickstart: str  # the flattened text the installer gets
    build_id: str
    manifest: BuildManifest
    skipped: bool = False  # the same build is already published
    workdir: str | None = None
    disk: str | None = None
    image: str | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.request.output) / self.template.name

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "request": self.request.to_json(),
            "template": self.template.to_json(),
            "manifest": self.manifest.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildState:
        return cls(
            **(data | {"request": BuildRequest.from_json(data["request"]),
                       "template": Template.from_json(data["template"]),
                       "manifest": BuildManifest.from_json(data["manifest"])}),
        )  # fmt: skip


def validate_step(request: BuildRequest, emit: Emit = discard) -> BuildState:
    """Check the template and its kickstart; work out the build id; skip if published."""
    started = time.monotonic()
    with _kickstart_files(request) as (path, media_base, media_roots, root, shown):
        template = load_template(path, media_base, media_roots)
        emit("validate", "start", f"validating {request.kickstart} as {template.version}")
        checked = kickstart.validate(template.kickstart, template.version, root)
        for warning in checked.warnings:
            emit("validate", "warning", shown(str(warning)))
    media = provenance.inputs(template)
    tools = provenance.tool_versions()
    build_id = provenance.build_id(checked.digest, template, media, tools, request.finalize)
    manifest = BuildManifest(
        template=template.name,
        build_id=build_id,
        kickstart=KickstartRecord(template.kickstart.name, template.version, checked.digest),
        inputs=media,
        settings=Settings(template.os_variant, template.disk_size, template.memory, template.vcpus),
        tools=tools,
        durations={},
    ).timed("validate", time.monotonic() - started)
    # The files were read; dropping them keeps them out of every later task's message and
    # stored result (a kickstart may hold a password hash).
    state = BuildState(replace(request, bundle=None), template, checked.text, build_id, manifest)
    if request.publish_to:
        store = request.publish.store(request.publish_to)
        existing = find_published(store, template.name, build_id)
        if existing and not request.force:
            emit("validate", "done", f"build {build_id} is already published: skipping "
                 "(--force rebuilds)", build_id=build_id)  # fmt: skip
            state.output_dir.mkdir(parents=True, exist_ok=True)
            write_datavolume(
                state.output_dir, Published.from_manifest(existing), request.publish, emit
            )
            return replace(state, skipped=True, manifest=existing)
        if existing:
            # A rebuild goes to a key of its own: overwriting the published image would leave
            # its old manifest describing the new image until the new manifest is written.
            build_id = f"{build_id}.{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
            state = replace(state, build_id=build_id, manifest=replace(manifest, build_id=build_id))
    emit("validate", "done", f"{template.name}: build {build_id}", build_id=build_id)
    return state


def install_step(state: BuildState, emit: Emit = discard) -> BuildState:
    """Run the unattended install onto a fresh disk in a new work directory."""
    if state.skipped:
        return state
    request, template = state.request, state.template
    # A previous build's image, manifest or DataVolume must not pass for this one's. Only
    # the files a build writes go: OUTPUT/NAME may be a directory of the user's.
    output = state.output_dir
    output.mkdir(parents=True, exist_ok=True)
    image = f"{template.name}.qcow2"
    for name in (image, f"{image}.sha256", *OUTPUT_FILES):
        (output / name).unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"diskflow-{template.name}-", dir=request.workdir))
    try:
        installed = install(template, state.kickstart, workdir, request.build, emit)
    except BaseException:
        _keep_logs(workdir, output)  # a failed build's logs are the ones worth reading
        if not kept(workdir):  # --on-error keep: it holds the domain's disk
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    _keep_logs(workdir, output)
    manifest = replace(
        state.manifest,
        accel=AccelRecord(installed.accel.accel, installed.accel.reason),
        builder=socket.gethostname(),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).timed("install", installed.seconds)
    return replace(state, workdir=str(workdir), disk=str(installed.disk), manifest=manifest)


def finalize_step(state: BuildState, emit: Emit = discard) -> BuildState:
    """Compress (and seal) the installed disk into OUTPUT/NAME/NAME.qcow2, with its .sha256."""
    if state.skipped:
        return state
    if not state.disk or not Path(state.disk).is_file():
        raise FinalError(
            "BuildOutputMissing",
            f"the installed disk {state.disk} is not on this machine: the build must run again",
        )
    if state.manifest.accel is None:
        raise FinalError("InternalError", "the manifest records no install before finalize")
    accel = state.manifest.accel.used
    image = state.output_dir / f"{state.template.name}.qcow2"
    try:
        done = finalize(Path(state.disk), image, state.request.finalize, accel, emit)
    finally:
        if state.workdir:
            shutil.rmtree(state.workdir, ignore_errors=True)
    output = OutputRecord(
        file=image.name,
        format="qcow2",
        compression=done.compression,
        sealed=done.sealed,
        size=done.size,
        virtual_size=done.virtual_size,
        sha256=done.sha256,
    )
    manifest = replace(state.manifest, output=output).timed("finalize", done.seconds)
    (image.parent / f"{image.name}.sha256").write_text(f"{done.sha256}  {image.name}\n")
    return replace(state, workdir=None, disk=None, image=str(image), manifest=manifest)


def boot_test_step(state: BuildState, emit: Emit = discard) -> BuildState:
    """Boot the finished image once, unless the request says not to; then write its manifest.

    An image that fails its boot test is removed with its .sha256 (its console log stays):
    nothing is left that looks like a finished build, so nothing of it can be published.
    """
    if state.skipped:
        return state
    image = Path(state.image or "")
    if not state.image or not image.is_file():
        raise FinalError(
            "BuildOutputMissing",
            f"the finished image {state.image} is not on this machine: the build must run again",
        )
    if not state.request.boot_test:
        emit("boot-test", "warning", "the image is not boot-tested (--no-boot-test)")
        record = BootTestRecord(tested=False)
        seconds = 0.0
    else:
        try:
            tested = boot_test(
                image, state.template, state.request.build, state.request.workdir,
                keep_console=state.output_dir / CONSOLE_LOG, emit=emit,
            )  # fmt: skip
        except BaseException:
            for name in (image.name, f"{image.name}.sha256"):
                (image.parent / name).unlink(missing_ok=True)
            raise
        record = BootTestRecord(
            tested=True,
            method=METHOD,
            accel=tested.accel,
            boot="kernel" if tested.kernel else "bootloader",
        )
        seconds = tested.seconds
    manifest = replace(state.manifest, boot_test=record).timed("boot_test", seconds)
    _write_manifest(state.output_dir, manifest)
    return replace(state, manifest=manifest)


def publish_step(state: BuildState, emit: Emit = discard) -> BuildState:
    """Upload the image, its .sha256 and (last) the manifest, if a store was named."""
    request = state.request
    if state.skipped or not request.publish_to:
        return state
    published = publish_directory(state.output_dir, request.publish_to, request.publish, emit)
    return replace(state, manifest=published.manifest)


def publish_directory(
    directory: Path, publish_to: str, options: PublishOptions, emit: Emit = discard
) -> Published:
    """Publish the finished build in DIRECTORY (OUTPUT/NAME); its manifest.json records where."""
    path = directory / "manifest.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FinalError(
            "InvalidArgument", f"{directory} holds no manifest.json: is it a finished build?"
        ) from None
    manifest = BuildManifest.parse(text, str(path))
    image = directory / manifest.finished(str(path)).file
    published = publish_image(image, manifest, publish_to, options, emit)
    _write_manifest(directory, published.manifest)
    return published


def publish_image(
    image: Path,
    manifest: BuildManifest,
    publish_to: str,
    options: PublishOptions,
    emit: Emit = discard,
) -> Published:
    """Publish a finished build (its image and manifest) to the store at `publish_to`.

    A DataVolume manifest importing it is written next to the image.
    """
    sha256 = manifest.finished().sha256
    store = options.store(publish_to)
    emit("publish", "start", f"publishing {image.name} to {store.description}")
    started = time.monotonic()
    progress = Progress()
    with reporting(progress, [EventReporter(relay(emit))], interval=PROGRESS_SECONDS):
        published = publish_build(store, image, manifest, progress, sha256=sha256)
    emit("publish", "done", f"published {published.image_url} in "
         f"{time.monotonic() - started:.1f}s", url=published.image_url)  # fmt: skip
    write_datavolume(image.parent, published, options, emit)
    return published


def write_datavolume(
    directory: Path, published: Published, options: PublishOptions, emit: Emit = discard
) -> Path | None:
    """DIRECTORY/datavolume.yaml importing the published image, if a cluster can reach it;
    else none at all: one an earlier publish wrote would name another store than this one."""
    name = re.sub(r"[^a-z0-9-]+", "-", published.template.lower()).strip("-") or "template"
    path = directory / "datavolume.yaml"
    try:
        manifest = datavolume(
            name, published, namespace=options.namespace, storage_class=options.storage_class,
            volume_mode=options.volume_mode, secret_ref=options.secret_ref,
        )  # fmt: skip
    except FinalError as e:
        message = f"no DataVolume manifest: {e.message}"
        if path.exists():
            path.unlink()
            message += f"; removed {path}, which an earlier publish wrote"
        emit("publish", "warning", message)
        return None
    path.write_text(to_yaml(manifest))
    emit("publish", "info", f"DataVolume manifest: {path}", datavolume=str(path))
    return path


def build_template(request: BuildRequest, emit: Emit = discard) -> BuildState:
    """All the steps in this process: the embedded default, no broker needed."""
    state = validate_step(request, emit)
    for step in (install_step, finalize_step, boot_test_step, publish_step):
        state = step(state, emit)
    return state


def _keep_logs(workdir: Path, output: Path) -> None:
    for name in LOGS:
        with contextlib.suppress(OSError):  # no log yet (the guest never started)
            shutil.copyfile(workdir / name, output / name)


@contextmanager
def _kickstart_files(
    request: BuildRequest,
) -> Iterator[tuple[Path, Path | None, tuple[Path, ...] | None, Path | None, Callable[[str], str]]]:
    """The kickstart to read, in place or unpacked from the request's bundle; where relative
    media paths start; the directories media must be under (None: anywhere); the root its
    %includes are confined to (None: the default, or the bundle's); and how to show a message
    about the files (with the submitter's paths).
    """
    from pipelines.bundle import media_dirs  # here: only this function reads the setting

    bundle = request.bundle
    if bundle is None:
        # The user's own files on their own machine: media anywhere, includes in their tree.
        root = Path(request.kickstart_root) if request.kickstart_root else None
        yield Path(request.kickstart), None, None, root, str
        return
    # Read before unpacking: a misconfigured worker fails before it writes anything.
    roots = media_dirs()
    with unpacked(bundle) as path:
        scratch = str(path.parents[len(Path(bundle.kickstart).parts) - 1])

        def shown(text: str) -> str:
            return text.replace(scratch, bundle.origin)

        yield path, bundle.media_base, roots, None, shown


def _write_manifest(directory: Path, manifest: BuildManifest) -> None:
    path = directory / "manifest.json"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    partial.replace(path)
