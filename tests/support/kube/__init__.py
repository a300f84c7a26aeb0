"""A Kubernetes stand-in for controller tests: an emulated API server, its controllers and a
kubelet that runs pods as local processes. README.md says what is emulated and what is not."""

from tests.support.kube.client import KubeClient, poll
from tests.support.kube.server import KubeServer
from tests.support.kube.store import ApiError

__all__ = ["ApiError", "KubeClient", "KubeServer", "poll"]
