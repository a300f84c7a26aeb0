"""Running guests with virt-install, watched closely: the unattended install, and (through
`running_domain`) the boot test's boot.

The kickstart is injected into the installer's initrd (`--initrd-inject`, `inst.ks=file:/`),
so the guest needs no HTTP server it can reach. The console and Anaconda's log channel are
files that are read as they grow and passed on as events, and three watchdogs end a build
early: an overall timeout, silence on every channel, and a failure pattern in what the
installer printed. Whatever happens, the domain is destroyed and undefined (virt-install
leaves it running when it gives up waiting) — unless a failed build is to be kept for
debugging (`OnError.KEEP`, Packer's `-on-error=abort`).

libvirt is driven through libvirt-python (typed error codes, no `virsh` output to parse),
imported on first use: only builds need it. Each call runs on a connection of its own in a
thread, so that a hung libvirtd ends in an error instead of a hung build.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from importer.errors import Failure, FinalError, TransientError
from importer.qemu import qemu_img
from importer.reasons import Reason
from pipelines.accel import Accel, AccelChoice, choose_accel
from pipelines.console import Line, LogTail, failure_in
from pipelines.events import Emit, discard
from pipelines.template import Template

ANACONDA_LOG_CHANNEL = "org.fedoraproject.anaconda.log.0"
KICKSTART_NAME = "ks.cfg"
POLL_SECONDS = 0.25
FAILURE_CONTEXT_SECONDS = 2.0  # what follows a failure line (a traceback's body) is wanted too
FAILURE_CONTEXT_LINES = 15
STOP_GRACE_SECONDS = 15.0
LIBVIRT_TIMEOUT_SECONDS = 60.0  # a libvirt call (destroy waits up to 10 s for QEMU to stop)
STALE_COPY_SECONDS = 3600.0
# A finished install waits in its work dir for its finalize task, which may come after the
# worker restarted (a StatefulSet pod keeps its name and volume). After this long none will:
# the build's results have expired and its client has long given up.
INSTALLED_KEEP_SECONDS = 7 * 24 * 3600.0
OWNER_FILE = "owner"
KEPT = "diskflow build kept"  # the owner record of a failed build kept for debugging
# libvirt's and virt-install's own variable: a worker pod sets qemu:///session in it.
LIBVIRT_URI_ENV = "LIBVIRT_DEFAULT_URI"
DEFAULT_LIBVIRT_URI = "qemu:///system"
# Where virt-install, run as root against the local libvirtd, keeps its kernel/initrd copies.
VIRTINST_SCRATCH = (
    Path("/var/lib/libvirt/boot")
    if os.geteuid() == 0
    else (Path.home() / ".cache/virt-manager/boot")
)
# virt-install's advice after an install names its domain, which diskflow removes (or, for a
# kept build, names with commands of its own): "Domain installation does not appear to have
# been successful. If it was, you can restart your domain by running: virsh ... start NAME".
VIRT_INSTALL_ADVICE = re.compile(
    r"does not appear to have been successful|you can restart your domain by running"
    r"|virsh --connect \S+ start |please restart your installation"
    r"|reconnect to the console to complete",
    re.IGNORECASE,
)
T = TypeVar("T")


class OnError(StrEnum):
    """What a failed build leaves behind, as Packer's -on-error."""

    CLEANUP = "cleanup"  # nothing: the domain is destroyed, the work directory removed
    KEEP = "keep"  # the domain (running, or defined and shut off) and its work directory


@dataclass(frozen=True)
class BuildOptions:
    """How to run the install; the defaults suit a KVM worker with the system libvirtd."""

    # None: resolved where the install runs (see libvirt_uri), so that a queued build uses
    # the worker's libvirt, not the default of the client that queued it.
    connect: str | None = None
    accel: Accel = Accel.AUTO
    timeout: float = 3 * 3600.0
    no_output_timeout: float = 600.0
    network: str = "user"  # virt-install --network; user-mode needs no bridge in a pod
    boot_timeout: float = 1800.0  # the boot test: seconds until the marker is on the console
    on_error: OnError = OnError.CLEANUP


