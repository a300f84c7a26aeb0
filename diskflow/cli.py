"""The `diskflow` command: a thin shell over the importer and pipeline libraries."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
import typer.main
from typer.core import TyperGroup

from diskflow.failures import guarded
from diskflow.flags import conventional, duration, size, takes_groups, usage_checked
from diskflow.options import S3Flags
from diskflow.output import PROGRESS_HELP, ProgressMode, resolve, start
from importer import (
    Checksum,
    ContentType,
    HttpOptions,
    ImportOptions,
    ImportResult,
    Progress,
    import_image,
)
from importer.capacity import DEFAULT_OVERHEAD
from importer.errors import FinalError
from importer.events import Level, Output
from importer.outcome import Outcome
from importer.progress import (
    EventReporter,
    MetricsReporter,
    Reporter,
    RichReporter,
    metrics_address,
    reporting,
)
from importer.sources.http_options import parse_header

if TYPE_CHECKING:
    from typer._click import Command, Context, HelpFormatter  # the click typer vendors

# The commands defined in other modules, as "module:attribute" (a command function, or a Typer
# of subcommands), in the order `diskflow --help` lists them after import and demo. They are
# imported when run or listed, so that `diskflow import` in an importer pod does not load the
# template builds' or the controller's modules (pykickstart, kopf, kubernetes, YAML, ...).
LAZY_COMMANDS = {
    "validate": "diskflow.templates_cli:validate",
    "build": "diskflow.templates_cli:build",
    "publish": "diskflow.templates_cli:publish",
    "worker": "diskflow.templates_cli:worker",
    "controller": "diskflow.controller_cli:controller",
    "ci": "diskflow.templates_cli:ci_app",
    "manifest": "diskflow.manifest_cli:manifest_app",
}


class _Commands(MutableMapping[str, "Command"]):
    """A group's commands: the ones built already, then the lazy ones ("module:attribute"),
    each built on first lookup. Listing the names (and suggesting one for a typo) loads nothing."""

    def __init__(
        self, built: Mapping[str, Command], lazy: Mapping[str, str], settings: dict[str, Any]
    ) -> None:
        pending = {name: spec for name, spec in lazy.items() if name not in built}
        self._entries: dict[str, Command | str] = {**built, **pending}  # a str: not loaded yet
        self._settings = settings

    def __getitem__(self, name: str) -> Command:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = self._load(name, entry)
        return entry

    def __setitem__(self, name: str, command: Command) -> None:
        self._entries[name] = command

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _load(self, name: str, spec: str) -> Command:
        """The click command typer makes of `spec`, registered as `app` would have."""
        module, attribute = spec.split(":")
        __import__(module)  # not importlib.import_module: -X importtime reports this one
        target = getattr(sys.modules[module], attribute)
        holder = typer.Typer(**self._settings)
        if isinstance(target, typer.Typer):
            holder.add_typer(target, name=name, cls=Group)
        else:
            holder.command(name)(target)
        command = typer.main.get_group(holder).commands[name]
        conventional(command)  # a group (add_typer's) did its own commands
        return command


class Group(TyperGroup):
    """A group whose help lists each command with the whole first sentence of its help, as
    typer's rich help did: click's own cuts it short to fit the terminal. Its options and
    those of its commands built with it follow `conventional`."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in [self, *self.commands.values()]:
            conventional(command)

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows: list[tuple[str, str]] = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1 << 16)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class LazyGroup(Group):
    """A group with commands loaded when used (`lazy`): the `diskflow` group's LAZY_COMMANDS."""

    lazy: Mapping[str, str] = LAZY_COMMANDS

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        settings = {"add_completion": False, "rich_markup_mode": self.rich_markup_mode}
        self.commands = _Commands(self.commands, self.lazy, settings)

    def list_commands(self, ctx: Context) -> list[str]:
        return list(self.commands)  # the names: typer's own would load every command


app = typer.Typer(
    cls=LazyGroup,
    help="Import VM disk images into volumes, and build golden images.",
    no_args_is_help=True,
    # --install-completion/--show-completion; typer.main has loaded what they need already.
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Plain click help and usage errors: rich would be imported to format them.
    rich_markup_mode=None,
)

