"""The kopf operator: watches DataVolumes, their PVCs and importer pods, and carries out
what `decide` plans. Handlers only record what they see and reconcile the DataVolume it
concerns; a periodic tick scrapes running importers' progress and wakes DataVolumes whose
backoff ended or that wait for an import slot."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.web
import kopf

from importer.api import (
    GROUP,
    PLURAL,
    VERSION,
    BlankSource,
    DataVolume,
    HttpSource,
    Phase,
    S3Source,
    Status,
)
from importer.capacity import required_volume_size
from importer.controller.admission import no_slot
from importer.controller.config import ControllerConfig
from importer.controller.decide import (
    TERMINAL,
    WAITING_FOR_OBJECTS,
    WAITING_FOR_SLOT,
    Event,
    Observed,
    Plan,
    decide,
)
from importer.controller.kube import Kube
from importer.controller.lease import Lease
from importer.controller.metrics import ControllerMetrics
from importer.controller.plan import (
    DV_UID_LABEL,
    MANAGED_BY,
    SOURCE_HOST_ANNOTATION,
    Scratch,
    cert_config_map,
    claim_name,
    plan_pod,
    plan_pvc,
    pod_name,
    source_host,
    volume_size,
)
from importer.controller.scrape import Sample, parse_metrics
from importer.controller.store import Body, Store
from importer.errors import Failure
from importer.pipeline import ContentType, ImportOptions, Probe, probe
from importer.progress import bind_failure
from importer.quantity import parse_quantity
from importer.reasons import Reason
from importer.sources import HttpOptions, S3Options
from importer.sources.http import parse_header

log = logging.getLogger("diskflow.controller")
KEEP_PVC_FINALIZER = "diskflow.io/keep-pvc"
METRICS_PAGE_LIMIT = 64 << 10  # bytes of an importer's metrics page read at most
PROBE_TTL = 600.0  # seconds a probe's answer about a source stands
PROGRESS_FIELDS = ("progress", "stage", "bytes_done", "bytes_total", "throughput")
_MANAGED = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())


@dataclass(frozen=True)
class Scope:
    """Where the controller acts, and how it stays the only one acting."""

    namespaces: tuple[str, ...] = ()
    """Empty: every namespace (cluster-wide)."""
    lease_namespace: str | None = None
    """Hold a Lease here before acting (several replicas); None: act at once."""
    lease_name: str = "diskflow-controller"
    health_addr: str = "0.0.0.0"
    health_port: int | None = None
    """Serve /healthz here (liveness and readiness); None: not at all."""
    metrics_addr: str = "0.0.0.0"
    metrics_port: int | None = None


class Controller:
    """The state one controller process keeps between events."""

    def __init__(self, config: ControllerConfig, kube: Kube, scope: Scope) -> None:
        self.config, self.kube, self.scope = config, kube, scope
        self.store = Store()
        self.metrics = ControllerMetrics()
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.samples: dict[str, Sample] = {}
        self.marks: dict[str, tuple[tuple[str, int], float]] = {}  # progress, since when
        self.written: dict[str, float] = {}  # last status write (monotonic)
        self.wake: dict[str, float] = {}  # reconcile again at (epoch seconds)
        self.starting: dict[str, str | None] = {}  # dv uid → source host, pods being made
        self.probes: dict[tuple[Any, ...], tuple[asyncio.Future[bool | str], float]] = {}
        self.classes: dict[str, tuple[bool, float]] = {}  # binds on consumer?, when read
        self.default: tuple[str | None, float] | None = None  # the default class, when read
        self.tasks: list[asyncio.Task[None]] = []
        self.ticking: asyncio.Task[None] | None = None

    # Events

    async def on_datavolume(self, event: dict[str, Any]) -> None:
        self.tick_in_handler_context()
        body = event["object"]
        if event["type"] == "DELETED":
            # Its PVC goes by garbage collection, but a running importer keeps a PVC in use
            # (and so Terminating): end the pods now.
            await self.end_pods(body)
            self.forget(body)
            return
        before = self.store.datavolumes.get(body["metadata"]["uid"])
        if self.store.known(body) or not self.store.put(body):
            return  # the echo of its own status write, or older than what it knows
        if before is not None and _spec_changed_after_the_end(before, body):
            message = "the import has ended: a changed spec is ignored (make a new DataVolume)"
            self.post(body, Event("Warning", "SpecChangeIgnored", message))
        if body["metadata"].get("deletionTimestamp"):
            await self.release(body)
        else:
            await self.reconcile(body["metadata"]["uid"])

    async def on_owned(self, event: dict[str, Any]) -> None:
        self.tick_in_handler_context()
        body = event["object"]
        if event["type"] == "DELETED":
            self.store.remove(body)
        elif not self.store.put(body):
            return
        owner = body["metadata"].get("labels", {}).get(DV_UID_LABEL)
        if owner in self.store.datavolumes:
            await self.reconcile(owner)
        ended = event["type"] == "DELETED" or _phase(body) in ("Succeeded", "Failed")
        if body.get("kind") == "Pod" and ended:
            await self.admit_waiting()

    async def admit_waiting(self) -> None:
        """An importer ended, so a slot may be free: hand it to the oldest DataVolume
        waiting for one now rather than at the next tick."""
        waiting = sorted(
            (b for b in self.store.datavolumes.values() if _reason(b) == WAITING_FOR_SLOT),
            key=lambda b: b["metadata"].get("creationTimestamp", ""),
        )
        for body in waiting:
            uid = body["metadata"]["uid"]
            await self.reconcile(uid)
            if _reason(self.store.datavolumes.get(uid)) == WAITING_FOR_SLOT:
                return  # no slot left for it: none for the younger ones either

    def forget(self, body: Body) -> None:
        uid = body["metadata"]["uid"]
        self.store.remove(body)
        for memory in (self.samples, self.marks, self.written, self.wake, self.locks):
            memory.pop(uid, None)

    # Reconciling

    async def reconcile(self, uid: str) -> None:
        """Bring one DataVolume a step further."""
        async with self.locks[uid]:
            body = self.store.datavolumes.get(uid)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            started = time.monotonic()
            try:
                dv = DataVolume.from_manifest(body)
            except Failure as exc:
                await self.refuse(body, exc)
                return
            if dv.keep_pvc and KEEP_PVC_FINALIZER not in body["metadata"].get("finalizers", []):
                await self.add_finalizer(body)
            try:
                await self.carry_out(body, dv, decide(await self.observe(dv), self.config))
            finally:
                self.starting.pop(uid, None)  # the slot is the pod's now, or not needed
            self.metrics.reconcile.observe(time.monotonic() - started)

    async def observe(self, dv: DataVolume) -> Observed:
        """Gather what `decide` needs: from the store, and from the API only where the
        answer matters now (a storage class, Secrets an import is about to need)."""
        assert dv.uid is not None
        status = dv.status
        attempt = status.restart_count if status else 0
        pods = self.store.owned(dv.uid, "Pod")
        pod = pods.get(pod_name(dv, attempt))
        if pod is None and status is not None and status.phase is Phase.IMPORT_IN_PROGRESS:
            # Gone, or not seen yet (a restarted controller's watches may bring the
            # DataVolume before its pod): ask before calling it lost.
            pod = await self.kube.read("Pod", dv.namespace, pod_name(dv, attempt))
            if pod is not None:
                pod.setdefault("kind", "Pod")
                self.store.put(pod)
        previous = pods.get(pod_name(dv, attempt - 1)) if attempt else None
        pvc = self.store.owned(dv.uid, "PersistentVolumeClaim").get(claim_name(dv))
        bound = _phase(pvc) == "Bound"
        on_consumer = pvc is not None and not bound and await self.binds_on_consumer(pvc)
        phase = status.phase if status else Phase.PENDING
        may_start = (
            pod is None
            and pvc is not None
            and (bound or (on_consumer and dv.bind_immediately))
            and phase not in (*TERMINAL, Phase.IMPORT_IN_PROGRESS)
        )
        missing = await self.missing(dv) if may_start else ()
        return Observed(
            dv=dv,
            pvc=pvc,
            pod=pod,
            previous=previous,
            binds_on_consumer=on_consumer,
            missing=missing,
            no_slot=self.reserve(dv) if may_start else None,
            sample=self.samples.get(dv.uid),
            stalled=self.stalled(dv.uid, pod),
            now=time.time(),
        )

    async def carry_out(self, body: Body, dv: DataVolume, plan: Plan) -> None:
        assert dv.uid is not None and dv.namespace is not None
        pvc = self.store.owned(dv.uid, "PersistentVolumeClaim").get(claim_name(dv))
        if plan.create_pvc:
            pvc = await self.create(plan_pvc(dv, self.config))
        if plan.start_attempt is not None and pvc is not None:
            await self.start(dv, pvc, plan.start_attempt)
        for name in plan.delete_pods:
            await self.kube.delete_pod(dv.namespace, name)
        await self.write_status(dv, plan.status)
        for event in plan.events:
            self.post(body, event)
        if plan.wake_after is not None:
            self.wake[dv.uid] = time.time() + plan.wake_after

    async def start(self, dv: DataVolume, pvc: Body, attempt: int) -> None:
        """Create the importer pod of `attempt` (adopting one of that name if it exists)."""
        assert dv.uid is not None
        scratch = await self.scratch_for(dv)
        block = dv.spec.storage.block
        capacity = pvc.get("status", {}).get("capacity", {}).get("storage")
        size = (
            None
            if block
            else parse_quantity(capacity)
            if capacity
            else volume_size(dv, self.config)
        )
        pod = plan_pod(dv, pvc, attempt=attempt, size=size, scratch=scratch, config=self.config)
        await self.create(pod)

    async def create(self, obj: Body) -> Body | None:
        """Create `obj`, or read the one of its name that exists already."""
        made = await self.kube.create(obj)
        meta = obj["metadata"]
        made = made or await self.kube.read(obj["kind"], meta["namespace"], meta["name"])
        if made is not None:
            made.setdefault("kind", obj["kind"])
            self.store.put(made)
        return made

    async def write_status(self, dv: DataVolume, status: Status) -> None:
        """Write `status` if it changed; progress alone at most every status_interval."""
        assert dv.uid is not None and dv.namespace is not None
        old = dv.status
        if status == old:
            return
        now = time.monotonic()
        if old is not None:
            same = dataclasses.replace(status, **{f: getattr(old, f) for f in PROGRESS_FIELDS})
            recent = now - self.written.get(dv.uid, 0.0) < self.config.status_interval
            if same == old and recent:
                return
            if status.restart_count > old.restart_count:
                self.metrics.retries.inc()
        made = await self.kube.patch_datavolume(
            dv.namespace, dv.name, {"status": status.to_patch(old)}, status=True
        )
        if made is not None:
            self.store.put(made)
            self.written[dv.uid] = now

    def post(self, body: Body, event: Event) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    async def refuse(self, body: Body, failure: Failure) -> None:
        """A DataVolume the model refuses (the CRD schema lets through what it cannot
        check): Failed, saying which field is wrong."""
        meta = body["metadata"]
        if body.get("status", {}).get("phase") == str(Phase.FAILED):
            return
        status = Status(
            phase=Phase.FAILED,
            progress="N/A",
            restart_count=0,
            reason=failure.reason,
            message=failure.message,
        )
        await self.kube.patch_datavolume(
            meta["namespace"], meta["name"], {"status": status.to_dict()}, status=True
        )
        self.post(body, Event("Warning", failure.reason, failure.message))

    # What observing needs

    async def binds_on_consumer(self, pvc: Body) -> bool:
        """Whether the PVC's storage class binds it only for a first consumer (cached 60 s)."""
        name = pvc.get("spec", {}).get("storageClassName")
        if name is None:
            name = await self.default_class()
            if name is None:
                return False
        cached = self.classes.get(name)
        if cached is not None and time.monotonic() - cached[1] < 60:
            return cached[0]
        found = await self.kube.read("StorageClass", None, name)
        waits = (found or {}).get("volumeBindingMode") == "WaitForFirstConsumer"
        self.classes[name] = (waits, time.monotonic())
        return waits

    async def default_class(self) -> str | None:
        """The default StorageClass's name (cached 60 s, as a named class is)."""
        if self.default is not None and time.monotonic() - self.default[1] < 60:
            return self.default[0]
        name = None
        for sc in await self.kube.storage_classes():
            annotations = sc["metadata"].get("annotations", {})
            if annotations.get("storageclass.kubernetes.io/is-default-class") == "true":
                name = str(sc["metadata"]["name"])
                break
        self.default = (name, time.monotonic())
        return name

    async def missing(self, dv: DataVolume) -> tuple[str, ...]:
        """The Secrets and ConfigMaps the import mounts that do not exist."""
        source, needed = dv.spec.source, []
        if isinstance(source, HttpSource | S3Source):
            if source.secret_ref:
                needed.append(("Secret", source.secret_ref))
            if ca := cert_config_map(source, self.config):
                needed.append(("ConfigMap", ca))
        if isinstance(source, HttpSource):
            needed += [("Secret", name) for name in source.secret_extra_headers]
        absent = []
        for kind, name in needed:
            if await self.kube.read(kind, dv.namespace, name) is None:
                absent.append(f"{kind} {dv.namespace}/{name}")
        return tuple(absent)

    def reserve(self, dv: DataVolume) -> str | None:
        """Take an import slot for `dv` (at once: no other reconcile may see it free in
        between), or say why there is none. The reconcile gives it back once it is done:
        by then the pod exists and counts itself."""
        assert dv.uid is not None
        why = self.no_slot(dv)
        if why is None:
            self.starting[dv.uid] = source_host(dv)
        return why

    def no_slot(self, dv: DataVolume) -> str | None:
        if not self.config.max_imports and not self.config.max_imports_per_host:
            return None
        running = [
            pod["metadata"].get("annotations", {}).get(SOURCE_HOST_ANNOTATION)
            for pod in self.active_pods()
        ]
        running += [host for uid, host in self.starting.items() if uid != dv.uid]
        return no_slot(
            source_host(dv),
            running,
            limit=self.config.max_imports,
            per_host=self.config.max_imports_per_host,
        )

    def active_pods(self) -> list[Body]:
        return [pod for pod in self.store.pods() if _phase(pod) not in ("Succeeded", "Failed")]

    def stalled(self, uid: str, pod: Body | None) -> bool:
        if pod is None or _phase(pod) != "Running":
            return False
        mark = self.marks.get(uid)
        return mark is not None and time.monotonic() - mark[1] > self.config.stall_timeout

    async def scratch_for(self, dv: DataVolume) -> Scratch | None:
        """Scratch space, decided before the pod starts: none for what streams (raw and iso,
        compressed or not; qcow2, vmdk, vhd and vdi whose header a decoder takes; archives;
        blank), sized by the request for what converts. The source is probed from here to
        tell; where it cannot be, scratch is given anyway. An attempt that found the image
        cannot stream after all (NeedsScratch) is followed by one with scratch space."""
        source = dv.spec.source
        if isinstance(source, BlankSource) or dv.spec.content_type is ContentType.ARCHIVE:
            return None
        scratch = Scratch(required_volume_size(dv.spec.storage.request))
        if dv.status is not None and dv.status.reason == Reason.NEEDS_SCRATCH:
            return scratch  # the last attempt found that this image cannot stream
        if not self.config.probe:
            why = "probing is off (--no-probe)"
        elif (
            source.secret_ref
            or source.cert_config_map
            or (isinstance(source, HttpSource) and source.secret_extra_headers)
        ):
            why = "the source needs credentials or a CA the controller does not read"
        else:
            found = await self.probe(dv)
            if isinstance(found, bool):
                return scratch if found else None
            why = f"probing the source failed ({found})"
        assert dv.uid is not None
        message = f"a scratch volume is given because {why}"
        self.post(self.store.datavolumes[dv.uid], Event("Normal", "ScratchAssumed", message))
        return scratch

    async def probe(self, dv: DataVolume) -> bool | str:
        """Whether `dv`'s source needs scratch space, or why that could not be told. Each
        source is probed once and remembered for PROBE_TTL: a batch of DataVolumes of one
        image costs one probe, not one each."""
        now = time.monotonic()
        for stale in [k for k, (_, when) in self.probes.items() if now - when > PROBE_TTL]:
            del self.probes[stale]
        key = _source_key(dv)
        if key not in self.probes:
            self.probes[key] = (asyncio.ensure_future(self._probe_once(dv)), now)
        return await asyncio.shield(self.probes[key][0])

    async def _probe_once(self, dv: DataVolume) -> bool | str:
        try:
            found = await asyncio.wait_for(asyncio.to_thread(_probe, dv), self.config.probe_timeout)
        except (Failure, OSError, TimeoutError) as exc:
            return _describe(exc)
        return bool(found.needs_scratch)

    # Deletion

    async def add_finalizer(self, body: Body) -> None:
        meta = body["metadata"]
        finalizers = [*meta.get("finalizers", []), KEEP_PVC_FINALIZER]
        made = await self.kube.patch_datavolume(
            meta["namespace"], meta["name"], {"metadata": {"finalizers": finalizers}}
        )
        if made is not None:
            self.store.put(made)

    async def end_pods(self, body: Body) -> None:
        """Delete a DataVolume's importer pods."""
        meta = body["metadata"]
        for name in self.store.owned(meta["uid"], "Pod"):
            await self.kube.delete_pod(meta["namespace"], name)

    async def release(self, body: Body) -> None:
        """A DataVolume being deleted that keeps its PVC: stop its importer, let the PVC go
        free of its owner, then let the DataVolume go."""
        meta = body["metadata"]
        if KEEP_PVC_FINALIZER not in meta.get("finalizers", []):
            return
        uid, namespace = meta["uid"], meta["namespace"]
        await self.end_pods(body)
        for name in self.store.owned(uid, "PersistentVolumeClaim"):
            await self.kube.patch_pvc(namespace, name, {"metadata": {"ownerReferences": None}})
        rest = [f for f in meta.get("finalizers", []) if f != KEEP_PVC_FINALIZER]
        await self.kube.patch_datavolume(
            namespace, meta["name"], {"metadata": {"finalizers": rest}}
        )

    # Leading

    async def lead(self) -> None:
        """Hold the lease (if any), then start the tick; exit the process if the lease is
        lost, so that only the leader ever acts."""
        if self.scope.lease_namespace is not None:
            identity = f"{socket.gethostname()}-{os.getpid()}"
            lease = Lease(self.kube, self.scope.lease_namespace, self.scope.lease_name, identity)
            await lease.acquire()

            async def hold() -> None:
                await lease.hold()
                log.error("lost the lease: exiting so that only the leader acts")
                os._exit(1)  # the Deployment restarts the process, as a follower

            self.tasks.append(asyncio.create_task(hold()))

    async def stop(self) -> None:
        """Stop the tick and the lease's renewal (kopf waits for what still runs)."""
        tasks = [t for t in (*self.tasks, self.ticking) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def tick_in_handler_context(self) -> None:
        """Start the tick from a handler: a task copies its creator's context, and kopf's
        event posting works only in the handlers' context."""
        if self.ticking is None:
            self.ticking = asyncio.create_task(self.tick_forever())

    # The tick

    async def tick_forever(self) -> None:
        """Scrape running importers; reconcile what time alone moves on. Oldest first, so
        that import slots go to DataVolumes in the order they were made."""
        timeout = aiohttp.ClientTimeout(total=min(2.0, self.config.progress_interval))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self.config.progress_interval)
                await self.tick(session)

    async def tick(self, session: aiohttp.ClientSession) -> None:
        running = [pod for pod in self.active_pods() if _phase(pod) == "Running"]
        await asyncio.gather(*(self.scrape(session, pod) for pod in running))
        now = time.time()
        bodies = sorted(
            self.store.datavolumes.values(),
            key=lambda b: b["metadata"].get("creationTimestamp", ""),
        )
        for body in bodies:
            uid = body["metadata"]["uid"]
            status = body.get("status", {})
            due = self.wake.get(uid, float("inf")) <= now
            # Only what time alone moves: progress, a backoff's end, a slot or Secret that
            # may have come; every other change arrives as an event.
            if (
                due
                or status.get("phase") == Phase.IMPORT_IN_PROGRESS
                or status.get("reason") in (WAITING_FOR_SLOT, WAITING_FOR_OBJECTS)
            ):
                self.wake.pop(uid, None)
                try:
                    await self.reconcile(uid)
                except Exception:  # one DataVolume's trouble must not stop the others'
                    log.exception("reconciling %s failed", _describe_body(body))
        self.metrics.count(
            (b.get("status", {}).get("phase", "Pending") for b in self.store.datavolumes.values()),
            len(self.active_pods()),
        )

    async def scrape(self, session: aiohttp.ClientSession, pod: Body) -> None:
        uid = pod["metadata"]["labels"][DV_UID_LABEL]
        ip = pod.get("status", {}).get("podIP")
        sample = None
        if ip:
            host = f"[{ip}]" if ":" in ip else ip
            try:
                async with session.get(f"http://{host}:{self.config.metrics_port}/metrics") as r:
                    # A pod is not trusted with the controller's memory: a page is a few
                    # hundred bytes, and a longer one is no page of the importer's.
                    page = await r.content.read(METRICS_PAGE_LIMIT + 1)
                    ok = r.status == 200 and len(page) <= METRICS_PAGE_LIMIT
                    sample = parse_metrics(page.decode(errors="replace")) if ok else None
            except (aiohttp.ClientError, TimeoutError):
                sample = None
        now = time.monotonic()
        if sample is not None:
            self.samples[uid] = sample
            mark = (sample.stage, sample.bytes_done)
            if self.marks.get(uid, ((), 0.0))[0] != mark:
                self.marks[uid] = (mark, now)
        else:
            self.marks.setdefault(uid, (("", -1), now))


