"""The failure reasons the code raises, the `Reason` enum and the README's table agree: each
reason the import side can give is in the enum, raised as final or transient as the enum
says, and documented with that finality."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from importer.reasons import Reason

REPO = Path(__file__).resolve().parents[2]
# Where the import side raises its failures: the importer and the CLI shell around it.
SOURCES = [*sorted((REPO / "importer").rglob("*.py")), REPO / "diskflow" / "cli.py"]
# Call sites whose reason is a variable. Each is fed from Reason members (a table, a
# parameter with a Reason default, a tuple of Reason and message): checked where they are made.
DYNAMIC = {
    ("archive.py", "_refuse"),
    ("pipeline.py", "_refuse_early"),
    ("http.py", "_check_status"),
    ("qemu.py", "_failure"),
}


def raised() -> tuple[dict[str, set[bool]], set[tuple[str, str]]]:
    """{reason: {final?...}} of every FinalError/TransientError with a literal or Reason.X
    reason, and the (file, function) of those whose reason is a variable."""
    found: dict[str, set[bool]] = {}
    dynamic: set[tuple[str, str]] = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
                continue
            name = getattr(function, "name", "<module>")
            for node in ast.walk(function):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("FinalError", "TransientError")
                    and node.args
                ):
                    continue
                final = node.func.id == "FinalError"
                reason = _reason(node.args[0])
                if reason is None:
                    dynamic.add((path.name, name))
                else:
                    found.setdefault(reason, set()).add(final)
    return found, dynamic


def _reason(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "Reason"
    ):
        return Reason[node.attr].value
    return None


def test_every_reason_raised_is_in_the_enum_with_its_finality() -> None:
    found, dynamic = raised()
    unknown = set(found) - {reason.value for reason in Reason}
    assert not unknown, f"raised but not in importer.reasons.Reason: {sorted(unknown)}"
    for reason, finalities in found.items():
        assert finalities == {Reason(reason).final}, f"{reason} is raised with other finality"
    # Functions nest, so a dynamic site may be seen from its enclosing function too.
    assert {site for site in dynamic if site in DYNAMIC} == DYNAMIC
    unexpected = {site for site in dynamic if site not in DYNAMIC and site[1] != "<module>"}
    assert not unexpected, f"a reason from a variable: make it a Reason, or list it: {unexpected}"


def test_the_readme_documents_every_reason_with_its_finality() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("#### Failure reasons") :]
    rows = re.findall(r"^\| `(\w+)` \| (final|transient) \|", section, re.M)
    documented = {name: kind == "final" for name, kind in rows}
    assert documented == {reason.value: reason.final for reason in Reason}
