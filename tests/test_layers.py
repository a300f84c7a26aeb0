"""The layers point one way: the CLI (diskflow) → the template pipelines → the importer, and the
importer core imports no framework. The controller (importer/controller, the import side's
kopf shell) sits over the importer core beside the pipelines: neither imports the other.
Checked on the source, imports inside functions included, so a lazy import cannot slip a
dependency in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("typer", "click", "celery", "kopf", "kubernetes", "pykickstart")
CONTROLLER = "importer/controller"
FORBIDDEN = {
    "importer": ("diskflow", "pipelines", "importer.controller", *FRAMEWORKS, "aiohttp"),
    CONTROLLER: ("diskflow", "pipelines", "typer", "click", "celery", "pykickstart"),
    "pipelines": ("diskflow", "importer.controller", "typer", "click", "kopf", "kubernetes"),
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up_or_out(package: str) -> None:
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        where = str(path.relative_to(REPO))
        if package == "importer" and where.startswith(CONTROLLER + "/"):
            continue  # the controller's own rules apply
        for module in imports(path):
            for banned in FORBIDDEN[package]:
                if module == banned or module.startswith(banned + "."):
                    wrong.append(f"{where} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_only_the_entry_point_imports_the_app() -> None:
    """diskflow.cli registers the other command modules (by name, loaded lazily); none of them
    imports it back, not even inside a function: what they share is in diskflow.failures."""
    wrong = []
    for path in sorted((REPO / "diskflow").glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [f"{node.module}.{alias.name}" for alias in node.names]
                if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            if any(name == "diskflow.cli" or name.startswith("diskflow.cli.") for name in names):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not wrong, "\n".join(wrong)
