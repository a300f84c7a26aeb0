"""`diskflow controller --config FILE`: every setting is checked against its ControllerConfig
field's type, times taking durations as the command line's options do, and a bad value is
refused naming the file, the setting and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from diskflow.controller_cli import _read_config
from importer.controller.config import ControllerConfig
from importer.errors import FinalError


def read(tmp_path: Path, text: str) -> ControllerConfig:
    path = tmp_path / "controller.yaml"
    path.write_text(text)
    return ControllerConfig(**_read_config(path))


def test_times_are_durations_or_seconds(tmp_path: Path) -> None:
    config = read(
        tmp_path,
        """
        backoff_base: 250ms
        backoff_max: 1h30m
        stall_timeout: 10m
        probe_timeout: 45
        progress_interval: "1.5"
        status_interval: 2.5s
        termination_grace: 2m
        """.replace("        ", ""),
    )
    assert config.backoff_base == 0.25 and config.backoff_max == 5400
    assert config.stall_timeout == 600 and config.probe_timeout == 45
    assert config.progress_interval == 1.5 and config.status_interval == 2.5
    assert config.termination_grace == 120 and isinstance(config.termination_grace, int)


def test_the_other_settings_keep_their_types(tmp_path: Path) -> None:
    config = read(tmp_path, "max_imports: 3\nimporter_args: [--min-rate, '1']\nprobe: false\n")
    assert config.max_imports == 3 and config.probe is False
    assert config.importer_args == ("--min-rate", "1")  # a tuple, as the dataclass has it


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("stall_timeout: ten", "stall_timeout: 'ten' is not a duration like 90s"),
        (
            "stall_timeout: 500ms",
            "stall_timeout: '500ms': Input should be greater than or equal to 1",
        ),
        ("backoff_base: -5", "backoff_base: -5: Input should be greater than or equal to 0"),
        ("probe_timeout: 0s", "probe_timeout: '0s': Input should be greater than 0"),
        ("termination_grace: 1.5s", "termination_grace: 1.5: Input should be a valid integer"),
        ("max_imports: abc", "max_imports: 'abc': Input should be a valid integer"),
        ("retry_limit: -1", "retry_limit: -1: Input should be greater than or equal to 0"),
        ("filesystem_overhead: 1.5", "filesystem_overhead: 1.5: Input should be less than or"),
        ("storage_class_overheads: {ceph: lots}", "storage_class_overheads.ceph: 'lots': "),
        ("metrics_port: 99999", "metrics_port: 99999: Input should be less than or equal to"),
        (
            "image_pull_policy: Sometimes",
            "image_pull_policy: 'Sometimes': Input should be 'Always'",
        ),
        ("importer_args: --min-rate 1", "importer_args: '--min-rate 1': Input should be a list"),
        ("node_selector: [a]", "node_selector: ['a']: Input should be a mapping"),
        ("node_selector: {disk: 1}", "node_selector.disk: 1: Input should be a valid string"),
        ("image: null", "image: None: Input should be a valid string"),
    ],
)
def test_a_bad_value_is_named(tmp_path: Path, setting: str, problem: str) -> None:
    with pytest.raises(FinalError) as refused:
        read(tmp_path, setting + "\n")
    assert refused.value.reason == "InvalidArgument"
    assert refused.value.message.startswith(f"{tmp_path / 'controller.yaml'}: ")
    assert problem in refused.value.message


def test_every_bad_value_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(FinalError) as refused:
        read(tmp_path, "stall_timeout: soon\nmax_imports: many\n")
    assert "stall_timeout: 'soon'" in refused.value.message
    assert "max_imports: 'many'" in refused.value.message
