"""The Celery app: validate → install → finalize → boot test → publish as a chain of tasks.

Each task is a thin shell over the step of the same name in `pipelines.steps`. Settings that
matter for builds on KVM workers:
- `acks_late` with `reject_on_worker_lost`: a build whose worker dies is delivered again, to
  this or another worker, and runs from the start (nothing was published: publishing is the
  last step and writes the manifest last).
- one build per worker process and no prefetching: a KVM host runs as many installs as it has
  worker processes (`--concurrency`, default 1).
- a build cannot outlive the broker's visibility timeout, or Redis would hand it, still
  running, to a second worker: the install task lowers a longer build timeout to the worker's
  maximum (`DISKFLOW_MAX_BUILD_TIMEOUT`), and the worker refuses to start unless that maximum
  plus a margin fits in the visibility timeout (`WorkerSettings`). Concurrency does not enter
  it: with late acknowledgement and a prefetch multiplier of 1 a worker holds at most one
  unacknowledged message per pool process, so every unacknowledged message is a running task,
  whose clock (in Redis, from its delivery) starts with the task.
- the install disk stays on the worker that installed it, so the install task routes the rest
  of its chain (finalize, boot test, publish) to that worker's own queue.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery, Task, chain
from celery.result import AsyncResult
from celery.utils.nodenames import worker_direct
from kombu.exceptions import OperationalError

from importer.errors import FinalError, TransientError
from importer.events import Event
from importer.quantity import parse_duration
from importer.sources.http import redact_url
from pipelines.events import Emit, event, relay
from pipelines.steps import (
    BuildRequest,
    BuildState,
    boot_test_step,
    finalize_step,
    install_step,
    publish_step,
    validate_step,
)

BROKER_ENV = "DISKFLOW_BROKER_URL"
RESULT_ENV = "DISKFLOW_RESULT_URL"
CONCURRENCY_ENV = "DISKFLOW_WORKER_CONCURRENCY"
VISIBILITY_ENV = "DISKFLOW_VISIBILITY_TIMEOUT"
MAX_BUILD_TIMEOUT_ENV = "DISKFLOW_MAX_BUILD_TIMEOUT"
BUILD_MARGIN_ENV = "DISKFLOW_BUILD_MARGIN"
DEFAULT_BROKER = "redis://localhost:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 4 * 3600
# What an install task spends outside its build timeout, which the visibility timeout must
# cover too: the checks before the guest starts (libvirt, osinfo, the sweep for orphans) and,
# once the timeout strikes, stopping virt-install and destroying the domain (each with its own
# timeout of up to a minute), then the acknowledgement.
BUILD_MARGIN_SECONDS = 600
QUEUE = "diskflow-templates"
KEPT_EVENTS = 200  # per task, in its PROGRESS state: enough to follow a console
STATE_INTERVAL = 1.0  # seconds between task-state writes for console lines
CHATTY = {"console", "installer", "progress", "info"}
POLL_SECONDS = 0.5
NO_WORKER_WARNING_SECONDS = 30.0
PING_SECONDS = 30.0  # how often a follower checks that the worker holding the disk lives

log = logging.getLogger("diskflow.tasks")


class InvalidSettings(FinalError):
    """A worker setting in the environment is not usable; the message names it."""

    def __init__(self, message: str) -> None:
        super().__init__("InvalidArgument", message)


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's settings, read from its environment and checked together."""

    concurrency: int = 1
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    max_build_timeout: int = DEFAULT_VISIBILITY_TIMEOUT - BUILD_MARGIN_SECONDS
    # DISKFLOW_MEDIA_DIRS: where a queued build's iso/kernel/initrd may be (none by default).
    # The validate step reads it itself (pipelines.bundle.media_dirs); here it is checked
    # when the worker starts, so a bad value stops the worker rather than every build.
    media_dirs: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """The settings, or InvalidSettings naming the variable and the rule it breaks."""

        def number(name: str, default: int, minimum: int = 1) -> int:
            text = environ.get(name)
            if text is None:
                return default
            if text.strip().isdecimal() and int(text) >= minimum:
                return int(text)
            raise InvalidSettings(f"{name}={text!r}: must be a whole number, at least {minimum}")

        def seconds(name: str, default: int, minimum: int = 1) -> int:
            """A time: 4h, 90m, 600s or a number of seconds (whole: Redis counts in them)."""
            text = environ.get(name)
            if text is None:
                return default
            try:
                value = parse_duration(text)
            except FinalError as e:
                raise InvalidSettings(f"{name}={text!r}: {e.message}") from None
            if value != int(value) or value < minimum:
                raise InvalidSettings(
                    f"{name}={text!r}: must be a whole number of seconds, at least {minimum}"
                )
            return int(value)

        visibility = seconds(VISIBILITY_ENV, DEFAULT_VISIBILITY_TIMEOUT)
        margin = seconds(BUILD_MARGIN_ENV, BUILD_MARGIN_SECONDS, minimum=0)
        if visibility <= margin:
            raise InvalidSettings(
                f"{VISIBILITY_ENV}={visibility} leaves no time for a build: it must exceed the "
                f"{margin}s an install task needs besides its build ({BUILD_MARGIN_ENV})"
            )
        max_build = seconds(MAX_BUILD_TIMEOUT_ENV, visibility - margin)
        if max_build + margin > visibility:
            raise InvalidSettings(
                f"{MAX_BUILD_TIMEOUT_ENV}={max_build} plus the {margin}s an install task needs "
                f"besides its build ({BUILD_MARGIN_ENV}) exceeds {VISIBILITY_ENV}={visibility}: "
                "Redis would hand a build still running to a second worker. Lower the first "
                f"(at most {visibility - margin}) or raise the second."
            )
        from pipelines.bundle import media_dirs

        try:
            media = tuple(str(d) for d in media_dirs(environ))
        except FinalError as e:
            raise InvalidSettings(e.message) from None
        return cls(number(CONCURRENCY_ENV, 1), visibility, max_build, media)