@dataclass(frozen=True)
class Installed:
    disk: Path  # qcow2, as the installer left it
    console_log: Path
    installer_log: Path
    accel: AccelChoice
    seconds: float


@dataclass
class _Failure:
    pattern: str
    first: Line
    until: float
    context: list[Line] = field(default_factory=list)


def install(
    template: Template,
    kickstart: str,
    workdir: Path,
    options: BuildOptions = BuildOptions(),
    emit: Emit = discard,
) -> Installed:
    """Install `template` with the (flattened) `kickstart` text onto a new disk in `workdir`."""
    virt_install = require_tool("virt-install", "virtinst")
    connect = libvirt_uri(options.connect)
    check_libvirt(connect)
    choice = choose_accel(options.accel)
    emit("install", "warning" if choice.accel is Accel.TCG else "info", choice.reason)

    # QEMU runs as its own user and must reach the disk by path (search, not listing); the
    # kickstart may hold a password hash: only root (virt-install) reads it.
    workdir.chmod(0o711)
    kickstart_file = workdir / KICKSTART_NAME
    with open(os.open(kickstart_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(kickstart)
    disk = workdir / "disk.qcow2"
    qemu_img()("create", "-q", "-f", "qcow2", str(disk), str(template.disk_size))
    console, installer = workdir / "console.log", workdir / "installer.log"
    domain = f"diskflow-{template.name}-{secrets.token_hex(4)}"
    (workdir / OWNER_FILE).write_text(owner_record())
    template = _with_private_media(template, workdir, domain)
    os_variant = known_os_variant(virt_install, template.os_variant, emit)
    command = virt_install_command(
        virt_install, template, os_variant, options, choice, domain, disk, kickstart_file,
        console, installer,
    )  # fmt: skip
    try:
        sweep_orphans(connect, workdir.parent, emit)
    except (OSError, Failure) as e:  # tidying up must not fail a build
        emit("install", "warning", f"could not look for what killed builds left: {e}")
    emit("install", "start", f"starting domain {domain}", domain=domain, accel=choice.accel.value)
    started = time.monotonic()
    before = _virtinst_files()
    watch = Watch("install", connect, domain, options.timeout, options.no_output_timeout, choice,
                  keep=options.on_error is OnError.KEEP)  # fmt: skip
    with running_domain(
        command, watch, [LogTail(console, "console"), LogTail(installer, "installer")], workdir,
        emit,
        cleanups=(
            lambda: _remove_virtinst_leftovers(before, domain if template.install.kernel else None),
            lambda: kickstart_file.unlink(missing_ok=True),
        ),
    ):  # fmt: skip
        if not _has_data(disk):
            raise FinalError(
                "InstallFailed",
                f"the installer powered off without writing to the disk; last console lines:\n"
                f"{tail(console)}",
            )
    seconds = time.monotonic() - started
    # No process owns the disk now: the sweep must not take it for a killed build's.
    (workdir / OWNER_FILE).write_text(_installed())
    emit("install", "done", f"installed in {seconds:.1f}s", seconds=round(seconds, 3))
    return Installed(disk, console, installer, choice, seconds)


def virt_install_command(
    virt_install: str,
    template: Template,
    os_variant: str,
    options: BuildOptions,
    choice: AccelChoice,
    domain: str,
    disk: Path,
    kickstart: Path,
    console: Path,
    installer: Path,
) -> list[str]:
    """The virt-install argv: no secrets in it, every path escaped for virt-install's parser."""
    source = template.install
    boot_args = f"console=ttyS0,115200 inst.ks=file:/{KICKSTART_NAME} inst.text"
    if source.kernel_args:
        boot_args += f" {source.kernel_args}"
    command = [
        *domain_command(virt_install, template, os_variant, options, choice, domain, console),
        f"--disk=path={escape(disk)},format=qcow2,bus=virtio,cache=unsafe",
        f"--initrd-inject={kickstart}",
        "--noreboot",  # the install's end is a powered-off guest (for --import, its start)
        f"--channel=file,path={escape(installer)},target.type=virtio,"
        f"target.name={ANACONDA_LOG_CHANNEL}",
    ]
    if source.kernel:
        command.append(
            f"--install=kernel={escape(source.kernel)},initrd={escape(source.initrd)},"
            f'kernel_args="{boot_args}",kernel_args_overwrite=yes'
        )
    else:
        command += [f"--location={source.location or source.iso}", f"--extra-args={boot_args}"]
    return command


def domain_command(
    virt_install: str,
    template: Template,
    os_variant: str,
    options: BuildOptions,
    choice: AccelChoice,
    domain: str,
    console: Path,
) -> list[str]:
    """The virt-install argv every diskflow domain starts with (the install's, the boot test's).

    The serial console is a pty (what `virsh console` attaches to) logged to `console`. The
    domain is transient, unless a failed build is to be kept: a transient domain vanishes when
    its guest powers off, a defined one can be started again. Its description is its owner
    record, written by virt-install as it defines the domain, so no domain is ever without one
    (libvirt's <metadata> with a namespace of diskflow's own would be tidier, but virt-install
    cannot write it, and writing it afterwards leaves a window in which a killed build's
    domain has no owner and is never swept).
    """
    return [
        virt_install,
        f"--connect={libvirt_uri(options.connect)}",
        f"--name={domain}",
        f"--virt-type={choice.virt_type}",
        f"--osinfo={os_variant}",
        f"--memory={template.memory // 2**20}",
        f"--vcpus={template.vcpus}",
        f"--network={options.network}",
        f"--serial=pty,log.file={escape(console)},log.append=off",
        "--graphics=none",
        "--noautoconsole",
        "--wait=-1",  # diskflow's own watchdogs decide when to give up
        *(["--transient"] if options.on_error is OnError.CLEANUP else []),
        f"--metadata=description={owner_record()}",
    ]


def known_os_variant(virt_install: str, wanted: str, emit: Emit = discard) -> str:
    """`wanted` if this host's osinfo database knows it, else the closest generic entry.

    A distribution newer than the host's osinfo-db (fedora44 on Debian 12) would make
    virt-install refuse to start. Tried instead, in order: the major version's "-unknown"
    entry (rhel9.6 → rhel9-unknown), the family's (fedora44 → fedora-unknown), then the
    newest generic "linuxYYYY" entry the database has.
    """
    try:
        listing = subprocess.run(
            [virt_install, "--osinfo", "list"], capture_output=True, text=True, timeout=60,
            check=True,
        ).stdout  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        emit("install", "warning", "virt-install --osinfo list failed: passing "
             f"os_variant {wanted!r} as it is")  # fmt: skip
        return wanted
    known = {name.strip() for line in listing.splitlines() for name in line.split(",")}
    if wanted in known:
        return wanted
    major = re.match(r"(.*?\d+)(?:\.\d+)*$", wanted)
    family = wanted.rstrip("0123456789.").rstrip("-")
    generic = sorted(name for name in known if re.fullmatch(r"linux\d{4}", name))
    candidates = [f"{major.group(1)}-unknown" if major else None, f"{family}-unknown",
                  *reversed(generic)]  # fmt: skip
    fallback = next((name for name in candidates if name in known), None)
    if fallback is None:
        raise FinalError(
            "InvalidTemplate",
            f"os_variant {wanted!r} is unknown to this host's osinfo database, and so is every "
            "generic fallback (virt-install --osinfo list shows what it knows)",
        )
    emit("install", "warning", f"this host's osinfo database does not know os_variant "
         f"{wanted!r}: using {fallback!r} (a newer osinfo-db knows it)")  # fmt: skip
    return fallback


def libvirt_uri(connect: str | None) -> str:
    """The libvirt URI to use: `connect` if given, else LIBVIRT_DEFAULT_URI, else the system's."""
    return connect or os.environ.get(LIBVIRT_URI_ENV) or DEFAULT_LIBVIRT_URI


def check_libvirt(connect: str) -> None:
    """Raise a clear error unless libvirt answers at `connect`."""
    _ask(connect, lambda connection: connection.getURI())


def destroy_domain(connect: str, domain: str, emit: Emit = discard, stage: str = "install") -> None:
    """Destroy and undefine `domain` if it exists; a domain that stays is reported loudly."""
    if not _ask(connect, lambda connection: _remove(connection, domain)):
        emit(stage, "warning", f"domain {domain} could not be removed: remove it by hand")


def domain_exists(connect: str, domain: str) -> bool:
    """Whether libvirt at `connect` has a domain of that name."""
    return _ask(connect, lambda connection: _lookup(connection, domain) is not None)


@functools.cache
def _libvirt() -> ModuleType:
    """libvirt-python, imported on first use; its errors raised, not also printed."""
    try:
        import libvirt
    except ImportError:
        raise FinalError(
            "MissingTool",
            "libvirt-python is not installed (pip install 'libvirt-python>=9.0'; it builds "
            "against Debian's libvirt-dev, with pkg-config)",
        ) from None
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    return libvirt


def _ask(connect: str, question: Callable[[Any], T]) -> T:
    """`question(connection)`, answered by libvirt at `connect` on a connection of its own.

    libvirt's calls have no timeout of their own (its keepalive needs an event loop), so a
    thread asks and this waits; a SIGTERM still interrupts the wait. libvirt's errors become
    the build's: an unreachable daemon is transient (`LibvirtUnreachable`), anything else final
    (`LibvirtFailed`), both with libvirt's own message.
    """
    libvirt = _libvirt()
    answer: Future[T] = Future()

    def run() -> None:
        try:
            connection = libvirt.open(connect)
            try:
                answer.set_result(question(connection))
            finally:
                connection.close()
        except BaseException as e:
            answer.set_exception(e)

    threading.Thread(target=run, name=f"libvirt {connect}", daemon=True).start()
    try:
        return answer.result(LIBVIRT_TIMEOUT_SECONDS)
    except TimeoutError:
        raise TransientError(
            "LibvirtUnreachable",
            f"libvirt at {connect} did not answer within {LIBVIRT_TIMEOUT_SECONDS:.0f}s",
        ) from None
    except libvirt.libvirtError as e:
        detail = e.get_error_message()
        unreachable = (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                       libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_OPERATION_TIMEOUT)  # fmt: skip
        if e.get_error_code() in unreachable:
            raise TransientError(
                "LibvirtUnreachable",
                f"cannot reach libvirt at {connect}: {detail} (is libvirtd running, with "
                f"virtlogd? --connect or {LIBVIRT_URI_ENV} picks another URI)",
            ) from None
        raise FinalError("LibvirtFailed", f"libvirt at {connect}: {detail}") from None


def _lookup(connection: Any, domain: str) -> Any | None:
    """The domain of that name, or None."""
    libvirt = _libvirt()
    try:
        return connection.lookupByName(domain)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _remove(connection: Any, domain: str) -> bool:
    """Destroy and undefine `domain`; whether it is gone."""
    libvirt = _libvirt()
    for action in ("destroy", "undefine"):
        found = _lookup(connection, domain)
        if found is None:
            return True
        try:
            getattr(found, action)()
        except libvirt.libvirtError as e:
            # It stopped, or (transient) vanished, meanwhile; undefining a transient one is
            # invalid too. Whatever else stays is reported.
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN,
                                          libvirt.VIR_ERR_OPERATION_INVALID):  # fmt: skip
                raise
    return _lookup(connection, domain) is None


@dataclass(frozen=True)
class Watch:
    """What a domain's run is watched for, and how it is named in events and errors."""

    stage: str  # the events' stage: "install", "boot-test"
    connect: str
    domain: str
    timeout: float  # seconds the whole run may take
    no_output_timeout: float  # seconds of silence on every channel before giving up
    choice: AccelChoice
    until: Callable[[Line], bool] | None = None  # a line that ends the run successfully
    keep: bool = False  # a failed run leaves its domain and work directory (OnError.KEEP)


@contextlib.contextmanager
def running_domain(
    command: list[str],
    watch: Watch,
    tails: list[LogTail],
    workdir: Path,
    emit: Emit,
    cleanups: tuple[Callable[[], object], ...] = (),
) -> Iterator[bool]:
    """Run virt-install's `command`, watch the guest's `tails` until it is done, and yield.

    Done is the guest powering off (False) or, with `watch.until`, a line it matches (True);
    the caller checks what it left inside the `with`. FinalError for a failure pattern, the
    timeout or silence. Then the domain is destroyed and undefined — unless the run or the
    caller's checks failed and `watch.keep` says to keep it (see `_keep`; a SIGTERM is no
    build failure: it cleans up) — and `cleanups` run.
    """
    log = workdir / f"virt-install-{watch.stage}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    keep = False
    try:
        done = _watch(process, tails, log, watch, emit)
        if not done and process.returncode != 0:
            raise _virt_install_failure(log)
        yield done
    except Failure as failure:
        keep = watch.keep and failure.reason != Reason.TERMINATED
        if keep:
            raise _keep(failure, watch, workdir, emit) from None
        raise
    finally:
        # Each step on its own: one that fails (a hung libvirtd) must not skip the others,
        # nor replace the error the run failed with. The domain goes first: virt-install
        # then sees it gone and ends at once, and the guest does not run on meanwhile.
        for cleanup in (
            *(() if keep else (lambda: destroy_domain(watch.connect, watch.domain, emit,
                                                      watch.stage),)),
            lambda: _stop(process),
            *cleanups,
        ):  # fmt: skip
            try:
                cleanup()
            except Exception as e:
                emit(watch.stage, "warning", f"clean-up of {watch.domain} incomplete: {e}")


def _keep(failure: Failure, watch: Watch, workdir: Path, emit: Emit) -> Failure:
    """Keep a failed run's domain and `workdir` for debugging, marked so that no sweep takes
    them; `failure`, saying what was kept, how to reach it and how to remove it."""
    (workdir / OWNER_FILE).write_text(_kept())
    try:
        running = _ask(watch.connect, lambda connection: _mark_kept(connection, watch.domain))
    except Failure as e:
        emit(watch.stage, "warning", f"could not mark domain {watch.domain} as kept: {e}")
        running = None
    domain, virsh = watch.domain, ["virsh", "--connect", watch.connect]
    removal = [["rm", "-r", str(workdir)]]
    if running is None:
        what, reach = f"the work directory {workdir} (no domain {domain} found)", ""
    elif running:
        what = f"domain {domain} (running) and its work directory {workdir}"
        reach = f"attach to its console with: {shlex.join([*virsh, 'console', domain])}; "
        removal = [[*virsh, "destroy", domain], [*virsh, "undefine", domain], *removal]
    else:
        what = f"domain {domain} (shut off) and its work directory {workdir}"
        reach = ("start it with its console attached with: "
                 f"{shlex.join([*virsh, 'start', '--console', domain])}; ")  # fmt: skip
        removal = [[*virsh, "undefine", domain], *removal]
    kept = f"kept {what}: {reach}remove it all with: {' && '.join(map(shlex.join, removal))}"
    emit(watch.stage, "warning", kept, domain=watch.domain, workdir=str(workdir))
    return type(failure)(failure.reason, f"{failure.message}\n{kept}")


def _mark_kept(connection: Any, domain: str) -> bool | None:
    """Give `domain` the kept owner record; whether it runs, None if it is gone."""
    libvirt = _libvirt()
    found = _lookup(connection, domain)
    if found is None:
        return None
    running = bool(found.isActive())
    flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0) | (
        libvirt.VIR_DOMAIN_AFFECT_CONFIG if found.isPersistent() else 0
    )
    found.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, _kept(), None, None, flags)
    return running


