"""The template half of the `diskflow` command: validate, build, publish, worker, ci."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diskflow.options import (
    S3Addressing,
    S3AddressingOption,
    S3CredentialsFile,
    S3Endpoint,
    S3Profile,
    S3Region,
    s3_options,
)
from importer.errors import FinalError, ImportFailure
from importer.outcome import Outcome
from pipelines.accel import Accel
from pipelines.build import BuildOptions
from pipelines.events import Emit, discard, json_lines, log_lines
from pipelines.finalize import Compression, FinalizeOptions

if TYPE_CHECKING:
    from pipelines.steps import BuildRequest, BuildState, PublishOptions

# The build machinery (pykickstart, the stores, YAML) is imported by the commands that use it:
# `diskflow import` in an importer pod should not pay for it at start-up.

ci_app = typer.Typer(
    help="Build what a git change affects (Jenkins and other CI).", no_args_is_help=True
)


class EventMode(StrEnum):
    AUTO = "auto"
    LOG = "log"
    JSON = "json"
    NONE = "none"


Kickstarts = Annotated[
    Path, typer.Option("--kickstarts", help="The directory of templates (NAME.ks + NAME.toml).")
]
Output = Annotated[Path, typer.Option(help="The template's files land in OUTPUT/NAME/.")]
PublishTo = Annotated[
    str | None,
    typer.Option(help="s3://bucket/prefix, http(s)://artifact-store/path, or a local directory."),
]
Force = Annotated[bool, typer.Option(help="Build even when the same build id is published.")]
AccelOption = Annotated[
    Accel, typer.Option(help="kvm, tcg, or auto (KVM if it can run the guest, said aloud).")
]
Connect = Annotated[
    str | None,
    typer.Option(
        help="libvirt URI (default: LIBVIRT_DEFAULT_URI, else qemu:///system; a queued build "
        "uses the worker's).",
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        min=1,
        help="Seconds the whole install may take (a worker lowers a longer one to its "
        "DISKFLOW_MAX_BUILD_TIMEOUT).",
    ),
]
SilenceTimeout = Annotated[
    float,
    typer.Option(min=1, help="Seconds without console or installer output before giving up."),
]
Network = Annotated[
    str, typer.Option(help="virt-install --network: user (no bridge needed), none, bridge=br0...")
]
Seal = Annotated[bool, typer.Option(help="virt-sysprep the disk before compressing it.")]
CompressionOption = Annotated[Compression, typer.Option(help="qcow2 compression: zstd or zlib.")]
Workdir = Annotated[
    Path | None, typer.Option(help="Where the install disk lives meanwhile (default: $TMPDIR).")
]
Progress = Annotated[
    EventMode, typer.Option("--progress", help="auto: log lines on a terminal, JSON otherwise.")
]
AuthFile = Annotated[
    Path | None,
    typer.Option(
        exists=True,
        dir_okay=False,
        help="user:password for an http(s) store (or DISKFLOW_PUBLISH_USER/_PASSWORD, or "
        "DISKFLOW_PUBLISH_TOKEN).",
    ),
]
PublicUrl = Annotated[
    str | None, typer.Option(help="The HTTP URL serving a local directory store, for DataVolumes.")
]
Namespace = Annotated[str | None, typer.Option(help="Namespace of the DataVolume manifest.")]
StorageClass = Annotated[str | None, typer.Option(help="storageClassName of the DataVolume.")]
SecretRef = Annotated[
    str | None,
    typer.Option(help="Secret with the store's credentials, named in the DataVolume's source."),
]


class VolumeMode(StrEnum):
    FILESYSTEM = "Filesystem"
    BLOCK = "Block"


VolumeModeOption = Annotated[
    VolumeMode | None, typer.Option(help="volumeMode of the DataVolume (sizes it to match).")
]


def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Kickstart files (default: every template in --kickstarts)."),
    ] = None,
    kickstarts: Kickstarts = Path("kickstarts"),
) -> None:
    """Check kickstarts with pykickstart for their metadata's version, %includes resolved."""
    from pipelines import ci, kickstart
    from pipelines.template import load_template

    paths = files or ci.template_files(kickstarts)
    failed = 0
    for path in paths:
        try:
            template = load_template(path)
            checked = kickstart.validate(path, template.version)
        except ImportFailure as failure:
            failed += 1
            typer.echo(f"error: {failure.message} [{failure.reason}]", err=True)
            continue
        for warning in checked.warnings:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(f"ok {path} ({template.version}, {len(checked.files)} file(s))")
    if failed:
        raise typer.Exit(1)


