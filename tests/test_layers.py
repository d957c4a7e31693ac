"""The package's import graph, read from the source with ast (imports inside functions included): every module
sits in one of the README Code map's groups and imports only from its own group and the groups below it, and no
modules import each other in a circle.

A new module fails `test_every_module_has_a_group` until it is placed in LAYERS (and in the README's Code map).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "edge_memdec"

# top to bottom, as in README's Code map; a name covers the module and, for a package, every module inside it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("package face", ("edge_memdec",)),
    (
        "command line and servers",
        ("cli", "server", "openai_api", "llama_server_api", "metrics", "llm_plugin", "chat_session",
         "explain_view", "web"),
    ),  # fmt: skip
    ("training", ("train",)),
    (
        "runtime",
        ("api", "pair", "overlap", "trunk", "llama_model", "threadpool", "llama_log", "decode", "batch", "trace", "detok",
         "chat_format", "perplexity", "perplexity_job", "compare", "plot", "knn_baseline", "kernels", "gate_fit"),
    ),  # fmt: skip
    ("conversion", ("convert",)),
    ("GGUF files", ("gguf_file", "lora_file", "pair_check", "describe")),
    ("shared leaves", ("defaults", "lambda_gate", "files", "windows", "scoring", "errors", "paths", "models", "corpus", "normalize")),
]
# the one arrow upward: `perplexity --knn` and `compare --knn` reach the training extra through this door only
UPWARD_DOORS = {("edge_memdec.knn_baseline", "edge_memdec.train")}


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, from pyproject's packages and package-dir (convert/ and
    kernels/ live at the repository root but install as edge_memdec.convert and edge_memdec.kernels)."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package in setup["packages"]:
        folder = ROOT / setup["package-dir"].get(package, package.replace(".", "/"))
        for path in sorted(folder.glob("*.py")):
            if path.is_symlink():  # edge_memdec/cli.py is the root cli.py, added below
                continue
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    modules[f"{PACKAGE}.cli"] = ROOT / "cli.py"
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    is_package = path.stem == "__init__"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _layer(name: str) -> int | None:
    short = name.removeprefix(f"{PACKAGE}.") if name != PACKAGE else PACKAGE
    for rank, (_, members) in enumerate(LAYERS):
        if any(short == m or short.startswith(f"{m}.") for m in members):
            return rank
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_module_has_a_group(graph):
    assert [name for name in graph if _layer(name) is None] == []


def test_imports_go_down_the_layers(graph):
    upward = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, targets in graph.items()
        for b in sorted(targets)
        if _layer(b) < _layer(a) and not any(a == door and b.startswith(to) for door, to in UPWARD_DOORS)
    ]
    assert upward == []


def test_no_import_circles(graph):
    circles = []
    for start in sorted(graph):  # depth-first search for a path from each module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            name, path = stack.pop()
            for nxt in sorted(graph[name]):
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert circles == []


def test_the_graph_is_read(graph):
    """The reader itself: relative, lazy and `from package import module` imports all count."""
    assert "edge_memdec.convert.gpt2" in graph["edge_memdec.convert.export"]  # from . import gpt2
    assert "edge_memdec.convert.rewrite" in graph["edge_memdec.trunk"]  # inside a function
    assert "edge_memdec.defaults" in graph["edge_memdec.decode"]  # from edge_memdec import defaults
    assert "edge_memdec.train.knn_lm" in graph["edge_memdec.knn_baseline"]
