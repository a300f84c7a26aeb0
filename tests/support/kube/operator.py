"""An operator under test, run as a real separate process against the emulated API server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.kube.client import poll

# Python entry points run from this interpreter, so they import the project from the checkout.
_MODULES = {"diskflow": "diskflow", "kopf": "kopf"}


class OperatorProcess:
    """`argv` run with KUBECONFIG pointing at the emulator; its output goes to `log`.

    A first word `diskflow` or `kopf` runs as `python -m ...` of this interpreter. The
    environment is this process's, without in-cluster variables, plus `env`.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        kubeconfig: Path,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        if argv[0] in _MODULES:
            argv = [sys.executable, "-m", _MODULES[argv[0]], *argv[1:]]
        self.argv = argv
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
        self._env = base | {"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"} | (env or {})
        self._cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_output(
        self, pattern: str | re.Pattern[str], *, timeout: float = 30
    ) -> re.Match[str]:
        """The first match of `pattern` in the output; fails at once if the process exits."""
        compiled = re.compile(re.escape(pattern) if isinstance(pattern, str) else pattern)

        def check() -> re.Match[str] | None:
            if match := compiled.search(self.output()):
                return match
            if not self.alive:
                raise AssertionError(
                    f"the operator exited ({self.process and self.process.returncode}) "
                    f"before printing {compiled.pattern!r}:\n{self.tail()}"
                )
            return None

        return poll(
            check,
            timeout=timeout,
            what=lambda: f"no {compiled.pattern!r} in its output:\n{self.tail()}",
        )

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, *, timeout: float = 10) -> int:
        """SIGTERM (as Kubernetes stops a pod), then SIGKILL to its whole group after `timeout`."""
        assert self.process is not None, "not started"
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM kill would end it: no shutdown, no cleanup."""
        assert self.process is not None, "not started"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()
