"""The package's layers point one way (read from the source with ``ast``, not by importing):

- ``errors`` and ``registry`` import nothing of the package; ``runtime/`` and ``weighting/`` import nothing else
  of the package (``errors`` and ``registry`` aside), and ``weighting/`` imports no megatron;
- ``model/``, ``data/`` and ``checkpoint/`` never import ``scoring/``, ``step``, ``loss`` or
  ``arguments``; ``scoring/`` never imports ``step``, ``loss`` or ``arguments``;
- no import cycle among modules (imports at module level, the ones that run on import);
- no file of the tree cites a document that is not in the tree.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

from tests.launch import ROOT

pytestmark = pytest.mark.unit
PACKAGE = os.path.join(ROOT, "megatron_tw")


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, module: str, top_level_only: bool) -> set[str]:
    """Package modules ``module`` imports (resolving ``from pkg import sub`` to the submodule)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("megatron_tw")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                parts = module.split(".")[:-node.level + (1 if path.endswith("__init__.py") else 0) or None]
                base = ".".join(parts + [node.module])
            if base.startswith("megatron_tw"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


MODULES = _modules()


def _edges(top_level_only: bool) -> dict[str, set[str]]:
    return {m: {t for t in _imports(p, m, top_level_only) if t in MODULES and t != m}
            for m, p in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _all_megatron_imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] == "megatron"}


FORBIDDEN = {  # layer -> layers it must never import (at any depth: lazy imports included)
    "errors": {"*"},
    "registry": {"*"},
    "runtime": {"*"},
    "weighting": {"*"},
    "model": {"scoring", "step", "loss", "arguments"},
    "data": {"scoring", "step", "loss", "arguments"},
    "checkpoint": {"scoring", "step", "loss", "arguments"},
    "scoring": {"step", "loss", "arguments"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    bad = []
    for module, targets in _edges(top_level_only=False).items():
        if _layer(module) != layer:
            continue
        for target in targets:
            other = _layer(target)
            if other in (layer, "errors", "registry", ""):
                continue
            if "*" in FORBIDDEN[layer] or other in FORBIDDEN[layer]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_weighting_imports_no_megatron():
    bad = [m for m, p in MODULES.items() if _layer(m) == "weighting" and _all_megatron_imports(p)]
    assert not bad, bad


def test_no_module_level_import_cycle():
    edges = _edges(top_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_cycle_and_a_wrong_arrow(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a model -> scoring import are found."""
    global MODULES
    planted = {"megatron_tw.model.a": "from megatron_tw.scoring import b\n",
               "megatron_tw.scoring.b": "import megatron_tw.model.a\n"}
    paths = {}
    for module, text in planted.items():
        path = tmp_path / (module.replace(".", "_") + ".py")
        path.write_text(text)
        paths[module] = str(path)
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "MODULES", paths)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_module_level_import_cycle()
    with pytest.raises(AssertionError, match="megatron_tw.model.a -> megatron_tw.scoring.b"):
        test_layer_imports_point_one_way("model")


CITED = re.compile(r"(?<![\w/.-])((?:docs|tools|examples|benchmarks|scripts|tests|megatron_tw)/"
                   r"[\w./-]+\.(?:md|py|sh|toml|png))|(?<![\w/.-])([A-Z][A-Z_]+\.md)")


def test_every_cited_document_is_in_the_tree():
    missing = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "data")]
        for name in names:
            if not name.endswith((".py", ".md", ".sh", ".toml")) and name != "Dockerfile":
                continue
            path = os.path.join(folder, name)
            text = open(path, errors="replace").read()
            for match in CITED.finditer(text):
                cited = match.group(1) or match.group(2)
                cited = cited.rstrip(".")
                if "<" in cited or "*" in cited or "/results/" in cited:
                    continue  # placeholders, and the files benchmarks write
                if not os.path.exists(os.path.join(ROOT, cited)):
                    missing.append(f"{os.path.relpath(path, ROOT)}: {cited}")
    assert not missing, "cited but not in the tree:\n" + "\n".join(sorted(set(missing)))
