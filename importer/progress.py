"""Progress of an import: one thread-safe model, shown by interchangeable reporters.

The data path only calls `stage()` and `advance()`; how progress is shown (a rich bar on a
terminal, events for machines and logs, Prometheus metrics for the controller) is chosen by
the shell around it. The pod's termination message is written here too.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

from importer.errors import Failure, FinalError, TransientError
from importer.events import Event, Send, Type
from importer.quantity import format_bytes
from importer.reasons import Reason

if TYPE_CHECKING:  # prometheus_client costs every command start-up time: imported when used
    from prometheus_client.core import Metric


@dataclass(frozen=True)
class Snapshot:
    stage: str
    bytes_done: int
    bytes_total: int | None
    elapsed: float  # seconds since the stage started
    throughput: float  # bytes per second over the stage
    path: str = "stream"
    """"stream": written as it downloads; "scratch": through scratch space and qemu-img."""
    fallback: str | None = None
    """Why an image of a format that streams goes through scratch space."""

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    @property
    def eta(self) -> float | None:
        if not self.bytes_total or not self.throughput:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / self.throughput)


class Progress:
    """Where the import is: stage, bytes done of the stage's total. Safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stage = "pending"
        self._done = 0
        self._total: int | None = None
        self._started = time.monotonic()
        self._ended: list[Snapshot] = []  # final numbers of stages not yet reported
        self.changed = threading.Event()  # set on every stage change, for prompt reporting
        self.committed = False
        self._path = "stream"
        self._fallback: str | None = None

    def stage(self, name: str, total: int | None = None) -> None:
        with self._lock:
            if self._stage != "pending":
                self._ended.append(self._snapshot())
            self._stage, self._done, self._total = name, 0, total
            self._started = time.monotonic()
        self.changed.set()

    @property
    def current_stage(self) -> str | None:
        """The stage under way; None before the first."""
        return None if self._stage == "pending" else self._stage

    def commit(self) -> None:
        """The import reached the point where it completes (the rename, the device's head):
        a SIGTERM from here on must not report a completed import as stopped."""
        self.committed = True

    def fall_back(self, why: str) -> None:
        """The image goes through scratch space though its format streams, because `why`."""
        with self._lock:
            self._path, self._fallback = "scratch", why
        self.changed.set()

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n

    def set_done(self, done: int) -> None:
        with self._lock:
            self._done = done

    def snapshots(self) -> list[Snapshot]:
        """Final snapshots of stages ended since the last call, then the current one."""
        with self._lock:
            ended, self._ended = self._ended, []
            return [*ended, self._snapshot()]

    def _snapshot(self) -> Snapshot:
        elapsed = time.monotonic() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        return Snapshot(
            self._stage, self._done, self._total, elapsed, rate, self._path, self._fallback
        )


class Reporter(Protocol):
    def show(self, snapshot: Snapshot) -> None: ...
    def close(self) -> None: ...


@contextmanager
def reporting(
    progress: Progress, reporters: Sequence[Reporter], *, interval: float
) -> Iterator[None]:
    """Show `progress` through `reporters` every `interval` seconds and on stage changes."""
    stop = threading.Event()
    last: tuple[str, int, int | None, str] | None = None

    def show() -> None:
        nonlocal last
        for snapshot in progress.snapshots():
            # The same numbers again (a tick with nothing new, the final show) say nothing.
            key = (snapshot.stage, snapshot.bytes_done, snapshot.bytes_total, snapshot.path)
            if key == last:
                continue
            last = key
            for reporter in reporters:
                reporter.show(snapshot)

    def tick() -> None:
        while not stop.is_set():
            progress.changed.wait(interval)
            progress.changed.clear()
            show()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    if reporters:
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        progress.changed.set()
        if reporters:
            ticker.join()
            show()
        for reporter in reporters:
            reporter.close()