def _watch(
    process: subprocess.Popen, tails: list[LogTail], log: Path, watch: Watch, emit: Emit
) -> bool:
    virt_install_log = LogTail(log, "virt-install")
    started = time.monotonic()
    last_output: float | None = None  # when the guest last said something
    recent: deque[Line] = deque(maxlen=FAILURE_CONTEXT_LINES)
    failure: _Failure | None = None
    while True:
        exited = process.poll() is not None
        now = time.monotonic()
        for line in virt_install_log.read(final=exited):
            if said := _virt_install_said(line.text):
                emit(watch.stage, *said)
        lines = [line for tail in tails for line in tail.read(final=exited)]
        # The silence clock starts with the guest: virt-install may spend minutes before it
        # (fetching an install tree's kernel, libvirt probing QEMU's capabilities).
        if lines or (last_output is None and tails[0].path.exists()):
            last_output = now
        for line in lines:
            emit(watch.stage, line.source, line.text, line=line.number)
            recent.append(line)
            if failure:
                if len(failure.context) < FAILURE_CONTEXT_LINES:
                    failure.context.append(line)
            elif pattern := failure_in(line):
                failure = _Failure(pattern, line, now + FAILURE_CONTEXT_SECONDS, [line])
            elif watch.until and watch.until(line):
                return True
        if failure and (exited or now >= failure.until):
            raise FinalError(
                "InstallFailed",
                f"{failure.pattern} in the {failure.first.source} output (line "
                f"{failure.first.number}):\n{_format(failure.context)}",
            )
        if exited:
            return False
        if now - started > watch.timeout:
            raise FinalError(
                "Timeout",
                f"the {watch.stage} did not finish within {watch.timeout:.0f}s; last lines:\n"
                f"{_format(recent)}",
            )
        if last_output is not None and now - last_output > watch.no_output_timeout:
            hint = (
                " With KVM, a host whose KVM cannot run this guest looks exactly like this;"
                " try --accel tcg to check."
                if watch.choice.accel is Accel.KVM
                else ""
            )
            raise FinalError(
                "NoConsoleOutput",
                f"no console or installer output for {watch.no_output_timeout:.0f}s: the guest "
                f"looks hung.{hint} Last lines:\n{_format(recent) or '(none at all)'}",
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(POLL_SECONDS)


def _virt_install_said(text: str) -> tuple[str, str] | None:
    """The kind and message of a line virt-install printed; None for its advice."""
    if VIRT_INSTALL_ADVICE.search(text):
        return None
    level = re.match(r"(WARNING|ERROR)\s+(.*)", text)
    return (level.group(1).lower(), level.group(2)) if level else ("info", text)


def _stop(process: subprocess.Popen) -> None:
    """Stop virt-install: SIGINT, as Ctrl-C would; SIGKILL if it does not end."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _with_private_media(template: Template, workdir: Path, domain: str) -> Template:
    """The template with its kernel and initrd linked under names unique to this build.

    virt-install copies them into its scratch directory as virtinst-XXXX-NAME and removes
    the copies only when it finishes normally; unique names tell this build's copies apart
    from a concurrent build's.
    """
    source = template.install
    if not source.kernel or not source.initrd:
        return template
    links = {}
    for key, path in (("kernel", source.kernel), ("initrd", source.initrd)):
        links[key] = workdir / f"{domain}-{key}"
        links[key].symlink_to(path.resolve())
    return replace(template, install=replace(source, **links))


def _virtinst_files() -> set[Path]:
    return set(VIRTINST_SCRATCH.glob("virtinst-*"))


def _remove_virtinst_leftovers(before: set[Path], marker: str | None) -> None:
    """Remove the kernel/initrd copies an interrupted virt-install left in its scratch dir.

    With a marker (kernel installs) only files naming it go; for an install tree the files
    are told apart only by being new, which a concurrent tree install on the host shares.
    """
    for path in _virtinst_files() - before:
        if marker is None or marker in path.name:
            path.unlink(missing_ok=True)


def sweep_orphans(connect: str, workroot: Path, emit: Emit = discard) -> None:
    """Remove what builds killed outright on this host left: domains, work dirs, copies.

    A worker that is SIGKILLed cleans up nothing: its domain goes on installing into its
    work dir. Each build records its host and process in its domain's description and its
    work dir; when that process is gone, they are removed. A kept build's record says so:
    it stays until its user removes it.
    """
    for name in _ask(connect, _orphaned_domains):
        emit("install", "warning", f"removing domain {name}, left by a killed build")
        destroy_domain(connect, name, emit)
    sweep_workdirs(workroot)
    sweep_stale_copies(connect)


def _orphaned_domains(connection: Any) -> list[str]:
    """The names of the domains, running or not, whose owner record is a killed build's."""
    libvirt = _libvirt()
    orphans = []
    for domain in connection.listAllDomains(0):
        if not domain.name().startswith("diskflow-"):
            continue
        try:
            description = domain.metadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, None)
        except libvirt.libvirtError as e:
            # Not diskflow's after all, or gone since it was listed.
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                                      libvirt.VIR_ERR_NO_DOMAIN):  # fmt: skip
                continue
            raise
        if _orphaned(description):
            orphans.append(domain.name())
    return orphans


