"""What happens next to a DataVolume, decided from observations alone: phases, retries with
backoff and a limit, final failures, vanished/evicted/OOM-killed/stalled pods, waiting said
out loud. The operator only gathers these observations and carries out the plans."""

from __future__ import annotations

import dataclasses
from typing import Any

from importer.api import DataVolume, Phase, Status
from importer.controller.admission import no_slot
from importer.controller.config import ControllerConfig
from importer.controller.decide import Observed, Plan, decide
from importer.controller.scrape import Sample, parse_metrics
from importer.outcome import ImportResult, Outcome
from importer.reasons import Reason

CONFIG = ControllerConfig(retry_limit=2, backoff_base=10, backoff_max=300)
NOW = 1_800_000_000.0
BOUND = {
    "metadata": {"name": "fedora", "uid": "pvc"},
    "status": {"phase": "Bound", "capacity": {"storage": "11Gi"}},
}
RESULT = ImportResult(
    source="https://example.com/f.qcow2",
    destination="/data/disk.img",
    compression="xz",
    format="qcow2",
    bytes_downloaded=100,
    size=1 << 30,
    checksum="sha256:" + "0" * 64,
    seconds=1.0,
)


def datavolume(status: Status | None = None, **spec: Any) -> DataVolume:
    manifest = {
        "apiVersion": "diskflow.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "fedora", "namespace": "vms", "uid": "dv-uid"},
        "spec": {
            "source": {"http": {"url": "https://example.com/f.qcow2.xz"}},
            "storage": {"resources": {"requests": {"storage": "10Gi"}}},
            **spec,
        },
    }
    if status is not None:
        manifest["status"] = status.to_dict()
    return DataVolume.from_manifest(manifest)


def pod(
    phase: str,
    *,
    attempt: int = 0,
    message: str | None = None,
    exit_code: int = 0,
    reason: str | None = None,
    finished: float = NOW,
    **status: Any,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if phase in ("Succeeded", "Failed"):
        stamp = _stamp(finished)
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason or "Error",
                "message": message or "",
                "finishedAt": stamp,
            }
        }
    return {
        "metadata": {"name": f"importer-fedora-{attempt}"},
        "spec": {
            "containers": [
                {"args": ["u", "/data/disk.img"], "resources": {"limits": {"memory": "1Gi"}}}
            ]
        },
        "status": {"phase": phase, "containerStatuses": [{"state": state}], **status},
    }


