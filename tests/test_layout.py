"""The house's layout: one-way imports between the modules, SQLAlchemy in dal.py only, a
docstring on every module, and rooms small enough to see in one sitting.

Imports are read from the source with ``ast``: function-level (deferred) imports count like any
other; only those under ``if TYPE_CHECKING:`` (never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in sorted(PROJECT.glob("*.py"))}
MAX_LINES = 1000
MAX_APP_MODULE_LINES = 500


def _type_checking_only(node: ast.If) -> bool:
    """Whether ``node`` is ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``)."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports at run time, wherever the import is."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        """Collect imports below ``node``, skipping TYPE_CHECKING blocks (their else runs)."""
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


GRAPH = {name: imported_modules(path) & MODULES.keys() - {name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the modules along it (first one repeated), or None."""
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" after

    def walk(name: str, path: list[str]) -> list[str] | None:
        """Depth first from ``name``; a module met again while open closes a cycle."""
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := walk(target, [*path, target])):
                return cycle
        state[name] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start, [start])):
            return cycle
    return None


# --- the import graph ---------------------------------------------------------------------------


def test_the_modules_imports_form_no_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_deferred_cycle_and_ignores_type_checking(tmp_path: Path) -> None:
    (tmp_path / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import high\n"
        "def later():\n    import middle\n"
    )
    (tmp_path / "middle.py").write_text("import low\n")
    (tmp_path / "high.py").write_text("import low\n")
    assert imported_modules(tmp_path / "low.py") == {"typing", "middle"}
    names = {"low", "middle", "high"}
    graph = {name: imported_modules(tmp_path / f"{name}.py") & names for name in names}
    assert find_cycle(graph) == ["low", "middle", "low"]
    assert find_cycle({"low": set(), "middle": {"low"}, "high": {"low"}}) is None


# What each lower layer must not import (the design's order: settings <- links <- dal <- cache
# <- migrate; validation is pure; dal <- delivery <- tasks <- users, intake, services <- the
# blueprints <- microapp). Modules not named here are held to it by the cycle test.
ABOVE_TASKS = {"microapp", "services", "users", "intake", "forms", "api"}
ALLOWED = {
    "settings": set(),
    "records": set(),
    "links": {"settings"},
    "validation": {"settings"},
    "dal": {"records", "settings"},
    "cache": {"dal", "records", "settings"},
    "migrate": {"dal", "settings"},
    "delivery": {"cache", "dal", "links", "records", "settings", "validation"},
    "tasks": {"cache", "dal", "delivery", "links", "records", "settings"},
    "forms": {"settings", "validation"},
}
# The web layer: what serves HTTP. Nothing below it may import it; blueprints stand side by side.
WEB_LAYER = {"web", "openapi", "accounts", "dashboard", "public_site", "api", "microapp"}
BLUEPRINTS = {"accounts", "dashboard", "public_site", "api"}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_lower_layers_import_only_what_is_below_them(module: str) -> None:
    assert GRAPH[module] <= ALLOWED[module]


def test_tasks_sit_below_the_services_and_the_app() -> None:
    assert GRAPH["tasks"] & ABOVE_TASKS == set()


@pytest.mark.parametrize("module", sorted(set(MODULES) - WEB_LAYER))
def test_nothing_below_the_web_layer_imports_it(module: str) -> None:
    assert GRAPH[module] & WEB_LAYER == set()


@pytest.mark.parametrize("module", sorted(BLUEPRINTS))
def test_blueprints_import_neither_each_other_nor_the_app_module(module: str) -> None:
    assert GRAPH[module] & (BLUEPRINTS | {"microapp"}) == set()


@pytest.mark.parametrize(
    ("library", "owner"),
    [("sqlalchemy", "dal"), ("redis", "cache"), ("fakeredis", "cache"), ("celery", "tasks")],
)
def test_a_library_is_imported_by_its_one_module(library: str, owner: str) -> None:
    importers = {name for name, path in MODULES.items() if library in imported_modules(path)}
    assert importers == {owner}


def test_pure_modules_import_no_flask_wtforms_or_database() -> None:
    for module in ("validation", "records", "migrate"):
        outside = imported_modules(MODULES[module]) & {
            "flask",
            "flask_wtf",
            "wtforms",
            "sqlalchemy",
        }
        assert outside == set(), module


# --- every room says what it is, and is small ---------------------------------------------------


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_opens_with_a_docstring(module: str) -> None:
    docstring = ast.get_docstring(ast.parse(MODULES[module].read_text()))
    assert docstring, f"{module}.py has no docstring"
    assert len(docstring.split()) >= 15, f"{module}.py: say what it owns and what it must not do"


# dal.py is the one room allowed past the limit: it must hold the tables and every SQL statement
# (no other module may import SQLAlchemy), and that is ~1,200 lines of short, separate queries.
# It still has a bound, so that it is split by concern the day it cannot be read in one sitting.
DAL_MAX_LINES = 1300


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"dal"}))
def test_no_module_is_over_a_thousand_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}.py has {lines} lines"


def test_dal_stays_within_its_own_bound() -> None:
    lines = len(MODULES["dal"].read_text().splitlines())
    assert lines <= DAL_MAX_LINES, f"dal.py has {lines} lines: split it by concern"


def test_the_app_module_is_small() -> None:
    lines = len(MODULES["microapp"].read_text().splitlines())
    assert lines <= MAX_APP_MODULE_LINES, f"microapp.py has {lines} lines"