def sweep_workdirs(workroot: Path, keep_installed: float = INSTALLED_KEEP_SECONDS) -> list[Path]:
    """Remove the work dirs under `workroot` of installs killed outright, and of finished
    installs whose finalize never came within `keep_installed` seconds; keep the rest (a
    finished install survives the worker's restart, for its finalize)."""
    removed = []
    for owner in workroot.glob(f"diskflow-*/{OWNER_FILE}"):
        record = owner.read_text()
        installed = re.fullmatch(r"diskflow build installed at=(\d+)", record.strip())
        if installed:
            stale = time.time() - int(installed.group(1)) > keep_installed
        else:
            stale = _orphaned(record)
        if stale:
            shutil.rmtree(owner.parent, ignore_errors=True)
            removed.append(owner.parent)
    return removed


def owner_record() -> str:
    """The owner record of a build's domain and work dir: this host and process."""
    # Asked per build: a Celery pool process is not the process that imported this module.
    return f"diskflow build host={socket.gethostname()} pid={os.getpid()}"


def _installed() -> str:
    return f"diskflow build installed at={int(time.time())}"


def _kept() -> str:
    return f"{KEPT} host={socket.gethostname()} at={int(time.time())}"


def kept(workdir: Path) -> bool:
    """Whether `workdir` is a failed build's, kept for debugging: not to be removed."""
    try:
        return (workdir / OWNER_FILE).read_text().startswith(KEPT)
    except OSError:
        return False


