"""A template: a kickstart file and the metadata next to it that says how to install it.

`kickstarts/NAME.ks` is built with the settings in `kickstarts/NAME.toml`:

    [template]
    version = "RHEL9"             # pykickstart syntax version of the kickstart
    os_variant = "centos-stream9" # virt-install --osinfo
    disk_size = "20Gi"
    memory = "2Gi"
    vcpus = 2

    [install]                     # exactly one of: location, iso, kernel + initrd
    location = "https://mirror.stream.centos.org/9-stream/BaseOS/x86_64/os/"
    kernel_args = "inst.text"     # optional, appended to the installer's command line

    [boot]                        # optional: how the boot test starts the finished image
    kernel = "vmlinuz"            # a kernel (and initrd) to boot directly, for an image with
    initrd = "initrd.img"         # no bootloader; default: the image's own bootloader
    kernel_args = "root=/dev/vda1 console=ttyS0"

Relative `iso`, `kernel` and `initrd` paths are relative to the metadata file; each must name a
regular file. A queued build's are read by the worker, which only reads media under the
directories it is configured with (`media_roots`, from DISKFLOW_MEDIA_DIRS): the metadata
comes from whoever queued the build and must not make the worker read its own files. A location
must not carry credentials (`user:password@`): it is passed on virt-install's command line and
recorded in the published manifest.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from importer.errors import FinalError
from importer.quantity import parse_quantity
from pipelines.kickstart import MAX_FILE_BYTES, read_text

TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEMPLATE_KEYS = {"version", "os_variant", "disk_size", "memory", "vcpus"}
INSTALL_KEYS = {"location", "iso", "kernel", "initrd", "kernel_args"}
BOOT_KEYS = {"kernel", "initrd", "kernel_args"}
# The worker setting (colon-separated absolute directories) that a queued build's media must be
# under; read by pipelines.bundle.media_dirs, named here in load_template's errors.
MEDIA_DIRS_ENV = "DISKFLOW_MEDIA_DIRS"

# A URL's authority (what urlsplit calls netloc): userinfo, if any, is what precedes an "@".
_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


@dataclass(frozen=True)
class InstallSource:
    """Where the installer comes from: a tree URL, an ISO, or an explicit kernel and initrd."""

    location: str | None = None
    iso: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_args: str = ""


@dataclass(frozen=True)
class BootSource:
    """How the boot test starts the image: its own bootloader, or the kernel given here."""

    kernel: Path | None = None
    initrd: Path | None = None
    kernel_args: str = ""


@dataclass(frozen=True)
class Template:
    name: str
    kickstart: Path
    metadata: Path
    version: str
    os_variant: str
    disk_size: int  # bytes
    memory: int  # bytes
    vcpus: int
    install: InstallSource
    boot: BootSource = BootSource()

    def to_json(self) -> dict:
        """The template as JSON-ready data (paths as strings), for a queued build's state."""

        def plain(value: object) -> object:
            if isinstance(value, InstallSource | BootSource):
                return {k: plain(v) for k, v in vars(value).items()}
            return str(value) if isinstance(value, Path) else value

        return {k: plain(v) for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> Template:
        def paths(table: dict) -> dict:
            return {k: Path(v) if k in ("iso", "kernel", "initrd") and v else v
                    for k, v in table.items()}  # fmt: skip

        files = {k: Path(data[k]) for k in ("kickstart", "metadata")}
        sources = {"install": InstallSource(**paths(data["install"])),
                   "boot": BootSource(**paths(data.get("boot", {})))}  # fmt: skip
        return cls(**(data | files | sources))


def metadata_path(kickstart: Path) -> Path:
    """The metadata file that belongs to a kickstart: same name, `.toml`."""
    return kickstart.with_suffix(".toml")


def load_template(
    kickstart: Path, media_base: Path | None = None, media_roots: Sequence[Path] | None = None
) -> Template:
    """Read a kickstart's metadata; every error names the file and the key.

    Relative iso/kernel/initrd paths are relative to `media_base` (default: the metadata's
    directory). With `media_roots` (a worker's DISKFLOW_MEDIA_DIRS; empty: none allowed), a
    media file that resolves outside all of them is refused; None reads media anywhere, for
    the user's own local builds.
    """
    kickstart = Path(kickstart)
    if not kickstart.is_file():
        raise FinalError("InvalidTemplate", f"{kickstart}: no such kickstart file")
    meta = metadata_path(kickstart)
    if not meta.exists():
        raise FinalError("InvalidTemplate", f"{kickstart}: its metadata file {meta} is missing")
    try:
        # Bounded and regular files only, as kickstarts are read: a symlink to /dev/zero in a
        # pull request must fail the check, not hang it.
        data = tomllib.loads(read_text(meta, MAX_FILE_BYTES, reason="InvalidTemplate"))
    except tomllib.TOMLDecodeError as e:
        raise FinalError("InvalidTemplate", f"{meta}: not valid TOML: {e}") from None

    if not TEMPLATE_NAME.fullmatch(kickstart.stem):
        # The name becomes a store key, a file name and part of a domain name.
        raise FinalError(
            "InvalidTemplate",
            f"{kickstart}: the template name {kickstart.stem!r} (the file's name) must be 1 to "
            "128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    template = _table(data, "template", TEMPLATE_KEYS, meta)
    install = _table(data, "install", INSTALL_KEYS, meta)
    return Template(
        name=kickstart.stem,
        kickstart=kickstart,
        metadata=meta,
        version=_string(template, "version", meta, section="template"),
        os_variant=_string(template, "os_variant", meta, section="template"),
        disk_size=_quantity(template, "disk_size", meta),
        memory=_quantity(template, "memory", meta),
        vcpus=_positive_int(template, "vcpus", meta, default=2),
        install=_install_source(install, meta, media_base or meta.parent, media_roots),
        boot=_boot_source(data, meta, media_base or meta.parent, media_roots),
    )


def _table(data: dict, section: str, keys: set[str], meta: Path) -> dict:
    table = data.get(section)
    if not isinstance(table, dict):
        raise FinalError("InvalidTemplate", f"{meta}: missing the [{section}] table")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise FinalError(
            "InvalidTemplate",
            f"{meta}: unknown key(s) in [{section}]: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(keys))})",
        )
    return table


def _string(table: dict, key: str, meta: Path, *, section: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise FinalError("InvalidTemplate", f"{meta}: [{section}] {key} must be a non-empty string")
    return value.strip()


def _quantity(table: dict, key: str, meta: Path) -> int:
    value = table.get(key)
    try:
        size = parse_quantity(str(value)) if isinstance(value, str | int) else 0
    except FinalError as e:
        raise FinalError("InvalidTemplate", f"{meta}: [template] {key}: {e.message}") from None
    if size <= 0:
        raise FinalError(
            "InvalidTemplate", f'{meta}: [template] {key} must be a size such as "20Gi"'
        )
    return size


def _positive_int(table: dict, key: str, meta: Path, *, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FinalError("InvalidTemplate", f"{meta}: [template] {key} must be a positive integer")
    return value


def _install_source(
    table: dict, meta: Path, base: Path, roots: Sequence[Path] | None = None
) -> InstallSource:
    kinds = [k for k in ("location", "iso", "kernel") if k in table]
    if len(kinds) != 1:
        raise FinalError(
            "InvalidTemplate",
            f"{meta}: [install] needs exactly one of location, iso, or kernel + initrd "
            f"(found: {', '.join(kinds) or 'none'})",
        )
    if ("kernel" in table) != ("initrd" in table):
        raise FinalError("InvalidTemplate", f"{meta}: [install] kernel and initrd go together")
    kernel_args = _kernel_args(table, meta, "install")
    if "location" in table:
        location = _string(table, "location", meta, section="install")
        authority = _AUTHORITY.match(location)
        if authority and "@" in authority.group(1):
            # The location itself is not repeated: it holds the secret.
            raise FinalError(
                "InvalidTemplate",
                f"{meta}: [install] location must not carry credentials (user:password@); "
                "it would be visible in virt-install's command line and the published manifest. "
                "Serve the tree without authentication, or use iso or kernel + initrd",
            )
        return InstallSource(location=location, kernel_args=kernel_args)
    paths = {
        key: _existing_file(table, key, meta, base, roots=roots)
        for key in ("iso", "kernel", "initrd")
        if key in table
    }
    return InstallSource(**paths, kernel_args=kernel_args)


def _kernel_args(table: dict, meta: Path, section: str) -> str:
    kernel_args = table.get("kernel_args", "")
    if not isinstance(kernel_args, str):
        raise FinalError("InvalidTemplate", f"{meta}: [{section}] kernel_args must be a string")
    if '"' in kernel_args:
        # It is quoted inside virt-install's --install/--boot value: a quote would end it, and
        # what follows would be read as more options (another kernel, another initrd).
        raise FinalError(
            "InvalidTemplate",
            f'{meta}: [{section}] kernel_args must not contain a double quote (")',
        )
    return kernel_args


def _boot_source(
    data: dict, meta: Path, base: Path, roots: Sequence[Path] | None = None
) -> BootSource:
    if "boot" not in data:
        return BootSource()
    table = _table(data, "boot", BOOT_KEYS, meta)
    if ("kernel" in table) != ("initrd" in table):
        raise FinalError("InvalidTemplate", f"{meta}: [boot] kernel and initrd go together")
    kernel_args = _kernel_args(table, meta, "boot")
    if kernel_args and "kernel" not in table:
        raise FinalError(
            "InvalidTemplate",
            f"{meta}: [boot] kernel_args needs kernel and initrd (the image's own bootloader "
            "has its own command line)",
        )
    files = {key: _existing_file(table, key, meta, base, section="boot", roots=roots)
             for key in ("kernel", "initrd") if key in table}  # fmt: skip
    return BootSource(**files, kernel_args=kernel_args)


def _existing_file(
    table: dict,
    key: str,
    meta: Path,
    base: Path,
    *,
    section: str = "install",
    roots: Sequence[Path] | None = None,
) -> Path:
    """The regular file `key` names; within `roots` (resolved, symlinks followed) if given."""
    path = base / _string(table, key, meta, section=section)
    where = f"{meta}: [{section}] {key}"
    if roots is not None:
        # Checked before anything else about the file: the metadata must not even learn
        # whether a file outside exists.
        allowed = [Path(root).resolve() for root in roots]
        if not any(path.resolve().is_relative_to(root) for root in allowed):
            dirs = ", ".join(str(root) for root in allowed) or "none are configured"
            raise FinalError(
                "InvalidTemplate",
                f"{where}: {path} is outside the directories this worker reads installer media "
                f"from ({MEDIA_DIRS_ENV}: {dirs})",
            )
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FinalError("InvalidTemplate", f"{where}: no such file {path}") from None
    except OSError as e:
        raise FinalError("InvalidTemplate", f"{where}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        # virt-install and the build id's checksum read it whole: a FIFO or a device would
        # hang them or never end.
        raise FinalError("InvalidTemplate", f"{where}: {path} is not a regular file")
    return path
