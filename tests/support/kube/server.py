"""The emulated API server running on a thread of its own, with a kubeconfig pointing at it."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import kmock
import yaml

from tests.support.kube.client import KubeClient
from tests.support.kube.controllers import Controllers
from tests.support.kube.emulator import KubeEmulator
from tests.support.kube.rbac import Authorizer
from tests.support.kube.resources import KOPF_PEERING_CRDS, ResourceType
from tests.support.kube.store import Store

T = TypeVar("T")
SYSTEM_NAMESPACES = ("default", "kube-system")


class KubeServer:
    """`with KubeServer(crds=[...]) as kube:` serves the Kubernetes API at `kube.url`.

    `kube.kubeconfig` is a kubeconfig file for it (no credentials), `kube.client` a small
    synchronous client; `kube.emulator` and `kube.store` are the server itself, to be
    touched only through `kube.call()` (they live on the server's event loop).
    """

    def __init__(
        self,
        *,
        crds: Iterable[dict[str, Any]] = (),
        workdir: Path | None = None,
        history: int = 10_000,
        pod_grace_period: int = 30,
        bookmark_interval: float = 10.0,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._crds = [*KOPF_PEERING_CRDS, *crds]
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-")) if workdir is None else workdir
        self._settings = {"history": history, "pod_grace_period": pod_grace_period}
        self._bookmark_interval = bookmark_interval
        self._authorizer = authorizer
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop
        self.store: Store
        self.emulator: KubeEmulator
        self.url = ""
        self.kubeconfig = self.workdir / "kubeconfig"
        self.client: KubeClient

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
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name="kube-api", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise TimeoutError("the emulated API server did not start within 30 s")
        if self._failure is not None:
            raise RuntimeError("the emulated API server failed to start") from self._failure
        self.kubeconfig.write_text(yaml.safe_dump(self._kubeconfig()))
        self.client = KubeClient(
            self.url, lambda name, api_version=None: self.call(self._find, name, api_version)
        )

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=30)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            self.store = Store(**self._settings)
            self.emulator = KubeEmulator(
                store=self.store,
                bookmark_interval=self._bookmark_interval,
                authorizer=self._authorizer,
            )
            crd_type = self.store.resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            for crd in self._crds:
                self.store.create(crd_type, None, crd)
            for name in SYSTEM_NAMESPACES:
                self.store.create(self.store.find("namespaces"), None, {"metadata": {"name": name}})
            controllers = asyncio.create_task(
                Controllers(self.store).run(), name="kube-controllers"
            )
            async with self.emulator, kmock.Server(self.emulator) as server:
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stopping.wait()
                self.store.close_watches()
            controllers.cancel()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            raise

    def _kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}
            ],
            "current-context": "emulator",
        }

    def _find(self, name: str, api_version: str | None) -> ResourceType:
        if api_version is None:
            return self.store.find(name)
        group, _, version = api_version.rpartition("/")
        for rt in self.store.types():
            if (rt.group, rt.version) == (group, version) and name in (rt.kind, rt.plural):
                return rt
        raise KeyError(f"no resource type {name!r} in {api_version}")

    # Reaching into the server from the test's thread

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30, **kwargs: Any) -> T:
        """Run `fn` on the server's loop (where the store may be touched) and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float = 30) -> T:
        """Await `coroutine` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def request_counts(self) -> collections.Counter[tuple[str, str]]:
        """API requests by (verb, resource) — `("create", "pods")`, `("patch", "pods/status")`,
        `("watch", "datavolumes.diskflow.io")` — from every client but the harness's own."""
        return self.call(lambda: collections.Counter(self.emulator.counts))

    def used_permissions(self) -> set[tuple[str, str, str]]:
        """With an authorizer: every (verb, API group, resource) the operator was allowed."""
        return self.call(lambda: set(self.emulator.used))

    def denied(self) -> list[str]:
        """With an authorizer: the 403 messages of every request it refused."""
        return self.call(lambda: list(self.emulator.denied))

    def reset_request_counts(self) -> None:
        self.call(self.emulator.counts.clear)

    def close_watches(self) -> None:
        """End every open watch stream, as an API server restart does."""
        self.call(self.store.close_watches)

    def compact(self) -> None:
        """Forget the watch history: a watch resumed from an older version gets 410 Gone."""
        self.call(self.store.compact)

    def failures(self) -> list[str]:
        """Tracebacks of requests the emulator itself failed on (500s): bugs of the harness."""
        return self.call(lambda: list(self.emulator.failures))
