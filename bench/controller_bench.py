"""Benchmark the DataVolume controller: its cost in the control plane, and its overhead on
real imports.

Run it from the repository, with the venv that has diskflow installed (as root: the kubelet
stand-in runs the importers):

    python bench/controller_bench.py [--datavolumes 500] [--imports 50] [--limit 8] [--json FILE]

1. Control plane: N DataVolumes (http sources) are applied at once to the emulated API server
   (tests/support/kube) with the real `diskflow controller` process running and no kubelet:
   PVCs are bound by the harness's provisioner, pods are never run. It reports the seconds
   until every PVC and importer pod exists, the API requests the controller made per DataVolume (the
   server counts every request but the harness's own), and the controller's CPU seconds
   and peak RSS. Targets: 500 to pods in under 10 s, under 10 requests per DataVolume, under
   150 MiB RSS.
2. Overhead: M real imports of the same compressed raw image through the controller and the
   kubelet stand-in with `--max-imports L`, against the same M `diskflow import` commands run
   L at a time by hand. Target: the controller adds under 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import lzma
import os
import random
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from importer.capacity import required_volume_size  # noqa: E402
from importer.quantity import format_quantity  # noqa: E402
from tests.support.kube import KubeServer  # noqa: E402
from tests.support.kube.kubelet import Kubelet  # noqa: E402
from tests.support.kube.operator import OperatorProcess  # noqa: E402
from tests.support.kube.storage import Storage  # noqa: E402

MIB = 1 << 20
NAMESPACE = "bench"
CRD = REPO / "importer" / "controller" / "crd.yaml"
TARGET_SECONDS_500 = 10.0
TARGET_REQUESTS = 10.0
TARGET_RSS_MIB = 150
TARGET_OVERHEAD = 0.10
BINDERS: list[asyncio.Future[None]] = []  # kept referenced while they run


def datavolume(name: str, url: str, size: str = "64Mi") -> dict[str, Any]:
    return {
        "apiVersion": "diskflow.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"http": {"url": url}},
            "storage": {"resources": {"requests": {"storage": size}}},
        },
    }


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = partial(Quiet, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *a: None  # type: ignore[method-assign]  # probes hang up early
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def prepare(kube: KubeServer) -> None:
    """The benchmark's namespace and a default, immediately binding StorageClass."""
    kube.client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kube.client.create(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": "standard",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "bench",
            "volumeBindingMode": "Immediate",
        }
    )


def bind_volumes(kube: KubeServer, root: Path) -> None:
    """The harness's provisioner alone (the kubelet stand-in's, without running pods): PVCs
    bound as they come, inside the server, as a real PV controller would."""
    storage = Storage(
        kube.store, root, lambda *_: None, node_name="bench", capacity_step=1, bound=lambda _: None
    )
    kube.store.listeners.append(storage.notice)
    BINDERS.append(asyncio.ensure_future(storage.run(), loop=kube.loop))


def control_plane(count: int, workdir: Path, url: str) -> dict[str, Any]:
    """N DataVolumes to PVCs and pods, with no pod run."""
    import yaml

    crds = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    with KubeServer(crds=crds, workdir=workdir) as kube:
        api = kube.client  # the harness's own requests are not counted: only the controller's
        prepare(kube)
        argv = ["diskflow", "controller", "-n", NAMESPACE, "--max-imports", "0"]
        argv += ["--max-imports-per-host", "0"]
        if profile := os.environ.get("DISKFLOW_BENCH_PROFILE"):  # a cProfile output file
            argv = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "diskflow", *argv[1:]]
        operator = OperatorProcess(
            argv,
            kubeconfig=kube.kubeconfig,
            log=workdir / f"operator-{count}.log",
        ).start()
        operator.wait_for_output("Activity 'registry.<locals>.login' succeeded")
        kube.call(bind_volumes, kube, workdir / "volumes")
        time.sleep(1)  # let the initial listings settle before measuring
        cpu0 = proc_cpu(operator.pid)
        kube.reset_request_counts()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: api.create(datavolume(f"dv-{n:05d}", url)), range(count)))
        applied = time.monotonic() - started
        while (pods := kube.call(lambda: len(kube.store.items("pods")))) < count:
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {pods} of {count} pods after 600 s")
            time.sleep(0.05)  # a poll interval: the count is read inside the server
        seconds = time.monotonic() - started
        counts = kube.request_counts()
        requests = sum(counts.values())
        result = {
            "datavolumes": count,
            "apply_seconds": round(applied, 2),
            "to_pods_seconds": round(seconds, 2),
            "requests_per_datavolume": round(requests / count, 2),
            "controller_cpu_seconds": round(proc_cpu(operator.pid) - cpu0, 2),
            "controller_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
            "requests_by_kind": {f"{v} {r}": n for (v, r), n in sorted(counts.items())},
        }
        operator.stop()
        return result


