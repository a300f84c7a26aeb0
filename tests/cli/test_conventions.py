"""The command line keeps the conventions its users bring from other tools: options from the
environment (DISKFLOW_<OPTION>), durations with units, -h, --version, shell completion, plain
help from a pipe, and every bad input a usage error (exit 2) that names it, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from importer.errors import FinalError
from importer.quantity import parse_duration
from tests.pipelines.manifests import STORED
from tests.support.commands import diskflow
from tests.support.events import result
from tests.support.stores import BUCKET, s3_client

pytest_plugins = ["tests.support.stores"]

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    (), ("import",), ("demo",), ("demo", "import"), ("demo", "template"), ("validate",),
    ("build",), ("publish",), ("worker",), ("controller",), ("ci",), ("ci", "build"),
    ("ci", "changed"), ("manifest",), ("manifest", "convert"),
]  # fmt: skip
# Options that act and exit rather than set anything: no variable of their own.
ACTING = {"help", "version", "install-completion", "show-completion"}
LONG_OPTION = re.compile(r"^ {2}(?:-\w, )?--([\w-]+)", re.MULTILINE)


def help_of(command: tuple[str, ...]) -> str:
    done = diskflow(*command, "--help")  # captured: standard output is a pipe
    assert done.returncode == 0, done.stderr
    return done.stdout


def usage_error(done: object, *said: str) -> None:
    """`done` exited 2 with a message saying each of `said`, and no traceback."""
    out = f"{done.stdout}{done.stderr}"  # type: ignore[attr-defined]
    assert done.returncode == 2, out  # type: ignore[attr-defined]
    assert "Error: " in done.stderr and "Traceback" not in out, out  # type: ignore[attr-defined]
    for words in said:
        assert words in done.stderr, done.stderr  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_from_a_pipe_is_plain_words_and_names_every_options_variable(
    command: tuple[str, ...],
) -> None:
    text = help_of(command)
    assert not re.search(r"<[\w |\[\]]+>|list\[|\bstr\b|\bbool\b", text), text
    assert not re.search("[\u2500-\u257f]", text), "box-drawing characters in piped help"
    flat = " ".join(text.split())  # help wraps lines
    for option in set(LONG_OPTION.findall(text)) - ACTING:
        variable = "DISKFLOW_" + option.upper().replace("-", "_")
        assert f"env var: {variable}" in flat, (option, text)


def test_no_options_variable_means_something_else_already() -> None:
    """The variables diskflow, its pods and its charts read at run time keep their meaning:
    no option's variable has one of their names."""
    read = set()
    for directory in ("diskflow", "importer", "pipelines", "charts", "images"):
        for path in (REPO / directory).rglob("*"):
            if path.suffix in (".py", ".sh", ".yaml", ".tpl") and path.is_file():
                read |= set(re.findall(r"DISKFLOW_[A-Z0-9_]+", path.read_text()))
    assert {"DISKFLOW_BROKER_URL", "DISKFLOW_HTTP_USER", "DISKFLOW_PUBLISH_TOKEN"} <= read
    options = set()
    for command in COMMANDS:
        options |= set(
            re.findall(r"env var: (DISKFLOW_[A-Z0-9_]+)", " ".join(help_of(command).split()))
        )
    assert "DISKFLOW_PUBLISH_TO" in options and "DISKFLOW_S3_ENDPOINT" in options
    # A help text may name a variable it reads ("default: DISKFLOW_WORKER_CONCURRENCY");
    # the sources spell out no option's variable: they are made from the option's name.
    assert not options & read


def test_options_come_from_the_environment(tmp_path: Path) -> None:
    dest = tmp_path / "blank.img"
    env = {"DISKFLOW_SIZE": "2Mi", "DISKFLOW_FILESYSTEM_OVERHEAD": "0",
           "DISKFLOW_PROGRESS": "json", "DISKFLOW_DEADLINE": "1h30m"}  # fmt: skip
    done = diskflow("import", "blank:", dest, env=env)
    assert done.returncode == 0, done.stderr
    assert result(done.stdout)["size"] == 2 << 20
    assert dest.stat().st_size == 2 << 20
    # The command line wins over the environment.
    done = diskflow("import", "blank:", dest, "--size", "3Mi", "--progress", "none", env=env)
    assert done.returncode == 0 and dest.stat().st_size == 3 << 20, done.stderr


def test_a_flag_and_a_path_come_from_the_environment(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("")
    env = {"DISKFLOW_INSECURE": "true", "DISKFLOW_CA_BUNDLE": str(pem)}
    done = diskflow("import", "blank:", tmp_path / "d.img", "--size", "1Mi", env=env)
    assert done.returncode == 1 and "--ca-bundle and --insecure contradict" in done.stderr


def test_a_repeatable_option_takes_one_value_per_line_of_its_variable(tmp_path: Path) -> None:
    # Split on whitespace, "Accept: */*" would be two headers; the second line is refused.
    env = {"DISKFLOW_HEADER": "Accept: */*\nX-Trace: a b c\nno colon here\n"}
    done = diskflow("import", "blank:", tmp_path / "d.img", "--size", "1Mi", env=env)
    assert done.returncode == 2, done.stderr
    assert "--header number 3" in done.stderr and "is not of the form" in done.stderr


def test_a_required_option_comes_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(STORED))
    env = {"DISKFLOW_PUBLISH_TO": "https://ci:s3cr3t@store.example/x"}
    done = diskflow("publish", tmp_path, env=env)
    assert done.returncode == 1, done.stderr  # not "Missing option '--publish-to'"
    assert "must not carry credentials" in done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr


def test_the_s3_endpoint_comes_from_the_environment(moto_s3: str, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    s3_client(moto_s3).put_object(Bucket=BUCKET, Key="env/disk.raw", Body=data)
    dest = tmp_path / "disk.img"
    env = {"DISKFLOW_S3_ENDPOINT": moto_s3, "DISKFLOW_PROGRESS": "none"}
    done = diskflow("import", f"s3://{BUCKET}/env/disk.raw", dest, env=env)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == data


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("3h", 10800), ("1h30m", 5400), ("1.5h", 5400),
     ("250ms", 0.25), ("2d", 172800), ("600", 600), ("0.5", 0.5), (" 1m30s ", 90)],
)  # fmt: skip
def test_durations_take_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "h", "1h 30m", "-5s", "1m30", "1e3", "inf", "1.2.3s"])
def test_a_malformed_duration_is_refused(text: str) -> None:
    with pytest.raises(FinalError, match="is not a duration like 90s"):
        parse_duration(text)


def test_duration_options_take_units_and_name_a_bad_one(tmp_path: Path) -> None:
    dest = tmp_path / "d.img"
    done = diskflow("import", "blank:", dest, "--size", "1Mi", "--progress", "none",
                    "--deadline", "1h30m", "--stall-timeout", "90s", "--retry-backoff", "250ms",
                    "--min-rate-window", "2m")  # fmt: skip
    assert done.returncode == 0, done.stderr
    usage_error(
        diskflow("import", "blank:", dest, "--deadline", "3 hours"),
        "'--deadline'", "'3 hours' is not a duration like 90s, 10m, 3h, 1h30m",
    )  # fmt: skip
    usage_error(
        diskflow("import", "blank:", dest, "--min-rate-window", "500ms"),
        "'--min-rate-window'", "500ms is less than 1s",
    )  # fmt: skip
    usage_error(
        diskflow("import", "blank:", dest, env={"DISKFLOW_STALL_TIMEOUT": "soon"}),
        "DISKFLOW_STALL_TIMEOUT", "'soon' is not a duration",
    )  # fmt: skip
    for command, option in (("build", "--timeout"), ("build", "--no-output-timeout"),
                            ("build", "--boot-timeout"), ("ci build", "--timeout"),
                            ("controller", "--backoff-max"), ("controller", "--stall-timeout"),
                            ("controller", "--progress-interval")):  # fmt: skip
        extra = ["x.ks"] if command == "build" else ["--since", "HEAD"] if "ci" in command else []
        done = diskflow(*command.split(), *extra, option, "3y", cwd=tmp_path)
        usage_error(done, f"'{option}'", "'3y' is not a duration")


def test_h_is_help_everywhere() -> None:
    for command in COMMANDS:
        done = diskflow(*command, "-h")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Usage: diskflow") and "-h, --help" in done.stdout


def test_version() -> None:
    done = diskflow("--version")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"diskflow \d+\.\d+\S*\n", done.stdout)


def test_shell_completion() -> None:
    done = diskflow("--show-completion", "bash")
    assert done.returncode == 0 and "_DISKFLOW_COMPLETE" in done.stdout, done.stderr
    words = {"COMP_WORDS": "diskflow imp", "COMP_CWORD": "1", "_DISKFLOW_COMPLETE": "complete_bash"}
    done = diskflow(env=words)
    assert done.returncode == 0 and done.stdout.split() == ["import"], done.stderr
    words |= {"COMP_WORDS": "diskflow build --publish-t", "COMP_CWORD": "2"}
    done = diskflow(env=words)
    assert done.returncode == 0 and done.stdout.split() == ["--publish-to"], done.stderr


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (("validate", "--kickstarts", "kickstart"), {}, ("'--kickstarts'", "no such directory")),
        (("worker", "--log-level", "bogus"), {}, ("'--log-level'", "'bogus' is not a log level")),
        (("import", "-v", "-q", "blank:", "x.img"), {}, ("'-v'", "opposite")),
        (
            ("worker",),
            {"DISKFLOW_WORKER_CONCURRENCY": "abc"},
            ("DISKFLOW_WORKER_CONCURRENCY='abc'", "whole number"),
        ),
        (("import", "http://[::1", "x.img"), {}, ("'SOURCE'", "not a valid URL")),
        (("import", "http://ci:s3cr3t/x.img", "x.img"), {}, ("'SOURCE'", "port")),
        (("import", "blank:", "x.img", "--metrics-port", "99999"), {}, ("'--metrics-port'",)),
        (("controller", "--metrics-port", "99999"), {}, ("'--metrics-port'",)),
        (("import", "blank:", "x.img", "--size", "1e9x"), {}, ("'--size'", "not a quantity")),
        (("import", "blank:", "x.img", "--connections", "0"), {}, ("'--connections'",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_bad_input_is_a_usage_error(
    args: tuple[str, ...], env: dict[str, str], said: tuple[str, ...], tmp_path: Path
) -> None:
    done = diskflow(*args, env=env, cwd=tmp_path)
    usage_error(done, *said)
    assert "s3cr3t" not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was started
