"""What a build takes from the machine it runs on: the libvirt URI (LIBVIRT_DEFAULT_URI, as
libvirt's own tools do) and the worker's time limits."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from importer.errors import FinalError, TransientError  # noqa: E402
from pipelines import virtinstall  # noqa: E402
from pipelines.steps import BuildRequest, BuildState, build_template  # noqa: E402
from pipelines.tasks import (  # noqa: E402
    BUILD_MARGIN_ENV,
    BUILD_MARGIN_SECONDS,
    DEFAULT_VISIBILITY_TIMEOUT,
    MAX_BUILD_TIMEOUT_ENV,
    VISIBILITY_ENV,
    WorkerSettings,
    within_max_build_time,
)
from pipelines.template import InstallSource, Template  # noqa: E402
from pipelines.virtinstall import (  # noqa: E402
    DEFAULT_LIBVIRT_URI,
    LIBVIRT_URI_ENV,
    BuildOptions,
    OnError,
    check_libvirt,
    destroy_domain,
    domain_exists,
    libvirt_uri,
)
from tests.pipelines.manifests import finished  # noqa: E402
from tests.support.installer import Installer, write_template  # noqa: E402

# libvirt's test driver: answers in-process, no daemon needed.
TEST_DRIVER = "test:///default"
NOWHERE = "qemu+unix:///session?socket=/nonexistent/libvirt-sock"


def test_the_uri_is_the_given_one_else_the_environment_s_else_the_system_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(LIBVIRT_URI_ENV, raising=False)
    assert libvirt_uri(None) == DEFAULT_LIBVIRT_URI == "qemu:///system"
    monkeypatch.setenv(LIBVIRT_URI_ENV, "qemu:///session")
    assert libvirt_uri(None) == "qemu:///session"
    assert libvirt_uri("qemu:///system") == "qemu:///system"


def test_a_request_carries_no_uri_unless_one_was_given() -> None:
    """A queued build must use the worker's libvirt, not the default of the client's."""
    request = BuildRequest(kickstart="t.ks")
    assert request.build.connect is None
    assert BuildRequest.from_json(request.to_json()).build.connect is None


def test_on_error_keep_reaches_a_worker() -> None:
    request = BuildRequest(kickstart="t.ks", build=BuildOptions(on_error=OnError.KEEP))
    assert BuildRequest.from_json(request.to_json()).build.on_error is OnError.KEEP


def test_libvirt_is_asked_at_the_resolved_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIBVIRT_URI_ENV, TEST_DRIVER)
    check_libvirt(libvirt_uri(None))
    monkeypatch.setenv(LIBVIRT_URI_ENV, NOWHERE)
    with pytest.raises(TransientError, match=re.escape(f"cannot reach libvirt at {NOWHERE}:")):
        check_libvirt(libvirt_uri(None))
    check_libvirt(libvirt_uri(TEST_DRIVER))  # a given URI wins over the environment


def test_libvirt_s_errors_become_the_build_s_reasons() -> None:
    with pytest.raises(TransientError) as unreachable:
        check_libvirt(NOWHERE)
    assert unreachable.value.reason == "LibvirtUnreachable"
    assert "Failed to connect socket to '/nonexistent/libvirt-sock'" in unreachable.value.message
    # Retrying cannot help a URI libvirt refuses: final, with libvirt's own words.
    with pytest.raises(FinalError) as refused:
        check_libvirt("qemu:///nonsense")
    assert refused.value.reason == "LibvirtFailed"
    assert refused.value.message.startswith("libvirt at qemu:///nonsense: internal error:")
    assert "unexpected qemu URI path '/nonsense'" in refused.value.message


def test_a_hung_libvirtd_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket that accepts connections and never answers, as a hung daemon's does.
    path = tmp_path / "libvirt-sock"
    with socket.socket(socket.AF_UNIX) as hung:
        hung.bind(str(path))
        hung.listen()
        monkeypatch.setattr(virtinstall, "LIBVIRT_TIMEOUT_SECONDS", 1.0)
        uri = f"qemu+unix:///system?socket={path}"
        with pytest.raises(TransientError) as failure:
            destroy_domain(uri, "diskflow-any")
    assert failure.value.reason == "LibvirtUnreachable"
    assert failure.value.message == f"libvirt at {uri} did not answer within 1s"


def test_domains_are_looked_up_and_an_absent_one_is_no_error() -> None:
    assert domain_exists(TEST_DRIVER, "test")  # the test driver's own domain
    assert not domain_exists(TEST_DRIVER, "diskflow-absent-00000000")
    said: list[tuple[str, ...]] = []
    destroy_domain(TEST_DRIVER, "diskflow-absent-00000000", lambda *event, **_: said.append(event))
    assert said == []  # nothing to do, nothing said


def test_a_build_without_connect_uses_libvirt_default_uri(
    minimal_installer: Installer, vm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIBVIRT_URI_ENV, NOWHERE)
    kickstart = write_template(tmp_path, minimal_installer, "defaulturi")
    request = BuildRequest(
        kickstart=str(kickstart), output=str(tmp_path / "out"), workdir=str(vm_dir),
        build=BuildOptions(timeout=60, no_output_timeout=60, network="none"),
    )  # fmt: skip
    with pytest.raises(TransientError) as failure:
        build_template(request)
    assert failure.value.reason == "LibvirtUnreachable"
    assert f"cannot reach libvirt at {NOWHERE}" in failure.value.message
    assert LIBVIRT_URI_ENV in failure.value.message  # how to pick another


def test_the_maximum_build_time_defaults_to_the_visibility_timeout_less_the_margin() -> None:
    assert WorkerSettings.from_environment({}) == WorkerSettings(
        concurrency=1,
        visibility_timeout=DEFAULT_VISIBILITY_TIMEOUT,
        max_build_timeout=DEFAULT_VISIBILITY_TIMEOUT - BUILD_MARGIN_SECONDS,
    )
    settings = WorkerSettings.from_environment({VISIBILITY_ENV: "7200", BUILD_MARGIN_ENV: "0"})
    assert settings.max_build_timeout == 7200
    exact = {VISIBILITY_ENV: "3600", MAX_BUILD_TIMEOUT_ENV: str(3600 - BUILD_MARGIN_SECONDS)}
    assert WorkerSettings.from_environment(exact).max_build_timeout == 3000


def test_a_worker_lowers_the_install_and_boot_test_timeouts_to_its_maximum(tmp_path: Path) -> None:
    template = Template(
        name="t", kickstart=tmp_path / "t.ks", metadata=tmp_path / "t.toml", version="RHEL9",
        os_variant="linux2022", disk_size=1 << 30, memory=1 << 30, vcpus=1,
        install=InstallSource(location="http://mirror.example/os/"),
    )  # fmt: skip
    request = BuildRequest(kickstart="t.ks", build=BuildOptions(timeout=600, boot_timeout=5000))
    state = BuildState(request, template, "", "id", finished("t", "id"))
    said: list[str] = []

    limits = WorkerSettings(visibility_timeout=4000, max_build_timeout=3400)
    lowered = within_max_build_time(state, limits, lambda *event, **_: said.append(event[2]))

    assert lowered.request.build.timeout == 600  # within the maximum: kept
    assert lowered.request.build.boot_timeout == 3400
    assert said == [
        "the boot test's timeout of 5000s is lowered to 3400s, this worker's maximum "
        f"({MAX_BUILD_TIMEOUT_ENV}), which keeps a task within the broker's visibility timeout "
        f"of 4000s ({VISIBILITY_ENV})"
    ]