USER_ENV, PASSWORD_ENV = "DISKFLOW_HTTP_USER", "DISKFLOW_HTTP_PASSWORD"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version  # 20 ms: only --version reads the metadata

        typer.echo(f"diskflow {version('diskflow')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """diskflow: get VM disk images into Kubernetes volumes, and build the golden images."""


def _headers(lines: list[str]) -> tuple[tuple[str, str], ...]:
    """The --header lines as (name, value); FinalError naming the first bad one."""
    return tuple(
        parse_header(line, where=f"--header number {n}") for n, line in enumerate(lines, 1)
    )


def _url_syntax(source: str) -> str:
    """SOURCE, refused if it is a URL that does not parse. The message does not quote it: a
    URL may hold a password."""
    if "://" in source:
        try:
            split = urlsplit(source)
        except ValueError:  # the only one: "Invalid IPv6 URL"
            raise typer.BadParameter(
                "not a valid URL: a '[' or ']' of an IPv6 host is missing"
            ) from None
        try:
            _ = split.port  # parsed on first use
        except ValueError:
            raise typer.BadParameter("not a valid URL: its port is not a number 0-65535") from None
    return source


@app.command("import")
@takes_groups
def import_command(
    source: Annotated[
        str,
        typer.Argument(
            callback=_url_syntax,
            help="http(s):// URL, s3://bucket/key, local path, or blank: (empty disk).",
        ),
    ],
    dest: Annotated[
        str,
        typer.Argument(
            help="Destination: a file (disk.img of a Filesystem volume) or a block device."
        ),
    ],
    size: Annotated[
        int | None,
        size(
            "Volume capacity (10Gi, 512Mi, 20G, bytes). Default: the device's size; "
            "for a file, the image's own size."
        ),
    ] = None,
    checksum: Annotated[
        str | None,
        typer.Option(
            callback=usage_checked(Checksum.parse),
            help="ALG:HEX of the bytes as downloaded; ALG is sha256, sha512, sha1 or md5.",
        ),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option(
            callback=usage_checked(_headers),
            help="Extra request header 'Name: value'; repeatable.",
        ),
    ] = None,
    header_file: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            help="File of secret 'Name: value' header lines, or a directory of such files (a "
            "mounted Secret); repeatable. Sent only to the URL's own host.",
        ),
    ] = None,
    auth_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help=f"File holding 'user:password' for basic auth (or set {USER_ENV} and "
            f"{PASSWORD_ENV}). Sent only to the URL's own host.",
        ),
    ] = None,
    secret_dir: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="A mounted Secret holding accessKeyId and secretKey: basic auth (user, "
            "password) for an http(s) SOURCE, the static key pair for an S3 one.",
        ),
    ] = None,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            help="PEM file of CA certificates to trust, or a directory whose files hold them "
            "(a mounted ConfigMap).",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Do not verify the server's TLS certificate.")
    ] = False,
    retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="Failed attempts in a row before giving up; a connection that brought 64 KiB "
            "or more starts the count again.",
        ),
    ] = 5,
    retry_backoff: Annotated[
        float,
        duration("Delay before every reconnect; doubles with each failure in a row, up to 30 s."),
    ] = 1.0,
    stall_timeout: Annotated[
        float,
        duration("Time without a byte before a transfer counts as failed.", at_least=0.1),
    ] = 60.0,
    min_rate: Annotated[
        int,
        typer.Option(
            min=0,
            help="Bytes/s a transfer must average over --min-rate-window, or the connection is "
            "retried as too slow (TooSlow); 0: no minimum.",
        ),
    ] = 1024,
    min_rate_window: Annotated[
        float, duration("The time over which --min-rate is averaged.", at_least=1)
    ] = 60.0,
    connections: Annotated[
        int,
        typer.Option(
            min=1,
            max=32,
            help="Parallel ranged GETs where the server allows, used when one stream is slow "
            "(under 100 MB/s over the first 8 MiB); 1: always one stream.",
        ),
    ] = 4,
    *,  # the options of S3Flags go here, in --help too
    store: S3Flags,
    s3: Annotated[
        bool,
        typer.Option(
            "--s3", help="Read an http(s) SOURCE as CDI's S3 URL https://host/bucket/key."
        ),
    ] = False,
    preallocate: Annotated[
        bool, typer.Option(help="Allocate every block of the destination.")
    ] = False,
    filesystem_overhead: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=0.99,
            help="DEST is the disk.img of a Filesystem volume whose filesystem takes this share: "
            "the image may use --size ÷ (1 + F) in whole MiB (CDI's default: "
            f"{DEFAULT_OVERHEAD:g}). Default: none, DEST is a plain file that may use all of "
            "--size.",
        ),
    ] = None,
    content_type: Annotated[
        ContentType,
        typer.Option(help="kubevirt: a disk image, to raw; archive: a tar, extracted into DEST."),
    ] = ContentType.KUBEVIRT,
    scratch_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where images that do not stream (vhdx, or features no decoder takes) wait "
            "for qemu-img, and where qcow2/vmdk/vhd/vdi data that arrives before its tables is "
            "spilled."
        ),
    ] = None,
    no_scratch: Annotated[
        bool,
        typer.Option(
            "--no-scratch",
            help="There is no scratch space: an image that must go through it fails with "
            "NeedsScratch (exit 75), so that it can be tried again with some.",
        ),
    ] = False,
    spill_limit: Annotated[
        int,
        size(
            "The most qcow2/vmdk data held while its tables have not arrived (16Mi in "
            "memory, the rest in --scratch-dir); past it the image goes through scratch space.",
            show_default="256Mi",
        ),
    ] = 256 << 20,
    max_expansion: Annotated[
        float,
        typer.Option(
            min=0,
            help="Without --size: the most bytes of image per byte downloaded, once past 1 GiB "
            "of image (decompression bombs expand far more); 0: no limit.",
        ),
    ] = 2000.0,
    decompression_memory: Annotated[
        int,
        size("The most memory an xz or zstd stream may ask for its window.", show_default="128Mi"),
    ] = 128 << 20,
    archive_max_members: Annotated[
        int, typer.Option(min=1, help="The most members an archive may hold.")
    ] = 100_000,
    deadline: Annotated[
        float | None,
        duration("The time the whole import may take (DeadlineExceeded after).", at_least=1),
    ] = None,
    progress: Annotated[ProgressMode, typer.Option(help=PROGRESS_HELP)] = ProgressMode.AUTO,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve progress as Prometheus metrics on this port."),
    ] = None,
    metrics_addr: Annotated[
        str,
        typer.Option(
            callback=usage_checked(lambda addr: metrics_address(addr, 0)),
            help="The IP address (IPv4 or IPv6) the metrics are served on: the pod's own, so "
            "that importers sharing a network do not collide.",
        ),
    ] = "0.0.0.0",
    owner_uid: Annotated[
        str | None,
        typer.Option(
            metavar="UID",
            help="The UID of the DataVolume the import fills: with --metrics-port, CDI's "
            "kubevirt_cdi_import_progress_total is served too, labelled ownerUID=UID.",
        ),
    ] = None,
    termination_log: Annotated[
        Path | None,
        typer.Option(help="Write the JSON result or failure here (e.g. /dev/termination-log)."),
    ] = None,
) -> None:
    """Import a disk image into a file or block device, converting it to raw.

    Exit status: 0 done, 1 failed for good (bad input, missing object, checksum mismatch),
    75 failed for now (network or server trouble: trying again may work), 2 bad usage.
    """

    def job(state: Progress) -> ImportResult:
        if ca_bundle and insecure:
            raise FinalError("InvalidArgument", "--ca-bundle and --insecure contradict each other")
        is_s3 = source.lower().startswith("s3://") or s3  # schemes are case-insensitive
        auth, s3_keys = _credentials(auth_file, secret_dir, s3=is_s3)
        access_key, secret_key = s3_keys or (None, None)
        with _ca_bundle(ca_bundle) as trusted:
            options = ImportOptions(
                size=size,
                checksum=Checksum.parse(checksum) if checksum else None,
                http=HttpOptions(
                    headers=_headers(header or []),
                    secret_headers=_read_secret_headers(header_file or []),
                    auth=auth,
                    ca_bundle=trusted,
                    insecure=insecure,
                    retries=retries,
                    backoff=retry_backoff,
                    stall_timeout=stall_timeout,
                    min_rate=min_rate,
                    min_rate_window=min_rate_window,
                ),
                s3=replace(store.options(cdi_url=s3), access_key=access_key, secret_key=secret_key),
                connections=connections,
                preallocate=preallocate,
                filesystem_overhead=filesystem_overhead,
                scratch_dir=str(scratch_dir) if scratch_dir else None,
                scratch=not no_scratch,
                spill_limit=spill_limit,
                content_type=content_type,
                max_expansion=max_expansion,
                decompression_memory=decompression_memory,
                archive_max_members=archive_max_members,
                deadline=deadline,
            )
            return import_image(source, dest, options=options, progress=state)

    metrics = (metrics_addr, metrics_port, owner_uid) if metrics_port is not None else None
    _run(job, progress, metrics=metrics, termination_log=termination_log)


class DemoGroup(LazyGroup):
    """`diskflow demo`: its first argument names a demo (import, template); without one, the
    import demo runs, so `diskflow demo [DIR]` keeps meaning what it always has."""

    lazy: Mapping[str, str] = {"template": "diskflow.templates_cli:demo_template"}

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["import", *args]
        return super().parse_args(ctx, args)


demo_app = typer.Typer(
    cls=DemoGroup,
    help="The whole flow on this machine with nothing else running: import (default) or template.",
    rich_markup_mode=None,
)
app.add_typer(demo_app, name="demo")


@demo_app.command("import")
def demo(
    directory: Annotated[Path, typer.Argument(help="Where the sample and disk.img go.")] = Path(
        "diskflow-demo"
    ),
    progress: Annotated[ProgressMode, typer.Option(help=PROGRESS_HELP)] = ProgressMode.AUTO,
) -> None:
    """Import a sample image end to end with nothing else running (no cluster, no network).

    Makes a 256 MiB qcow2 disk, xz-compresses it, serves it from an HTTP server on 127.0.0.1
    and imports it into DIRECTORY/disk.img with checksum verification and a 512 MiB volume.
    """
    from diskflow.demo import run_demo  # its HTTP server is needed by nothing else

    _run(lambda state: run_demo(directory, state), progress)


def _run(
    job: Callable[[Progress], ImportResult],
    progress: ProgressMode,
    *,
    metrics: tuple[str, int, str | None] | None = None,
    termination_log: Path | None = None,
) -> None:
    """Run an import with progress shown as asked; report the outcome; exit 0, 1 or 75."""
    mode = resolve(progress, terminal=ProgressMode.BAR)
    output = start(mode)
    state = Progress()

    def job_with_progress() -> ImportResult:
        with _reporting(state, mode, output, metrics):
            return job(state)

    result = guarded(
        job_with_progress,
        output,
        finish=lambda outcome: _finish(outcome, output, termination_log),
        completed=lambda: state.committed,
        stage=lambda: state.current_stage,
    )
    _finish(Outcome.success(result, state.current_stage), output, termination_log)


def _reporting(
    state: Progress,
    mode: ProgressMode,
    output: Output,
    metrics: tuple[str, int, str | None] | None,
) -> AbstractContextManager[None]:
    reporters: list[Reporter] = []
    # First: a metrics address that cannot be bound fails the import before anything else
    # has started (a bar left running, a byte read).
    if metrics is not None:
        addr, port, owner_uid = metrics
        reporters.append(MetricsReporter(port, addr, owner_uid=owner_uid))
    if mode is ProgressMode.BAR and output.wants(Level.INFO):
        reporters.append(RichReporter())
    elif output.progress:
        reporters.append(EventReporter(output))
    return reporting(state, reporters, interval=PROGRESS_INTERVALS[mode])


# Seconds between progress updates: a bar moves smoothly, a log line a minute would be too few.
PROGRESS_INTERVALS = {ProgressMode.BAR: 0.2, ProgressMode.JSON: 1.0, ProgressMode.LOG: 5.0,
                      ProgressMode.NONE: 1.0}  # fmt: skip


def _finish(outcome: Outcome, output: Output, termination_log: Path | None) -> None:
    if termination_log:
        outcome.write(str(termination_log))
    summary = ""
    if result := outcome.result:
        summary = (
            f"imported {result.source} ({result.format}, compression {result.compression}) "
            f"into {result.destination}: {result.size} bytes in {result.seconds}s"
        )
    output(outcome.event(summary))


def _credentials(
    auth_file: Path | None, secret_dir: Path | None, *, s3: bool
) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(basic auth, static S3 keys): from --secret-dir, as basic auth for an http(s) source
    and as the key pair for an S3 one; or basic auth from --auth-file or the environment."""
    if secret_dir is None:
        return _read_auth(auth_file), None
    env = {USER_ENV, PASSWORD_ENV} & set(os.environ)
    other = "--auth-file" if auth_file else f"{USER_ENV}/{PASSWORD_ENV}" if env else None
    if other:
        raise FinalError(
            "InvalidArgument", f"--secret-dir and {other} both give credentials; give one of them"
        )
    keys = _secret_value(secret_dir, "accessKeyId"), _secret_value(secret_dir, "secretKey")
    if s3:
        return None, keys
    return _basic_auth(*keys, where=f"--secret-dir {secret_dir}"), None


def _secret_value(directory: Path, key: str) -> str:
    """The value of `key` in a mounted Secret (one line; a final newline is not part of it).
    Errors name the directory and the key, never what the file holds."""
    path = directory / key
    if not path.is_file():
        raise FinalError("InvalidArgument", f"--secret-dir {directory} has no {key} file")
    value = _read_secret_file(path).removesuffix("\n").removesuffix("\r")
    if not value:
        raise FinalError("InvalidArgument", f"{key} in --secret-dir {directory} is empty")
    if "\n" in value or "\r" in value:
        raise FinalError(
            "InvalidArgument", f"{key} in --secret-dir {directory} holds more than one line"
        )
    return value


def _read_auth(path: Path | None) -> tuple[str, str] | None:
    if path is not None:
        text = _read_secret_file(path).strip()
        user, sep, password = text.partition(":")
        if not sep or not user or "\n" in text:
            raise FinalError(
                "InvalidArgument", f"auth file {path} must hold 'user:password' on one line"
            )
        return _basic_auth(user, password, where=f"auth file {path}")
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user is None and password is None:
        return None
    if not user or password is None:
        raise FinalError("InvalidArgument", f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    return _basic_auth(user, password, where=f"{USER_ENV}/{PASSWORD_ENV}")


def _basic_auth(user: str, password: str, *, where: str) -> tuple[str, str]:
    # HTTP basic auth is Latin-1 on the wire (what requests sends).
    try:
        (user + password).encode("latin-1")
    except UnicodeEncodeError:
        raise FinalError(
            "InvalidArgument", f"credentials in {where} must be Latin-1 text"
        ) from None
    return user, password


def _read_secret_headers(paths: list[Path]) -> tuple[tuple[str, str], ...]:
    """The header lines of every --header-file: a file, or every file in a directory (a
    mounted Secret of CDI's secretExtraHeaders). Errors name the file and line, never the
    line itself: it may be a secret pasted without its name."""
    headers: list[tuple[str, str]] = []
    for path in paths:
        files = _files_in(path, "--header-file") if path.is_dir() else [path]
        for file in files:
            lines = _read_secret_file(file).splitlines()
            headers += (
                parse_header(line, where=f"line {n} of {file}")
                for n, line in enumerate(lines, 1)
                if line.strip()
            )
    return tuple(headers)


def _read_secret_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise FinalError("InvalidArgument", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FinalError("InvalidArgument", f"{path} is not UTF-8 text") from None


def _files_in(directory: Path, option: str) -> list[Path]:
    """The regular files of a directory, by name; for a mounted Secret or ConfigMap, its keys
    (links to files in a hidden directory, which is left out like any directory)."""
    files = sorted(path for path in directory.iterdir() if path.is_file())
    if not files:
        raise FinalError("InvalidArgument", f"{option} {directory} is a directory with no file")
    return files


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


@contextmanager
def _ca_bundle(path: Path | None) -> Iterator[str | None]:
    """The --ca-bundle file to verify with: as given, or for a directory (a mounted
    ConfigMap, as CDI's certConfigMap) a temporary file of the PEM certificates that all of its
    files hold, for as long as the import runs (requests and botocore take only files)."""
    if path is None or not path.is_dir():
        yield str(path) if path else None
        return
    import ssl  # only a directory of certificates is checked here; HTTP loads ssl itself

    certificates: list[bytes] = []
    for file in _files_in(path, "--ca-bundle"):
        found = _PEM_CERTIFICATE.findall(file.read_bytes())
        if not found:
            continue  # a ConfigMap may hold other keys too
        try:  # a broken certificate is named here, not blamed on the server's TLS later
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cadata=b"\n".join(found).decode("ascii")
            )
        except (ssl.SSLError, UnicodeDecodeError):
            raise FinalError(
                "InvalidArgument", f"{file} in --ca-bundle {path} holds a malformed certificate"
            ) from None
        certificates += found
    if not certificates:
        raise FinalError(
            "InvalidArgument", f"--ca-bundle {path} holds no PEM certificate in any of its files"
        )
    with tempfile.NamedTemporaryFile(prefix="diskflow-ca-", suffix=".pem") as bundle:
        bundle.write(b"\n".join(certificates) + b"\n")
        bundle.flush()
        yield bundle.name
