"""A tiny kickstart "installer": Debian's cloud kernel and a busybox initramfs.

A real distribution install needs a mirror, which a guest often cannot reach (and the tests and
`diskflow demo template` must not need). This installer boots under virt-install as Anaconda
would (kernel + initrd, kickstart injected as /ks.cfg), runs the kickstart's %pre sections,
installs a tiny "operating system" on /dev/vda, runs the %post sections (busybox sh), writes
a marker to /dev/vda and powers off. Booted again with `root=/dev/vda` (BOOT_ARGS, a
template's [boot] kernel_args), the same kernel and initrd start that system, whose
"cloud-init" runs a NoCloud seed's user-data script: what diskflow's boot test needs.
Everything comes from Debian packages (busybox-static, installed by `scripts/setup.sh`; the
cloud kernel's package, downloaded with apt).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
CACHE_ENV = "DISKFLOW_INSTALLER_CACHE"
BUSYBOX = Path("/bin/busybox")  # from busybox-static: the initramfs has no libc
ANACONDA_LOG_PORT = "org.fedoraproject.anaconda.log.0"
ANACONDA_LOG_DIRECTIVE = "# diskflow-test: anaconda-log"
MARKER_HEADER = b"diskflow-test-installer ok\n"
# The second marker sits this far before the end of the disk.
TAIL_MARKER_OFFSET = 2**20
# The installed "operating system" (OS below) sits at this sector, in at most OS_SECTORS.
OS_SECTOR = 128
OS_SECTORS = 16
# The kernel command line that boots it: what a template's [boot] kernel_args says.
BOOT_ARGS = "root=/dev/vda console=ttyS0"

# Dependency order. virtio_ring is tried again after virtio because which of the two needs the
# other has varied between kernels (in 6.1 virtio needs virtio_ring's virtio_break_device).
# The guest ignores insmod errors (already loaded, unknown symbol) and checks REQUIRED_MODULES.
MODULE_ORDER = (
    "virtio_ring",
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    # The installed system's "cloud-init" mounts its NoCloud seed; isofs needs cdrom.
    "cdrom",
    "isofs",
)
REQUIRED_MODULES = frozenset({"virtio_ring", "virtio", "virtio_pci", "virtio_blk"})

INIT = r"""#!/bin/sh
# PID 1 of the diskflow test installer. Every way out ends in halt: if PID 1 exits the
# kernel panics and the VM never stops.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# Kernel messages would interleave with the lines tests look for.
echo 1 >/proc/sys/kernel/printk

say() { echo "diskflow-test-installer: $*"; }
halt() {
    sync
    poweroff -f
    while :; do sleep 1000; done
}
fail() { say "error: $*"; halt; }
uptime_s() { read -r up _ </proc/uptime; echo "${up%.*}"; }

say starting

for m in @MODULES@; do
    [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done
for m in @REQUIRED@; do
    [ -d "/sys/module/$m" ] || fail "module $m did not load: $(insmod "/lib/modules/$m.ko" 2>&1)"
done

deadline=$(($(uptime_s) + 60))
while [ ! -b /dev/vda ]; do
    [ "$(uptime_s)" -lt "$deadline" ] || fail "no /dev/vda after 60 s (is the disk on bus=virtio?)"
    sleep 0.1
done

ks=
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    inst.ks=file:* | ks=file:*) ks="${arg#*ks=file:}" ;;
    root=/dev/vda) root=/dev/vda ;;
    esac
done
if [ -z "$ks" ] && [ -n "$root" ]; then
    # Booting the installed system, as an initramfs hands over to the root file system.
    dd if=/dev/vda bs=512 skip=@OS_SECTOR@ count=@OS_SECTORS@ 2>/dev/null | tr -d '\000' >/tmp/os.sh
    [ "$(head -n 1 /tmp/os.sh)" = "#!/bin/sh" ] || fail "no operating system on /dev/vda"
    say "booting the system installed on /dev/vda"
    sh /tmp/os.sh </dev/null
    say "the system stopped (status $?)"
    halt
fi
[ -n "$ks" ] || fail "no inst.ks=file:/PATH on the kernel command line: $(cat /proc/cmdline)"
[ -f "$ks" ] || fail "kickstart $ks not found in the initrd (was it given to --initrd-inject?)"
say "kickstart $ks"

# Each %pre and %post section becomes /tmp/pre.N.sh or /tmp/post.N.sh; they run in order
# like Anaconda runs them: %pre before the disk is touched, %post after the system is on it.
mkdir -p /tmp
awk '
    /^%(pre|post)([ \t]|$)/ {
        n++; f = sprintf("/tmp/%s.%03d.sh", substr($1, 2), n); printf "" > f; next
    }
    f != "" && /^%end([ \t]|$)/ { close(f); f = ""; next }
    f != "" { print > f }
' "$ks" || fail "cannot read the %pre and %post sections of $ks"

