"""The `diskflow` command as users, pods and CI run it: a fresh interpreter for every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def diskflow(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run `diskflow ARGS...` with `env` added to ours; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "diskflow", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def diskflow_import(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `diskflow import ARGS...`."""
    return diskflow("import", *args, env=env, timeout=120)
