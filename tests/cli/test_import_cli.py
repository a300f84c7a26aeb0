"""`diskflow import` as users and pods run it: exit codes, JSON progress, the termination
log, Prometheus metrics, and credentials that never show up in any output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from importer.progress import MetricsReporter, Snapshot
from tests.conftest import Images, MiB, free_port
from tests.support.commands import diskflow_import
from tests.support.events import events, result
from tests.support.faultserver import FaultServer

SECRET = "correct-horse-battery-staple"


def test_success_prints_json_progress_and_writes_the_termination_log(
    images: Images, nginx: str, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    source = images.path("qcow2", "xz")
    done = diskflow_import(
        f"{nginx}/{source.name}", tmp_path / "disk.img", "--progress", "json",
        "--termination-log", log, "--size", "64Mi",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = events(done.stdout)
    stages = [e["stage"] for e in said if e["type"] == "progress"]
    # qcow2 streams: decoded as it downloads, no convert stage, no scratch space.
    assert stages[0] == "download" and "convert" not in stages and stages[-1] == "resize"
    assert {e["path"] for e in said if e["type"] == "progress"} == {"stream"}
    download = [e for e in said if e.get("stage") == "download"][-1]
    assert download["bytes_done"] == download["bytes_total"] == source.stat().st_size
    assert download["message"].startswith("download ") and download["message"].endswith("B/s")
    assert said[-1]["ok"] is True and said[-1]["format"] == "qcow2"
    assert said[-1]["message"].startswith("imported ")
    result = json.loads(log.read_text())
    # A plain file, given no --filesystem-overhead: all of --size.
    assert result["ok"] is True and result["size"] == 64 * MiB
    assert (result["path"], result["fallback"]) == ("stream", None)


def test_an_image_through_scratch_space_says_so_and_why(
    images: Images, nginx: str, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    done = diskflow_import(
        f"{nginx}/{images.path('vhdx').name}", tmp_path / "disk.img", "--progress", "json",
        "--termination-log", log, "--scratch-dir", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    progress = [e for e in events(done.stdout) if e["type"] == "progress"]
    assert "convert" in [e["stage"] for e in progress]
    assert progress[-1]["path"] == "scratch"
    assert progress[-1]["fallback"] == "diskflow does not stream vhdx images"
    result = json.loads(log.read_text())
    assert (result["path"], result["fallback"]) == (
        "scratch",
        "diskflow does not stream vhdx images",
    )
    no_scratch = diskflow_import(
        f"{nginx}/{images.path('vhdx').name}", tmp_path / "other.img", "--no-scratch",
        "--termination-log", log,
    )  # fmt: skip
    assert no_scratch.returncode == 75, no_scratch.stderr
    failure = json.loads(log.read_text())
    assert failure["reason"] == "NeedsScratch" and "does not stream vhdx" in failure["message"]


def test_final_failure_exits_1_with_reason(faults: FaultServer, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    url = faults.url(uuid.uuid4().hex, "disk.raw.gz", status=404, times=9)
    done = diskflow_import(
        url, tmp_path / "disk.img", "--progress", "none", "--termination-log", log
    )
    assert done.returncode == 1
    assert "404" in done.stderr and "[NotFound]" in done.stderr
    record = json.loads(log.read_text())
    assert record == {
        "ok": False,
        "reason": "NotFound",
        "message": record["message"],
        "final": True,
    }
    assert not (tmp_path / "disk.img").exists()


def test_transient_failure_exits_75(faults: FaultServer, tmp_path: Path) -> None:
    url = faults.url(uuid.uuid4().hex, "disk.raw.gz", status=503, times=99)
    done = diskflow_import(
        url, tmp_path / "d.img", "--progress", "json", "--retries", "1", "--retry-backoff", "0"
    )
    assert done.returncode == 75
    last = result(done.stdout)
    assert last["ok"] is False and last["level"] == "error"
    assert last["reason"] == "ServerError" and last["final"] is False
    # The retry, said by a log record, is an event of the same schema.
    retried = [e for e in events(done.stdout) if e["type"] == "log"]
    assert retried and all(e["level"] == "warning" for e in retried), retried


def test_bad_arguments_are_named(images: Images, tmp_path: Path) -> None:
    done = diskflow_import(images.raw, tmp_path / "d.img", "--size", "ten gigs")
    assert done.returncode == 2 and "'ten gigs' is not a quantity" in done.stderr  # usage
    cases = {
        ("--checksum", "sha256:xyz"): "64 hex digits",
        ("--header", "no colon here"): "--header number 1 is not of the form",
        ("--metrics-addr", "metrics.example"): "is not an IPv4 or IPv6 address",
    }
    for args, message in cases.items():  # usage errors, found before anything starts
        done = diskflow_import(images.raw, tmp_path / "d.img", "--progress", "none", *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "d.img").exists()
    done = diskflow_import(images.raw, tmp_path / "no-such-dir" / "d.img", "--progress", "none")
    assert done.returncode == 1 and "does not exist" in done.stderr


def test_credentials_never_appear_in_output(faults: FaultServer, tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text(f"admin:{SECRET}\n")
    headers = tmp_path / "headers"
    headers.write_text(f"X-Api-Key: {SECRET}\n")
    log = tmp_path / "termination-log"
    token = uuid.uuid4().hex
    url = faults.url(token, "disk.raw.gz", status=401, times=9, sig=SECRET)
    for extra, env in (
        (["--auth-file", auth, "--header-file", headers], {}),
        ([], {"DISKFLOW_HTTP_USER": "admin", "DISKFLOW_HTTP_PASSWORD": SECRET}),
    ):
        done = diskflow_import(
            url, tmp_path / "d.img", "--progress", "json", "--termination-log", log, *extra, env=env
        )
        assert done.returncode == 1
        for text in (done.stdout, done.stderr, log.read_text()):
            assert SECRET not in text
    sent = faults.requests[token][0]["headers"]
    assert sent["X-Api-Key"] == SECRET and sent["Authorization"].startswith("Basic ")


def test_half_set_credentials_are_refused(images: Images, tmp_path: Path) -> None:
    done = diskflow_import(images.raw, tmp_path / "d.img", env={"DISKFLOW_HTTP_USER": "admin"})
    assert done.returncode == 1 and "DISKFLOW_HTTP_PASSWORD" in done.stderr


def scrape(address: str, port: int) -> dict[str, list[Sample]] | None:
    """The samples of /metrics on `address`:`port` by name; None while nothing answers."""
    host = f"[{address}]" if ":" in address else address
    try:
        text = requests.get(f"http://{host}:{port}/metrics", timeout=1).text
    except requests.ConnectionError:
        return None
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str) -> float:
    (sample,) = samples[name]
    assert sample.labels == {}, f"{name} has labels: {sample.labels}"
    return sample.value


def stages(samples: dict[str, list[Sample]]) -> list[tuple[str, float]]:
    return [(s.labels["stage"], s.value) for s in samples.get("diskflow_import_stage", [])]


def importing(url: str, dest: Path, *args: str | int | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "diskflow", "import", url, str(dest), "--progress", "none",
         "--stall-timeout", "30", *map(str, args)],
    )  # fmt: skip


def test_metrics_are_served_while_importing(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    port = free_port()
    stall_at = 3 * MiB + 1000
    url = faults.url(uuid.uuid4().hex, "disk.qcow2.gz", stall_after=stall_at, stall=4)
    process = importing(url, tmp_path / "d.img", "--metrics-port", port)
    try:
        deadline = time.monotonic() + 30
        done: float | None = None
        while done is None or done < 3 * MiB:  # the transfer pauses at stall_at for 4 s
            assert time.monotonic() < deadline, f"no download progress in the metrics: {done}"
            time.sleep(0.05)
            samples = scrape("127.0.0.1", port)  # the default address, 0.0.0.0, has it too
            if samples and stages(samples) == [("download", 1.0)]:
                done = value(samples, "diskflow_import_done_bytes")
        assert 3 * MiB <= done <= stall_at
        assert process.poll() is None, "measured during the import, not after"
        total = value(samples, "diskflow_import_size_bytes")
        assert total == images.path("qcow2", "gz").stat().st_size
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def test_the_stage_gauge_holds_the_current_stage_alone() -> None:
    port = free_port()
    reporter = MetricsReporter(port, "::1")  # an IPv6 address, as a pod's may be
    try:
        reporter.show(Snapshot("download", 5 * MiB, 10 * MiB, elapsed=1.0, throughput=5.0 * MiB))
        samples = scrape("::1", port)
        assert samples and stages(samples) == [("download", 1.0)]
        assert value(samples, "diskflow_import_progress_ratio") == 0.5
        reporter.show(Snapshot("convert", 0, None, elapsed=0.0, throughput=0.0))
        samples = scrape("::1", port)
        assert samples and stages(samples) == [("convert", 1.0)]
        assert value(samples, "diskflow_import_done_bytes") == 0
        assert "diskflow_import_size_bytes" not in samples  # not known: no series
        assert value(samples, "diskflow_import_throughput_bytes_per_second") == 0
    finally:
        reporter.close()


def test_importers_on_different_addresses_share_a_port(faults: FaultServer, tmp_path: Path) -> None:
    port = free_port()
    url = faults.url(uuid.uuid4().hex, "disk.raw.gz", stall_after=MiB, stall=5, times=2)
    addresses = ["127.0.0.2", "127.0.0.3"]
    processes = [
        importing(url, tmp_path / f"{n}.img", "--metrics-addr", address, "--metrics-port", port)
        for n, address in enumerate(addresses)
    ]
    try:
        deadline = time.monotonic() + 30
        serving: set[str] = set()
        while serving != set(addresses):
            assert time.monotonic() < deadline, f"only {serving} serve metrics"
            assert all(p.poll() is None for p in processes), "an importer ended early"
            time.sleep(0.05)
            serving |= {
                a for a in addresses if (scrape(a, port) or {}).get("diskflow_import_stage")
            }
        assert [p.wait(timeout=60) for p in processes] == [0, 0]
    finally:
        for process in processes:
            process.kill()


def test_a_taken_metrics_port_fails_for_now_before_reading(
    faults: FaultServer, tmp_path: Path
) -> None:
    token, log = uuid.uuid4().hex, tmp_path / "termination-log"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = diskflow_import(
            faults.url(token, "disk.raw.gz"), tmp_path / "d.img", "--progress", "none",
            "--metrics-addr", "127.0.0.1", "--metrics-port", port, "--termination-log", log,
        )  # fmt: skip
    assert done.returncode == 75, done.stderr
    assert f"127.0.0.1:{port}: Address already in use" in done.stderr
    assert "[AddressInUse]" in done.stderr and "Traceback" not in done.stderr
    record = json.loads(log.read_text())
    assert record["reason"] == "AddressInUse" and record["final"] is False
    assert faults.requests[token] == [], "the source was read before the metrics were bound"
    assert not (tmp_path / "d.img").exists()


def test_a_metrics_address_of_no_interface_is_refused(images: Images, tmp_path: Path) -> None:
    port = free_port()
    done = diskflow_import(
        images.raw, tmp_path / "d.img", "--progress", "none",
        "--metrics-addr", "192.0.2.1", "--metrics-port", port,  # TEST-NET-1: no interface's
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    said = f"192.0.2.1:{port}: Cannot assign requested address"
    assert said in done.stderr and "[InvalidArgument]" in done.stderr, done.stderr


def test_demo_imports_its_sample_with_nothing_else_running(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diskflow", "demo", str(tmp_path / "demo"), "--progress", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    done_ = result(done.stdout)
    assert done_["ok"] and done_["format"] == "qcow2" and done_["compression"] == "xz"
    assert done_["checksum"].startswith("sha256:")
    disk = tmp_path / "demo" / "disk.img"
    assert disk.stat().st_size == done_["size"] == 512 * MiB  # the "512 MiB volume"
    with open(disk, "rb") as f:
        assert f.read(21) == b"diskflow sample disk\n"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["disk.img"]


def test_progress_bar_shows_stages_bytes_and_speed(images: Images, tmp_path: Path) -> None:
    # vhdx goes through scratch space: downloaded, then converted by qemu-img.
    done = diskflow_import(images.path("vhdx", "gz"), tmp_path / "d.img", "--progress", "bar")
    assert done.returncode == 0, done.stderr
    assert "download" in done.stderr and "convert" in done.stderr and "MiB" in done.stderr
    assert done.stdout.startswith("imported ")
    # vmdk streams: decoded as it downloads, with no convert stage.
    done = diskflow_import(images.path("vmdk", "gz"), tmp_path / "e.img", "--progress", "bar")
    assert done.returncode == 0, done.stderr
    assert "download" in done.stderr and "MiB" in done.stderr
    assert "convert" not in done.stderr
    assert done.stdout.startswith("imported ")


def holds_a_file(directory: Path, pid: int) -> bool:
    """Whether process `pid` holds (has flock-ed) a file in `directory` other than a
    destination's lock: the partial or scratch file the import writes, past the point where
    it is made and owned (importer.claims.owned_file), from which a failure removes it."""
    inodes = {str(p.stat().st_ino) for p in directory.iterdir() if "diskflow-lock" not in p.name}
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        # "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF" ("->" marks a waiter: not held)
        fields = line.split()
        if fields[1] == "FLOCK" and fields[4] == str(pid):
            held.add(fields[5].rsplit(":", 1)[-1])
    return bool(inodes & held)


def sigterm_mid_download(faults: FaultServer, tmp_path: Path, image: str, writes_in: str) -> None:
    """Import `image` from a server that stalls after 2 MiB for a minute, SIGTERM the import
    once it holds its file in `writes_in` ("scratch", or "out" for the destination's partial
    file), and check it stops promptly, reports Terminated and leaves nothing behind."""
    log, scratch = tmp_path / "termination-log", tmp_path / "scratch"
    scratch.mkdir()
    dest = tmp_path / "out" / "d.img"
    dest.parent.mkdir()
    url = faults.url(uuid.uuid4().hex, image, stall_after=2 * MiB, stall=60)
    process = subprocess.Popen(
        [sys.executable, "-m", "diskflow", "import", url, str(dest), "--progress", "none",
         "--scratch-dir", str(scratch), "--termination-log", str(log), "--stall-timeout", "120"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not holds_a_file(tmp_path / writes_in, process.pid):  # the download has begun
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.terminate()
        # The fetch thread is blocked in a read that would last a minute: it must be woken.
        assert process.wait(timeout=15) == 75
    finally:
        process.kill()
    assert json.loads(log.read_text())["reason"] == "Terminated"
    assert list(scratch.iterdir()) == [] and list(dest.parent.iterdir()) == []


def test_sigterm_cleans_up_and_reports(faults: FaultServer, tmp_path: Path) -> None:
    # vhdx goes through scratch space: the download lands in a scratch file.
    sigterm_mid_download(faults, tmp_path, "disk.vhdx", "scratch")


def test_sigterm_cleans_up_and_reports_when_streaming(faults: FaultServer, tmp_path: Path) -> None:
    # qcow2 streams: decoded into the destination's partial file as it downloads.
    sigterm_mid_download(faults, tmp_path, "disk.qcow2", "out")


def test_secret_header_file_lines_are_never_echoed(images: Images, tmp_path: Path) -> None:
    headers = tmp_path / "headers"
    headers.write_text(f"X-Ok: 1\nBearer {SECRET}\n")
    done = diskflow_import(
        images.raw, tmp_path / "d.img", "--progress", "json", "--header-file", headers
    )
    assert done.returncode == 1 and "line 2 of" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_more_bad_arguments(images: Images, tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("")
    auth = tmp_path / "auth"
    auth.write_text("user:p\u20acss\n")
    cases = [
        (["--ca-bundle", pem, "--insecure"], "contradict"),
        (["--auth-file", auth], "Latin-1"),
    ]
    for args, message in cases:
        done = diskflow_import(images.raw, tmp_path / "d.img", "--progress", "none", *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
