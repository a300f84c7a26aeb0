"""Progress of a running importer, read from its Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from importer.progress import DONE_METRIC, SIZE_METRIC, STAGE_METRIC, THROUGHPUT_METRIC

# What importers of the previous release call them (their size is -1 when unknown): their
# pods may still run when the controller is upgraded, and must not look stalled.
PREVIOUS_NAMES = {
    "diskflow_import_bytes_done": DONE_METRIC,
    "diskflow_import_bytes_total": SIZE_METRIC,
    "diskflow_import_throughput_bytes": THROUGHPUT_METRIC,
}


@dataclass(frozen=True)
class Sample:
    """One reading of an importer's progress."""

    stage: str
    bytes_done: int
    bytes_total: int | None
    throughput: float
    """Bytes per second in the current stage."""


def parse_metrics(text: str) -> Sample | None:
    """The importer's progress in its metrics page; None when the page has none (yet)."""
    values: dict[str, float] = {}
    stage = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == STAGE_METRIC and sample.value == 1:
                    stage = sample.labels.get("stage")
                elif not sample.labels:
                    values[PREVIOUS_NAMES.get(sample.name, sample.name)] = sample.value
    except ValueError:  # not a metrics page: a proxy's error page, a half-written body
        return None
    if stage is None or DONE_METRIC not in values:
        return None
    total = values.get(SIZE_METRIC, -1)  # no series: not known
    return Sample(
        stage=stage,
        bytes_done=int(values[DONE_METRIC]),
        bytes_total=None if total < 0 else int(total),
        throughput=values.get(THROUGHPUT_METRIC, 0.0),
    )
