"""`diskflow controller`: run the DataVolume operator."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from diskflow.failures import guarded
from diskflow.flags import duration
from diskflow.output import ProgressMode, resolve, start
from importer.errors import FinalError


def controller(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", "-n", help="Watch this namespace; repeatable. Default: every namespace."
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="YAML mapping of settings (the options below in snake_case, plus "
            "importer_resources, node_selector, tolerations, affinity, image_pull_secrets, "
            "importer_env, importer_pod_labels, importer_pod_annotations, "
            "default_cert_config_map, storage_class_overheads); options given on the "
            "command line win.",
        ),
    ] = None,
    image: Annotated[str | None, typer.Option(help="Importer pods' image.")] = None,
    max_imports: Annotated[
        int | None, typer.Option(min=0, help="Importer pods at once, cluster-wide (0: no limit).")
    ] = None,
    max_imports_per_host: Annotated[
        int | None,
        typer.Option(min=0, help="Importer pods at once per source host (0: no limit)."),
    ] = None,
    retry_limit: Annotated[
        int | None,
        typer.Option(min=0, help="Transient failures before a DataVolume fails (default 5)."),
    ] = None,
    backoff_base: Annotated[
        float | None, duration("The wait before the first retry; doubles each time (10s).")
    ] = None,
    backoff_max: Annotated[
        float | None, duration("The longest wait between attempts (5m).")
    ] = None,
    stall_timeout: Annotated[
        float | None,
        duration("The time without progress before an import is retried (10m).", at_least=1),
    ] = None,
    scratch_storage_class: Annotated[
        str | None,
        typer.Option(help="Scratch space as PVCs of this class (default: an emptyDir)."),
    ] = None,
    probe: Annotated[
        bool | None,
        typer.Option(
            "--probe/--no-probe",
            help="Open sources from the controller to decide scratch space; with --no-probe "
            "every import that may convert gets scratch.",
        ),
    ] = None,
    filesystem_overhead: Annotated[
        float | None,
        typer.Option(min=0, max=0.99, help="Filesystem overhead of volumes (default 0.06)."),
    ] = None,
    priority_class_name: Annotated[
        str | None, typer.Option(help="Importer pods' priority class.")
    ] = None,
    importer_arg: Annotated[
        list[str] | None,
        typer.Option(help="An extra `diskflow import` argument for every importer; repeatable."),
    ] = None,
    progress_interval: Annotated[
        float | None, duration("The time between progress scrapes (2s).", at_least=0.1)
    ] = None,
    status_interval: Annotated[
        float | None, duration("The least time between progress-only status writes (5s).")
    ] = None,
    lease_namespace: Annotated[
        str | None,
        typer.Option(
            help="Hold a Lease in this namespace before acting, so that of several replicas "
            "one acts. Default: act at once (one replica)."
        ),
    ] = None,
    lease_name: Annotated[str, typer.Option(help="The Lease's name.")] = "diskflow-controller",
    metrics_addr: Annotated[
        str, typer.Option(help="Address of the controller's Prometheus metrics.")
    ] = "0.0.0.0",
    metrics_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve the controller's metrics on this port."),
    ] = None,
    health_addr: Annotated[str, typer.Option(help="Address of the health endpoint.")] = "0.0.0.0",
    health_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve /healthz (liveness and readiness) here."),
    ] = None,
) -> None:
    """Run the DataVolume controller: DataVolumes in, PVCs filled by importer pods out.

    Connects with the in-cluster service account, else the kubeconfig (KUBECONFIG)."""
    from importer.controller.config import ControllerConfig
    from importer.controller.operator import Scope, run

    given = {
        "image": image,
        "max_imports": max_imports,
        "max_imports_per_host": max_imports_per_host,
        "retry_limit": retry_limit,
        "backoff_base": backoff_base,
        "backoff_max": backoff_max,
        "stall_timeout": stall_timeout,
        "scratch_storage_class": scratch_storage_class,
        "probe": probe,
        "filesystem_overhead": filesystem_overhead,
        "priority_class_name": priority_class_name,
        "progress_interval": progress_interval,
        "status_interval": status_interval,
        "importer_args": tuple(importer_arg) if importer_arg else None,
    }

    def job() -> None:
        settings = _read_config(config_file) if config_file else {}
        settings.update({key: value for key, value in given.items() if value is not None})
        config = ControllerConfig(**settings)
        scope = Scope(
            namespaces=tuple(namespace or ()),
            lease_namespace=lease_namespace,
            lease_name=lease_name,
            health_addr=health_addr,
            health_port=health_port,
            metrics_addr=metrics_addr,
            metrics_port=metrics_port,
        )
        run(config, scope)

    # Its log as events: JSON lines in a pod, readable lines on a terminal.
    guarded(job, start(resolve(ProgressMode.AUTO, terminal=ProgressMode.LOG)))


def _read_config(path: Path) -> dict[str, Any]:
    """The settings `path` gives, each checked against its ControllerConfig field's type:
    times as seconds or durations (10m), counts as whole numbers, and so on."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from importer.controller.config import ControllerConfig

    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FinalError("InvalidArgument", f"cannot read {path}: {exc}") from None
    if not isinstance(settings, dict):
        raise FinalError("InvalidArgument", f"{path} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(ControllerConfig)}
    unknown = sorted(set(settings) - known, key=str)
    if unknown:
        raise FinalError(
            "InvalidArgument",
            f"{path}: unknown settings {', '.join(map(str, unknown))} "
            f"(known: {', '.join(sorted(known))})",
        )
    try:
        config = TypeAdapter(ControllerConfig).validate_python(settings)
    except ValidationError as exc:
        problems = "; ".join(map(_problem, exc.errors(include_url=False)))
        raise FinalError("InvalidArgument", f"{path}: {problems}") from None
    return {name: getattr(config, name) for name in settings}


# In YAML's words rather than Python's.
_YAML_WORDS = {"tuple_type": "Input should be a list", "dict_type": "Input should be a mapping"}


def _problem(error: Any) -> str:
    """One setting's problem, as pydantic found it: where, the value, what is wrong."""
    where = ".".join(map(str, error["loc"]))
    if error["type"] == "value_error":  # ours: the message names the value already
        return f"{where}: {error['ctx']['error']}"
    return f"{where}: {error['input']!r}: {_YAML_WORDS.get(error['type'], error['msg'])}"
