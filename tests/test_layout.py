"""The layout: the method's modules are pure (no ultralytics, no params, no paths), and the README
stays short, true to the committed reports, and without dead links."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

METHOD = sorted((PROJECT_ROOT / "stages" / "compress").rglob("*.py"))
# What the method may not import: ultralytics (its trainers, its model classes), and the
# pipeline's params, paths and outputs. It may raise the pipeline's UserError (stages.pipeline.cli).
FORBIDDEN = ("ultralytics", "stages.pipeline.params", "stages.pipeline.runtime", "stages.yolo")
FORBIDDEN += ("stages.pipeline.outputs", "stages.pipeline.images", "stages.deploy")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", METHOD, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_the_method_imports_no_trainer_no_params_and_no_paths(path: Path) -> None:
    found = {n for n in _imports(path) if n.startswith(FORBIDDEN)}
    assert not found, f"{path.name} imports {sorted(found)}"


def test_importing_the_whole_method_loads_no_ultralytics() -> None:
    modules = [
        ".".join(p.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in METHOD
    ]
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; " + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ultralytics' "
        "or m == 'stages.pipeline.params'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


README = (PROJECT_ROOT / "README.md").read_text()


def _table(text: str, first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The Markdown table whose header starts with ``first_header``: its columns, and its rows
    by their first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    assert len(lines) <= 200
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("pip install -c constraints.txt -e . && dvc repro")
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert block[1].split("#")[0].strip() == ci


def test_the_readme_headline_is_the_committed_summary() -> None:
    """Every cell of the README's headline table equals the one in reports/summary.md."""
    columns, rows = _table(README, "model")
    summary_columns, summary_rows = _table(
        (PROJECT_ROOT / "reports" / "summary.md").read_text(), "model"
    )
    assert rows
    for name, cells in rows.items():
        for column, cell in zip(columns, cells, strict=True):
            source = column if column in summary_columns else f"CPU {column}"
            assert cell == summary_rows[name][summary_columns.index(source)], (name, column)


@pytest.mark.parametrize(
    "page", [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
)
def test_every_link_resolves_inside_the_checkout(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(PROJECT_ROOT), f"{page.name} links outside: {target}"
        assert resolved.exists(), f"{page.name} links to a missing {target}"
