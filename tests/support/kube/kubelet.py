"""A kubelet stand-in: runs each pod's container command as a local process.

It lives on the emulated server's event loop and learns of changes from the store's own
notifications (no polling). Per pod: wait for its claims to be bound, schedule it on the one
node, write its Secret and ConfigMap volumes out as files, resolve its environment, map every
mount path, device path and the termination-message path in its command, arguments and
environment to host paths, give it an address of its own on loopback, run it, and write the
pod's status as the kubelet does. What it cannot do, it refuses loudly (`Kubelet.errors`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.kube.objects import now
from tests.support.kube.server import KubeServer
from tests.support.kube.storage import Storage
from tests.support.kube.store import TERMINAL, ApiError, Change, Store

MESSAGE_LIMIT = 4096  # bytes of a termination message the kubelet keeps
# Pod addresses handed out by any kubelet of this process: never given twice, so a socket
# lingering from an earlier test (TIME_WAIT) cannot make a new pod's bind fail.
_ADDRESSES_GIVEN: set[str] = set()
_SUPPORTED_VOLUMES = ("persistentVolumeClaim", "emptyDir", "secret", "configMap")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_OPTION_PATH = re.compile(r"(--?[A-Za-z0-9][-A-Za-z0-9_.]*=)(/.*)")


@dataclass
class PodProcess:
    """A process the kubelet started for a pod."""

    namespace: str
    pod: str
    uid: str
    pid: int
    argv: list[str]
    log: Path
    returncode: int | None = None  # as Kubernetes shows it: 128 + N when killed by signal N


class Waiting(Exception):
    """The pod cannot start yet, and how the kubelet shows that."""

    def __init__(self, stage: str, reason: str, message: str, event: tuple[str, str] | None = None):
        super().__init__(message)
        self.stage = stage  # "unschedulable" or "container" (scheduled, container not started)
        self.reason, self.message, self.event = reason, message, event


class Unsupported(Exception):
    """A pod the harness cannot run faithfully: refused loudly rather than run wrongly."""


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_log: Path
    fallback_to_logs: bool


@dataclass(eq=False)
class Worker:
    """The kubelet's pod worker for one pod uid."""

    namespace: str
    name: str
    uid: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    process: PodProcess | None = None
    action: tuple[str, asyncio.Future[None]] | None = None  # a test hook's request
    shown: tuple[str, str] | None = None  # the waiting reason and message last written
    exited: asyncio.Future[int] | None = None  # the process's end, once started


