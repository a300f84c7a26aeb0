"""What happens next to a DataVolume, decided from what the cluster holds: a pure function
from observations (the DataVolume, its PVC, its importer pods, a progress sample) to a plan
(the status to write, objects to create or delete, events to post, when to look again).

Attempts are numbered by `status.restartCount`: attempt N runs in pod `importer-NAME-N`.
A transient failure raises the count; the failed pod stays until the next attempt starts, so
its end time, and so the backoff, survive a controller restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from importer.api import Condition, DataVolume, ImportSummary, Phase, Status
from importer.controller.config import ControllerConfig
from importer.controller.plan import pod_name
from importer.controller.scrape import Sample
from importer.outcome import Outcome
from importer.reasons import Reason

TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)
WAITING_FOR_SLOT = "WaitingForImportSlot"
WAITING_FOR_OBJECTS = "WaitingForObjects"
STARTING = ("False", "Pending", "the importer pod is starting")
UNBOUND = ("False", "Pending", "waiting for the PVC to bind")


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the cluster holds for one DataVolume, gathered by the operator."""

    dv: DataVolume
    pvc: dict[str, Any] | None
    pod: dict[str, Any] | None
    """The importer pod of the current attempt, if it exists."""
    previous: dict[str, Any] | None = None
    """The pod of the attempt before, until the next one starts."""
    binds_on_consumer: bool = False
    """The PVC's storage class waits for a first consumer (WaitForFirstConsumer)."""
    missing: tuple[str, ...] = ()
    """Secrets and ConfigMaps the import needs that do not exist ("Secret ns/name")."""
    no_slot: str | None = None
    """Why no importer may start now (admission limits); None: it may."""
    sample: Sample | None = None
    stalled: bool = False
    """The running import made no progress for the stall timeout."""
    now: float = 0.0
    """Seconds since the epoch."""


@dataclass(frozen=True)
class Plan:
    """What to do: write `status`, then create, start, delete, and post events."""

    status: Status
    create_pvc: bool = False
    start_attempt: int | None = None
    """Create the importer pod of this attempt."""
    delete_pods: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    wake_after: float | None = None
    """Seconds after which time alone changes the decision (a backoff ends)."""


def decide(seen: Observed, config: ControllerConfig) -> Plan:
    """The next step for `seen.dv`."""
    dv = seen.dv
    status = dv.status or Status(phase=Phase.PENDING, progress="N/A", restart_count=0)
    if status.phase in TERMINAL:
        return Plan(status)
    status = dataclasses.replace(status, claim_name=dv.name)
    step = _Step(seen, config, status)
    if seen.pvc is None:
        return step.plan(Phase.PENDING, create_pvc=True, bound=UNBOUND)
    bound = _pvc_phase(seen.pvc) == "Bound"
    if not bound:
        if seen.binds_on_consumer and not dv.bind_immediately:
            return step.plan(
                Phase.WAIT_FOR_FIRST_CONSUMER,
                bound=(
                    "False",
                    "WaitForFirstConsumer",
                    "the storage class binds the PVC when a pod first uses it",
                ),
            )
        if not seen.binds_on_consumer:
            return step.plan(
                Phase.PENDING, bound=("False", "Pending", "waiting for the PVC to bind")
            )
    step.bound = (
        ("True", "Bound", f"PVC {dv.name} Bound")
        if bound
        else ("False", "Pending", "the importer pod binds the PVC (immediate binding asked)")
    )
    if seen.pod is None:
        return step.no_pod()
    return step.with_pod(seen.pod)


