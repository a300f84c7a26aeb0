"""Options declared once: the groups of options `build`, `ci build`, `publish` and `import`
share, the flags → request conversion, and the command modules' independence from the app
that registers them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from diskflow.cli import LAZY_COMMANDS, app
from diskflow.flags import options, takes_groups
from diskflow.options import S3Flags
from diskflow.templates_cli import BuildFlags, PublishFlags, VolumeMode
from importer.sources.s3_options import S3Options
from pipelines.accel import Accel
from pipelines.finalize import FinalizeOptions, QcowCompression
from pipelines.steps import BuildRequest, PublishOptions
from pipelines.virtinstall import BuildOptions
from tests.support.commands import diskflow

REPO = Path(__file__).resolve().parents[2]
# The commands that take each group: every option of the group must be on each of them.
TAKERS = {
    S3Flags: (("import",), ("build",), ("ci", "build"), ("publish",)),
    PublishFlags: (("build",), ("ci", "build"), ("publish",)),
    BuildFlags: (("build",), ("ci", "build")),
}


def command(*path: str) -> Any:
    """The click command at `path` under `diskflow` (click's own, or the one typer vendors)."""
    found: Any = typer.main.get_command(app)
    for name in path:
        found = found.commands[name]
    return found


def declared(cmd: Any) -> dict[str, tuple[str, ...]]:
    """Each parameter of `cmd` by name: the option strings it answers to."""
    return {param.name or "": (*param.opts, *param.secondary_opts) for param in cmd.params}


@pytest.mark.parametrize("group", TAKERS, ids=lambda group: group.__name__)
def test_every_command_taking_a_group_has_all_its_options_spelt_alike(group: type) -> None:
    names = {parameter.name for parameter in options(group)}  # the group's fields, derived
    assert names  # a group of nothing would pass anything
    spellings = [
        {name: opts for name, opts in declared(command(*path)).items() if name in names}
        for path in TAKERS[group]
    ]
    assert set(spellings[0]) == names
    assert all(other == spellings[0] for other in spellings[1:])


def test_groups_nest_build_holds_publish_holds_s3() -> None:
    assert {p.name for p in options(S3Flags)} < {p.name for p in options(PublishFlags)}
    assert {p.name for p in options(PublishFlags)} < {p.name for p in options(BuildFlags)}


# A toy group pair, at module level: their annotations are strings (this module has
# `from __future__ import annotations`) that takes_groups must resolve as typer needs.
@dataclass(frozen=True)
class Inner:
    level: Annotated[int, typer.Option(min=0, help="A level.")] = 3


@dataclass(frozen=True)
class Outer:
    name: Annotated[str, typer.Option(help="A required name.")]
    inner: Inner = field(default_factory=Inner)
    loud: Annotated[bool, typer.Option(help="Shout.")] = False


def test_a_field_added_to_a_group_is_an_option_of_every_command_that_takes_it() -> None:
    toy = typer.Typer()
    seen: list[tuple[str, Outer]] = []

    @toy.command()
    @takes_groups
    def first(
        path: Annotated[str, typer.Argument()],
        outer: Outer,
        tail: Annotated[int, typer.Option()] = 0,
    ) -> None:
        seen.append((f"first {path} {tail}", outer))

    @toy.command()
    @takes_groups
    def second(outer: Outer) -> None:
        seen.append(("second", outer))

    runner = CliRunner()
    done = runner.invoke(toy, ["first", "here", "--name", "n", "--level", "7", "--tail", "2"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(toy, ["second", "--name", "m", "--loud"])
    assert done.exit_code == 0, done.output
    assert seen == [
        ("first here 2", Outer(name="n", inner=Inner(level=7))),
        ("second", Outer(name="m", loud=True)),
    ]
    missing = runner.invoke(toy, ["second"])
    assert missing.exit_code == 2 and "--name" in missing.output
    help_text = runner.invoke(toy, ["first", "--help"]).output
    assert all(option in help_text for option in ("--name", "--level", "--loud", "--tail"))


def test_two_options_of_one_name_are_refused() -> None:
    def twice(outer: Outer, name: Annotated[str, typer.Option()] = "") -> None:
        """Takes --name twice."""

    with pytest.raises(TypeError, match="more than one option named name"):
        takes_groups(twice)


def test_build_help_shows_the_boot_test_and_root_options() -> None:
    done = diskflow("build", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--root", "--boot-test / --no-boot-test", "--boot-timeout", "--s3-endpoint"):
        assert option in done.stdout
    validate = diskflow("validate", "--help")
    assert validate.returncode == 0 and "--root" in validate.stdout


def test_the_flags_defaults_are_the_pipelines() -> None:
    """A build with no option given is the pipeline's default request."""
    assert BuildFlags().request(Path("t.ks")) == BuildRequest(kickstart="t.ks")


def test_every_build_option_reaches_the_request(tmp_path: Path) -> None:
    """From the command line through the groups to BuildRequest, as `build` makes it."""
    toy = typer.Typer()
    requests: list[BuildRequest] = []

    @toy.command()
    @takes_groups
    def probe(flags: BuildFlags) -> None:
        requests.append(flags.request(Path("t.ks")))

    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\n")
    args = [
        "--output", tmp_path / "out", "--publish-to", "s3://b/p", "--force", "--root", tmp_path,
        "--accel", "tcg", "--connect", "qemu:///session", "--timeout", "100",
        "--no-output-timeout", "50", "--network", "none", "--seal", "--compression", "zlib",
        "--no-boot-test", "--boot-timeout", "42", "--workdir", tmp_path / "work",
        "--s3-endpoint", "http://127.0.0.1:9", "--s3-region", "r", "--s3-addressing", "path",
        "--s3-profile", "p", "--s3-credentials-file", credentials, "--auth-file", credentials,
        "--public-url", "https://images.example", "--namespace", "ns", "--storage-class", "sc",
        "--secret-ref", "store", "--volume-mode", "Block",
    ]  # fmt: skip
    done = CliRunner().invoke(toy, list(map(str, args)))
    assert done.exit_code == 0, done.output
    assert requests == [
        BuildRequest(
            kickstart="t.ks",
            output=str(tmp_path / "out"),
            publish_to="s3://b/p",
            force=True,
            workdir=str(tmp_path / "work"),
            kickstart_root=str(tmp_path),
            boot_test=False,
            build=BuildOptions(
                connect="qemu:///session",
                accel=Accel.TCG,
                timeout=100,
                no_output_timeout=50,
                network="none",
                boot_timeout=42,
            ),
            finalize=FinalizeOptions(seal=True, compression=QcowCompression.ZLIB),
            publish=PublishOptions(
                s3=S3Options(
                    endpoint="http://127.0.0.1:9",
                    region="r",
                    addressing="path",
                    profile="p",
                    credentials_file=str(credentials),
                ),
                auth_file=str(credentials),
                public_url="https://images.example",
                namespace="ns",
                storage_class="sc",
                secret_ref="store",
                volume_mode=VolumeMode.BLOCK.value,
            ),
        )
    ]
    # The probe set every field: a field the request gains and the flags do not give fails here.
    given = {f.name for f in fields(BuildRequest)} - {"kickstart", "bundle"}
    assert all(getattr(requests[0], name) != getattr(BuildRequest("t.ks"), name) for name in given)


def test_a_boot_timeout_under_a_second_and_a_missing_root_are_usage_errors(tmp_path: Path) -> None:
    ks = REPO / "kickstarts" / "alma-9.ks"
    done = diskflow("build", ks, "--boot-timeout", "0")
    assert done.returncode == 2 and "--boot-timeout" in done.stderr
    done = diskflow("build", ks, "--root", tmp_path / "missing")
    assert done.returncode == 2 and "--root" in done.stderr


def test_validate_reads_includes_from_the_root_only() -> None:
    kickstarts = REPO / "kickstarts"
    ks = kickstarts / "alma-9.ks"  # it includes common/cloud-base.ks
    inside = diskflow("validate", "--root", kickstarts, ks)
    assert inside.returncode == 0, inside.stderr
    outside = diskflow("validate", "--root", kickstarts / "common", ks)
    assert outside.returncode == 1 and "[InvalidKickstart]" in outside.stderr


@pytest.mark.parametrize(
    "module", sorted({spec.partition(":")[0] for spec in LAZY_COMMANDS.values()})
)
def test_a_command_module_does_not_import_the_app(module: str) -> None:
    """The app registers the commands; the commands do not import it back."""
    check = f"import sys, {module}; assert 'diskflow.cli' not in sys.modules, 'diskflow.cli'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
