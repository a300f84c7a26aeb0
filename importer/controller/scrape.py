"""Progress of a running importer, read from its Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


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
                if sample.name == "diskflow_import_stage" and sample.value == 1:
                    stage = sample.labels.get("stage")
                elif sample.name.startswith("diskflow_import_") and not sample.labels:
                    values[sample.name.removeprefix("diskflow_import_")] = sample.value
    except ValueError:  # not a metrics page: a proxy's error page, a half-written body
        return None
    if stage is None or "bytes_done" not in values:
        return None
    total = values.get("bytes_total", -1)
    return Sample(
        stage=stage,
        bytes_done=int(values["bytes_done"]),
        bytes_total=None if total < 0 else int(total),
        throughput=values.get("throughput_bytes", 0.0),
    )