def _probe(dv: DataVolume) -> Probe:
    """Probe `dv`'s source as its importer will open it (headers, TLS, S3 store)."""
    source = dv.spec.source
    http, s3 = HttpOptions(retries=1), S3Options()
    if isinstance(source, HttpSource):
        headers = tuple(parse_header(h, where="extraHeaders") for h in source.extra_headers)
        http = HttpOptions(retries=1, headers=headers, insecure=source.insecure_skip_verify)
    else:
        assert isinstance(source, S3Source)
        s3 = S3Options(cdi_url=True, endpoint=source.endpoint, region=source.region)
    return probe(source.url, ImportOptions(http=http, s3=s3, content_type=dv.spec.content_type))


def _source_key(dv: DataVolume) -> tuple[Any, ...]:
    """What a probe's answer depends on: the source as the probe opens it."""
    source = dv.spec.source
    if isinstance(source, HttpSource):
        where: tuple[Any, ...] = (source.extra_headers, source.insecure_skip_verify)
    else:
        assert isinstance(source, S3Source)
        where = (source.endpoint, source.region)
    return (type(source).__name__, source.url, *where, dv.spec.content_type)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Failure):
        return f"{exc.message} [{exc.reason}]"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def _spec_changed_after_the_end(before: Body, after: Body) -> bool:
    phase = before.get("status", {}).get("phase")
    generations = (before["metadata"].get("generation"), after["metadata"].get("generation"))
    return phase in TERMINAL and generations[0] != generations[1]


