"""Kickstart validation and flattening, on the shipped templates and on broken kickstarts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pykickstart.constants import KS_SHUTDOWN, SELINUX_ENFORCING
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion

from importer.errors import FinalError
from pipelines.kickstart import confined, flatten, included_files, kickstart_digest, validate
from pipelines.template import load_template

KICKSTARTS = Path(__file__).resolve().parents[2] / "kickstarts"
SHIPPED = sorted(KICKSTARTS.glob("*.ks"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def minimal(extra: str = "") -> str:
    """A complete, valid kickstart body (each line its own line number) plus `extra`."""
    return "text\nrootpw --lock\nbootloader --timeout=1\n" + extra


def metadata(install: str) -> str:
    """A template's metadata (NAME.toml) whose [install] table holds the line `install`."""
    return (
        '[template]\nversion = "RHEL9"\nos_variant = "centos-stream9"\ndisk_size = "4Gi"\n'
        f'memory = "2Gi"\n\n[install]\n{install}\n'
    )


def parsed(text: str, version: str):
    handler = makeVersion(version)
    KickstartParser(handler, followIncludes=False).readKickstartFromString(text)
    return handler


def test_ships_centos_stream_alma_or_rocky_and_fedora() -> None:
    names = {p.stem for p in SHIPPED}
    assert "centos-stream-9" in names
    assert names & {"alma-9", "rocky-9"}
    assert any(n.startswith("fedora-") for n in names)


@pytest.mark.parametrize("kickstart", SHIPPED, ids=lambda p: p.stem)
def test_shipped_kickstart_validates_without_warnings(kickstart: Path) -> None:
    template = load_template(kickstart)
    result = validate(kickstart, template.version)
    assert result.warnings == ()
    # Every template uses the shared include, so includes are exercised for real.
    assert KICKSTARTS / "common" / "cloud-base.ks" in result.files
    assert not any(line.split()[:1] == ["%include"] for line in result.text.splitlines())


@pytest.mark.parametrize("kickstart", SHIPPED, ids=lambda p: p.stem)
def test_shipped_kickstart_is_a_golden_image(kickstart: Path) -> None:
    template = load_template(kickstart)
    ks = parsed(validate(kickstart, template.version).text, template.version)
    # The kickstart installs from the tree the metadata boots the installer from.
    assert ks.url.url == template.install.location
    assert ks.displaymode.nonInteractive
    # Powered off, not rebooted into the installed system: the build sees the VM stop.
    assert ks.reboot.action == KS_SHUTDOWN
    assert ks.rootpw.lock
    assert ks.selinux.selinux == SELINUX_ENFORCING
    assert "console=ttyS0" in ks.bootloader.appendLine
    assert ks.zerombr.zerombr and ks.clearpart.initAll
    assert [p.mountpoint for p in ks.partition.partitions] == ["/"]
    assert ks.partition.partitions[0].fstype in ("xfs", "ext4")
    assert {"cloud-init", "qemu-guest-agent"} <= set(ks.packages.packageList)
    assert "qemu-guest-agent" in ks.services.enabled
    post = "\n".join(s.script for s in ks.scripts)
    assert "truncate -s 0 /etc/machine-id" in post
    assert all(n.bootProto == "dhcp" for n in ks.network.network)
    assert ks.timezone.isUtc


def test_error_names_file_and_line(tmp_path: Path) -> None:
    ks = write(tmp_path / "bad.ks", minimal("frobnicate --now\n"))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(f"{ks}:4: ")
    assert "frobnicate" in e.value.message