@dataclass
class _Step:
    seen: Observed
    config: ControllerConfig
    status: Status
    bound: tuple[str, str, str] = ("False", "Pending", "")
    events: list[Event] = field(default_factory=list)

    @property
    def attempt(self) -> int:
        return self.status.restart_count

    def plan(
        self,
        phase: Phase,
        *,
        running: tuple[str, str, str] | None = None,
        bound: tuple[str, str, str] | None = None,
        **actions: Any,
    ) -> Plan:
        """A plan moving the DataVolume to `phase`, with its conditions and events."""
        old = self.status
        bound = bound or self.bound
        running = running or ("False", str(phase), "")
        ready = ("True", "Ready", "") if phase is Phase.SUCCEEDED else ("False", str(phase), "")
        conditions = _conditions(
            old.conditions, self.seen.now, Bound=bound, Running=running, Ready=ready
        )
        new = dataclasses.replace(old, phase=phase, conditions=conditions)
        if new.phase != old.phase and phase is not Phase.PENDING:  # Pending: nothing yet
            failed = phase is Phase.FAILED
            message = new.message if failed and new.message else _phase_message(phase, new)
            self.events.append(
                Event(
                    "Warning" if failed else "Normal",
                    str(new.reason) if failed else str(phase),
                    message,
                )
            )
        return Plan(new, events=tuple(self.events), **actions)

    def no_pod(self) -> Plan:
        seen, status = self.seen, self.status
        if status.phase is Phase.IMPORT_IN_PROGRESS:
            return self.transient(
                Reason.POD_LOST, f"importer pod {pod_name(self.seen.dv, self.attempt)} disappeared"
            )
        if seen.missing:
            what = ", ".join(seen.missing)
            if status.reason != WAITING_FOR_OBJECTS or status.message != f"waiting for {what}":
                self.events.append(Event("Warning", WAITING_FOR_OBJECTS, f"waiting for {what}"))
            self.status = dataclasses.replace(
                status, reason=WAITING_FOR_OBJECTS, message=f"waiting for {what}"
            )
            return self.plan(
                Phase.PVC_BOUND if _pvc_phase(seen.pvc) == "Bound" else Phase.PENDING,
                running=("False", WAITING_FOR_OBJECTS, f"waiting for {what}"),
            )
        previous = seen.previous
        if previous is not None and (ended := _finished_at(previous)) is not None:
            left = ended + self.config.backoff(self.attempt) - seen.now
            if left > 0:
                message = f"attempt {self.attempt + 1} in {left:.0f}s after {status.reason}"
                return self.plan(
                    Phase.IMPORT_SCHEDULED, running=("False", "Backoff", message), wake_after=left
                )
        if seen.no_slot:
            if status.reason != WAITING_FOR_SLOT:
                self.events.append(Event("Normal", WAITING_FOR_SLOT, seen.no_slot))
            self.status = dataclasses.replace(status, reason=WAITING_FOR_SLOT, message=seen.no_slot)
            return self.plan(
                Phase.IMPORT_SCHEDULED, running=("False", WAITING_FOR_SLOT, seen.no_slot)
            )
        if status.reason in (WAITING_FOR_SLOT, WAITING_FOR_OBJECTS):
            self.status = dataclasses.replace(status, reason=None, message=None)
        stale = (previous["metadata"]["name"],) if previous is not None else ()
        return self.plan(
            Phase.IMPORT_SCHEDULED,
            start_attempt=self.attempt,
            delete_pods=stale,
            running=STARTING,
        )

    def with_pod(self, pod: dict[str, Any]) -> Plan:
        phase = pod.get("status", {}).get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            return self.ended(pod)
        if phase != "Running":
            waiting = _container_state(pod).get("waiting", {})
            if "reason" not in waiting:  # as when it was made: no status write for nothing
                return self.plan(Phase.IMPORT_SCHEDULED, running=STARTING)
            return self.plan(
                Phase.IMPORT_SCHEDULED,
                running=("False", waiting["reason"], waiting.get("message", "")),
            )
        if self.seen.stalled:
            message = f"no progress for {self.config.stall_timeout:g}s; the importer pod is ended"
            return self.transient(Reason.STALLED, message, delete=(pod["metadata"]["name"],))
        self.status = _with_sample(self.status, self.seen.sample, converts=_converts(pod))
        return self.plan(Phase.IMPORT_IN_PROGRESS, running=("True", "Running", ""))

    def ended(self, pod: dict[str, Any]) -> Plan:
        name = pod["metadata"]["name"]
        if pod.get("status", {}).get("reason") == "Evicted":
            message = pod["status"].get("message") or "the node evicted the importer pod"
            return self.transient(Reason.EVICTED, message)
        terminated = _container_state(pod).get("terminated", {})
        if terminated.get("reason") == "OOMKilled":
            limit = _memory_limit(pod)
            return self.transient(
                Reason.OOM_KILLED,
                f"the importer went over its memory limit{f' of {limit}' if limit else ''}",
            )
        try:
            outcome = Outcome.parse(terminated.get("message") or "")
        except ValueError as exc:
            code = terminated.get("exitCode")
            return self.transient(
                Reason.IMPORTER_CRASHED,
                f"the importer exited with code {code} and no outcome: {exc}",
            )
        if outcome.ok:
            self.status = _succeeded(self.status, outcome)
            return self.plan(
                Phase.SUCCEEDED,
                running=("False", "Completed", ""),
                delete_pods=() if self.seen.dv.retain_pod else (name,),
            )
        reason, message = outcome.reason or Reason.IMPORTER_CRASHED, outcome.message
        if outcome.final:
            return self.fail(str(reason), message, stage=outcome.stage)
        return self.transient(str(reason), message)

    def transient(self, reason: str, message: str, *, delete: tuple[str, ...] = ()) -> Plan:
        """Count a transient failure: retry after a backoff, or fail past the retry limit."""
        limit = self.seen.dv.spec.retry_limit
        limit = self.config.retry_limit if limit is None else limit
        if self.attempt >= limit:
            return self.fail(
                str(Reason.RETRY_LIMIT_EXCEEDED),
                f"{limit} retries used; the last attempt: {message} [{reason}]",
                delete=delete,
            )
        self.status = dataclasses.replace(
            self.status, restart_count=self.attempt + 1, reason=reason, message=message
        )
        self.events.append(
            Event(
                "Warning",
                reason,
                f"{message}; retrying (attempt {self.attempt + 1} of {limit + 1})",
            )
        )
        return self.plan(
            Phase.IMPORT_SCHEDULED,
            running=("False", reason, message),
            delete_pods=delete,
            wake_after=self.config.backoff(self.attempt),
        )

    def fail(
        self, reason: str, message: str, *, stage: str | None = None, delete: tuple[str, ...] = ()
    ) -> Plan:
        self.status = dataclasses.replace(
            self.status,
            reason=reason,
            message=message,
            stage=stage or self.status.stage,
            throughput=None,
        )
        return self.plan(Phase.FAILED, running=("False", reason, message), delete_pods=delete)