log=
if grep -q '^@DIRECTIVE@[[:space:]]*$' "$ks"; then
    port_deadline=$(($(uptime_s) + 10))
    while [ -z "$log" ] && [ "$(uptime_s)" -lt "$port_deadline" ]; do
        for name in /sys/class/virtio-ports/*/name; do
            [ -f "$name" ] && [ "$(cat "$name")" = "@PORT@" ] || continue
            port=$(basename "$(dirname "$name")")
            [ -c "/dev/$port" ] && log="/dev/$port"
        done
        [ -n "$log" ] || sleep 0.1
    done
    if [ -n "$log" ]; then
        say "%post output also goes to $log (@PORT@)"
    else
        say "no virtio port named @PORT@: %post output goes to the console only"
    fi
fi

# run_sections pre|post: run those scripts in order; the first that fails ends the install.
run_sections() {
    for script in /tmp/"$1".*.sh; do
        [ -f "$script" ] || continue
        say "running %$1 ($script)"
        if [ -n "$log" ]; then
            { sh "$script" </dev/null; echo $? >/tmp/status; } 2>&1 | tee "$log"
            status=$(cat /tmp/status)
        else
            sh "$script" </dev/null
            status=$?
        fi
        if [ "$status" != 0 ]; then
            say "%$1 failed with status $status"
            halt
        fi
    done
}

run_sections pre
# The system, as Anaconda installs packages before running %post: a %post can break it.
[ "$(wc -c </os.sh)" -le $((@OS_SECTORS@ * 512)) ] || fail "/os.sh does not fit its sectors"
dd if=/os.sh of=/dev/vda bs=512 seek=@OS_SECTOR@ conv=notrunc,fsync 2>/dev/null ||
    fail "cannot install the system on /dev/vda"
say "system installed"
run_sections post

sum=$(sha256sum "$ks") || fail "cannot hash $ks"
printf 'diskflow-test-installer ok\n%s\n' "${sum%% *}" >/tmp/marker
sectors=$(cat /sys/block/vda/size)
tail_sectors=$((@TAIL_OFFSET@ / 512))
[ "$sectors" -ge $((2 * tail_sectors)) ] || fail "/dev/vda has only $sectors sectors"
dd if=/tmp/marker of=/dev/vda conv=notrunc,fsync 2>/dev/null || fail "cannot write to /dev/vda"
dd if=/tmp/marker of=/dev/vda bs=512 seek=$((sectors - tail_sectors)) conv=notrunc,fsync \
    2>/dev/null || fail "cannot write the end of /dev/vda"
sync
say done
halt
"""


# The installed "operating system": run by /init when the kernel is booted with root=/dev/vda.
# Its "cloud-init" finds a NoCloud seed (an ISO 9660 disk holding meta-data and user-data, as
# cloud-init's NoCloud source finds a disk labelled cidata) and runs a user-data script.
OS = r"""#!/bin/sh
say() { echo "diskflow-test-os: $*"; }
say "up; looking for a NoCloud seed"
mkdir -p /seed
for dev in /dev/vd[b-z]; do
    [ -b "$dev" ] || continue
    mount -t iso9660 -o ro "$dev" /seed 2>/dev/null || continue
    if [ -f /seed/meta-data ] && [ -f /seed/user-data ]; then
        case "$(head -n 1 /seed/user-data)" in
        '#!'*) say "running the user-data script of $dev"; sh /seed/user-data ;;
        *) say "the user-data of $dev is not a script: ignored" ;;
        esac
        exit 0
    fi
    umount /seed
done
say "no NoCloud seed found"
exit 1
"""


@dataclass(frozen=True)
class Installer:
    kernel: Path
    initrd: Path


def cache_dir() -> Path:
    """Where the downloaded kernel package is kept between runs ($DISKFLOW_INSTALLER_CACHE)."""
    configured = os.environ.get(CACHE_ENV)
    path = Path(configured) if configured else Path.home() / ".cache" / "diskflow" / "installer"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kernel_package() -> str:
    """The versioned linux-image-*-cloud-amd64 package that the metapackage depends on."""
    out = _run("apt-cache", "depends", KERNEL_METAPACKAGE)
    names = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)\s*$", out, re.MULTILINE)
    if not names:
        raise RuntimeError(f"{KERNEL_METAPACKAGE} depends on no kernel image:\n{out}")
    return names[0]


def kernel_deb(cache: Path) -> Path:
    """The kernel .deb, from the cache or downloaded into it."""
    try:
        package = kernel_package()
    except (subprocess.CalledProcessError, RuntimeError):
        # No apt lists (apt-get update not run): an earlier download still serves.
        cached = sorted(cache.glob("linux-image-*-cloud-amd64_*.deb"))
        if cached:
            return cached[-1]
        raise
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    # Download into a private directory and rename, so a concurrent run never sees half a file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=scratch,
            check=True,
            capture_output=True,
            text=True,
        )
        (deb,) = Path(scratch).glob(f"{package}_*.deb")
        target = cache / deb.name
        deb.rename(target)
    for old in cache.glob("linux-image-*-cloud-amd64_*.deb"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def module_bytes(tree: Path, name: str) -> bytes | None:
    """The uncompressed module NAME from an extracted kernel package, if it has one."""
    for path in sorted(tree.glob(f"lib/modules/*/kernel/**/{name}.ko*")):
        data = path.read_bytes()
        if path.name == f"{name}.ko":
            return data
        # Busybox insmod cannot decompress, so the host does it.
        if path.name == f"{name}.ko.xz":
            return lzma.decompress(data)
        if path.name == f"{name}.ko.zst":
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return None