def _orphaned(description: str) -> bool:
    """Whether an owner record names this host and a process that no longer runs."""
    match = re.fullmatch(r"diskflow build host=(\S+) pid=(\d+)", description.strip())
    if not match or match.group(1) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_stale_copies(connect: str, older_than: float = STALE_COPY_SECONDS) -> list[Path]:
    """Remove kernel/initrd copies that builds killed outright (a worker's SIGKILL) left.

    A copy names its build's domain; it is stale when that domain is gone and the copy is
    old enough that no build can still be between copying it and starting its domain.
    """
    removed = []
    now = time.time()
    for path in _virtinst_files():
        match = re.search(r"(diskflow-.+-[0-9a-f]{8})-(?:kernel|initrd)$", path.name)
        if not match or now - path.stat().st_mtime < older_than:
            continue
        if not domain_exists(connect, match.group(1)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _has_data(disk: Path) -> bool:
    extents = json.loads(qemu_img()("map", "--output=json", "-f", "qcow2", str(disk)))
    return any(extent.get("data") for extent in extents)


def _virt_install_failure(log: Path) -> FinalError | TransientError:
    text = log.read_text(errors="replace")
    detail = _last_error(text) or "no output"
    if "virtlogd-sock" in text or "Failed to connect socket" in text:
        return TransientError("LibvirtUnreachable", f"virt-install: {detail}")
    return FinalError("VirtInstallFailed", f"virt-install failed: {detail}")


def _last_error(text: str) -> str:
    errors = [line.split("ERROR", 1)[-1].strip() for line in text.splitlines() if "ERROR" in line]
    if errors:
        return errors[-1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def tail(path: Path, count: int = FAILURE_CONTEXT_LINES) -> str:
    """The last `count` lines of a console file, formatted for an error message."""
    lines = LogTail(path, "console").read(final=True)
    return _format(deque(lines, maxlen=count)) or "(none at all)"


def _format(lines: list[Line] | deque[Line]) -> str:
    return "\n".join(f"  {line.source}:{line.number}: {line.text}" for line in lines)


def escape(path: Path | None) -> str:
    """`path` as a virt-install option value."""
    return str(path).replace(",", ",,")  # virt-install's option parser splits on single commas


def require_tool(name: str, package: str) -> str:
    """The path of the tool `name`, or FinalError("MissingTool") naming its Debian package."""
    path = shutil.which(name)
    if not path:
        raise FinalError("MissingTool", f"{name} is not installed (Debian package {package})")
    return path
