"""Queued builds: a real Redis broker, real `diskflow worker` processes, real installs.

A worker killed in the middle of an install must lead to the build running again on another
worker, with nothing published in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from pipelines.tasks import (  # noqa: E402
    BROKER_ENV,
    BUILD_MARGIN_ENV,
    CONCURRENCY_ENV,
    MAX_BUILD_TIMEOUT_ENV,
    VISIBILITY_ENV,
    WorkerSettings,
)
from pipelines.template import MEDIA_DIRS_ENV  # noqa: E402
from pipelines.virtinstall import VIRTINST_SCRATCH, sweep_stale_copies  # noqa: E402
from tests.conftest import free_port, run, sha256  # noqa: E402
from tests.support.events import events, result  # noqa: E402
from tests.support.installer import Installer, write_template  # noqa: E402

VISIBILITY_TIMEOUT = 30  # seconds: longer than one test build, short enough to wait for
# The production margin (10 min) would leave no time for a build in 30 s; a test build's
# clean-up takes a second or two.
BUILD_MARGIN = 5
MAX_BUILD_TIMEOUT = VISIBILITY_TIMEOUT - BUILD_MARGIN  # the worker's default


def wait_until(check: Callable[[], object], deadline: float, what: str) -> object:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of the test's own on a free port."""
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(
        lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                               text=True).stdout.strip() == "PONG",
        10, "redis-server",
    )  # fmt: skip
    yield url
    server.terminate()
    server.wait()


@pytest.fixture
def environment(broker: str, minimal_installer: Installer) -> dict[str, str]:
    return dict(
        os.environ,
        **{BROKER_ENV: broker, VISIBILITY_ENV: str(VISIBILITY_TIMEOUT),
           BUILD_MARGIN_ENV: str(BUILD_MARGIN),
           # A queued template's kernel and initrd must be in a media directory of the worker.
           MEDIA_DIRS_ENV: str(minimal_installer.kernel.parent)},
    )  # fmt: skip


