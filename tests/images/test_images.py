"""The container images: built once with scripts/build-images.sh, then checked from inside.

Commands run in a container of the built image (`buildah from` + `buildah run --isolation
chroot`, the only isolation that works on these machines), as the image's own user unless a
test says otherwise. Chroot isolation shares the host's network namespace, so a server the
test starts on 127.0.0.1 is reachable from inside.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from importer.controller.plan import IMPORTER_UID

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DISKFLOW = f"localhost/diskflow:{VERSION}"
WORKER = f"localhost/diskflow-worker:{VERSION}"
REDIS = f"localhost/diskflow-redis:{VERSION}"
REDIS_UID = 999
BUILD_TIMEOUT = 1500  # from scratch it takes about 4 minutes; a slow mirror may take longer
COMPILERS = ("gcc", "cc", "g++", "c++", "clang", "make")
COMPILER_PACKAGES = {"gcc", "gcc-12", "g++", "g++-12", "clang", "make", "build-essential",
                     "python3-dev", "python3.11-dev", "libpython3.11-dev"}  # fmt: skip


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "building the images needs root (debootstrap, buildah's chroot isolation)"
    for tool in ("buildah", "podman", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/setup.sh --test installs it)"
    return None


pytestmark = [pytest.mark.images, pytest.mark.timeout(BUILD_TIMEOUT + 300)]
if reason := _missing():
    pytestmark.append(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    """Build (or, with buildah's layer cache, bring up to date) every image, once."""
    try:
        built = subprocess.run(
            ["bash", str(ROOT / "scripts/build-images.sh")],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/build-images.sh took more than {BUILD_TIMEOUT}s")
    if built.returncode != 0:
        pytest.fail(
            f"scripts/build-images.sh failed ({built.returncode}):\n"
            f"{built.stdout[-3000:]}\n{built.stderr[-5000:]}"
        )


@contextlib.contextmanager
def container(image: str) -> Iterator[str]:
    """A working container of `image` (its name), always removed afterwards."""
    name = f"diskflow-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(
        ["buildah", "from", "--pull=never", "--name", name, image],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def buildah_run(
    name: str,
    *cmd: str,
    user: str | int | None = None,
    mounts: Sequence[str] = (),
    volumes: Sequence[str] = (),
) -> list[str]:
    """The `buildah run` command line for `cmd` in container `name`."""
    options = [f"--user={user}"] if user is not None else []
    options += [f"--mount={mount}" for mount in mounts]
    options += [f"--volume={volume}" for volume in volumes]
    return ["buildah", "run", "--isolation", "chroot", *options, name, "--", *cmd]


def run_in(
    image: str,
    *cmd: str,
    user: str | int | None = None,
    mounts: Sequence[str] = (),
    volumes: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in a fresh container of `image`; the container is removed afterwards."""
    with container(image) as name:
        return subprocess.run(
            buildah_run(name, *cmd, user=user, mounts=mounts, volumes=volumes),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def check(image: str, *cmd: str, **kwargs: object) -> str:
    """run_in that must succeed; returns stdout."""
    result = run_in(image, *cmd, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, (
        f"{' '.join(cmd)} in {image} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def config(image: str) -> dict:
    """The image's OCI config (User, Entrypoint, Cmd, Env, Labels)."""
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", image],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out)["OCIv1"]["config"]


def installed_packages(image: str) -> set[str]:
    out = check(image, "dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n")
    return {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}


# ---------------------------------------------------------------- diskflow (controller, importer)


def test_diskflow_prints_the_project_version() -> None:
    assert check(DISKFLOW, "diskflow", "--version").strip() == f"diskflow {VERSION}"


def test_diskflow_runs_as_the_importer_uid_named_numerically() -> None:
    assert check(DISKFLOW, "id", "-u").strip() == str(IMPORTER_UID)
    assert check(DISKFLOW, "id", "-g").strip() == str(IMPORTER_UID)
    # Numeric, so the kubelet can check runAsNonRoot without a runAsUser.
    assert config(DISKFLOW)["User"] == f"{IMPORTER_UID}:{IMPORTER_UID}"


def test_diskflow_resolves_as_a_command_for_pod_specs() -> None:
    # Pods set command: ["diskflow", ...], which replaces any entrypoint: PATH must find it.
    assert not config(DISKFLOW).get("Entrypoint")
    found = check(DISKFLOW, "sh", "-c", "command -v diskflow").strip()
    assert found == "/opt/diskflow/bin/diskflow"


def test_diskflow_image_has_oci_labels() -> None:
    labels = config(DISKFLOW)["Labels"]
    assert labels["org.opencontainers.image.title"] == "diskflow"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.description"]
    assert "org.opencontainers.image.source" in labels


@pytest.mark.parametrize("image", [DISKFLOW, WORKER])
def test_no_compilers(image: str) -> None:
    found = check(image, "sh", "-c", f"for t in {' '.join(COMPILERS)}; do command -v $t; done; :")
    assert found.split() == []
    assert installed_packages(image) & COMPILER_PACKAGES == set()


def test_qemu_img_works() -> None:
    assert check(DISKFLOW, "qemu-img", "--version").startswith("qemu-img version ")


def test_importer_user_can_write_nothing_but_temporary_directories() -> None:
    # What a read-only root filesystem would enforce: the importer only ever needs /tmp.
    writable = check(DISKFLOW, "sh", "-c", "find / -xdev -writable 2>/dev/null; :").split()
    assert set(writable) <= {"/tmp", "/var/tmp", "/var/lock", "/run/lock"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A small qcow2 on a loopback HTTP server: (its URL, sha256 of its raw content)."""
    directory = tmp_path_factory.mktemp("served")
    raw = directory / "small.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        for offset in (0, 3 << 20, (8 << 20) - 4096):  # data at the start, middle and end
            f.seek(offset)
            f.write(os.urandom(4096))
    qcow2 = directory / "small.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/small.qcow2", digest
    finally:
        server.shutdown()
        server.server_close()


def test_import_over_http_as_the_importer_user_with_only_tmp(served: tuple[str, str]) -> None:
    url, digest = served
    # A fresh tmpfs on /tmp stands for the pod's emptyDir; the user cannot write elsewhere
    # (test above), so the import succeeding means it needed nothing else.
    out = check(
        DISKFLOW, "sh", "-c", f'diskflow import "{url}" /tmp/out.img && sha256sum /tmp/out.img',
        user=f"{IMPORTER_UID}:{IMPORTER_UID}",
        mounts=["type=tmpfs,destination=/tmp"],
    )  # fmt: skip
    assert out.split()[-2:] == [digest, "/tmp/out.img"]


# ---------------------------------------------------------------- worker


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["virt-install", "--version"], "4."),
        (["virsh", "--version"], "9."),
        (["qemu-system-x86_64", "--version"], "QEMU emulator version 7."),
        (["virt-sysprep", "--version"], "virt-sysprep 1."),
        (["qemu-img", "--version"], "qemu-img version 7."),
        (["cpio", "--version"], "cpio (GNU cpio)"),
        (["xorrisofs", "-version"], "mkisofs 2.01-Emulation"),  # the boot test's seed
    ],
)
def test_worker_tools(command: list[str], expected: str) -> None:
    assert check(WORKER, *command).startswith(expected)


def test_worker_has_a_kernel_for_the_libguestfs_appliance() -> None:
    # Readable by the worker user: supermin copies it into the appliance.
    out = check(WORKER, "sh", "-c", "test -r /boot/vmlinuz-* && ls /lib/modules")
    assert out.split(), "no kernel modules next to the kernel"


def test_worker_user_is_not_root_and_in_kvm() -> None:
    assert check(WORKER, "id", "-u").strip() == str(IMPORTER_UID)
    assert config(WORKER)["User"] == f"{IMPORTER_UID}:{IMPORTER_UID}"
    assert "kvm" in check(WORKER, "id", "-nG", "diskflow").split()


def test_worker_entrypoint_runs_diskflow_worker() -> None:
    assert config(WORKER)["Entrypoint"] == ["/usr/local/bin/diskflow-worker-entrypoint"]
    out = check(WORKER, "/usr/local/bin/diskflow-worker-entrypoint", "--help")
    assert "Run a Celery worker for template builds" in out


def test_worker_entrypoint_refuses_an_unwritable_state_dir() -> None:
    result = run_in(
        WORKER, "env", "DISKFLOW_STATE_DIR=/usr/lib/diskflow",
        "/usr/local/bin/diskflow-worker-entrypoint", "--help",
    )  # fmt: skip
    assert result.returncode == 1
    assert "/usr/lib/diskflow (DISKFLOW_STATE_DIR) is not writable" in result.stderr


SESSION_CHECK = r"""
set -u
stop() {
    virsh destroy smoke >/dev/null 2>&1
    # Session daemons exit only after 120 s idle: stop them, so nothing outlives the container.
    # (Their pid files have no newline; ps matched by name would see the host's processes.)
    local pids=() file pid deadline=$((SECONDS + 30))
    for file in "$XDG_RUNTIME_DIR"/libvirt/libvirtd.pid "$XDG_RUNTIME_DIR"/libvirt/virtlogd.pid; do
        [[ -s "$file" ]] && pids+=("$(cat "$file")")
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            ((SECONDS < deadline)) || { echo "session daemon $pid still running" >&2; return; }
            sleep 0.1
        done
    done
}
trap stop EXIT
uri=$(virsh uri) || exit 1
echo "uri=$uri"
kernel=$(ls /boot/vmlinuz-*)
virt-install --virt-type qemu --name smoke --memory 256 --vcpus 1 --osinfo linux2022 \
    --disk none --network user --graphics none --import --noautoconsole --transient \
    --boot "kernel=$kernel,kernel_args=console=ttyS0 panic=-1" \
    --serial "file,path=$HOME/console.log" >/dev/null || exit 2
deadline=$((SECONDS + 120))
until grep -q "Linux version" "$HOME/console.log" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "no console output in 120s"; break; }
    sleep 0.2
done
grep -o "Linux version [^ ]*" "$HOME/console.log"
echo "qemu-user=$(ps -o user= -p "$(cat "$XDG_RUNTIME_DIR"/libvirt/qemu/run/smoke.pid)")"
"""


def test_worker_boots_a_guest_through_session_libvirt_as_its_user() -> None:
    # No root libvirtd: the first call starts libvirtd and virtlogd as this user, QEMU runs as
    # this user with user-mode networking. TCG, since this machine's /dev/kvm cannot run guests.
    out = check(WORKER, "/usr/local/bin/diskflow-worker-entrypoint", "bash", "-c", SESSION_CHECK)
    assert "uri=qemu:///session" in out
    assert "Linux version" in out, out
    assert "qemu-user=diskflow" in out.split()


def test_worker_libguestfs_appliance_boots_as_its_user() -> None:
    # An empty disk: the appliance must build (supermin, from /boot) and boot (direct
    # backend, TCG here) for virt-sysprep to get as far as finding no OS on it.
    result = run_in(
        WORKER, "/usr/local/bin/diskflow-worker-entrypoint", "sh", "-c",
        'qemu-img create -q -f qcow2 "$HOME/empty.qcow2" 64M && '
        'LIBGUESTFS_BACKEND_SETTINGS=force_tcg virt-sysprep -a "$HOME/empty.qcow2"',
    )  # fmt: skip
    assert "no operating systems were found in the guest image" in result.stderr, result.stderr


# ---------------------------------------------------------------- redis


def test_redis_version_and_user() -> None:
    assert check(REDIS, "redis-server", "--version").startswith("Redis server v=7.")
    assert check(REDIS, "id", "-u").strip() == str(REDIS_UID)
    assert config(REDIS)["User"] == f"{REDIS_UID}:{REDIS_UID}"
    assert config(REDIS)["Cmd"] == ["redis-server", "/etc/redis/diskflow.conf"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_takes_its_password_from_a_mounted_config(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    port, password = _free_port(), uuid.uuid4().hex
    # What the chart does: its own config file (from a Secret) with requirepass, on top of the
    # image's defaults, named as the argument: the password is in no command line.
    conf = tmp_path / "redis.conf"
    conf.write_text(f"include /etc/redis/diskflow.conf\nport {port}\nrequirepass {password}\n")
    conf.chmod(0o644)
    tmp_path.chmod(0o755)
    command = ["redis-server", "/etc/diskflow-redis/redis.conf"]
    volumes = [f"{tmp_path}:/etc/diskflow-redis:ro"]
    with container(REDIS) as name:
        server = subprocess.Popen(
            buildah_run(name, *command, volumes=volumes),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        authed = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    authed.ping()
                    break
                except redis.ConnectionError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
            assert authed.config_get("save") == {"save": ""}
            assert authed.config_get("appendonly") == {"appendonly": "no"}
            assert authed.config_get("bind") == {"bind": "0.0.0.0"}
        finally:
            with contextlib.suppress(redis.ConnectionError):  # not up, or gone already
                authed.shutdown(nosave=True)
            try:
                out, _ = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                out, _ = server.communicate()
        assert password not in out  # not in its log either
