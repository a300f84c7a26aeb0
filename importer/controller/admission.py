"""Admission limits: at most N importer pods at once cluster-wide and M per source host,
so that a batch of DataVolumes does not overload a mirror (CDI has no such limit)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def no_slot(
    host: str | None, running_hosts: Iterable[str | None], *, limit: int, per_host: int
) -> str | None:
    """Why an import from `host` may not start while imports from `running_hosts` run;
    None when it may. A limit of 0 is no limit."""
    hosts = Counter(running_hosts)
    total = sum(hosts.values())
    if limit and total >= limit:
        return f"{total} of at most {limit} imports are running; waiting for one to finish"
    if per_host and host is not None and hosts[host] >= per_host:
        return (
            f"{hosts[host]} of at most {per_host} imports from {host} are running; "
            "waiting for one to finish"
        )
    return None