def build(
    kickstart_file: Annotated[Path, typer.Argument(help="kickstarts/NAME.ks", metavar="KICKSTART")],
    output: Output = Path("build"),
    publish_to: PublishTo = None,
    force: Force = False,
    accel: AccelOption = Accel.AUTO,
    connect: Connect = None,
    timeout: Timeout = BuildOptions.timeout,
    no_output_timeout: SilenceTimeout = BuildOptions.no_output_timeout,
    network: Network = BuildOptions.network,
    seal: Seal = False,
    compression: CompressionOption = Compression.ZSTD,
    workdir: Workdir = None,
    progress: Progress = EventMode.AUTO,
    queue: Annotated[
        bool,
        typer.Option(help="Submit to the Celery broker (DISKFLOW_BROKER_URL) and follow it."),
    ] = False,
    s3_endpoint: S3Endpoint = None,
    s3_region: S3Region = None,
    s3_addressing: S3AddressingOption = S3Addressing.AUTO,
    s3_profile: S3Profile = None,
    s3_credentials_file: S3CredentialsFile = None,
    auth_file: AuthFile = None,
    public_url: PublicUrl = None,
    namespace: Namespace = None,
    storage_class: StorageClass = None,
    secret_ref: SecretRef = None,
    volume_mode: VolumeModeOption = None,
) -> None:
    """Build a template: validate, install with virt-install, compress, publish.

    Exit status: 0 built (or already published), 1 failed for good, 75 failed for now.
    """
    request = _request(kickstart_file, **_shared(locals()))
    from pipelines.steps import build_template

    mode = _resolve(progress)
    emit = _emitter(mode)
    run = _queued if queue else build_template
    _report(lambda: run(request, emit), mode)


def publish(
    directory: Annotated[
        Path,
        typer.Argument(help="A finished build, OUTPUT/NAME: its manifest.json and NAME.qcow2."),
    ],
    publish_to: Annotated[
        str,
        typer.Option(
            help="s3://bucket/prefix, http(s)://artifact-store/path, or a local directory."
        ),
    ],
    s3_endpoint: S3Endpoint = None,
    s3_region: S3Region = None,
    s3_addressing: S3AddressingOption = S3Addressing.AUTO,
    s3_profile: S3Profile = None,
    s3_credentials_file: S3CredentialsFile = None,
    auth_file: AuthFile = None,
    public_url: PublicUrl = None,
    namespace: Namespace = None,
    storage_class: StorageClass = None,
    secret_ref: SecretRef = None,
    volume_mode: VolumeModeOption = None,
    progress: Progress = EventMode.AUTO,
) -> None:
    """Publish a build made earlier: image and .sha256 first, manifest last; a DataVolume."""
    from diskflow.cli import guarded
    from pipelines.steps import publish_directory

    given = locals()
    options = _publish_options(**{name: given[name] for name in PUBLISH_OPTIONS})
    mode = _resolve(progress)
    published = guarded(
        lambda: publish_directory(directory, publish_to, options, _emitter(mode)),
        _failure_reporter(mode),
    )
    summary = {"image": published.image_url, "sha256": published.sha256,
               "manifest": published.manifest_url}  # fmt: skip
    if mode is EventMode.JSON:
        print(json.dumps({"kind": "result", **summary}), flush=True)
    else:
        typer.echo(f"published {published.image_url} (sha256 {published.sha256})")


