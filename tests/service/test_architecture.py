"""The layout rules of `service/` (docs/architecture.md), checked against the tree and its real import graph."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "service"
DOC = REPO / "docs" / "architecture.md"


def _modules_in_tree() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in SERVICE.rglob("*.py") if p.name != "__init__.py"}


def _modules_in_table() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Where does X live", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\|\s*`(service/[\w/]+\.py)`\s*\|", section, flags=re.M))


def test_where_does_x_live_table_matches_the_tree() -> None:
    tree, table = _modules_in_tree(), _modules_in_table()
    assert table, "docs/architecture.md has no 'Where does X live' table"
    assert not table - tree, f"the table names modules that do not exist: {sorted(table - tree)}"
    assert not tree - table, f"modules missing from the table: {sorted(tree - table)}"


def test_service_top_level_stays_small() -> None:
    top = [p.name for p in SERVICE.glob("*.py")]
    assert len(top) <= 6, f"service/ has {len(top)} top-level modules ({sorted(top)}); put new ones in a subpackage"


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import grimp sees."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node) & modules:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_service_modules() -> None:
    # grimp reads every import statement, including those inside functions and under TYPE_CHECKING
    graph = grimp.build_graph("service")
    modules = {m for m in graph.modules if m.startswith("service.")}
    assert len(modules) > 30
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert _cycles(graph, {"pkg.a", "pkg.b", "pkg.c"}) == [["pkg.a", "pkg.b"]]


def test_no_module_imports_a_private_name_of_another() -> None:
    graph = grimp.build_graph("service", "bench", "training")
    offenders = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            if not imported.startswith("service."):
                continue
            for detail in graph.get_import_details(importer=importer, imported=imported):
                line = detail["line_contents"]
                names = line.split(" import ", 1)[1] if " import " in line else ""
                if re.search(r"(?:^|[\s,(])_[A-Za-z]", names) or re.search(r"\._[a-z]", line.split(" import ")[0]):
                    offenders.append(f"{importer}: {line}")
    assert offenders == []
