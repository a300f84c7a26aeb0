"""Groups of options, each declared once and taken whole by every command that needs it.

A group is a frozen dataclass whose fields are options: an `Annotated[type, typer.Option(...)]`
with a default (none: the option is required), or another group, whose options join its own.
A command decorated with `takes_groups` names a group as the type of one of its parameters;
typer sees the group's options in its place, and the command is called with the group built
from their values. Adding a field to a group adds the option to every command that takes it.
The group's options stand where its parameter does, in --help too; a `*` before it lets it
follow parameters with defaults.

`conventional` gives the options of every command, built, what users of other command-line
tools expect: each can come from the environment (`DISKFLOW_<OPTION>`, shown in --help), each
shows a plain word for its value (FILE, URL, N), not a Python type, and every command has
--log-level, -v and -q (diskflow.output). `duration` and
`size` declare options taking `90s`/`1h30m` and `10Gi`, a bad value being a usage error.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from importer.errors import FinalError
from importer.quantity import parse_duration, parse_quantity

if TYPE_CHECKING:
    from typer._click import Command, Parameter  # the click typer vendors

F = TypeVar("F", bound=Callable[..., Any])
_PREFIX = "DISKFLOW_"
_OPTION = inspect.Parameter.KEYWORD_ONLY  # keyword-only: a required option may follow others


def is_group(hint: object) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def _fields(group: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, resolved type, default) of each field: typer needs the types themselves, and
    `from __future__ import annotations` leaves strings that only the group's module can read."""
    hints = typing.get_type_hints(group, include_extras=True)
    return tuple(
        (field.name, hints[field.name],
         inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default)
        for field in dataclasses.fields(group)
    )  # fmt: skip


def options(group: type) -> Iterator[inspect.Parameter]:
    """The options of `group`, those of the groups it holds included, as parameters."""
    for name, hint, default in _fields(group):
        if is_group(hint):
            yield from options(hint)
        else:
            yield inspect.Parameter(name, _OPTION, default=default, annotation=hint)


def _build(group: type, given: dict[str, Any]) -> Any:
    """`group` made of its options' values, which are taken out of `given`."""
    return group(**{
        name: _build(hint, given) if is_group(hint) else given.pop(name)
        for name, hint, _ in _fields(group)
    })  # fmt: skip


def takes_groups(command: F) -> F:
    """`command` as typer should see it: each parameter whose type is a group replaced by the
    group's options. Raises TypeError if two of the options (or parameters) share a name."""
    hints = typing.get_type_hints(command, include_extras=True)
    groups = {name: hint for name, hint in hints.items() if name != "return" and is_group(hint)}
    parameters: list[inspect.Parameter] = []
    for name, parameter in inspect.signature(command).parameters.items():
        if name in groups:
            parameters += options(groups[name])
        else:
            parameters.append(parameter.replace(kind=_OPTION, annotation=hints[name]))
    names = [parameter.name for parameter in parameters] + list(groups)
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise TypeError(f"{command.__name__}: more than one option named {', '.join(twice)}")

    @functools.wraps(command)
    def run(**given: Any) -> Any:
        built = {name: _build(group, given) for name, group in groups.items()}
        return command(**given, **built)

    # typer reads both: the signature for the options, the annotations for their types.
    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return typing.cast(F, run)


def duration(help: str, *, at_least: float = 0, **option: Any) -> Any:
    """An option taking a time, in seconds: `90s`, `10m`, `1h30m`, `250ms`, `2d`, or `600`;
    `option`: more of typer.Option's arguments (show_default="3h")."""

    def seconds(text: str | float) -> float:
        try:  # a default comes as a number
            value = float(text) if isinstance(text, int | float) else parse_duration(text)
        except FinalError as e:
            raise typer.BadParameter(e.message) from None
        if value < at_least:
            raise typer.BadParameter(f"{text} is less than {at_least:g}s")
        return value

    return typer.Option(parser=seconds, metavar="DURATION", help=help, **option)


def size(help: str, **option: Any) -> Any:
    """An option taking a size in bytes as a Kubernetes quantity: `10Gi`, `512Mi`, `20G`."""

    def size_in_bytes(text: str | int) -> int:
        try:
            return text if isinstance(text, int) else parse_quantity(text)
        except FinalError as e:
            raise typer.BadParameter(e.message) from None

    return typer.Option(parser=size_in_bytes, metavar="SIZE", help=help, **option)


def usage_checked(check: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A typer callback that runs `check` on an option's value (when given) before the command
    starts, its FinalError a usage error (exit 2); the value passes unchanged."""

    def callback(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except FinalError as e:
                raise typer.BadParameter(e.message) from None
        return value

    return callback


# The words help shows for a value, by the name of its click type (after `_WORDS_BY_NAME`).
_WORDS = {"str": "TEXT", "text": "TEXT", "int": "N", "integer": "N", "int range": "N",
          "integer range": "N", "float": "NUMBER", "float range": "NUMBER", "path": "PATH",
          "file": "FILE", "directory": "DIR", "boolean": "BOOLEAN"}  # fmt: skip
_TEXT = ("str", "text")
_WORDS_BY_NAME = (("_port", "PORT"), ("_addr", "ADDR"), ("_url", "URL"), ("_endpoint", "URL"))


def conventional(command: Command) -> None:
    """Give `command`'s options their environment variables and plain metavars, and a command
    that runs (not a group) --log-level, -v and -q (see above)."""
    names = {param.name for param in command.params}
    if not hasattr(command, "commands") and "log_level" not in names:
        from diskflow.output import level_options  # imports the events: not for every group

        command.params.extend(level_options())
    for param in command.params:
        if param.param_type_name == "argument":
            if param.metavar is None and param.name:
                param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
            continue
        if param.is_eager:  # --help, --version, --install-completion: they act, then exit
            continue
        if param.envvar is None:
            param.envvar = _environment_variable(param)
        param.show_envvar = True  # type: ignore[attr-defined]
        if param.multiple and param.type.name in _TEXT and not param.type.envvar_list_splitter:
            # Whitespace would split a value such as a header, "Name: value": one per line.
            param.type = _one_per_line(type(param.type))()
        if param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = _metavar(param)


def _environment_variable(param: Parameter) -> str:
    """DISKFLOW_ and the option's first long name in capitals, each `-` an `_`."""
    long = [opt[2:] for opt in param.opts if opt.startswith("--")]
    name = long[0] if long else str(param.name)
    return _PREFIX + name.upper().replace("-", "_")


def _metavar(param: Parameter) -> str:
    choices = getattr(param.type, "choices", None)
    if choices is not None:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
    for suffix, word in _WORDS_BY_NAME:
        if str(param.name).endswith(suffix):
            return word
    return _WORDS.get(param.type.name, param.type.name.upper().replace(" ", "_"))


@functools.cache
def _one_per_line(base: type) -> type:
    class OnePerLine(base):  # type: ignore[valid-type, misc]
        envvar_list_splitter = "\n"

        def split_envvar_value(self, rv: str) -> list[str]:
            return [line for line in rv.splitlines() if line.strip()]

    return OnePerLine