def make_app(settings: WorkerSettings, broker: str | None = None) -> Celery:
    """The Celery app, configured from `settings` and the environment (`DISKFLOW_BROKER_URL`)."""
    broker = broker or os.environ.get(BROKER_ENV, DEFAULT_BROKER)
    # A dead worker's build is run again this long after it was delivered.
    visibility = settings.visibility_timeout
    celery = Celery("diskflow", broker=broker, backend=os.environ.get(RESULT_ENV, broker))
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.concurrency,
        worker_direct=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # Sweep for the deliveries of dead workers often enough to notice them soon
            # after the visibility timeout, whatever its length.
            "unacked_restore_interval": max(1, min(10, visibility // 10)),
            "unacked_restore_throttle": 1,
        },
    )
    return celery


settings = WorkerSettings.from_environment()
app = make_app(settings)


class StepTask(Task):
    """A step of a build: its events become the task's PROGRESS state and worker log lines.

    A task returns {"state": ..., "run": ..., "events": [...]}: the next task reads the state,
    a follower the events it has not seen yet (a step may end between two of its polls).
    """

    def run_step(
        self, step: Callable[[Any, Emit], BuildState], given: Any
    ) -> tuple[BuildState, dict[str, Any]]:
        events: list[dict[str, Any]] = []
        count, written, last_write = 0, 0, 0.0
        # A task delivered again (its worker died) starts its events afresh: followers tell
        # the runs apart by this id.
        run = f"{self.request.hostname}/{uuid.uuid4().hex[:8]}"

        def emit(stage: str, kind: str, message: str, **fields: Any) -> None:
            nonlocal count, written, last_write
            count += 1
            made = event(stage, kind, message, **fields)
            events.append(made.to_json() | {"seq": count})
            del events[:-KEPT_EVENTS]
            # At the event's level, so that the worker's --log-level chooses among them too.
            log.log(made.level.logging_level, "%s %s: %s", stage, kind, message,
                    extra={"event": made})  # fmt: skip
            now = time.monotonic()
            # Chatty lines are batched, but never so many that the kept window drops some
            # before a follower could see them (a kernel boots in a burst).
            if (
                kind not in CHATTY
                or now - last_write > STATE_INTERVAL
                or count - written >= KEPT_EVENTS // 2
            ):
                written, last_write = count, now
                self.update_state(state="PROGRESS", meta={"run": run, "events": events})

        state = step(given, emit)
        return state, {"state": state.to_json(), "run": run, "events": events}


@app.task(base=StepTask, bind=True, name="diskflow.validate")
def validate(self: StepTask, request: dict[str, Any]) -> dict[str, Any]:
    """Validate the kickstart, work out the build id, and skip a published build."""
    return self.run_step(validate_step, BuildRequest.from_json(request))[1]


@app.task(base=StepTask, bind=True, name="diskflow.install")
def install(self: StepTask, previous: dict[str, Any]) -> dict[str, Any]:
    """Run the unattended install, in this worker's time limit; pin the rest of the chain to
    this worker."""

    def step(state: BuildState, emit: Emit) -> BuildState:
        return install_step(within_max_build_time(state, settings, emit), emit)

    result = self.run_step(step, BuildState.from_json(previous["state"]))[1]
    queue = worker_direct(self.request.hostname).name
    for signature in self.request.chain or []:
        signature.setdefault("options", {})["queue"] = queue
    return result


