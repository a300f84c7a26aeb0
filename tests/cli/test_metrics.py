"""The importer's Prometheus metrics as Prometheus, the controller and dashboards made for CDI
read them: scraped over HTTP from a running `diskflow import` (or a reporter serving them) and
parsed with prometheus_client's own parser. Names, types and units follow Prometheus's naming
rules; what is not known is no series; CDI's progress counter carries the ownerUID label."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from importer.progress import MetricsReporter, Snapshot
from tests.conftest import Images, MiB, free_port
from tests.support.faultserver import FaultServer

Page = dict[str, Metric]

DONE = "diskflow_import_done_bytes"
SIZE = "diskflow_import_size_bytes"
THROUGHPUT = "diskflow_import_throughput_bytes_per_second"
RATIO = "diskflow_import_progress_ratio"
STAGE = "diskflow_import_stage"
CDI = "kubevirt_cdi_import_progress"  # the family; its sample is ..._total
PREVIOUS = {
    "diskflow_import_bytes_done",
    "diskflow_import_bytes_total",
    "diskflow_import_throughput_bytes",
    "diskflow_import_progress_percent",
}


def scrape(port: int) -> Page | None:
    """The metric families of /metrics by name; None while nothing answers."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
    except requests.ConnectionError:
        return None
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(page: Page, name: str) -> float:
    (sample,) = page[name].samples
    assert sample.labels == {}, f"{name} has labels: {sample.labels}"
    return sample.value


def stage(page: Page) -> str | None:
    if STAGE not in page:
        return None
    (sample,) = page[STAGE].samples
    assert page[STAGE].type == "gauge" and sample.value == 1
    return sample.labels["stage"]


def cdi_progress(page: Page) -> tuple[dict[str, str], float]:
    """CDI's counter: its labels and value, checked to be a counter as CDI exports it."""
    family = page[CDI]
    assert family.type == "counter" and family.documentation == "The import progress in percentage"
    (sample,) = family.samples
    assert sample.name == "kubevirt_cdi_import_progress_total"
    return sample.labels, sample.value


def assert_conventional(page: Page) -> None:
    """Prometheus's rules hold on the whole page: counters, and only counters, end in
    `_total`; no value is a negative sentinel; none of the old names is left."""
    assert not PREVIOUS & set(page), set(page)
    for family in page.values():
        assert family.type in ("counter", "gauge"), family
        for sample in family.samples:
            assert sample.value >= 0, sample
            assert sample.name.endswith("_total") == (family.type == "counter"), sample


def importing(source: str | Path, dest: Path, *args: str | int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "diskflow", "import", str(source), str(dest), "--progress", "none",
         *map(str, args)],
    )  # fmt: skip


def scrape_until(
    process: subprocess.Popen[bytes], port: int, ready: Callable[[Page], bool], what: str
) -> Page:
    """The first page of the running import that is `ready`."""
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"the import ended before its metrics showed {what}"
        page = scrape(port)
        if page and ready(page):
            return page
        assert time.monotonic() < deadline, f"the metrics never showed {what}: {page}"
        time.sleep(0.05)


def test_a_running_import_serves_conventional_metrics_and_cdis_progress(
    faults: FaultServer, images: Images, tmp_path: Path
) -> None:
    source = images.path("qcow2", "gz")
    size = source.stat().st_size
    port, owner = free_port(), str(uuid.uuid4())
    # About four seconds of download: time to scrape it under way.
    url = faults.url(uuid.uuid4().hex, source.name, rate=size // 4)
    process = importing(url, tmp_path / "d.img", "--metrics-port", port, "--owner-uid", owner)
    try:
        page = scrape_until(
            process,
            port,
            lambda p: stage(p) == "download" and 0 < value(p, DONE) < size,
            "the download under way",
        )
        assert_conventional(page)
        for gauge in (DONE, SIZE, THROUGHPUT, RATIO):
            assert page[gauge].type == "gauge", page[gauge]
        done = value(page, DONE)
        assert value(page, SIZE) == size
        assert value(page, THROUGHPUT) > 0
        ratio = value(page, RATIO)
        assert 0 < ratio < 1 and ratio == pytest.approx(done / size)
        labels, percent = cdi_progress(page)
        assert labels == {"ownerUID": owner}
        assert percent == pytest.approx(100 * ratio)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def open_writer(fifo: Path, process: subprocess.Popen[bytes]) -> int:
    """The writing end of `fifo`, once the import opened it to read."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        assert process.poll() is None, "the import ended without reading its source"
        assert time.monotonic() < deadline, "the import never opened its source"
        time.sleep(0.05)


def test_a_size_not_known_is_no_series(images: Images, tmp_path: Path) -> None:
    """A source of unknown size (a pipe): no size, no ratio, and no CDI progress yet, rather
    than -1 or 0 standing for "unknown"."""
    fifo = tmp_path / "source"
    os.mkfifo(fifo)
    port = free_port()
    process = importing(fifo, tmp_path / "d.img", "--metrics-port", port, "--owner-uid", "uid-1")
    try:
        fd = open_writer(fifo, process)
        with os.fdopen(fd, "wb") as writer:
            data = images.raw.read_bytes()
            writer.write(data[: 2 * MiB])
            writer.flush()
            page = scrape_until(
                process,
                port,
                lambda p: stage(p) == "download" and value(p, DONE) > 0,
                "bytes read from the pipe",
            )
            assert_conventional(page)
            assert SIZE not in page and RATIO not in page and CDI not in page, set(page)
            assert page[THROUGHPUT].type == "gauge"
            writer.write(data[2 * MiB :])
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert (tmp_path / "d.img").read_bytes() == data


def test_cdis_progress_only_goes_up_and_needs_an_owner() -> None:
    """Like CDI's: a counter at the most percent any stage reached (a conversion after the
    download starts no second count), served only for an import that knows its owner."""
    port = free_port()
    reporter = MetricsReporter(port, "127.0.0.1", owner_uid="uid-1")
    try:
        assert scrape(port) == {}, "metrics before the first stage"
        reporter.show(Snapshot("download", 3 * MiB, 4 * MiB, elapsed=1.0, throughput=3.0 * MiB))
        page = scrape(port)
        assert page and cdi_progress(page) == ({"ownerUID": "uid-1"}, 75.0)
        assert value(page, RATIO) == 0.75
        reporter.show(Snapshot("download", 4 * MiB, 4 * MiB, elapsed=1.0, throughput=4.0 * MiB))
        reporter.show(Snapshot("convert", MiB, 40 * MiB, elapsed=1.0, throughput=1.0 * MiB))
        page = scrape(port)
        assert page and stage(page) == "convert" and value(page, RATIO) == 0.025
        assert cdi_progress(page) == ({"ownerUID": "uid-1"}, 100.0)
        assert_conventional(page)
    finally:
        reporter.close()
    port = free_port()
    anonymous = MetricsReporter(port, "127.0.0.1")
    try:
        anonymous.show(Snapshot("download", MiB, 4 * MiB, elapsed=1.0, throughput=1.0 * MiB))
        page = scrape(port)
        assert page and value(page, RATIO) == 0.25 and CDI not in page, set(page or {})
    finally:
        anonymous.close()
