"""`diskflow controller`'s plain start-up errors: each names what was wrong, with the exit
status that says whether trying again can help."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def controller(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    return subprocess.run(
        [sys.executable, "-m", "diskflow", "controller", *args],
        capture_output=True,
        text=True,
        env=env | {"KUBECONFIG": str(kubeconfig)},
        timeout=60,
    )


def test_no_api_server_to_connect_to_is_named(tmp_path: Path) -> None:
    done = controller(kubeconfig=tmp_path / "missing")
    assert done.returncode == 1, done.stderr
    assert "no Kubernetes API to connect to" in done.stderr
    assert "[InvalidArgument]" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("option", ["health", "metrics"])
def test_a_port_already_taken_is_address_in_use(option: str, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c"}}],
                "current-context": "c",
            }
        )
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = controller(
            f"--{option}-addr", "127.0.0.1", f"--{option}-port", str(port), kubeconfig=kubeconfig
        )
    assert done.returncode == 75, done.stderr  # the port may be free when tried again
    assert f"127.0.0.1:{port}" in done.stderr and f"(--{option}-port)" in done.stderr
    assert "[AddressInUse]" in done.stderr


def test_a_bad_config_file_is_named_before_connecting(tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"
    config.write_text("stall_timeout: 10 minutes\nbackoff_max: 5m\n")
    done = controller("--config", str(config), kubeconfig=tmp_path / "missing")
    assert done.returncode == 1, done.stderr
    assert f"{config}: stall_timeout: '10 minutes' is not a duration" in done.stderr
    assert "backoff_max" not in done.stderr  # 5m is good
    assert "InvalidArgument" in done.stderr and "Traceback" not in done.stderr