def _succeeded(status: Status, outcome: Outcome) -> Status:
    result = outcome.result
    assert result is not None
    summary = ImportSummary(
        format=result.format,
        compression=result.compression,
        checksum_verified=result.checksum is not None,
        size=result.size,
        bytes_downloaded=result.bytes_downloaded,
        path=result.path,
        fallback=result.fallback,
    )
    return dataclasses.replace(
        status,
        progress="100.00%",
        stage=outcome.stage,
        reason=None,
        message=None,
        bytes_done=result.bytes_downloaded,
        bytes_total=result.bytes_downloaded,
        throughput=None,
        result=summary,
    )


def _with_sample(status: Status, sample: Sample | None, *, converts: bool) -> Status:
    """Progress from the importer's metrics: the download is the whole import, or its first
    half when a conversion follows; later stages show the stage and 100%."""
    if sample is None:
        return status
    share = 50.0 if converts else 100.0
    if sample.bytes_total is None or sample.bytes_total <= 0:
        progress = "N/A"
    else:
        done = min(1.0, sample.bytes_done / sample.bytes_total)
        if sample.stage == "download":
            progress = f"{done * share:.2f}%"
        elif sample.stage == "convert" and converts:
            progress = f"{share + done * (100 - share):.2f}%"
        else:
            progress = "100.00%"
    return dataclasses.replace(
        status,
        progress=progress,
        stage=sample.stage,
        bytes_done=sample.bytes_done,
        bytes_total=sample.bytes_total,
        throughput=int(sample.throughput),
    )


def _conditions(
    old: tuple[Condition, ...], now: float, **wanted: tuple[str, str, str]
) -> tuple[Condition, ...]:
    """CDI's Bound, Running and Ready conditions; a transition time moves only when the
    condition's status does."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = {c.type: c for c in old}
    made = []
    for kind, (state, reason, message) in wanted.items():
        prior = before.get(kind)
        moved = prior is None or prior.status != state
        made.append(
            Condition(
                type=kind,
                status=state,
                reason=reason,
                message=message,
                last_transition_time=stamp if moved else prior.last_transition_time,
                last_heartbeat_time=stamp
                if moved or prior.reason != reason or prior.message != message
                else prior.last_heartbeat_time,
            )
        )
    return tuple(made)


def _phase_message(phase: Phase, status: Status) -> str:
    return {
        Phase.WAIT_FOR_FIRST_CONSUMER: "the PVC waits for its first consumer",
        Phase.PVC_BOUND: f"PVC {status.claim_name} bound",
        Phase.IMPORT_SCHEDULED: "the importer pod is scheduled",
        Phase.IMPORT_IN_PROGRESS: "the import is running",
        Phase.SUCCEEDED: "the import succeeded",
    }.get(phase, str(phase))


def _pvc_phase(pvc: dict[str, Any] | None) -> str | None:
    return (pvc or {}).get("status", {}).get("phase")


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


def _finished_at(pod: dict[str, Any]) -> float | None:
    stamp = _container_state(pod).get("terminated", {}).get("finishedAt")
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _memory_limit(pod: dict[str, Any]) -> str | None:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return containers[0].get("resources", {}).get("limits", {}).get("memory")


def _converts(pod: dict[str, Any]) -> bool:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return "--scratch-dir" in (containers[0].get("args") or [])