def _describe_body(body: Body) -> str:
    meta = body["metadata"]
    return f"{body.get('kind', 'object')} {meta.get('namespace')}/{meta.get('name')}"


def _reason(obj: Body | None) -> str | None:
    return (obj or {}).get("status", {}).get("reason")


def _phase(obj: Body | None) -> str | None:
    return (obj or {}).get("status", {}).get("phase")


def registry() -> kopf.OperatorRegistry:
    """kopf's handlers, each a line or two over the Controller in `memo.controller`."""
    handlers = kopf.OperatorRegistry()

    @kopf.on.startup(registry=handlers)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # kopf's own chatter is no user's event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # a line per event
        settings.watching.label_selectors["v1/pods"] = _MANAGED
        settings.watching.label_selectors["v1/persistentvolumeclaims"] = _MANAGED
        settings.watching.server_timeout = 300
        # Namespaces are given literally and the CRD exists before the controller starts
        # (Helm installs crds/ first): kopf's scanning would only cost cluster-wide list and
        # watch of Namespaces and CRDs, which least-privilege RBAC does not grant.
        settings.scanning.disabled = True
        await memo.controller.lead()

    @kopf.on.cleanup(registry=handlers)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        await memo.controller.stop()

    @kopf.on.login(registry=handlers)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """The same credentials as the `kubernetes` client: in-cluster, else kubeconfig."""
        return kopf.login_via_client(**kwargs)

    @kopf.index("v1", "pods", labels=MANAGED_BY, registry=handlers)
    @kopf.index("v1", "persistentvolumeclaims", labels=MANAGED_BY, registry=handlers)
    def listed(**_: Any) -> None:
        """No index: declaring one makes kopf list pods and PVCs before any handler runs,
        so a restarted controller adopts its pods instead of starting new ones."""

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=handlers)
    async def datavolume(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        await memo.controller.on_datavolume(event)

    @kopf.on.event("v1", "pods", labels=MANAGED_BY, registry=handlers)
    @kopf.on.event("v1", "persistentvolumeclaims", labels=MANAGED_BY, registry=handlers)
    async def owned(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        await memo.controller.on_owned(event)

    return handlers


def run(config: ControllerConfig, scope: Scope) -> None:
    """Run the operator until SIGTERM/SIGINT."""
    controller = Controller(config, Kube(), scope)
    if scope.metrics_port is not None:
        try:
            controller.metrics.serve(scope.metrics_addr, scope.metrics_port)
        except OSError as exc:
            raise bind_failure(exc, f"{scope.metrics_addr}:{scope.metrics_port}") from None

    async def operate() -> None:
        health = await serve_health(scope.health_addr, scope.health_port)
        try:
            await kopf.operator(
                registry=registry(),
                clusterwide=not scope.namespaces,
                namespaces=scope.namespaces,
                standalone=True,
                memo=kopf.Memo(controller=controller),
            )
        finally:
            if health is not None:
                await health.cleanup()

    asyncio.run(operate())


async def serve_health(addr: str, port: int | None) -> aiohttp.web.AppRunner | None:
    """/healthz on ADDR:PORT, answered from the operator's event loop from the start.

    Not kopf's liveness endpoint: kopf serves that only once the startup handlers are done,
    and a replica waiting for the Lease is still in one, so Kubernetes would restart every
    follower over and over."""
    if port is None:
        return None

    async def healthy(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok"})

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get("/healthz", healthy)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, addr, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise bind_failure(exc, f"{addr}:{port}", "/healthz", "health") from None
    return runner
