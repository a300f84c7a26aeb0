"""Start-up: `diskflow import` loads what its source needs and nothing else.

An importer pod runs `diskflow import` once per volume, and a small image's import is mostly
Python start-up: the Kubernetes client, kopf, Celery, boto3, pykickstart, rich and the
Prometheus client must not be imported unless the command (and the source's scheme) uses them.
Each case runs the real command in a fresh interpreter and looks at `sys.modules` when it
exits, so that a module-level import anywhere on the way (the CLI, the pipeline, a source)
fails here. No wall-clock thresholds: bench/startup_bench.py measures time.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diskflow.cli import LAZY_COMMANDS
from tests.support.events import result

# Never on a local import's way: the template builds', the controller's, S3's, a bar's, and
# metrics' libraries (and YAML, which only the manifests and build records use).
HEAVY = (
    "aiohttp",
    "boto3",
    "botocore",
    "celery",
    "kopf",
    "kubernetes",
    "prometheus_client",
    "libvirt",
    "pykickstart",
    "rich",
    "yaml",
)
# What an http(s) source needs, and only it.
NETWORK = ("requests", "urllib3", "tenacity")

# Runs `diskflow ARGS...` as `python -m diskflow` does, then writes the names of the modules
# loaded to the file named by the first argument, whatever the exit status.
PROBE = """
import json, runpy, sys
report, *args = sys.argv[1:]
sys.argv = ["diskflow", *args]
try:
    runpy.run_module("diskflow", run_name="__main__", alter_sys=True)
finally:
    with open(report, "w") as out:
        json.dump(sorted({name.partition(".")[0] for name in sys.modules}), out)
"""


def loaded(tmp_path: Path, *args: str | Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `diskflow ARGS...`; its result, and the top-level packages it had imported."""
    report = tmp_path / "modules.json"
    report.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *map(str, args)],
        capture_output=True,
        text=True,
        # As in a pod: no DISKFLOW_DEBUG or PYTHONSTARTUP of the caller's.
        env={k: v for k, v in os.environ.items() if not k.startswith(("DISKFLOW_", "PYTHON"))},
        timeout=120,
    )
    return done, set(json.loads(report.read_text()))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "www" / "1MiB.raw"
    path.parent.mkdir()
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def web(image: Path) -> Iterator[str]:
    """A plain HTTP server on loopback serving `image`'s directory."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(image.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_importing_a_local_file_loads_no_network_or_framework_module(
    image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    done, modules = loaded(tmp_path, "import", "--progress", "none", image, dest)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == image.read_bytes()
    assert not modules & {*HEAVY, *NETWORK}, done.stderr


def test_json_progress_and_a_blank_disk_load_nothing_more(tmp_path: Path) -> None:
    dest = tmp_path / "blank.img"
    done, modules = loaded(
        tmp_path, "import", "--progress", "json", "blank:", dest, "--size", "1Mi"
    )
    assert done.returncode == 0, done.stderr
    assert result(done.stdout)["ok"] is True
    assert not modules & {*HEAVY, *NETWORK}


def test_importing_over_http_loads_the_http_stack_only(
    web: str, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.img"
    done, modules = loaded(tmp_path, "import", "--progress", "none", f"{web}/1MiB.raw", dest)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == image.read_bytes()
    assert "requests" in modules  # the check sees what a command imports
    assert not modules & set(HEAVY)


def test_a_failed_import_loads_nothing_more(tmp_path: Path) -> None:
    done, modules = loaded(tmp_path, "import", tmp_path / "missing.raw", tmp_path / "disk.img")
    assert done.returncode == 1 and "[NotFound]" in done.stderr
    assert not modules & {*HEAVY, *NETWORK}


def test_import_help_is_complete_and_loads_nothing_more(tmp_path: Path) -> None:
    done, modules = loaded(tmp_path, "import", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--size", "--checksum", "--header-file", "--s3-endpoint", "--progress",
                   "--metrics-port", "--termination-log", "Exit status"):  # fmt: skip
        assert option in done.stdout
    assert not modules & {*HEAVY, *NETWORK}


def test_help_lists_every_command_with_its_whole_summary(tmp_path: Path) -> None:
    done, _ = loaded(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.partition("Commands:")[2]
    assert {"import", "demo", *LAZY_COMMANDS} <= set(commands.split())
    assert "..." not in commands  # no summary cut short to fit the width
    assert "Import a disk image into a file or block device, converting it to raw." in " ".join(
        commands.split()
    )


@pytest.mark.parametrize("command", sorted(LAZY_COMMANDS))
def test_every_command_loaded_on_demand_still_runs(command: str, tmp_path: Path) -> None:
    done, _ = loaded(tmp_path, command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: diskflow {command} ")


def test_a_mistyped_command_is_named_without_loading_the_others(tmp_path: Path) -> None:
    done, modules = loaded(tmp_path, "manifets")
    assert done.returncode == 2 and "Did you mean 'manifest'?" in done.stderr
    assert not modules & set(HEAVY)


def test_the_importer_packages_load_their_exports_on_first_use() -> None:
    check = """
import sys
import importer.errors, importer.sources
assert "importer.pipeline" not in sys.modules and "requests" not in sys.modules
import importer, importer.sources as sources
for name in importer.__all__:
    getattr(importer, name)
for name in sources.__all__:
    getattr(sources, name)
assert "importer.pipeline" in sys.modules and "requests" in sys.modules
from importer import qemu, HttpOptions
assert HttpOptions is sources.http.HttpOptions and qemu.__name__ == "importer.qemu"
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