class Cpio:
    """A cpio archive in the newc format the kernel unpacks, built in memory."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1000

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.inode += 1
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = [self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initrd(tree: Path) -> bytes:
    """The gzipped initramfs: busybox, its applets, the virtio modules and /init."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing (Debian: busybox-static)")
    archive = Cpio()
    directories = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp"]
    for name in [*directories, "lib", "lib/modules"]:
        archive.directory(name)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = _run(str(BUSYBOX), "--list-full").split()
    for applet in applets:
        if applet != "bin/busybox" and applet.rsplit("/", 1)[0] in directories:
            archive.symlink(applet, "/bin/busybox")
    present = []
    for name in dict.fromkeys(MODULE_ORDER):
        data = module_bytes(tree, name)
        if data is None:
            if name in REQUIRED_MODULES:
                raise RuntimeError(f"the kernel package has no {name} module")
            continue
        archive.file(f"lib/modules/{name}.ko", data)
        present.append(name)
    init = (
        INIT.replace("@MODULES@", " ".join(m for m in MODULE_ORDER if m in present))
        .replace("@REQUIRED@", " ".join(sorted(REQUIRED_MODULES)))
        .replace("@DIRECTIVE@", ANACONDA_LOG_DIRECTIVE)
        .replace("@PORT@", ANACONDA_LOG_PORT)
        .replace("@TAIL_OFFSET@", str(TAIL_MARKER_OFFSET))
        .replace("@OS_SECTORS@", str(OS_SECTORS))
        .replace("@OS_SECTOR@", str(OS_SECTOR))
    )
    archive.file("init", init.encode(), 0o755)
    archive.file("os.sh", OS.encode(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def build_installer(root: Path, cache: Path | None = None) -> Installer:
    """Extract the cloud kernel into ROOT and build the initrd next to it."""
    root.mkdir(parents=True, exist_ok=True)
    deb = kernel_deb(cache or cache_dir())
    tree = root / "kernel-package"
    _run("dpkg-deb", "-x", str(deb), str(tree))
    (vmlinuz,) = tree.glob("boot/vmlinuz-*")
    kernel = root / "vmlinuz"
    shutil.copyfile(vmlinuz, kernel)
    initrd = root / "initrd.gz"
    initrd.write_bytes(build_initrd(tree))
    shutil.rmtree(tree)
    # No permissions to open up: virt-install (as root) copies both files into
    # /var/lib/libvirt/boot, and QEMU only ever reads those copies.
    return Installer(kernel, initrd)


def write_kickstart(path: Path, post: str = "echo installing", extra: str = "") -> Path:
    """Write a kickstart valid for pykickstart's RHEL9 syntax, with POST as its %post body.

    EXTRA goes before %post: more commands, or ANACONDA_LOG_DIRECTIVE.
    """
    lines = [
        "# diskflow test kickstart",
        "text",
        "lang en_US.UTF-8",
        "keyboard us",
        "timezone Etc/UTC --utc",
        "rootpw --lock",
        "zerombr",
        "clearpart --all --initlabel",
        "autopart",
        "poweroff",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    lines += ["", "%post", post.rstrip("\n"), "%end", ""]
    path.write_text("\n".join(lines))
    return path


def expected_marker(kickstart: Path) -> bytes:
    """What the installer writes at the start of the disk and TAIL_MARKER_OFFSET before its end."""
    return MARKER_HEADER + hashlib.sha256(kickstart.read_bytes()).hexdigest().encode() + b"\n"


def write_template(
    directory: Path,
    installer: Installer,
    name: str = "tiny",
    post: str = "echo installing",
    extra: str = "",
    disk_size: str = "64Mi",
    location: str | None = None,
    boot: bool = True,
) -> Path:
    """A template diskflow can build with the test installer: NAME.ks and NAME.toml.

    The installer comes as kernel + initrd, or from the install tree at `location` (see
    `write_tree`). With `boot`, a [boot] table boots what it installed with the same kernel
    and initrd, for the boot test."""
    kickstart = write_kickstart(directory / f"{name}.ks", post, extra)
    (directory / f"{name}.toml").write_text(
        "[template]\n"
        'version = "RHEL9"\n'
        'os_variant = "linux2022"\n'
        f'disk_size = "{disk_size}"\n'
        'memory = "256Mi"\n'
        "vcpus = 1\n"
        "\n[install]\n"
        + (
            f'location = "{location}"\n'
            if location
            else f'kernel = "{installer.kernel}"\ninitrd = "{installer.initrd}"\n'
        )
        + (
            f'\n[boot]\nkernel = "{installer.kernel}"\ninitrd = "{installer.initrd}"\n'
            f'kernel_args = "{BOOT_ARGS}"\n'
            if boot
            else ""
        )
    )
    return kickstart


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout
