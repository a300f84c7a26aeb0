"""One event schema for every command, --log-level / -v / -q, and -o json for the lists."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support.installer")
pytest_plugins = ["tests.support.installer"]

from importer.events import Event, Level, Output, Type, rfc3339  # noqa: E402
from tests.conftest import Images  # noqa: E402
from tests.pipelines.manifests import finished_build  # noqa: E402
from tests.support.commands import diskflow  # noqa: E402
from tests.support.events import events, result  # noqa: E402
from tests.support.faultserver import FaultServer  # noqa: E402
from tests.support.git import commit, git, use_test_identity  # noqa: E402
from tests.support.installer import Installer, write_template  # noqa: E402

LINE = re.compile(r"\d\d:\d\d:\d\d \S* +[-!.x|:] ")


def test_an_event_is_rfc3339_utc_and_survives_a_relay() -> None:
    made = Event(Type.PROGRESS, "download 1 MiB", fields={"stage": "download", "eta": None},
                 time=1764568541.1234)  # fmt: skip
    data = made.to_json()
    assert data == {"time": "2025-12-01T05:55:41.123Z", "level": "info", "type": "progress",
                    "message": "download 1 MiB", "fields": {"stage": "download"}}  # fmt: skip
    again = Event.from_json(json.loads(json.dumps(data)))
    assert again.type is Type.PROGRESS and again.fields == {"stage": "download"}
    assert rfc3339(again.time) == data["time"]


def test_output_leaves_out_what_is_below_its_level_but_never_the_result(
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = Output(json_lines=True, level=Level.WARNING)
    output(Event(Type.LOG, "said at info"))
    output(Event(Type.LOG, "a warning", Level.WARNING))
    output(Event(Type.RESULT, "failed", Level.ERROR, {"ok": False, "reason": "NotFound"}))
    out, err = capsys.readouterr()
    assert [e["message"] for e in events(out)] == ["a warning", "failed"]
    assert err == "error: failed [NotFound]\n"  # for a person reading the CI log
    text = Output(json_lines=False, progress=False)
    text(Event(Type.PROGRESS, "download 1 MiB", fields={"stage": "download"}))
    text(Event(Type.LOG, "retrying", Level.WARNING, {"stage": "download"}))
    text(Event(Type.RESULT, "imported x", fields={"ok": True}))
    out, err = capsys.readouterr()
    assert out == "imported x\n"
    assert LINE.match(err) and err.endswith(" download ! retrying\n") and err.count("\n") == 1


def test_quiet_json_says_only_the_result_and_verbose_says_debug(
    images: Images, tmp_path: Path
) -> None:
    args = ("import", "blank:", tmp_path / "d.img", "--size", "1Mi", "--progress", "json")
    quiet = diskflow(*args, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert [e["type"] for e in events(quiet.stdout)] == ["result"] and quiet.stderr == ""
    said = events(diskflow(*args).stdout)
    assert "progress" in {e["type"] for e in said}
    # The publisher says where each file goes at debug: shown with -v, and as JSON.
    build = finished_build(tmp_path, images.path("qcow2"))
    store = tmp_path / "store"
    store.mkdir()
    publish = ("publish", build, "--publish-to", store, "--progress", "json")
    plain = diskflow(*publish, "--log-level", "info")
    assert plain.returncode == 0, plain.stderr
    assert not [e for e in events(plain.stdout) if e["level"] == "debug"]
    verbose = diskflow(*publish, "-v")
    assert verbose.returncode == 0, verbose.stderr
    debug = [e for e in events(verbose.stdout) if e["level"] == "debug"]
    assert debug and all(e["type"] == "log" for e in debug)
    assert any(e["logger"] == "diskflow.publish" for e in debug), debug
    assert result(verbose.stdout)["image"].startswith("file://")
    level_from_env = diskflow(*publish, env={"DISKFLOW_LOG_LEVEL": "DEBUG"})
    assert [e["message"] for e in events(level_from_env.stdout) if e["level"] == "debug"]


def test_progress_none_prints_warnings_but_no_info(faults: FaultServer, tmp_path: Path) -> None:
    """A retry is a warning; the resume that follows an info line: --progress none (and -q)
    shows the one, not the other, as readable lines on stderr."""

    def args() -> tuple[str | Path, ...]:  # a new token: the server fails its first request
        url = faults.url(uuid.uuid4().hex, "disk.raw.gz", status=503, times=1)
        return ("import", url, tmp_path / "d.img", "--retry-backoff", "0")

    for quiet in (("--progress", "none"), ("--progress", "log", "-q")):
        done = diskflow(*args(), *quiet)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.splitlines()
        assert lines and all(LINE.match(line) and " ! " in line for line in lines), lines
        assert done.stdout.startswith("imported ")
        (tmp_path / "d.img").unlink()
    logged = diskflow(*args(), "--progress", "log")
    assert logged.returncode == 0, logged.stderr
    lines = logged.stderr.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert any(" - download " in line and line.endswith("B/s") for line in lines), lines


def test_validate_and_ci_changed_speak_json(
    tmp_path: Path, minimal_installer: Installer, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / "kickstarts").mkdir(parents=True)
    (repo / "kickstarts" / "README.md").write_text("templates go here\n")
    use_test_identity(monkeypatch)
    git(repo, "init", "-q")
    commit(repo)
    base = git(repo, "rev-parse", "HEAD")
    write_template(repo / "kickstarts", minimal_installer, "alpha")
    write_template(repo / "kickstarts", minimal_installer, "broken", extra="part / --size=lots")
    commit(repo)

    checked = diskflow("validate", "-o", "json", cwd=repo)
    assert checked.returncode == 1
    document = json.loads(checked.stdout)
    assert document["ok"] is False
    alpha, broken = document["templates"]
    assert alpha["ok"] is True and alpha["kickstart"] == "kickstarts/alpha.ks"
    assert broken["ok"] is False and broken["reason"] == "InvalidKickstart", broken
    assert "error:" in checked.stderr  # and said for a person too

    changed = diskflow("ci", "changed", "--since", base, "--format", "json", cwd=repo)
    assert changed.returncode == 0, changed.stderr
    names = {t["name"] for t in json.loads(changed.stdout)["templates"]}
    assert names == {"alpha", "broken"}
    nothing = diskflow("ci", "changed", "--since", "HEAD", "-o", "json", cwd=repo)
    assert json.loads(nothing.stdout) == {"since": "HEAD", "templates": []}


def test_a_build_relayed_by_a_worker_keeps_its_time() -> None:
    from pipelines.events import event, relay

    said: list[tuple[str, str, str, dict[str, object]]] = []
    made = event("install", "warning", "slow", time=time.time() - 60, domain="d")
    relay(lambda stage, kind, message, **fields: said.append((stage, kind, message, fields)))(
        Event.from_json(made.to_json())
    )
    [(stage, kind, message, fields)] = said
    assert (stage, kind, message, fields["domain"]) == ("install", "warning", "slow", "d")
    assert abs(fields["time"] - made.time) < 0.001  # type: ignore[operator]
