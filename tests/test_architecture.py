"""The package's import graph, read from the source: no cycles, no private names across modules, every
layer importing only the layers below it, and imports at the top of a module unless they guard a heavy
or optional dependency. What ``import tokenprune`` pulls in is checked in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The layers, bottom first (docs/concepts.md). A module may import its own layer and those below it;
#: ``tokenprune/__init__.py`` (the public API) may import any of them.
LAYERS = ("core", "operators", "adapters", "runtime", "pipeline", "measure", "reference", "eval", "cli")

#: Third-party packages a module may import inside a function: heavy ones that ``import tokenprune`` must not
#: load, and the optional extras.
LAZY_THIRD_PARTY = {"lightning", "pytorch_lightning", "matplotlib", "wandb", "lmms_eval", "sklearn", "datasets",
                    "transformers", "tokenizers", "loguru",
                    "torchvision"}  # optional: whether it imports is the question (Qwen's video processors need it)

#: Package modules a module may import inside a function: those that import an optional extra at their top.
LAZY_INTERNAL = {"tokenprune.eval.lmms_eval_model"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported tokenprune module, or a third-party top-level name
    names: tuple[str, ...]  # the names taken from it (from-imports)
    in_function: bool
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "operators":  # the folder maps to tokenprune.operators (setup.cfg package_dir)
        parts = ["tokenprune", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    files = [*(REPO / "tokenprune").rglob("*.py"), *(REPO / "operators").rglob("*.py")]
    return {_module_name(p): p for p in files}


def _resolve(module: str | None, level: int, source: str, is_package: bool) -> str | None:
    if level == 0:
        return module
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(modules: dict[str, Path]) -> list[Import]:
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.append(Import(name, alias.name, (), id(node) in in_function, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node.module, node.level, name, path.name == "__init__.py")
                if target == "__future__":
                    continue
                names = tuple(a.name for a in node.names)
                # ``from tokenprune.x import y`` where y is a module: the edge goes to that module
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                for sub in subs:
                    out.append(Import(name, sub, (), id(node) in in_function, node.lineno))
                rest = tuple(n for n in names if f"{target}.{n}" not in modules)
                if rest or not subs:
                    out.append(Import(name, target, rest, id(node) in in_function, node.lineno))
    return out


def _internal(target: str, modules: dict[str, Path]) -> str | None:
    """The package module ``target`` names (a dotted path may end in an attribute)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _package_modules()
    return modules, _imports(modules)


def test_the_reader_sees_what_it_should():
    """The checks below read real imports: a hand-made module shows each kind the test tells apart."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"], ["d"]]
    assert _resolve("x", 1, "tokenprune.core.stage", False) == "tokenprune.core.x"
    assert _resolve(None, 2, "tokenprune.core", True) == "tokenprune"
    modules = _package_modules()
    found = _imports({"tokenprune.runtime.attach": modules["tokenprune.runtime.attach"]})
    assert any(i.target == "tokenprune.core.state" and not i.in_function for i in found)


def test_no_import_cycles(graph):
    modules, imports = graph
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = _internal(imp.target, modules) if imp.target.startswith("tokenprune") else None
        if target is not None:
            edges[imp.source].add(target)
    assert _cycles(edges) == []


def test_no_private_name_is_imported_from_another_module(graph):
    modules, imports = graph
    bad = [f"{imp.source}:{imp.line} imports {n} from {imp.target}" for imp in imports
           if imp.target.startswith("tokenprune") for n in imp.names
           if n.startswith("_") and not n.startswith("__") and _internal(imp.target, modules) != imp.source]
    # and no private attribute of an imported package module (``shapes._mask``)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokenprune"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and aliases[node.value.id] != name:
                bad.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert bad == []


def test_each_layer_imports_only_the_layers_below_it(graph):
    modules, imports = graph
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    assert {_layer(m) for m in modules} - {None} <= set(rank), "a folder of tokenprune/ that LAYERS does not place"
    bad = []
    for imp in imports:
        target = _internal(imp.target, modules) if imp.target.startswith("tokenprune") else None
        if target is None or imp.source == "tokenprune":
            continue
        src, dst = _layer(imp.source), _layer(target)
        if dst is None:
            bad.append(f"{imp.source}:{imp.line} imports from the package root (import from where it is defined)")
        elif rank[dst] > rank[src]:
            bad.append(f"{imp.source}:{imp.line} ({src}) imports {target} ({dst}), a layer above it")
    assert bad == []


def test_imports_sit_at_the_top_unless_they_guard_a_heavy_or_optional_dependency(graph):
    """The command line loads each command's module when that command runs, so ``tokenprune show`` stays fast."""
    modules, imports = graph
    bad = []
    for imp in imports:
        if not imp.in_function or imp.source == "tokenprune.cli":
            continue
        internal = _internal(imp.target, modules) if imp.target.startswith("tokenprune") else None
        if internal is not None:
            if internal not in LAZY_INTERNAL:
                bad.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function")
        elif imp.target.split(".")[0] not in LAZY_THIRD_PARTY:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function")
    assert bad == []


def test_import_tokenprune_loads_no_heavy_dependency():
    code = ("import sys, tokenprune; print(' '.join(m for m in ('lightning', 'pytorch_lightning', 'matplotlib', "
            "'wandb', 'lmms_eval', 'sklearn', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""