class Workers:
    """`diskflow worker` processes, each in its own process group so it can be killed whole."""

    def __init__(self, environment: dict[str, str], logs: Path) -> None:
        self.environment = environment
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, **environment: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        worker = subprocess.Popen(
            [sys.executable, "-m", "diskflow", "worker", "--hostname", f"{name}@%h"],
            env=self.environment | environment, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.started.append(worker)
        return worker

    def kill(self, worker: subprocess.Popen) -> None:
        """SIGKILL the worker and its pool processes: a pod that dies, no clean-up at all."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()


@pytest.fixture
def workers(environment: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(environment, tmp_path)
    yield pool
    pool.stop_all()


def queued_build(
    kickstart: Path, tmp_path: Path, vm_dir: Path, environment: dict[str, str], *extra: str
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "diskflow", "build", str(kickstart), "--queue", "--output",
         str(tmp_path / "out"), "--workdir", str(vm_dir), "--accel", "tcg", "--network", "none",
         "--progress", "json", *extra],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def domains(prefix: str) -> list[str]:
    names = run("virsh", "-c", "qemu:///system", "list", "--all", "--name").split()
    return [name for name in names if name.startswith(prefix)]


def test_queued_build_runs_on_a_worker_and_streams_its_progress(
    minimal_installer: Installer,
    vm_dir: Path,
    tmp_path: Path,
    environment: dict[str, str],
    workers: Workers,
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "queued", post="echo queued build")
    workers.start("one")
    client = queued_build(kickstart, tmp_path, vm_dir, environment)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    said = events(out)
    stages = [e["stage"] for e in said[:-1]]
    assert stages.index("validate") < stages.index("install") < stages.index("finalize")
    assert any(e["type"] == "console" for e in said)  # the guest's console, via Redis
    # The client's default 3 h build timeout is lowered to what the worker allows, aloud.
    lowered = f"the build's timeout of 10800s is lowered to {MAX_BUILD_TIMEOUT}s"
    assert any(e["level"] == "warning" and lowered in e["message"] for e in said)
    done = said[-1]
    assert done["type"] == "result" and done["ok"] and not done["skipped"]
    image = tmp_path / "out/queued/queued.qcow2"
    assert done["manifest"]["output"]["sha256"] == sha256(image)
    # The worker logs no task results: a build state holds the kickstart text.
    log = (tmp_path / "one.log").read_text()
    assert "rootpw" not in log
    # It logs JSON lines of the one schema (not a terminal): Celery's lines and the build's
    # events alike.
    logged = events(log)
    assert any(e["type"] == "console" and e["stage"] == "install" for e in logged)
    assert any(e.get("logger", "").startswith("celery") for e in logged)


def test_a_killed_worker_build_runs_again_with_nothing_published_before(
    minimal_installer: Installer,
    vm_dir: Path,
    tmp_path: Path,
    environment: dict[str, str],
    workers: Workers,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    kickstart = write_template(
        tmp_path, minimal_installer, "rerun", post="echo started; sleep 5; echo finishing"
    )
    first = workers.start("first")
    client = queued_build(kickstart, tmp_path, vm_dir, environment, "--publish-to", str(store))

    # Kill the worker once its guest runs: the install task is in flight, unacknowledged.
    def first_install() -> list[str]:
        assert client.poll() is None, client.communicate()
        return domains("diskflow-rerun-")

    (killed_domain,) = wait_until(first_install, 120, "the first install")
    workers.kill(first)
    assert list(store.iterdir()) == []

    workers.start("second")
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    done = result(out)
    published = done["manifest"]
    build_id = done["build_id"]
    image = store / "rerun" / build_id / "rerun.qcow2"
    assert sha256(image) == published["output"]["sha256"]
    assert (store / "rerun" / build_id / "manifest.json").is_file()
    # It was a second install, on the second worker, in a domain of its own.
    log = (tmp_path / "second.log").read_text()
    assert "install" in log
    started = [e["domain"] for e in events(out) if e["type"] == "start" and e["stage"] == "install"]
    assert started and killed_domain not in started[-1:]
    wait_until(lambda: not domains("diskflow-rerun-"), 120, "the killed worker's guest to stop")
    # A build killed outright cannot remove virt-install's kernel/initrd copies (in a pod they
    # go with its filesystem; virt-install may have removed them itself once the guest ran);
    # on a host, later builds sweep them once they are stale.
    sweep_stale_copies("qemu:///system", older_than=0)
    assert not [p for p in VIRTINST_SCRATCH.glob("virtinst-*") if killed_domain in p.name]
    # The killed build's work directory went at the second install's start (its owner is dead).
    assert list(vm_dir.iterdir()) == []


def test_unreachable_broker_is_a_transient_error_without_the_password(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path
) -> None:
    kickstart = write_template(tmp_path, minimal_installer, "nobroker")
    environment = dict(os.environ, DISKFLOW_BROKER_URL=f"redis://:s3cr3t@127.0.0.1:{free_port()}/0")
    client = queued_build(kickstart, tmp_path, vm_dir, environment)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 75
    assert "cannot reach the broker at redis://127.0.0.1:" in err
    assert "[BrokerUnreachable]" in err
    assert "s3cr3t" not in out + err


def test_a_build_longer_than_the_worker_allows_is_stopped_at_its_maximum(
    minimal_installer: Installer,
    vm_dir: Path,
    tmp_path: Path,
    environment: dict[str, str],
    workers: Workers,
) -> None:
    kickstart = write_template(
        tmp_path, minimal_installer, "capped", post="while :; do echo working; sleep 1; done"
    )
    workers.start("capped", **{MAX_BUILD_TIMEOUT_ENV: "8"})
    client = queued_build(kickstart, tmp_path, vm_dir, environment, "--timeout", "600")
    out, err = client.communicate(timeout=300)
    assert client.returncode == 1, err
    said = events(out)
    warning = next((e["message"] for e in said if "is lowered" in e["message"]), out)
    assert warning == (
        f"the build's timeout of 600s is lowered to 8s, this worker's maximum "
        f"({MAX_BUILD_TIMEOUT_ENV}), which keeps a task within the broker's visibility "
        f"timeout of {VISIBILITY_TIMEOUT}s ({VISIBILITY_ENV})"
    )
    assert said[-1]["ok"] is False and said[-1]["reason"] == "Timeout"
    assert "did not finish within 8s" in said[-1]["message"]


def test_the_worker_s_times_take_units() -> None:
    settings = WorkerSettings.from_environment(
        {VISIBILITY_ENV: "4h", MAX_BUILD_TIMEOUT_ENV: "3h30m", BUILD_MARGIN_ENV: "10m"}
    )
    assert (settings.visibility_timeout, settings.max_build_timeout) == (14400, 12600)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({CONCURRENCY_ENV: "abc"}, f"{CONCURRENCY_ENV}='abc': must be a whole number, at least 1"),
        ({CONCURRENCY_ENV: "0"}, f"{CONCURRENCY_ENV}='0': must be a whole number, at least 1"),
        ({VISIBILITY_ENV: "-3600"}, f"{VISIBILITY_ENV}='-3600': '-3600' is not a duration"),
        ({VISIBILITY_ENV: "1h0.5s"}, f"{VISIBILITY_ENV}='1h0.5s': must be a whole number of"),
        ({MAX_BUILD_TIMEOUT_ENV: "1.5"}, f"{MAX_BUILD_TIMEOUT_ENV}='1.5': must be a whole number"),
        (
            {VISIBILITY_ENV: "3600", MAX_BUILD_TIMEOUT_ENV: "3001"},
            f"{MAX_BUILD_TIMEOUT_ENV}=3001 plus the 600s an install task needs besides its build "
            f"({BUILD_MARGIN_ENV}) exceeds {VISIBILITY_ENV}=3600: Redis would hand a build still "
            "running to a second worker. Lower the first (at most 3000) or raise the second.",
        ),
        ({VISIBILITY_ENV: "600"}, f"{VISIBILITY_ENV}=600 leaves no time for a build"),
    ],
)
def test_a_worker_with_unusable_settings_refuses_to_start(
    settings: dict[str, str], message: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DISKFLOW_")}
    # A broker nobody listens at: a worker that did start would retry it until the timeout.
    environment |= {BROKER_ENV: f"redis://127.0.0.1:{free_port()}/0", "COLUMNS": "500", **settings}
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "worker"], env=environment, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