def overhead(imports: int, limit: int, workdir: Path, url: str, image_size: int) -> dict[str, Any]:
    """M imports through the controller against the same M commands, L at a time by hand."""
    import subprocess

    import yaml

    by_hand = workdir / "by-hand"
    by_hand.mkdir()
    # The same size the controller hands its importers: the PVC made for the image's size.
    size = str(required_volume_size(image_size))
    started = time.monotonic()

    def by_hand_import(n: int) -> None:
        out = str(by_hand / f"{n}.img")
        command = ["diskflow", "import", url, out, "--progress", "none", "--size", size]
        subprocess.run([sys.executable, "-m", *command], check=True, stdout=subprocess.DEVNULL)

    with concurrent.futures.ThreadPoolExecutor(limit) as pool:
        list(pool.map(by_hand_import, range(imports)))
    manual = time.monotonic() - started

    crds = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (workdir / "kube").mkdir()
    with KubeServer(crds=crds, workdir=workdir / "kube") as kube:
        prepare(kube)
        with Kubelet(kube, workdir / "node"):
            operator = OperatorProcess(
                [
                    "diskflow",
                    "controller",
                    "-n",
                    NAMESPACE,
                    "--max-imports",
                    str(limit),
                    "--max-imports-per-host",
                    "0",
                    "--progress-interval",
                    "1",
                ],
                kubeconfig=kube.kubeconfig,
                log=workdir / "operator-imports.log",
            ).start()
            operator.wait_for_output("Activity 'registry.<locals>.login' succeeded")
            started = time.monotonic()
            for n in range(imports):
                kube.client.create(datavolume(f"dv-{n:03d}", url, format_quantity(image_size)))
            while True:
                phases = [
                    dv.get("status", {}).get("phase")
                    for dv in kube.client.list("datavolumes", namespace=NAMESPACE)
                ]
                if "Failed" in phases:
                    raise SystemExit(f"an import failed: see {operator.log}")
                if phases.count("Succeeded") == imports:
                    break
                time.sleep(0.2)  # a poll interval, well under the imports' seconds
            controlled = time.monotonic() - started
            operator.stop()
    return {
        "imports": imports,
        "limit": limit,
        "by_hand_seconds": round(manual, 2),
        "controller_seconds": round(controlled, 2),
        "overhead": round(controlled / manual - 1, 3),
    }


def make_image(directory: Path, size: int) -> Path:
    """A raw image, half random and half zero, xz-compressed: small to serve, real to import."""
    rng = random.Random(7)
    raw = bytearray(size)
    for offset in range(0, size, 2 * MIB):
        raw[offset : offset + MIB] = rng.randbytes(MIB)
    path = directory / "disk.raw.xz"
    path.write_bytes(lzma.compress(bytes(raw), preset=0))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datavolumes", type=int, nargs="*", default=[500, 5000])
    parser.add_argument("--imports", type=int, default=50)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--image-mib", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"control_plane": []}
    with tempfile.TemporaryDirectory(prefix="diskflow-controller-bench-") as tmp:
        workdir = Path(tmp)
        image = make_image(workdir, args.image_mib * MIB)
        server, base = serve(workdir)
        url = f"{base}/{image.name}"
        for count in args.datavolumes:
            run = workdir / f"cp-{count}"
            run.mkdir()
            result = control_plane(count, run, url)
            results["control_plane"].append(result)
            print(json.dumps(result), flush=True)
        if args.imports:
            results["overhead"] = overhead(
                args.imports, args.limit, workdir, url, args.image_mib * MIB
            )
            print(json.dumps(results["overhead"]), flush=True)
        server.shutdown()
    for result in results["control_plane"]:
        if result["datavolumes"] == 500:
            ok = result["to_pods_seconds"] < TARGET_SECONDS_500
            print(
                f"500 DataVolumes to pods: {result['to_pods_seconds']} s "
                f"(target < {TARGET_SECONDS_500}): {'met' if ok else 'MISSED'}"
            )
        ok = result["requests_per_datavolume"] < TARGET_REQUESTS
        print(
            f"{result['datavolumes']}: {result['requests_per_datavolume']} requests per "
            f"DataVolume (target < {TARGET_REQUESTS}): {'met' if ok else 'MISSED'}; peak RSS "
            f"{result['controller_peak_rss_mib']} MiB (target < {TARGET_RSS_MIB}): "
            f"{'met' if result['controller_peak_rss_mib'] < TARGET_RSS_MIB else 'MISSED'}"
        )
    if "overhead" in results:
        over = results["overhead"]["overhead"]
        print(
            f"controller overhead on {args.imports} imports: {over:.1%} "
            f"(target < {TARGET_OVERHEAD:.0%}): {'met' if over < TARGET_OVERHEAD else 'MISSED'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