def _stamp(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def step(dv: DataVolume, **seen: Any) -> Plan:
    seen.setdefault("pvc", BOUND)
    seen.setdefault("pod", None)
    return decide(Observed(dv=dv, now=NOW, **seen), CONFIG)


def again(plan: Plan, **spec: Any) -> DataVolume:
    """The DataVolume after the plan's status was written."""
    return datavolume(plan.status, **spec)


def test_a_new_datavolume_gets_its_pvc_then_waits_for_it_to_bind() -> None:
    plan = step(datavolume(), pvc=None)
    assert plan.create_pvc and plan.status.phase is Phase.PENDING
    assert plan.status.claim_name == "fedora"
    pending = {"metadata": {"name": "fedora"}, "status": {"phase": "Pending"}}
    plan = step(again(plan), pvc=pending)
    assert plan.status.phase is Phase.PENDING and plan.start_attempt is None


def test_wait_for_first_consumer_is_a_phase_unless_immediate_binding_is_asked() -> None:
    pending = {"metadata": {"name": "fedora"}, "status": {"phase": "Pending"}}
    plan = step(datavolume(), pvc=pending, binds_on_consumer=True)
    assert plan.status.phase is Phase.WAIT_FOR_FIRST_CONSUMER and plan.start_attempt is None
    immediate = datavolume()
    immediate = dataclasses.replace(
        immediate,
        annotations={"cdi.kubevirt.io/storage.bind.immediate.requested": "true"},
    )
    plan = step(immediate, pvc=pending, binds_on_consumer=True)
    assert plan.start_attempt == 0 and plan.status.phase is Phase.IMPORT_SCHEDULED


def test_a_bound_pvc_starts_attempt_zero_and_a_running_pod_shows_progress() -> None:
    plan = step(datavolume())
    assert plan.start_attempt == 0 and plan.status.phase is Phase.IMPORT_SCHEDULED
    sample = Sample(stage="download", bytes_done=25, bytes_total=100, throughput=1e6)
    plan = step(again(plan), pod=pod("Running"), sample=sample)
    status = plan.status
    assert status.phase is Phase.IMPORT_IN_PROGRESS
    assert (status.progress, status.stage, status.bytes_done, status.bytes_total) == (
        "25.00%",
        "download",
        25,
        100,
    )
    assert status.throughput == 1_000_000
    running = {c.type: c for c in status.conditions}["Running"]
    assert running.status == "True"


def test_success_is_100_percent_with_the_result_and_the_pod_is_removed() -> None:
    message = Outcome.success(RESULT, "resize").to_json()
    running = datavolume(Status(phase=Phase.IMPORT_IN_PROGRESS, progress="40.00%", restart_count=0))
    plan = step(running, pod=pod("Succeeded", message=message))
    assert plan.status.phase is Phase.SUCCEEDED and plan.status.progress == "100.00%"
    assert plan.status.result is not None and plan.status.result.checksum_verified
    assert plan.delete_pods == ("importer-fedora-0",)
    assert {c.type: c.status for c in plan.status.conditions}["Ready"] == "True"
    assert [e.reason for e in plan.events] == ["Succeeded"]
    # Nothing moves a finished DataVolume.
    assert step(again(plan), pod=None).status == plan.status


def test_a_final_failure_fails_at_once_with_its_reason() -> None:
    message = Outcome.failure(Reason.CHECKSUM_MISMATCH, "sha256 differs", "download").to_json()
    running = datavolume(Status(phase=Phase.IMPORT_IN_PROGRESS, progress="9%", restart_count=0))
    plan = step(running, pod=pod("Failed", message=message, exit_code=1))
    assert plan.status.phase is Phase.FAILED
    assert plan.status.reason == "ChecksumMismatch" and plan.status.message == "sha256 differs"
    assert plan.status.restart_count == 0 and plan.start_attempt is None
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "ChecksumMismatch"


def test_a_transient_failure_retries_after_backoff_then_succeeds() -> None:
    message = Outcome.failure(Reason.CONNECTION_LOST, "reset by peer", "download").to_json()
    running = datavolume(Status(phase=Phase.IMPORT_IN_PROGRESS, progress="9%", restart_count=0))
    failed = pod("Failed", message=message, exit_code=75, finished=NOW)
    plan = step(running, pod=failed)
    assert plan.status.restart_count == 1 and plan.status.reason == "ConnectionLost"
    assert plan.status.phase is Phase.IMPORT_SCHEDULED and plan.wake_after == 10
    # Within the backoff: wait, saying how long.
    plan = step(again(plan), pod=None, previous=failed)
    assert plan.start_attempt is None and plan.wake_after is not None
    assert "attempt 2 in 10s" in {c.type: c for c in plan.status.conditions}["Running"].message
    # After it: attempt 1 starts and the failed pod goes.
    later = decide(
        Observed(dv=again(plan), pvc=BOUND, pod=None, previous=failed, now=NOW + 11), CONFIG
    )
    assert later.start_attempt == 1 and later.delete_pods == ("importer-fedora-0",)


def test_the_retry_limit_ends_in_failed_naming_the_last_failure() -> None:
    message = Outcome.failure(Reason.SERVER_ERROR, "HTTP 503", "download").to_json()
    status = Status(phase=Phase.IMPORT_IN_PROGRESS, progress="9%", restart_count=2)
    plan = step(datavolume(status), pod=pod("Failed", attempt=2, message=message, exit_code=75))
    assert plan.status.phase is Phase.FAILED and plan.status.reason == "RetryLimitExceeded"
    assert "HTTP 503 [ServerError]" in (plan.status.message or "")
    # spec.retryLimit overrides the controller's default.
    plan = step(
        datavolume(status, retryLimit=5),
        pod=pod("Failed", attempt=2, message=message, exit_code=75),
    )
    assert plan.status.restart_count == 3 and plan.status.phase is Phase.IMPORT_SCHEDULED


def test_pods_that_vanish_are_evicted_oom_killed_or_stall_are_transient_with_own_reasons() -> None:
    running = datavolume(Status(phase=Phase.IMPORT_IN_PROGRESS, progress="9%", restart_count=0))
    assert step(running, pod=None).status.reason == "PodLost"
    evicted = pod("Failed", reason="Evicted", message="")
    evicted["status"]["reason"] = "Evicted"
    assert step(running, pod=evicted).status.reason == "Evicted"
    oom = step(running, pod=pod("Failed", reason="OOMKilled", exit_code=137))
    assert oom.status.reason == "OOMKilled" and "1Gi" in (oom.status.message or "")
    stalled = step(running, pod=pod("Running"), stalled=True)
    assert stalled.status.reason == "Stalled" and stalled.delete_pods == ("importer-fedora-0",)
    crashed = step(running, pod=pod("Failed", message="panic", exit_code=2))
    assert crashed.status.reason == "ImporterCrashed" and "code 2" in (crashed.status.message or "")
    for plan in (oom, stalled, crashed):
        assert plan.status.restart_count == 1


def test_missing_secrets_and_admission_limits_are_said_out_loud() -> None:
    plan = step(datavolume(), missing=("Secret vms/mirror-auth",))
    assert plan.start_attempt is None and plan.status.reason == "WaitingForObjects"
    assert "Secret vms/mirror-auth" in (plan.status.message or "")
    assert ("Warning", "WaitingForObjects") in [(e.type, e.reason) for e in plan.events]
    # The same wait again posts no second event.
    assert not [
        e
        for e in step(again(plan), missing=("Secret vms/mirror-auth",)).events
        if e.reason == "WaitingForObjects"
    ]
    why = no_slot("mirror", ["mirror", "other"], limit=2, per_host=0)
    assert why is not None and "2 of at most 2" in why
    plan = step(datavolume(), no_slot=why)
    assert plan.status.phase is Phase.IMPORT_SCHEDULED and plan.start_attempt is None
    assert {c.type: c for c in plan.status.conditions}["Running"].reason == "WaitingForImportSlot"
    # A slot frees: it starts, and the waiting reason goes.
    plan = step(again(plan))
    assert plan.start_attempt == 0 and plan.status.reason is None


def test_admission_counts_hosts_and_the_total() -> None:
    assert no_slot("a", ["a", "a"], limit=0, per_host=2) is not None
    assert no_slot("b", ["a", "a"], limit=0, per_host=2) is None
    assert no_slot("b", ["a", "a"], limit=2, per_host=0) is not None
    assert no_slot(None, ["a"] * 50, limit=0, per_host=1) is None  # blank reads no host


def test_progress_halves_when_a_conversion_follows() -> None:
    running = datavolume(Status(phase=Phase.IMPORT_SCHEDULED, progress="N/A", restart_count=0))
    converting = pod("Running")
    converting["spec"]["containers"][0]["args"].append("--scratch-dir")
    sample = Sample(stage="download", bytes_done=50, bytes_total=100, throughput=0)
    assert step(running, pod=converting, sample=sample).status.progress == "25.00%"
    sample = Sample(stage="convert", bytes_done=50, bytes_total=100, throughput=0)
    assert step(running, pod=converting, sample=sample).status.progress == "75.00%"
    unknown = Sample(stage="download", bytes_done=50, bytes_total=None, throughput=0)
    assert step(running, pod=converting, sample=unknown).status.progress == "N/A"


def test_metrics_pages_parse_into_samples() -> None:
    stage = '# TYPE diskflow_import_stage gauge\ndiskflow_import_stage{stage="convert"} 1.0\n'
    page = (
        "# TYPE diskflow_import_done_bytes gauge\ndiskflow_import_done_bytes 512.0\n"
        "# TYPE diskflow_import_throughput_bytes_per_second gauge\n"
        "diskflow_import_throughput_bytes_per_second 7.5\n"
        "# TYPE kubevirt_cdi_import_progress_total counter\n"
        'kubevirt_cdi_import_progress_total{ownerUID="uid-1"} 100.0\n'
    ) + stage
    assert parse_metrics(page) == Sample("convert", 512, None, 7.5)  # no size: not known
    sized = page + "# TYPE diskflow_import_size_bytes gauge\ndiskflow_import_size_bytes 2048.0\n"
    assert parse_metrics(sized) == Sample("convert", 512, 2048, 7.5)
    # An importer of the previous release, still running while the controller is upgraded.
    previous = (
        "# TYPE diskflow_import_bytes_done gauge\ndiskflow_import_bytes_done 512.0\n"
        "# TYPE diskflow_import_bytes_total gauge\ndiskflow_import_bytes_total -1.0\n"
        "# TYPE diskflow_import_throughput_bytes gauge\ndiskflow_import_throughput_bytes 7.5\n"
    ) + stage
    assert parse_metrics(previous) == Sample("convert", 512, None, 7.5)
    assert parse_metrics("<html>bad gateway</html>") is None
    assert parse_metrics("") is None
