"""The import graph of ``mailgw``, read from the source with ``ast``: no cycles (also through
imports inside functions and ``__import__``), and the composition root imported from the top
only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailgw

PACKAGE = Path(mailgw.__file__).parent


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``mailgw`` by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is, or is in (``mailgw.cli.main.Context`` -> ``mailgw.cli.main``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``mailgw`` modules that ``name`` imports when it runs: at the top, in functions,
    through ``__import__``/``importlib.import_module`` of a constant name; not under
    ``if TYPE_CHECKING:`` (never run)."""
    is_package = path.name == "__init__.py"
    found: set[str | None] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(_resolve(a.name, modules) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:  # ``from mailgw.cli import queue``: a module
                    found.add(_resolve(f"{source}.{alias.name}", modules))
            elif (
                isinstance(child, ast.Call)
                and ast.unparse(child.func)
                in ("__import__", "importlib.import_module", "import_module")
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.add(_resolve(child.args[0].value, modules))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return {m for m in found if m is not None and m.startswith("mailgw") and m != name}


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = module_files() if modules is None else modules
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The detector itself: top-level, in-function, relative and ``__import__`` imports count;
    those under ``if TYPE_CHECKING:`` do not."""
    package = tmp_path / "mailgw"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("")
    (package / "cli" / "main.py").write_text(
        "def build():\n    __import__('mailgw.cli.queue').cli.queue.register()\n"
    )
    (package / "cli" / "queue.py").write_text("from .main import build\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mailgw import b\n"
    )
    (package / "b.py").write_text("def f():\n    from mailgw.a import x\n")
    graph = import_graph(module_files(package))
    assert graph["mailgw.cli.main"] == {"mailgw.cli.queue"}
    assert graph["mailgw.cli.queue"] == {"mailgw.cli.main"}
    assert graph["mailgw.a"] == set()
    assert graph["mailgw.b"] == {"mailgw.a"}
    assert cycles(graph) == [["mailgw.cli.main", "mailgw.cli.queue"]]


def test_mailgw_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def importers(graph: dict[str, set[str]], module: str) -> set[str]:
    return {name for name, imported in graph.items() if module in imported}


def test_cli_commands_share_a_context_not_each_other(graph: dict[str, set[str]]) -> None:
    assert "mailgw.cli.queue" in graph["mailgw.cli.main"]
    assert graph["mailgw.cli.context"] & {"mailgw.cli.main", "mailgw.cli.queue"} == set()
    assert "mailgw.cli.main" not in graph["mailgw.cli.queue"]


def test_only_the_top_imports_the_composition_root(graph: dict[str, set[str]]) -> None:
    """twistd's plugin (``mailgw.tap``) builds the node; the role registry serves the node
    only; an IMAP worker process builds its own (``mailgw.runtime.process``,
    ``mailgw.imap.setup``) instead of importing the composition root."""
    assert importers(graph, "mailgw.service") == {"mailgw.tap"}
    assert importers(graph, "mailgw.roles") == {"mailgw.service"}
    assert "mailgw.imap.setup" in graph["mailgw.imap.worker_process"]
    assert "mailgw.runtime.process" in graph["mailgw.imap.worker_process"]


def test_the_thread_runner_is_at_the_bottom(graph: dict[str, set[str]]) -> None:
    """``mailgw.runtime.threads`` (the spool, delivery, relay and IMAP take its runners)
    imports no other mailgw module."""
    assert graph["mailgw.runtime.threads"] == set()
    assert "mailgw.runtime.threads" in graph["mailgw.spool.spool"]