class Kubelet:
    """`with Kubelet(kube, root) as kubelet:` runs the pods of `kube` under `root`.

    Hooks for tests: `evict()`, `oom_kill()`, `vanish()`; `processes()` lists what it ran;
    `volume_path()` is where a claim's data lives; `errors` lists what it refused.
    """

    def __init__(
        self,
        kube: KubeServer,
        root: Path,
        *,
        node_name: str = "harness-node",
        capacity_step: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.kube = kube
        self.root = root
        self.node_name = node_name
        self.errors: list[str] = []
        self._capacity_step = capacity_step
        self._extra_env = extra_env or {}
        self._processes: list[PodProcess] = []
        self._workers: dict[str, Worker] = {}
        self._ips: dict[str, str] = {}
        self._logs: dict[tuple[str, str], Path] = {}
        self._emitted: set[tuple[str, str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.store: Store
        self.storage: Storage

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.kube.call(self._attach)

    def stop(self) -> None:
        self.kube.run(self._detach())

    # Test hooks

    def processes(self, namespace: str | None = None) -> list[PodProcess]:
        """Every process started for a pod (of `namespace`), running or not, oldest first."""
        return [p for p in list(self._processes) if namespace is None or p.namespace == namespace]

    def running(self, namespace: str | None = None) -> list[PodProcess]:
        return [p for p in self.processes(namespace) if p.returncode is None]

    def volume_path(self, namespace: str, claim: str) -> Path:
        """The directory (Filesystem) or loop device (Block) a bound claim got."""

        def find() -> Path:
            pvc = self.store.get(self.store.find("pvc"), namespace, claim)
            volume = self.storage.volumes[pvc["metadata"]["uid"]]
            return Path(volume.device) if volume.device else volume.path

        return self.kube.call(find)

    def evict(self, namespace: str, name: str) -> None:
        """Evict a running pod as the kubelet does under node pressure: killed, Failed/Evicted."""
        self.kube.run(self._act(namespace, name, "evict"))

    def oom_kill(self, namespace: str, name: str) -> None:
        """SIGKILL a running pod's processes, reported as OOMKilled with exit code 137."""
        self.kube.run(self._act(namespace, name, "oom"))

    def vanish(self, namespace: str, name: str) -> None:
        """The pod object disappears (a lost node, a forced removal) with no terminated status."""
        self.kube.run(self._act(namespace, name, "vanish"))

    async def _act(self, namespace: str, name: str, action: str) -> None:
        worker = next(
            (w for w in self._workers.values() if (w.namespace, w.name) == (namespace, name)), None
        )
        if worker is None or worker.process is None:
            if action != "vanish":
                raise LookupError(f"pod {namespace}/{name} has no running process to {action}")
            self.store.remove(self.store.find("pods"), namespace, name)
            return
        done = asyncio.get_running_loop().create_future()
        worker.action = (action, done)
        worker.wake.set()
        await done

    # Attaching to the server

    def _attach(self) -> None:
        self.store = self.kube.store
        self.storage = Storage(
            self.store,
            self.root,
            self._emit,
            node_name=self.node_name,
            capacity_step=self._capacity_step,
            bound=self._wake_namespace,
        )
        self._spawn(self.storage.run())
        self.store.listeners.append(self._notice)
        self.kube.emulator.pod_logs = lambda namespace, name: self._logs.get((namespace, name))
        nodes = self.store.find("nodes")
        if self.store.peek("nodes", ("", self.node_name)) is None:
            self.store.create(
                nodes,
                None,
                {
                    "metadata": {
                        "name": self.node_name,
                        "labels": {"kubernetes.io/hostname": self.node_name},
                    }
                },
            )
            status = {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            }
            self.store.patch(
                nodes, None, self.node_name, "merge", {"status": status}, subresource="status"
            )
        for storage_key in ("persistentvolumeclaims", "pods"):
            for obj in self.store.items(storage_key):
                self._notice(Change(self.store.rv, "ADDED", storage_key, obj, None))

    async def _detach(self) -> None:
        self.store.listeners.remove(self._notice)
        self.kube.emulator.pod_logs = None
        ending = [w.exited for w in self._workers.values() if w.exited is not None]
        for worker in self._workers.values():
            if worker.process is not None:
                _kill_group(worker.process.pid)
        if ending:  # leave no process behind, nor its sockets
            await asyncio.wait(ending, timeout=10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.storage.close()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notice(self, change: Change) -> None:
        self.storage.notice(change)
        meta = change.obj["metadata"]
        if change.storage_key in ("secrets", "configmaps"):
            self._wake_namespace(meta["namespace"])
        if change.storage_key != "pods":
            return
        worker = self._workers.get(meta["uid"])
        if worker is not None:
            worker.wake.set()
        elif (
            change.type != "DELETED"
            and change.obj.get("status", {}).get("phase") not in TERMINAL
            and change.obj["spec"].get("nodeName") in (None, self.node_name)
        ):
            worker = self._workers[meta["uid"]] = Worker(
                meta["namespace"], meta["name"], meta["uid"]
            )
            self._spawn(self._run(worker))

    def _wake_namespace(self, namespace: str) -> None:
        for worker in self._workers.values():
            if worker.namespace == namespace and worker.process is None:
                worker.wake.set()

    def _pod(self, worker: Worker) -> dict[str, Any] | None:
        """The worker's pod as stored now; None once gone (or replaced by a namesake)."""
        pod = self.store.peek("pods", (worker.namespace, worker.name))
        return pod if pod is not None and pod["metadata"]["uid"] == worker.uid else None

    # The pod worker

    async def _run(self, worker: Worker) -> None:
        try:
            launch = await self._prepare(worker)
            if launch is not None:
                await self._supervise(worker, launch)
        except Exception as exc:
            self.errors.append(
                f"pod worker {worker.namespace}/{worker.name}: {traceback.format_exc()}"
            )
            if worker.action is not None and not worker.action[1].done():
                worker.action[1].set_exception(exc)
        finally:
            del self._workers[worker.uid]

    async def _prepare(self, worker: Worker) -> Launch | None:
        """Wait until the pod can start: a Launch, or None if it went away first."""
        while True:
            worker.wake.clear()
            pod = self._pod(worker)
            if pod is None:
                return None
            if pod["metadata"].get("deletionTimestamp"):
                self._delete_now(pod)
                return None
            try:
                return self._setup(pod)
            except Waiting as waiting:
                self._show_waiting(pod, waiting)
            except Unsupported as exc:
                message = f"the harness cannot run this pod: {exc}"
                refusal = Waiting(
                    "container", "HarnessUnsupported", message, ("Warning", "HarnessUnsupported")
                )
                if worker.shown != (refusal.reason, message):  # once, not at every wake
                    self.errors.append(f"pod {worker.namespace}/{worker.name}: {message}")
                self._show_waiting(pod, refusal)
            await worker.wake.wait()

    def _setup(self, pod: dict[str, Any]) -> Launch:
        meta, spec = pod["metadata"], pod["spec"]
        container = _check_supported(pod)
        volumes = self._claimed_volumes(pod)
        if not spec.get("nodeName"):
            self.store.modify(
                self.store.find("pods"),
                meta["namespace"],
                meta["name"],
                lambda obj: obj["spec"].__setitem__("nodeName", self.node_name),
            )
            self._emit(
                pod,
                "Normal",
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {self.node_name}",
                component="default-scheduler",
            )
        if meta["uid"] not in self._ips:
            self._ips[meta["uid"]] = _pod_address()
        ip = self._ips[meta["uid"]]
        pod_dir = self.root / "pods" / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        for private in ("tmp", "home"):
            (pod_dir / private).mkdir(parents=True, exist_ok=True)
        for volume in spec.get("volumes") or []:
            if "persistentVolumeClaim" not in volume:
                volumes[volume["name"]] = self._local_volume(
                    pod, volume, pod_dir / "volumes" / volume["name"]
                )
        env = {"HOME": str(pod_dir / "home")} | self._environment(pod, container, ip)
        termination_log = pod_dir / "termination-log"
        termination_log.write_bytes(b"")
        mapping = self._mounts(container, volumes)
        mapping[container["terminationMessagePath"]] = termination_log
        env = {key: _map_path(value, mapping) for key, value in env.items()}
        env.setdefault("TMPDIR", str(mapping.get("/tmp", pod_dir / "tmp")))
        argv = [
            _map_path(_expand(arg, env), mapping)
            for arg in container["command"] + container.get("args", [])
        ]
        if argv[0] == "diskflow":
            argv[:1] = [sys.executable, "-m", "diskflow"]
        elif argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        cwd = (
            Path(_map_path(container["workingDir"], mapping))
            if container.get("workingDir")
            else pod_dir
        )
        self._logs[(meta["namespace"], meta["name"])] = pod_dir / "container.log"
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        return Launch(argv, env, cwd, termination_log, fallback)

    def _claimed_volumes(self, pod: dict[str, Any]) -> dict[str, Path | str]:
        """Host paths of the pod's claims, or Waiting (unschedulable) until all are bound."""
        namespace = pod["metadata"]["namespace"]
        found: dict[str, Path | str] = {}
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" not in volume:
                continue
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = self.store.peek("persistentvolumeclaims", (namespace, claim))
            problem = (
                f'persistentvolumeclaim "{claim}" not found'
                if pvc is None
                else f'persistentvolumeclaim "{claim}" is being deleted'
                if pvc["metadata"].get("deletionTimestamp")
                else "pod has unbound immediate PersistentVolumeClaims"
                if pvc["metadata"]["uid"] not in self.storage.volumes
                else None
            )
            if problem:
                message = f"0/1 nodes are available: {problem}."
                raise Waiting(
                    "unschedulable", "Unschedulable", message, ("Warning", "FailedScheduling")
                )
            stored = self.storage.volumes[pvc["metadata"]["uid"]]
            found[volume["name"]] = stored.device or stored.path
        return found

    def _local_volume(self, pod: dict[str, Any], volume: dict[str, Any], path: Path) -> Path:
        """An emptyDir, or a Secret or ConfigMap written out as files (`items` honoured)."""
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return path
        kind, source = (
            ("secret", volume["secret"])
            if "secret" in volume
            else ("configmap", volume["configMap"])
        )
        name = source.get("secretName") or source.get("name")
        obj = self.store.peek(
            "secrets" if kind == "secret" else "configmaps", (pod["metadata"]["namespace"], name)
        )
        if obj is None:
            if source.get("optional"):
                return path
            message = (
                f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
                f'{kind} "{name}" not found'
            )
            raise Waiting("container", "ContainerCreating", message, ("Warning", "FailedMount"))
        files = _contents(obj)
        items = source.get("items") or [{"key": key, "path": key} for key in files]
        for item in items:
            if item["key"] not in files:
                if source.get("optional"):
                    continue
                message = (
                    f'MountVolume.SetUp failed for volume "{volume["name"]}" : {kind} '
                    f"references non-existent config key: {item['key']}"
                )
                raise Waiting("container", "ContainerCreating", message, ("Warning", "FailedMount"))
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[item["key"]])
            target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
        return path

    def _environment(
        self, pod: dict[str, Any], container: dict[str, Any], ip: str
    ) -> dict[str, str]:
        """The container's environment as the kubelet builds it (CreateContainerConfigError
        for a missing Secret or ConfigMap), over a minimal base a process needs."""
        namespace = pod["metadata"]["namespace"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": pod["metadata"]["name"],
            "LANG": "C.UTF-8",
            **self._extra_env,
        }
        for source in container.get("envFrom") or []:
            kind = "secret" if "secretRef" in source else "configmap"
            ref = source.get("secretRef") or source.get("configMapRef")
            obj = self._config_object(namespace, kind, ref)
            for key, value in (_contents(obj) if obj else {}).items():
                env[source.get("prefix", "") + key] = value.decode(errors="replace")
        for var in container.get("env") or []:
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = _expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"], ip)
                continue
            kind = "secret" if "secretKeyRef" in source else "configmap"
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
            if ref is None:
                raise Unsupported(
                    f"env {var['name']}: only value, fieldRef, secretKeyRef and configMapKeyRef"
                )
            obj = self._config_object(namespace, kind, ref)
            contents = _contents(obj) if obj else {}
            if ref["key"] in contents:
                env[var["name"]] = contents[ref["key"]].decode(errors="replace")
            elif obj is not None and not ref.get("optional"):
                shown = "Secret" if kind == "secret" else "ConfigMap"
                message = f"couldn't find key {ref['key']} in {shown} {namespace}/{ref['name']}"
                raise Waiting(
                    "container", "CreateContainerConfigError", message, ("Warning", "Failed")
                )
        return env

    def _config_object(
        self, namespace: str, kind: str, ref: dict[str, Any]
    ) -> dict[str, Any] | None:
        obj = self.store.peek(
            "secrets" if kind == "secret" else "configmaps", (namespace, ref["name"])
        )
        if obj is None and not ref.get("optional"):
            message = f'{kind} "{ref["name"]}" not found'
            raise Waiting("container", "CreateContainerConfigError", message, ("Warning", "Failed"))
        return obj

    @staticmethod
    def _mounts(container: dict[str, Any], volumes: dict[str, Path | str]) -> dict[str, Path | str]:
        mapping: dict[str, Path | str] = {}
        for mount in container.get("volumeMounts") or []:
            source = volumes[mount["name"]]
            if isinstance(source, str):
                raise Unsupported(
                    f"volume {mount['name']} is a Block volume: use volumeDevices, not volumeMounts"
                )
            target = source / mount["subPath"] if mount.get("subPath") else source
            target.mkdir(parents=True, exist_ok=True)
            mapping[mount["mountPath"]] = target
        for device in container.get("volumeDevices") or []:
            source = volumes[device["name"]]
            if not isinstance(source, str):
                raise Unsupported(
                    f"volume {device['name']} is a Filesystem volume: use volumeMounts"
                )
            mapping[device["devicePath"]] = source
        return mapping

    async def _supervise(self, worker: Worker, launch: Launch) -> None:
        pod = self._pod(worker)
        assert pod is not None  # _prepare just saw it, without awaiting since
        log_path = self._logs[(worker.namespace, worker.name)]
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                env=launch.env,
                cwd=launch.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        process = worker.process = PodProcess(
            worker.namespace, worker.name, worker.uid, proc.pid, launch.argv, log_path
        )
        self._processes.append(process)
        started = now()
        self._write_status(worker, self._running_status(pod, started))
        self._emit(
            pod, "Normal", "Started", f"Started container {pod['spec']['containers'][0]['name']}"
        )
        exited = worker.exited = asyncio.ensure_future(proc.wait())
        outcome = await self._watch_process(worker, exited)
        process.returncode = _exit_code(exited.result())
        _kill_group(proc.pid)  # when a container's main process ends, the rest of it goes too
        if outcome == "vanish":
            if self._pod(worker) is not None:
                self.store.remove(self.store.find("pods"), worker.namespace, worker.name)
        elif outcome != "gone":
            self._write_terminated(worker, launch, started, outcome)
        if outcome == "deleted" and (pod := self._pod(worker)) is not None:
            self._delete_now(pod)
        if worker.action is not None:
            worker.action[1].set_result(None)

    async def _watch_process(self, worker: Worker, exited: asyncio.Future[int]) -> str:
        """Wait for the process to end by itself or be ended: "exited", "deleted" (after
        SIGTERM and the grace period), "gone" (the pod object vanished), or a hook's action."""
        assert worker.process is not None
        loop = asyncio.get_running_loop()
        deadline = None
        while not exited.done():
            worker.wake.clear()
            woken = asyncio.ensure_future(worker.wake.wait())
            timeout = None if deadline is None else max(deadline - loop.time(), 0)
            await asyncio.wait(
                {exited, woken}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            woken.cancel()
            if exited.done():
                break
            pod = self._pod(worker)
            if (
                worker.action is not None
                or pod is None
                or (deadline is not None and loop.time() >= deadline)
            ):
                _kill_group(worker.process.pid)
                await exited
                return worker.action[0] if worker.action else "gone" if pod is None else "deleted"
            if pod["metadata"].get("deletionTimestamp"):
                grace = pod["metadata"].get("deletionGracePeriodSeconds") or 0
                if deadline is None:
                    self._emit(
                        pod,
                        "Normal",
                        "Killing",
                        f"Stopping container {pod['spec']['containers'][0]['name']}",
                    )
                    _signal(worker.process.pid, signal.SIGTERM)
                    deadline = loop.time() + grace
                deadline = min(deadline, loop.time() + grace)
        return "deleted" if deadline is not None else "exited"

    # Status

    def _write_status(self, worker: Worker, status: dict[str, Any]) -> None:
        if self._pod(worker) is None:
            return
        try:
            self.store.patch(
                self.store.find("pods"),
                worker.namespace,
                worker.name,
                "merge",
                {"status": status},
                subresource="status",
            )
        except ApiError as exc:
            if exc.code != 404:
                raise

    def _show_waiting(self, pod: dict[str, Any], waiting: Waiting) -> None:
        if waiting.event:
            component = "default-scheduler" if waiting.stage == "unschedulable" else "kubelet"
            self._emit(pod, *waiting.event, waiting.message, component=component)
        if waiting.stage == "unschedulable":
            conditions = [_condition("PodScheduled", False, "Unschedulable", waiting.message)]
            status: dict[str, Any] = {"phase": "Pending", "conditions": conditions}
        else:
            status = self._base_status(pod, ready=False)
            state = {"waiting": {"reason": waiting.reason, "message": waiting.message}}
            status["containerStatuses"] = [_container_status(pod, state, ready=False)]
        worker = self._workers[pod["metadata"]["uid"]]
        if worker.shown != (waiting.reason, waiting.message):
            worker.shown = (waiting.reason, waiting.message)
            self._write_status(worker, status)

    def _base_status(
        self, pod: dict[str, Any], *, ready: bool, phase: str = "Pending"
    ) -> dict[str, Any]:
        not_ready = None if ready else "ContainersNotReady"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod.get("status", {}).get("startTime") or now(),
            "conditions": [
                _condition("PodScheduled", True),
                _condition("Initialized", True),
                _condition("ContainersReady", ready, not_ready),
                _condition("Ready", ready, not_ready),
            ],
        }
        if ip := self._ips.get(pod["metadata"]["uid"]):
            status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
        return status

    def _running_status(self, pod: dict[str, Any], started: str) -> dict[str, Any]:
        status = self._base_status(pod, ready=True, phase="Running")
        status["containerStatuses"] = [
            _container_status(pod, {"running": {"startedAt": started}}, ready=True)
        ]
        return status

    def _write_terminated(self, worker: Worker, launch: Launch, started: str, outcome: str) -> None:
        pod = self._pod(worker)
        assert worker.process is not None and worker.process.returncode is not None
        if pod is None:
            return
        code = worker.process.returncode
        reason = "OOMKilled" if outcome == "oom" else "Completed" if code == 0 else "Error"
        message = launch.termination_log.read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
        if not message and code != 0 and launch.fallback_to_logs:
            lines = worker.process.log.read_bytes().splitlines(keepends=True)[-80:]
            message = b"".join(lines)[-2048:].decode(errors="replace")
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"harness://{worker.process.pid}",
        }
        if message:
            terminated["message"] = message
        status = self._base_status(pod, ready=False, phase="Succeeded" if code == 0 else "Failed")
        status["containerStatuses"] = [
            _container_status(pod, {"terminated": terminated}, ready=False)
        ]
        if outcome == "evict":
            status |= {"reason": "Evicted", "message": "The node was low on resource: memory. "}
            self._emit(pod, "Warning", "Evicted", status["message"])
        self._write_status(worker, status)

    def _delete_now(self, pod: dict[str, Any]) -> None:
        """The kubelet's final delete once the containers are stopped (finalizers still hold)."""
        meta = pod["metadata"]
        try:
            self.store.delete(
                self.store.find("pods"),
                meta["namespace"],
                meta["name"],
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiError as exc:
            if exc.code not in (404, 409):
                raise

    def _emit(
        self,
        obj: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        *,
        component: str | None = None,
    ) -> None:
        """A core/v1 Event about `obj`, once per distinct reason and message."""
        meta = obj["metadata"]
        if (meta["uid"], reason, message) in self._emitted:
            return
        self._emitted.add((meta["uid"], reason, message))
        component = component or (
            "kubelet" if obj["kind"] == "Pod" else "persistentvolume-controller"
        )
        stamp = now()
        event = {
            "metadata": {
                "name": f"{meta['name']}.{time.time_ns():x}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": component, "host": self.node_name},
            "reportingComponent": component,
            "reportingInstance": self.node_name,
        }
        try:
            self.store.create(self.store.find("events"), meta["namespace"], event)
        except ApiError as exc:
            if exc.code != 403:  # the namespace is terminating
                raise


def _check_supported(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod's one container, if the harness can run the pod faithfully."""
    spec = pod["spec"]
    if spec.get("restartPolicy") != "Never":
        raise Unsupported(f"restartPolicy {spec.get('restartPolicy')}: only Never is emulated")
    if len(spec.get("containers") or []) != 1 or spec.get("initContainers"):
        raise Unsupported("exactly one container and no init containers are emulated")
    for volume in spec.get("volumes") or []:
        if not any(kind in volume for kind in _SUPPORTED_VOLUMES):
            raise Unsupported(
                f"volume {volume['name']}: only {', '.join(_SUPPORTED_VOLUMES)} are emulated"
            )
    container = spec["containers"][0]
    if not container.get("command"):
        raise Unsupported("the container has no command: the harness runs commands, not images")
    return container


def _contents(obj: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's or ConfigMap's keys and their bytes."""
    if obj["kind"] == "Secret":
        return {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}
    contents = {key: value.encode() for key, value in (obj.get("data") or {}).items()}
    return contents | {
        key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()
    }


def _field(pod: dict[str, Any], path: str, ip: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
    }
    if path in simple:
        return simple[path]
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return (meta.get(match[1]) or {}).get(match[2], "")
    raise Unsupported(f"fieldRef {path!r} is not emulated")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` references (`$$` escapes); unknown references stay as written."""
    return _REFERENCE.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def _map_path(text: str, mapping: dict[str, Path | str]) -> str:
    """A container path (or `--option=PATH`) rewritten to the host path it is mounted from."""
    if match := _OPTION_PATH.fullmatch(text):
        return match[1] + _map_path(match[2], mapping)
    for inside in sorted(mapping, key=len, reverse=True):
        if text == inside or text.startswith(inside.rstrip("/") + "/"):
            return str(mapping[inside]) + text[len(inside.rstrip("/")) :]
    return text


def _condition(
    kind: str, ok: bool, reason: str | None = None, message: str | None = None
) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastTransitionTime": now(),
    }
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _container_status(pod: dict[str, Any], state: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
        "lastState": {},
    }


def _pod_address() -> str:
    """A loopback address of its own: random, so that test sessions running side by side on
    one machine do not collide either (all of 127.0.0.0/8 reaches the host)."""
    while True:
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        if address not in _ADDRESSES_GIVEN:
            _ADDRESSES_GIVEN.add(address)
            return address


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