def test_error_inside_an_include_names_the_included_file(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", "text\n%include common/disk.ks\nrootpw --lock\n")
    included = write(tmp_path / "common" / "disk.ks", "zerombr\npart / --fstype=xfs --bogus\n")
    with pytest.raises(FinalError) as e:
        validate(ks, "F44")
    assert e.value.message.startswith(f"{included}:2: Unexpected arguments to partition command")
    # The included line's own words are not repeated: the file may not be a kickstart at all.
    assert "--bogus" not in e.value.message
    assert "not shown" in e.value.message


def test_error_after_an_include_counts_lines_of_the_including_file(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", "text\n%include part.ks\nrootpw --lock\nnosuchcommand\n")
    write(tmp_path / "part.ks", "zerombr\nclearpart --all\nreqpart\n")
    with pytest.raises(FinalError) as e:
        validate(ks, "F44")
    assert e.value.message.startswith(f"{ks}:4: ")


def test_unterminated_section_is_an_error(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%post\necho hi\n"))
    with pytest.raises(FinalError, match="does not end with %end"):
        validate(ks, "RHEL9")


def test_unbalanced_quotes_are_an_error_with_a_line(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal('bootloader --append="console=ttyS0\n'))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.message.startswith(f"{ks}:4: ")


def test_warnings_name_file_and_line_not_pykickstart_line_numbers(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%include old.ks\ntimezone Etc/UTC --isUtc\n"))
    old = write(tmp_path / "old.ks", "# deprecated in RHEL 9\n\nautostep\n")
    result = validate(ks, "RHEL9")
    by_place = {(str(w.location.path), w.location.line): w.message for w in result.warnings}
    assert set(by_place) == {(str(old), 3), (str(ks), 5)}
    # pykickstart's own text says "on line 7" (its count in the flattened text): dropped.
    assert "autostep command has been deprecated" in by_place[(str(old), 3)]
    assert "line" not in by_place[(str(old), 3)]
    assert "--isUtc" in by_place[(str(ks), 5)]


def test_deprecated_section_warns_at_its_header(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%traceback\necho failed\n%end\n"))
    (warning,) = validate(ks, "F44").warnings
    assert warning.location.line == 4
    assert "%traceback section has been deprecated" in warning.message


def test_validation_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ks = write(tmp_path / "t.ks", minimal("autostep\n"))
    assert validate(ks, "RHEL9").warnings
    assert capfd.readouterr() == ("", "")


def test_missing_include_names_the_including_file_and_line(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%include common/nothere.ks\n"))
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9")
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(f"{ks}:4: %include {tmp_path / 'common' / 'nothere.ks'}")
    assert "No such file" in e.value.message


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    a = write(tmp_path / "a.ks", minimal("%include b.ks\n"))
    write(tmp_path / "b.ks", "%include a.ks\n")
    with pytest.raises(FinalError, match="%include cycle") as e:
        validate(a, "F44")
    assert e.value.message.startswith(f"{tmp_path / 'b.ks'}:1: ")


def test_unknown_version_suggests_close_ones(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal())
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL99")
    assert e.value.reason == "InvalidTemplate"
    assert "'RHEL99'" in e.value.message and "RHEL9" in e.value.message.split(";")[1]


def test_version_syntax_differs(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("autostep\n"))
    assert validate(ks, "RHEL9").warnings
    with pytest.raises(FinalError, match="autostep has been removed"):
        validate(ks, "F44")


def test_flatten_inlines_includes_transitively_relative_to_the_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks = write(tmp_path / "t.ks", "text\n%include common/base.ks\nrootpw --lock\n")
    base = write(tmp_path / "common" / "base.ks", "zerombr\n  %include  'disk.ks'  # shared\n")
    # No final line break: the next line must still start a line of its own.
    (tmp_path / "common" / "disk.ks").write_text("reqpart")
    # pykickstart would try the working directory first; diskflow must not.
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "common" / "base.ks", "bogus\n").parent.parent)

    flat = flatten(ks)
    assert flat.text == "text\nzerombr\nreqpart\nrootpw --lock\n"
    assert flat.files == (ks, base, tmp_path / "common" / "disk.ks")
    assert [str(o) for o in flat.origins] == [
        f"{ks}:1",
        f"{base}:1",
        f"{tmp_path / 'common' / 'disk.ks'}:1",
        f"{ks}:3",
    ]
    assert included_files(ks) == [base, tmp_path / "common" / "disk.ks"]


def test_include_a_pre_section_writes_stays_for_the_installer(tmp_path: Path) -> None:
    ks = write(
        tmp_path / "t.ks",
        minimal(
            "%include /tmp/part-include\n%pre\necho 'part / --size=4096' > /tmp/part-include\n"
            "%end\n"
        ),
    )
    result = validate(ks, "RHEL9")
    assert "%include /tmp/part-include\n" in result.text
    # The %pre that writes it is checked with the rest: nothing to warn about.
    assert result.warnings == ()
    assert included_files(ks) == []


def test_include_of_a_url_stays_with_a_warning(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%include http://ks.example.com/part.ks\n"))
    result = validate(ks, "RHEL9")
    assert "%include http://ks.example.com/part.ks\n" in result.text
    (warning,) = result.warnings
    assert str(warning.location) == f"{ks}:4"
    assert "left for the installer" in warning.message


def test_included_files_lists_missing_files_without_failing(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", "%include a.ks\n%include gone.ks\n%include a.ks\n")
    write(tmp_path / "a.ks", "%include t.ks\n")
    assert included_files(ks) == [tmp_path / "a.ks", tmp_path / "gone.ks"]


def test_digest_follows_included_content(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal("%include common/a.ks\n"))
    write(tmp_path / "common" / "a.ks", "%include b.ks\n")
    nested = write(tmp_path / "common" / "b.ks", "zerombr\n")
    before = kickstart_digest(flatten(ks).text)
    assert kickstart_digest(flatten(ks).text) == before
    assert validate(ks, "F44").digest == before
    nested.write_text("zerombr\nreqpart\n")
    assert kickstart_digest(flatten(ks).text) != before


def test_root_confines_includes_and_names_the_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    secret = write(tmp_path / "secret.ks", "worker-secret\n")
    ks = write(root / "t.ks", minimal("%include sub/ok.ks\n"))
    write(root / "sub" / "ok.ks", "zerombr\n%include ../../secret.ks\n")
    with pytest.raises(FinalError) as e:
        validate(ks, "RHEL9", root=root)
    assert e.value.reason == "InvalidKickstart"
    assert e.value.message.startswith(
        f"{root / 'sub' / 'ok.ks'}:2: %include ../../secret.ks is outside {root}:"
    )
    assert "worker-secret" not in e.value.message
    # Without a root, the default one (no git repository here: the kickstart's directory)
    # refuses it just the same, and the lenient walk (what pack() bundles) leaves it out.
    with pytest.raises(FinalError, match=r"ok\.ks:2: %include \.\./\.\./secret\.ks is outside"):
        validate(ks, "RHEL9")
    assert secret.resolve() not in [p.resolve() for p in included_files(ks)]
    assert included_files(ks) == [root / "sub" / "ok.ks"]


def test_root_refuses_a_symlink_out_and_the_kickstart_itself(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(tmp_path / "secret.ks", "zerombr\n")
    ks = write(root / "t.ks", minimal("%include link.ks\n"))
    (root / "link.ks").symlink_to(tmp_path / "secret.ks")
    with pytest.raises(FinalError, match=r"t\.ks:4: %include link\.ks is outside"):
        flatten(ks, root=root)
    with pytest.raises(FinalError, match="the kickstart is outside"):
        flatten(tmp_path / "secret.ks", root=root)
    # Includes that stay inside, however spelled, are fine.
    (root / "sub").mkdir()
    inside = write(root / "u.ks", minimal("%include sub/../t2.ks\n"))
    write(root / "t2.ks", "zerombr\n")
    assert flatten(inside, root=root).text.endswith("zerombr\n")


def test_confined_applies_to_calls_without_a_root_until_the_block_ends(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()  # the default root, after the block: the repository
    root = tmp_path / "root"
    write(tmp_path / "shared.ks", "zerombr\n")
    ks = write(root / "t.ks", minimal("%include ../shared.ks\n"))
    with confined(root), pytest.raises(FinalError, match="is outside"):
        validate(ks, "RHEL9")
    assert validate(ks, "RHEL9").text.endswith("zerombr\n")


@pytest.mark.parametrize(
    "location",
    [
        "https://builder:hunter2@mirror.example.com/9-stream/BaseOS/x86_64/os/",
        "http://token-hunter2@mirror.example.com/os/",
        "ftp://:hunter2@[::1]:21/os/",
    ],
)
def test_location_with_credentials_is_refused_unechoed(tmp_path: Path, location: str) -> None:
    ks = write(tmp_path / "t.ks", minimal())
    write(tmp_path / "t.toml", metadata(f'location = "{location}"'))
    with pytest.raises(FinalError) as e:
        load_template(ks)
    assert e.value.reason == "InvalidTemplate"
    assert e.value.message.startswith(
        f"{tmp_path / 't.toml'}: [install] location must not carry credentials (user:password@)"
    )
    assert "hunter2" not in str(e.value)


def test_location_with_an_at_sign_in_its_path_is_fine(tmp_path: Path) -> None:
    ks = write(tmp_path / "t.ks", minimal())
    location = "https://mirror.example.com/os/x86_64@2024/"
    write(tmp_path / "t.toml", metadata(f'location = "{location}"'))
    assert load_template(ks).install.location == location


def test_template_name_must_make_a_store_key(tmp_path: Path) -> None:
    from pipelines.template import load_template

    kickstart = write(tmp_path / "golden image.ks", minimal(""))
    write(tmp_path / "golden image.toml", '[template]\nversion = "RHEL9"\n')
    with pytest.raises(FinalError) as caught:
        load_template(kickstart)
    assert caught.value.reason == "InvalidTemplate"
    assert "'golden image'" in caught.value.message


@pytest.mark.parametrize("section", ["install", "boot"])
def test_a_quote_in_kernel_args_is_refused(tmp_path: Path, section: str) -> None:
    # Inside virt-install's kernel_args="...", a quote would end the value and let the rest
    # name another kernel or initrd.
    ks = write(tmp_path / "t.ks", minimal())
    for name in ("vmlinuz", "initrd.img"):
        write(tmp_path / name, "x")
    sneaky = 'kernel_args = "quiet\\",initrd=/etc/shadow"'
    files = 'kernel = "vmlinuz"\ninitrd = "initrd.img"'
    text = metadata(f"{files}\n{sneaky if section == 'install' else ''}")
    if section == "boot":
        text += f"\n[boot]\n{files}\n{sneaky}\n"
    write(tmp_path / "t.toml", text)
    with pytest.raises(FinalError) as e:
        load_template(ks)
    assert e.value.reason == "InvalidTemplate"
    assert f"[{section}] kernel_args must not contain a double quote" in e.value.message