def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Builds at once (default: DISKFLOW_WORKER_CONCURRENCY, else 1: a KVM host's "
            "capacity).",
        ),
    ] = None,
    hostname: Annotated[
        str | None, typer.Option(help="Worker node name (default: celery@HOST).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker for template builds (broker: DISKFLOW_BROKER_URL).

    Settings from the environment: DISKFLOW_WORKER_CONCURRENCY, DISKFLOW_VISIBILITY_TIMEOUT,
    DISKFLOW_MAX_BUILD_TIMEOUT (a longer build timeout is lowered to it), DISKFLOW_BUILD_MARGIN;
    the worker refuses to start when a build could outlive the visibility timeout.
    """
    try:
        from pipelines.tasks import app as celery_app
    except FinalError as e:  # the app reads its settings on import (pipelines.tasks.settings)
        raise typer.BadParameter(e.message) from None

    # Celery logs every task's return value; a build state holds the kickstart text, which
    # may hold a password hash.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    argv = ["worker", f"--loglevel={loglevel}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


@ci_app.command("changed")
def ci_changed(
    since: Annotated[str, typer.Option(help="The git ref to compare HEAD with.")],
    kickstarts: Kickstarts = Path("kickstarts"),
) -> None:
    """Print the templates (one kickstart path per line) a change since REF affects."""
    from diskflow.cli import guarded
    from pipelines import ci

    changed = guarded(lambda: ci.changed_templates(Path.cwd(), since, kickstarts), _print_failure)
    for path in changed:
        typer.echo(path)


@ci_app.command("build")
def ci_build(
    since: Annotated[str, typer.Option(help="The git ref to compare HEAD with.")],
    junit: Annotated[Path, typer.Option(help="Where to write the JUnit XML report.")] = Path(
        "diskflow-junit.xml"
    ),
    kickstarts: Kickstarts = Path("kickstarts"),
    output: Output = Path("build"),
    publish_to: PublishTo = None,
    force: Force = False,
    accel: AccelOption = Accel.AUTO,
    connect: Connect = None,
    timeout: Timeout = BuildOptions.timeout,
    no_output_timeout: SilenceTimeout = BuildOptions.no_output_timeout,
    network: Network = BuildOptions.network,
    seal: Seal = False,
    compression: CompressionOption = Compression.ZSTD,
    workdir: Workdir = None,
    progress: Progress = EventMode.AUTO,
    s3_endpoint: S3Endpoint = None,
    s3_region: S3Region = None,
    s3_addressing: S3AddressingOption = S3Addressing.AUTO,
    s3_profile: S3Profile = None,
    s3_credentials_file: S3CredentialsFile = None,
    auth_file: AuthFile = None,
    public_url: PublicUrl = None,
    namespace: Namespace = None,
    storage_class: StorageClass = None,
    secret_ref: SecretRef = None,
    volume_mode: VolumeModeOption = None,
) -> None:
    """Build and publish every template a change since REF affects; exit 1 if any failed."""
    from diskflow.cli import guarded
    from pipelines import ci
    from pipelines.steps import build_template

    shared = _shared(locals())
    changed = guarded(lambda: ci.changed_templates(Path.cwd(), since, kickstarts), _print_failure)
    mode = _resolve(progress)
    emit = _emitter(mode)

    def build_all() -> list[ci.Case]:
        cases: list[ci.Case] = []
        try:
            for path in changed:
                started = time.monotonic()
                try:
                    state = build_template(_request(path, **shared), emit)
                except ImportFailure as failure:
                    text = f"{failure.message} [{failure.reason}]"
                    cases.append(ci.Case(path.stem, time.monotonic() - started, failure=text))
                    typer.echo(f"error: {path}: {text}", err=True)
                    if failure.reason == "Terminated":
                        raise  # the job was stopped: build nothing more
                    continue
                except Exception as exc:  # a bug of ours: this template fails, the rest build
                    message = f"internal error ({type(exc).__name__})"
                    cases.append(ci.Case(path.stem, time.monotonic() - started, failure=message))
                    typer.echo(f"error: {path}: {message} [InternalError]", err=True)
                    continue
                skipped = "already published" if state.skipped else None
                cases.append(ci.Case(path.stem, time.monotonic() - started, skipped=skipped,
                                     output=json.dumps(state.manifest, indent=2)))  # fmt: skip
        finally:
            ci.write_junit(junit, "diskflow templates", cases)  # whatever happened
        return cases

    cases = guarded(build_all, _print_failure)
    failures = sum(1 for case in cases if case.failure)
    typer.echo(f"{len(cases)} template(s), {failures} failed; report in {junit}")
    if failures:
        raise typer.Exit(1)


PUBLISH_OPTIONS = (
    "s3_endpoint", "s3_region", "s3_addressing", "s3_profile", "s3_credentials_file",
    "auth_file", "public_url", "namespace", "storage_class", "secret_ref", "volume_mode",
)  # fmt: skip
SHARED = (
    "output", "publish_to", "force", "accel", "connect", "timeout", "no_output_timeout",
    "network", "seal", "compression", "workdir", *PUBLISH_OPTIONS,
)  # fmt: skip


def _shared(options: dict[str, Any]) -> dict[str, Any]:
    """The options `build` and `ci build` share, picked from a command's locals()."""
    return {name: options[name] for name in SHARED}


def _request(
    kickstart_file: Path,
    *,
    output: Path,
    publish_to: str | None,
    force: bool,
    accel: Accel,
    connect: str | None,
    timeout: float,
    no_output_timeout: float,
    network: str,
    seal: bool,
    compression: Compression,
    workdir: Path | None,
    **publish: Any,
) -> BuildRequest:
    from pipelines.steps import BuildRequest

    return BuildRequest(
        kickstart=str(kickstart_file),
        output=str(output),
        publish_to=publish_to,
        force=force,
        workdir=str(workdir) if workdir else None,
        build=BuildOptions(connect, accel, timeout, no_output_timeout, network),
        finalize=FinalizeOptions(seal, compression),
        publish=_publish_options(**publish),
    )


def _publish_options(
    *,
    s3_endpoint: str | None,
    s3_region: str | None,
    s3_addressing: S3Addressing,
    s3_profile: str | None,
    s3_credentials_file: Path | None,
    auth_file: Path | None,
    public_url: str | None,
    namespace: str | None,
    storage_class: str | None,
    secret_ref: str | None,
    volume_mode: VolumeMode | None,
) -> PublishOptions:
    from pipelines.steps import PublishOptions

    return PublishOptions(
        s3=s3_options(s3_endpoint, s3_region, s3_addressing, s3_profile, s3_credentials_file),
        auth_file=str(auth_file) if auth_file else None,
        public_url=public_url,
        namespace=namespace,
        storage_class=storage_class,
        secret_ref=secret_ref,
        volume_mode=volume_mode.value if volume_mode else None,
    )


def _queued(request: BuildRequest, emit: Emit) -> BuildState:
    from pipelines.tasks import follow, submit

    results = submit(request)
    emit("queue", "info", f"queued as {results[-1].id} (tasks: {', '.join(r.id for r in results)})")
    return follow(results, emit)


def _failure_reporter(mode: EventMode) -> Callable[[Outcome], None]:
    def finish(outcome: Outcome) -> None:
        if mode is EventMode.JSON:
            print(json.dumps({"kind": "failed", **outcome.to_dict()}), flush=True)
        _print_failure(outcome)

    return finish


def _report(job: Callable[[], BuildState], mode: EventMode) -> None:
    from diskflow.cli import guarded

    state = guarded(job, _failure_reporter(mode))
    summary = {
        "template": state.template.name,
        "build_id": state.build_id,
        "skipped": state.skipped,
        "image": state.image,
        "manifest": state.manifest,
    }
    if mode is EventMode.JSON:
        print(json.dumps({"kind": "result", **summary}), flush=True)
    else:
        output = state.manifest.get("output", {})
        typer.echo(
            f"{state.template.name}: build {state.build_id} "
            + ("already published" if state.skipped else f"sha256 {output.get('sha256')}")
        )


def _print_failure(outcome: Outcome) -> None:
    from diskflow.cli import print_failure  # cli registers this module's commands

    print_failure(outcome)


def _resolve(mode: EventMode) -> EventMode:
    if mode is EventMode.AUTO:
        return EventMode.LOG if sys.stderr.isatty() else EventMode.JSON
    return mode


def _emitter(mode: EventMode) -> Emit:
    if mode is EventMode.JSON:
        return json_lines()
    if mode is EventMode.LOG:
        return log_lines()
    return discard