def within_max_build_time(state: BuildState, limits: WorkerSettings, emit: Emit) -> BuildState:
    """`state` with an install or boot test timeout longer than the worker allows lowered to
    its maximum: each runs in a task of its own, within the broker's visibility timeout."""
    build = state.request.build
    for name, what in (("timeout", "build"), ("boot_timeout", "boot test")):
        asked = getattr(build, name)
        if state.skipped or asked <= limits.max_build_timeout:
            continue
        emit("install", "warning", f"the {what}'s timeout of {asked:.0f}s is lowered to "
             f"{limits.max_build_timeout}s, this worker's maximum ({MAX_BUILD_TIMEOUT_ENV}), "
             "which keeps a task within the broker's visibility timeout of "
             f"{limits.visibility_timeout}s ({VISIBILITY_ENV})")  # fmt: skip
        build = replace(build, **{name: float(limits.max_build_timeout)})
    return replace(state, request=replace(state.request, build=build))


@app.task(base=StepTask, bind=True, name="diskflow.finalize")
def finalize(self: StepTask, previous: dict[str, Any]) -> dict[str, Any]:
    """Seal, compress and checksum the installed disk."""
    return self.run_step(finalize_step, BuildState.from_json(previous["state"]))[1]


@app.task(base=StepTask, bind=True, name="diskflow.boot_test")
def boot_test(self: StepTask, previous: dict[str, Any]) -> dict[str, Any]:
    """Boot the finished image once and wait for its marker; write its manifest."""
    return self.run_step(boot_test_step, BuildState.from_json(previous["state"]))[1]


@app.task(base=StepTask, bind=True, name="diskflow.publish")
def publish(self: StepTask, previous: dict[str, Any]) -> dict[str, Any]:
    """Upload the template, its checksum and its manifest; the manifest goes last."""
    return self.run_step(publish_step, BuildState.from_json(previous["state"]))[1]


def submit(request: BuildRequest) -> list[AsyncResult]:
    """Queue the build; returns the results of its tasks, in order."""
    packed = request.packed().to_json()
    check_broker()
    steps = (validate.s(packed), install.s(), finalize.s(), boot_test.s(), publish.s())
    last = chain(*steps).apply_async()
    results = [last]
    while results[0].parent is not None:
        results.insert(0, results[0].parent)
    return results


def check_broker() -> None:
    """Raise a clear transient error unless the broker answers (Celery would retry for long)."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
    except OperationalError as e:
        raise TransientError(
            "BrokerUnreachable",
            f"cannot reach the broker at {redact_url(app.conf.broker_url)}: {e} (set {BROKER_ENV})",
        ) from None


def follow(results: list[AsyncResult], emit: Emit) -> BuildState:
    """Pass on each task's events as they arrive; return the final state or raise the failure."""
    waiting_since = time.monotonic()
    holder: str | None = None  # the worker with the installed disk, once there is one
    for result in results:
        seen, run = 0, None
        checked = time.monotonic()
        while True:
            status, info = result.state, result.info
            if status == "PENDING" and holder and time.monotonic() - checked > PING_SECONDS:
                checked = time.monotonic()
                if not app.control.ping(destination=[holder], timeout=5.0):
                    raise TransientError(
                        "WorkerLost",
                        f"worker {holder}, which holds the installed disk, does not answer: "
                        "run the build again",
                    )
            unclaimed = time.monotonic() - (waiting_since or time.monotonic())
            if status == "PENDING" and unclaimed > NO_WORKER_WARNING_SECONDS:
                emit("queue", "warning", f"no worker has taken the build yet (queue {QUEUE}); "
                     "start one with `diskflow worker`")  # fmt: skip
                waiting_since = None  # said once
            if status in ("PROGRESS", "SUCCESS") and isinstance(info, dict):
                if info.get("run") != run:
                    if run is not None:
                        emit("queue", "warning", f"{result.name or 'task'} runs again on "
                             f"{info['run'].split('/')[0]}: its first worker was lost")  # fmt: skip
                    seen, run = 0, info.get("run")
                for item in info.get("events", []):
                    if item["seq"] > seen:
                        seen = item["seq"]
                        relay(emit)(Event.from_json(item))
            if status == "SUCCESS":
                if result.name == install.name:
                    holder = info["run"].split("/")[0]
                break
            if status in ("FAILURE", "REVOKED"):
                raise info if isinstance(info, BaseException) else RuntimeError(str(info))
            time.sleep(POLL_SECONDS)  # the result backend has no push notification to wait on
    return BuildState.from_json(results[-1].result["state"])
