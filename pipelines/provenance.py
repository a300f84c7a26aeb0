"""What a build is made from: inputs, tool versions, and the content address derived from them.

Two builds with the same kickstart text, install media, settings and tool versions produce
the same template, so the build id (a hash of all of these) names the published artifacts
and an existing manifest under that id means the build can be skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from importlib import metadata
from urllib.parse import urlsplit

import requests

from importer.errors import FinalError, TransientError
from importer.redaction import describe
from importer.sources.http import FINAL_STATUSES, redact_url
from pipelines.finalize import FinalizeOptions, sha256_of
from pipelines.manifest import Inputs, MediaFile, TreeRecord
from pipelines.template import Template

TREEINFO_TIMEOUT = 15.0


def inputs(template: Template) -> Inputs:
    """The install media, identified by content where diskflow can see it."""
    source = template.install
    files = {
        key: MediaFile(path.name, sha256_of(path))
        for key in ("iso", "kernel", "initrd")
        if (path := getattr(source, key))
    }
    # A tree's .treeinfo changes with every compose, so a new compose means a new build.
    tree = TreeRecord(source.location, _treeinfo(source.location)) if source.location else None
    return Inputs(**files, location=tree, kernel_args=source.kernel_args or None)


def tool_versions() -> dict[str, str]:
    """Versions of everything that shapes the image: diskflow, virt-install, qemu, libvirt."""
    versions = {"diskflow": metadata.version("diskflow")}
    # `virsh version` would name the daemon's QEMU, but costs libvirt a capabilities probe
    # (seconds); the local binaries are what a worker pod runs.
    for tool in ("virt-install", "qemu-img", "qemu-system-x86_64", "virsh"):
        versions[tool] = _first_line(tool, ["--version"])
    return versions


def build_id(
    kickstart_sha256: str,
    template: Template,
    media: Inputs,
    tools: dict[str, str],
    finalize: FinalizeOptions,
) -> str:
    """The content address of a build: 20 hex digits of a hash over everything it depends on."""
    recipe = {
        "kickstart": kickstart_sha256,
        "version": template.version,
        "os_variant": template.os_variant,
        "disk_size": template.disk_size,
        "memory": template.memory,
        "vcpus": template.vcpus,
        "inputs": media.to_json(),  # as the manifest records them: ids stay what they were
        "tools": tools,
        "seal": finalize.seal,
        "compression": str(finalize.compression),
    }
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:20]


def _treeinfo(location: str) -> str | None:
    """The sha256 of the tree's .treeinfo; None for a tree without one (404, 410) or one
    diskflow cannot fetch itself (nfs:, ftp:, which virt-install reads on its own).

    Anything else that keeps the file from being read fails the build rather than giving a
    None in its place: that would change the build id on a network blip (a needless rebuild)
    and give two different composes fetched while the mirror was down the same id (a wrong
    skip).
    """
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https"):
        return None
    url = location.rstrip("/") + "/.treeinfo"
    where = redact_url(url)
    secrets = [s for s in (parts.password, parts.query) if s]
    try:
        response = requests.get(url, timeout=TREEINFO_TIMEOUT)
    except requests.exceptions.SSLError as exc:  # as the importer: retrying will not help
        raise FinalError("TLSError", f"cannot read {where}: {describe(exc, secrets)}") from None
    except requests.exceptions.InvalidURL as exc:
        raise FinalError("InvalidURL", f"cannot read {where}: {describe(exc, secrets)}") from None
    except requests.RequestException as exc:
        raise TransientError(
            "SourceUnreachable", f"cannot read {where}: {describe(exc, secrets)}"
        ) from None
    status = response.status_code
    if 200 <= status < 300:
        return hashlib.sha256(response.content).hexdigest()
    if status in (404, 410):
        return None  # a tree without .treeinfo: the build id records that there was none
    answer = f"cannot read {where}: HTTP {status} {response.reason}"
    if status in (408, 429) or status >= 500:
        raise TransientError("SourceUnreachable", answer)
    raise FinalError(FINAL_STATUSES.get(status, "HttpError"), answer)


def _first_line(tool: str, args: list[str]) -> str:
    lines = _output([tool, *args]).splitlines()
    return lines[0].strip() if lines else "unknown"


def _output(command: list[str]) -> str:
    if not shutil.which(command[0]):
        return ""
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else ""
