"""The controller's own Prometheus metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import Counter as PromCounter

from importer.api import Phase


class ControllerMetrics:
    """DataVolumes by phase, imports in flight, retries, reconcile latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phases = Gauge(
            "diskflow_controller_datavolumes",
            "DataVolumes by phase",
            ["phase"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "diskflow_controller_imports_in_flight",
            "Importer pods started and not yet ended",
            registry=self.registry,
        )
        self.retries = PromCounter(
            "diskflow_controller_retries",
            "Attempts started again after a transient failure",
            registry=self.registry,
        )
        self.reconcile = Histogram(
            "diskflow_controller_reconcile_seconds",
            "Time to reconcile one DataVolume",
            registry=self.registry,
        )

    def serve(self, addr: str, port: int) -> None:
        """Serve the metrics on ADDR:PORT."""
        start_http_server(port, addr=addr, registry=self.registry)

    def count(self, phases: Iterable[str], in_flight: int) -> None:
        """Set the gauges from the DataVolumes' phases and the importer pods running."""
        counted = Counter(phases)
        for phase in Phase:
            self.phases.labels(str(phase)).set(counted.get(str(phase), 0))
        self.in_flight.set(in_flight)
