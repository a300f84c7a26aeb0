"""The template half of the `diskflow` command: validate, build, publish, worker, ci."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from diskflow.failures import guarded
from diskflow.flags import duration, takes_groups
from diskflow.options import S3Flags
from diskflow.output import PROGRESS_HELP, ProgressMode, resolve, route_logging, start
from importer.errors import Failure, FinalError
from importer.events import Event, Level, Output, Type, result
from importer.outcome import EXIT_FINAL
from pipelines.accel import Accel
from pipelines.events import Emit, to
from pipelines.finalize import FinalizeOptions, QcowCompression
from pipelines.virtinstall import BuildOptions, OnError

if TYPE_CHECKING:
    from pipelines.steps import BuildRequest, BuildState, PublishOptions

# The build machinery (pykickstart, the stores, YAML) is imported by the commands that use it:
# `diskflow import` in an importer pod should not pay for it at start-up.

ci_app = typer.Typer(
    help="Build what a git change affects (Jenkins and other CI).", no_args_is_help=True
)


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class VolumeMode(StrEnum):
    FILESYSTEM = "Filesystem"
    BLOCK = "Block"


STORE_URL = "s3://bucket/prefix, http(s)://artifact-store/path, or a local directory."
Kickstarts = Annotated[
    Path, typer.Option("--kickstarts", help="The directory of templates (NAME.ks + NAME.toml).")
]
Progress = Annotated[ProgressMode, typer.Option("--progress", help=PROGRESS_HELP)]
Format = Annotated[
    OutputFormat,
    typer.Option("--format", "-o", help="text, or json: one JSON document on stdout."),
]
AccelOption = Annotated[
    Accel, typer.Option(help="kvm, tcg, or auto (KVM if it can run the guest, said aloud).")
]
Root = Annotated[
    Path | None,
    typer.Option(
        exists=True,
        file_okay=False,
        help="The tree %include may read from; nothing outside it is read (default: the "
        "kickstart's git repository, else its directory).",
    ),
]


@dataclass(frozen=True)
class PublishFlags:
    """How to reach the store a build is published to, and the DataVolume that points at it."""

    store: S3Flags = field(default_factory=S3Flags)
    auth_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="user:password for an http(s) store (or DISKFLOW_PUBLISH_USER/_PASSWORD, or "
            "DISKFLOW_PUBLISH_TOKEN).",
        ),
    ] = None
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="PEM file of CA certificates to trust for an S3 or https store (default: "
            "AWS_CA_BUNDLE for S3, REQUESTS_CA_BUNDLE for https, else the system's).",
        ),
    ] = None
    public_url: Annotated[
        str | None,
        typer.Option(help="The HTTP URL serving a local directory store, for DataVolumes."),
    ] = None
    namespace: Annotated[
        str | None,
        typer.Option(help="Namespace of the DataVolume manifest."),
    ] = None
    storage_class: Annotated[
        str | None, typer.Option(help="storageClassName of the DataVolume.")
    ] = None
    secret_ref: Annotated[
        str | None,
        typer.Option(help="Secret with the store's credentials, named in the DataVolume's source."),
    ] = None
    volume_mode: Annotated[
        VolumeMode | None, typer.Option(help="volumeMode of the DataVolume (sizes it to match).")
    ] = None

    def options(self) -> PublishOptions:
        from pipelines.steps import PublishOptions

        return PublishOptions(
            s3=self.store.options(),
            auth_file=str(self.auth_file) if self.auth_file else None,
            ca_bundle=str(self.ca_bundle) if self.ca_bundle else None,
            public_url=self.public_url,
            namespace=self.namespace,
            storage_class=self.storage_class,
            secret_ref=self.secret_ref,
            volume_mode=self.volume_mode.value if self.volume_mode else None,
        )


@dataclass(frozen=True)
class BuildFlags:
    """How to build a template, test it and publish it: what `build` and `ci build` share."""

    output: Annotated[
        Path,
        typer.Option(help="The template's files land in OUTPUT/NAME/."),
    ] = Path("build")
    publish_to: Annotated[
        str | None,
        typer.Option(metavar="URL", help=STORE_URL),
    ] = None
    force: Annotated[
        bool,
        typer.Option(help="Build even when the same build id is published."),
    ] = False
    root: Root = None
    accel: AccelOption = Accel.AUTO
    connect: Annotated[
        str | None,
        typer.Option(
            help="libvirt URI (default: LIBVIRT_DEFAULT_URI, else qemu:///system; a queued "
            "build uses the worker's).",
        ),
    ] = None
    timeout: Annotated[
        float,
        duration(
            "The time the whole install may take (a worker lowers a longer one to its "
            "DISKFLOW_MAX_BUILD_TIMEOUT).",
            at_least=1,
            show_default="3h",
        ),
    ] = BuildOptions.timeout
    no_output_timeout: Annotated[
        float,
        duration(
            "The time without console or installer output before giving up.",
            at_least=1,
            show_default="10m",
        ),
    ] = BuildOptions.no_output_timeout
    network: Annotated[
        str,
        typer.Option(help="virt-install --network: user (no bridge needed), none, bridge=br0..."),
    ] = BuildOptions.network
    seal: Annotated[bool, typer.Option(help="virt-sysprep the disk before compressing it.")] = False
    compression: Annotated[
        QcowCompression,
        typer.Option(help="qcow2 compression: zstd or zlib."),
    ] = QcowCompression.ZSTD
    boot_test: Annotated[
        bool,
        typer.Option(
            help="Boot the finished image once with a cloud-init NoCloud seed and wait for a "
            "marker on its serial console before publishing; --no-boot-test skips it and the "
            "manifest says so."
        ),
    ] = True
    boot_timeout: Annotated[
        float,
        duration(
            "The time the boot test may take to show its marker.", at_least=1, show_default="30m"
        ),
    ] = BuildOptions.boot_timeout
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where the install disk lives meanwhile (default: $TMPDIR)."),
    ] = None
    on_error: Annotated[
        OnError,
        typer.Option(
            help="What a failed install or boot test leaves: cleanup (nothing), or keep its VM "
            "and disk for debugging, with the commands to reach and remove them (Packer's "
            "-on-error=abort).",
        ),
    ] = BuildOptions.on_error
    publish: PublishFlags = field(default_factory=PublishFlags)

    def request(self, kickstart: Path) -> BuildRequest:
        """What to build of `kickstart`, as these options say."""
        from pipelines.steps import BuildRequest

        return BuildRequest(
            kickstart=str(kickstart),
            output=str(self.output),
            publish_to=self.publish_to,
            force=self.force,
            workdir=str(self.workdir) if self.workdir else None,
            kickstart_root=str(self.root) if self.root else None,
            boot_test=self.boot_test,
            build=BuildOptions(
                connect=self.connect,
                accel=self.accel,
                timeout=self.timeout,
                no_output_timeout=self.no_output_timeout,
                network=self.network,
                boot_timeout=self.boot_timeout,
                on_error=self.on_error,
            ),
            finalize=FinalizeOptions(seal=self.seal, compression=self.compression),
            publish=self.publish.options(),
        )


def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Kickstart files (default: every template in --kickstarts)."),
    ] = None,
    kickstarts: Kickstarts = Path("kickstarts"),
    root: Root = None,
    form: Format = OutputFormat.TEXT,
) -> None:
    """Check kickstarts with pykickstart for their metadata's version, %includes resolved.

    Exit status: 0 every one is valid, 1 any is not (each named on stderr)."""
    from pipelines import ci, kickstart
    from pipelines.template import load_template

    output = start(ProgressMode.LOG)  # warnings and library log lines, at the level asked
    paths = files or _templates_in(kickstarts)
    if not paths:
        empty = ci.no_templates(kickstarts)
        typer.echo(f"error: {empty.message} [{empty.reason}]", err=True)
        raise typer.Exit(EXIT_FINAL)
    checks: list[dict[str, Any]] = []
    for path in paths:
        try:
            template = load_template(path)
            checked = kickstart.validate(path, template.version, root=root)
        except Failure as failure:
            checks.append({"kickstart": str(path), "ok": False, "reason": failure.reason,
                           "message": failure.message})  # fmt: skip
            typer.echo(f"error: {failure.message} [{failure.reason}]", err=True)
            continue
        checks.append({"kickstart": str(path), "ok": True, "version": template.version,
                       "files": [str(f) for f in checked.files],
                       "warnings": list(checked.warnings)})  # fmt: skip
        if form is OutputFormat.TEXT:
            for warning in checked.warnings:
                output(Event(Type.LOG, warning, Level.WARNING, {"stage": "validate"}))
            typer.echo(f"ok {path} ({template.version}, {len(checked.files)} file(s))")
    valid = all(check["ok"] for check in checks)
    if form is OutputFormat.JSON:
        typer.echo(json.dumps({"ok": valid, "templates": checks}, indent=2))
    if not valid:
        raise typer.Exit(EXIT_FINAL)


def _templates_in(kickstarts: Path) -> list[Path]:
    """The templates of --kickstarts; a directory that is not there is a usage error."""
    from pipelines import ci

    try:
        return ci.template_files(kickstarts)
    except FinalError as e:  # no such directory: a typo on the command line
        raise typer.BadParameter(e.message, param_hint="'--kickstarts'") from None


@takes_groups
def build(
    kickstart_file: Annotated[Path, typer.Argument(help="kickstarts/NAME.ks", metavar="KICKSTART")],
    flags: BuildFlags,
    progress: Progress = ProgressMode.AUTO,
    queue: Annotated[
        bool,
        typer.Option(help="Submit to the Celery broker (DISKFLOW_BROKER_URL) and follow it."),
    ] = False,
) -> None:
    """Build a template: validate, install with virt-install, compress, boot-test, publish.

    Exit status: 0 built (or already published), 1 failed for good, 75 failed for now.
    """
    request = flags.request(kickstart_file)
    from pipelines.steps import build_template

    output = _start(progress)
    run = _queued if queue else build_template
    _report(lambda: run(request, to(output)), output)


@takes_groups
def publish(
    directory: Annotated[
        Path,
        typer.Argument(help="A finished build, OUTPUT/NAME: its manifest.json and NAME.qcow2."),
    ],
    publish_to: Annotated[
        str,
        typer.Option(metavar="URL", help=STORE_URL),
    ],
    flags: PublishFlags,
    progress: Progress = ProgressMode.AUTO,
) -> None:
    """Publish a build made earlier: image and .sha256 first, manifest last; a DataVolume."""
    from pipelines.steps import publish_directory

    options = flags.options()
    output = _start(progress)
    published = guarded(
        lambda: publish_directory(directory, publish_to, options, to(output)), output
    )
    summary = {"ok": True, "image": published.image_url, "sha256": published.sha256,
               "manifest": published.manifest_url}  # fmt: skip
    output(result(f"published {published.image_url} (sha256 {published.sha256})", summary))


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
    progress: Annotated[
        ProgressMode,
        typer.Option(
            help="How it logs: auto (log lines on a terminal, JSON lines otherwise), log or json."
        ),
    ] = ProgressMode.AUTO,
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

    output = start(resolve(progress, terminal=ProgressMode.LOG))

    def route(**_: object) -> None:
        # Instead of Celery's own handlers: its log lines, the builds' events and the
        # libraries' warnings are events of one schema, at the level asked.
        route_logging(output)
        # Celery logs every task's return value; a build state holds the kickstart text,
        # which may hold a password hash.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)

    from celery.signals import setup_logging

    setup_logging.connect(route, weak=False)
    # Celery would turn print()s into log records by swapping sys.stdout for a logger, and
    # the events are written to sys.stdout.
    celery_app.conf.worker_redirect_stdouts = False
    # Celery's --quiet: no banner, whose lines on stdout would break the JSON lines.
    quiet = ["--quiet"] if output.json_lines else []
    argv = [*quiet, "worker", f"--loglevel={output.level.value.upper()}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


@ci_app.command("changed")
def ci_changed(
    since: Annotated[str, typer.Option(help="The git ref to compare HEAD with.")],
    kickstarts: Kickstarts = Path("kickstarts"),
    form: Format = OutputFormat.TEXT,
) -> None:
    """Print the templates (one kickstart path per line) a change since REF affects."""
    from pipelines import ci

    _templates_in(kickstarts)
    changed = guarded(lambda: ci.changed_templates(Path.cwd(), since, kickstarts))
    if form is OutputFormat.JSON:
        templates = [{"name": path.stem, "kickstart": str(path)} for path in changed]
        typer.echo(json.dumps({"since": since, "templates": templates}, indent=2))
        return
    for path in changed:
        typer.echo(path)
    # On stderr: stdout stays the list a script reads.
    typer.echo(f"{len(changed)} template{'' if len(changed) == 1 else 's'} changed", err=True)


@ci_app.command("build")
@takes_groups
def ci_build(
    since: Annotated[str, typer.Option(help="The git ref to compare HEAD with.")],
    junit: Annotated[Path, typer.Option(help="Where to write the JUnit XML report.")] = Path(
        "diskflow-junit.xml"
    ),
    kickstarts: Kickstarts = Path("kickstarts"),
    *,  # the options of BuildFlags go here, in --help too
    flags: BuildFlags,
    progress: Progress = ProgressMode.AUTO,
) -> None:
    """Build and publish every template a change since REF affects.

    Exit status: 0 all built (or already published), 75 some failed but every failure was
    transient (trying again may work), 1 any failed for good.
    """
    from pipelines import ci
    from pipelines.steps import build_template

    _templates_in(kickstarts)
    output = _start(progress)
    changed = guarded(lambda: ci.changed_templates(Path.cwd(), since, kickstarts), output)
    emit = to(output)

    def build_all() -> list[ci.Case]:
        cases: list[ci.Case] = []
        try:
            for path in changed:
                started = time.monotonic()
                try:
                    state = build_template(flags.request(path), emit)
                except Failure as failure:
                    text = f"{failure.message} [{failure.reason}]"
                    cases.append(ci.Case(path.stem, time.monotonic() - started, failure=text,
                                         transient=not failure.final))  # fmt: skip
                    emit("ci", "error", f"{path}: {text}", template=path.stem,
                         reason=failure.reason, final=failure.final)  # fmt: skip
                    if failure.reason == "Terminated":
                        raise  # the job was stopped: build nothing more
                    continue
                except Exception as exc:  # a bug of ours: this template fails, the rest build
                    message = f"internal error ({type(exc).__name__})"
                    cases.append(ci.Case(path.stem, time.monotonic() - started, failure=message))
                    emit("ci", "error", f"{path}: {message} [InternalError]", template=path.stem,
                         reason="InternalError", final=True)  # fmt: skip
                    continue
                skipped = "already published" if state.skipped else None
                emit("ci", "done", f"{path}: {_built(state)}", template=path.stem,
                     build_id=state.build_id, skipped=state.skipped)  # fmt: skip
                report = json.dumps(state.manifest.to_json(), indent=2)
                cases.append(ci.Case(path.stem, time.monotonic() - started, skipped=skipped,
                                     output=report))  # fmt: skip
        finally:
            ci.write_junit(junit, "diskflow templates", cases)  # whatever happened
        return cases

    cases = guarded(build_all, output)
    failures = sum(1 for case in cases if case.failure)
    summary = f"{len(cases)} template(s), {failures} failed; report in {junit}"
    status = ci.exit_code(cases)
    fields = {"ok": not failures, "templates": len(cases), "failed": failures, "junit": str(junit)}
    if failures:  # a reason and finality, as every failed result has
        fields |= {"reason": "TemplatesFailed", "final": status == EXIT_FINAL}
    output(result(summary, fields))
    if failures:
        raise typer.Exit(status)


def _queued(request: BuildRequest, emit: Emit) -> BuildState:
    from pipelines.tasks import follow, submit

    results = submit(request)
    emit("queue", "info", f"queued as {results[-1].id} (tasks: {', '.join(r.id for r in results)})")
    return follow(results, emit)


def _report(job: Callable[[], BuildState], output: Output) -> None:
    state = guarded(job, output)
    summary = {
        "ok": True,
        "template": state.template.name,
        "build_id": state.build_id,
        "skipped": state.skipped,
        "image": state.image,
        "manifest": state.manifest.to_json(),
    }
    output(result(f"{state.template.name}: {_built(state)}", summary))


def _built(state: BuildState) -> str:
    done = "already published" if state.skipped else f"sha256 {state.manifest.finished().sha256}"
    return f"build {state.build_id} {done}"


def _start(progress: ProgressMode) -> Output:
    """The Output of a template command: log lines on a terminal (a build has no bars)."""
    mode = resolve(progress, terminal=ProgressMode.LOG)
    return start(ProgressMode.LOG if mode is ProgressMode.BAR else mode)


def demo_template(
    directory: Annotated[
        Path, typer.Argument(help="Where the installer, template, store and disk.img go.")
    ] = Path("diskflow-demo-template"),
    accel: AccelOption = Accel.AUTO,
    progress: Progress = ProgressMode.AUTO,
) -> None:
    """Build a tiny template, boot-test it, publish it and import it back, all on this machine.

    The template is installed by a tiny installer (Debian's cloud kernel, downloaded with apt,
    and busybox: no distribution mirror) with virt-install under libvirtd (scripts/services.sh
    starts it), boot-tested, published to DIRECTORY/store served over HTTP on 127.0.0.1, given
    a DataVolume, and imported back into DIRECTORY/disk.img with `diskflow import` as that
    DataVolume says. About a minute under TCG.
    """
    from diskflow.demo_template import run_template_demo

    output = _start(progress)
    demo = guarded(lambda: run_template_demo(directory, accel, to(output)), output)
    summary = {
        "ok": True,
        "image": str(demo.image),
        "boot_test": demo.manifest["boot_test"],
        "published": demo.manifest["published"]["image"]["url"],
        "datavolume": str(demo.datavolume),
        "disk": str(demo.disk),
    }
    output(result(
        f"built {summary['image']} (boot-tested with {summary['boot_test']['accel']}), "
        f"published {summary['published']}\nDataVolume: {summary['datavolume']}\n"
        f"imported back into {summary['disk']}: the template's disk, byte for byte",
        summary,
    ))  # fmt: skip