class EventReporter:
    """Each snapshot as a `progress` event (importer.events): JSON lines for CI logs, pods
    and other programs, or readable lines."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def show(self, snapshot: Snapshot) -> None:
        if snapshot.stage == "pending":
            return
        percent, eta = snapshot.percent, snapshot.eta
        total = snapshot.bytes_total
        message = (
            f"{snapshot.stage} {format_bytes(snapshot.bytes_done)}"
            + ("" if total is None else f" of {format_bytes(total)}")
            + ("" if percent is None else f" ({percent:.0f}%)")
            + f" at {format_bytes(snapshot.throughput)}/s"
        )
        fields = asdict(snapshot) | {
            "percent": None if percent is None else round(percent, 1),
            "eta": None if eta is None else round(eta, 1),
            "elapsed": round(snapshot.elapsed, 3),
            "throughput": round(snapshot.throughput),
        }
        self._send(Event(Type.PROGRESS, message, fields=fields))

    def close(self) -> None:
        pass


class RichReporter:
    """A progress bar per stage on a terminal: bytes, total, throughput and ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bars

        self._bars = Bars(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._bars.start()
        self._tasks: dict[str, int] = {}

    def show(self, snapshot: Snapshot) -> None:
        if snapshot.stage == "pending":
            return
        task = self._tasks.get(snapshot.stage)
        if task is None:
            for earlier in self._tasks.values():
                self._bars.stop_task(earlier)
            task = self._bars.add_task(snapshot.stage, total=snapshot.bytes_total)
            self._tasks[snapshot.stage] = task
        self._bars.update(task, completed=snapshot.bytes_done, total=snapshot.bytes_total)

    def close(self) -> None:
        self._bars.stop()


# The importer's metrics, as the controller reads them (importer.controller.scrape). Named
# as Prometheus asks (https://prometheus.io/docs/practices/naming/): the unit last, in base
# units; a ratio 0-1; a value not known is no series rather than a sentinel.
DONE_METRIC = "diskflow_import_done_bytes"
SIZE_METRIC = "diskflow_import_size_bytes"
THROUGHPUT_METRIC = "diskflow_import_throughput_bytes_per_second"
RATIO_METRIC = "diskflow_import_progress_ratio"
STAGE_METRIC = "diskflow_import_stage"
# CDI's importer's progress, for the dashboards and alerts made for CDI.
CDI_PROGRESS_METRIC = "kubevirt_cdi_import_progress_total"


class MetricsReporter:
    """The same numbers as Prometheus metrics, served on `addr`:`port` for the controller (and
    Prometheus) to scrape: gauges of the current stage's bytes done, size (no series while it
    is unknown), throughput and progress ratio (none while the size is unknown), and
    `diskflow_import_stage{stage=...}` 1 for the current stage alone, so that a scraper reads
    the stage instead of guessing it from which series moved last. With `owner_uid`, also
    CDI's `kubevirt_cdi_import_progress_total{ownerUID=...}`: a counter of percent done, which
    like CDI's only ever goes up (to the most any stage reached) and appears once a stage's
    size is known. Before the first stage the page is empty."""

    def __init__(self, port: int, addr: str = "0.0.0.0", *, owner_uid: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        where = metrics_address(addr, port)
        self._owner_uid = owner_uid
        self._lock = threading.Lock()  # shown from the progress thread, read by the server's
        self._last: Snapshot | None = None
        self._percent: float | None = None  # CDI's counter: the most percent shown yet
        registry = CollectorRegistry()
        registry.register(self)
        try:
            self._server, self._thread = start_http_server(port, addr, registry=registry)
        except OSError as exc:
            raise bind_failure(exc, where) from None

    def show(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._last = snapshot
            if snapshot.percent is not None:
                self._percent = max(self._percent or 0.0, snapshot.percent)

    def collect(self) -> Iterator[Metric]:
        """The metrics of the last snapshot shown, for each scrape (the registry's collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            last, percent = self._last, self._percent
        if last is None:
            return
        stage = GaugeMetricFamily(
            STAGE_METRIC, "1 for the stage the import is in (one series)", labels=["stage"]
        )
        stage.add_metric([last.stage], 1)
        yield stage
        yield GaugeMetricFamily(DONE_METRIC, "Bytes done in the current stage", last.bytes_done)
        if last.bytes_total is not None:
            yield GaugeMetricFamily(SIZE_METRIC, "Bytes in the current stage", last.bytes_total)
        yield GaugeMetricFamily(
            THROUGHPUT_METRIC, "Bytes per second in the current stage", last.throughput
        )
        if last.percent is not None:
            yield GaugeMetricFamily(
                RATIO_METRIC, "Share of the current stage done, 0 to 1", last.percent / 100
            )
        if self._owner_uid is not None and percent is not None:
            cdi = CounterMetricFamily(
                CDI_PROGRESS_METRIC, "The import progress in percentage", labels=["ownerUID"]
            )
            cdi.add_metric([self._owner_uid], percent)
            yield cdi

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def metrics_address(addr: str, port: int) -> str:
    """ADDR:PORT as people write it ([fd00::5]:8443), once `addr` proved an IP address: a
    host name could resolve to an address of another machine, or to several."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise FinalError(
            Reason.INVALID_ARGUMENT,
            f"--metrics-addr {addr!r} is not an IPv4 or IPv6 address (such as 10.0.0.5 or fd00::5)",
        ) from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def bind_failure(
    exc: OSError, where: str, what: str = "metrics", option: str = "metrics"
) -> Failure:
    """Why serving `what` on `where` (ADDR:PORT) failed, naming the `--OPTION-port` and
    `--OPTION-addr` that chose it: a port another process holds is transient (it may be free
    when tried again); an address not of this machine, or anything else, is final."""
    said = f"cannot serve {what} on {where}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return TransientError(
            Reason.ADDRESS_IN_USE, f"{said}; another process listens there (--{option}-port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return FinalError(
            Reason.INVALID_ARGUMENT,
            f"{said}; it is not an address of this machine (--{option}-addr)",
        )
    return FinalError(Reason.INVALID_ARGUMENT, said)
