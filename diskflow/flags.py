"""Groups of options, each declared once and taken whole by every command that needs it.

A group is a frozen dataclass whose fields are options: an `Annotated[type, typer.Option(...)]`
with a default (none: the option is required), or another group, whose options join its own.
A command decorated with `takes_groups` names a group as the type of one of its parameters;
typer sees the group's options in its place, and the command is called with the group built
from their values. Adding a field to a group adds the option to every command that takes it.
The group's options stand where its parameter does, in --help too; a `*` before it lets it
follow parameters with defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
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
