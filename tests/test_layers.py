"""The layers, read from the source: every import statement (late ones inside functions included),
parsed with `ast`, so an `import ray` tucked into a function is caught like one at the top.

Layers (imports point down only):
  entry        cli.py, __main__.py
  integration  platform/ (Ray, MLflow), storage/ (boto3), requests/ (the deletion-request queue)
  pure / model everything else: configs, diffusion math, surgery, Pareto, families, methods,
               metrics, the loop, the engine, data, surrogates, evaluation, pictures, search spaces
and no module of the package imports itself through a cycle.
"""

from __future__ import annotations

import ast
import functools
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = "ray_unlearn"
# packages installed into ray_unlearn from elsewhere (pyproject.toml's package-dir)
MAPPED = {"ray_unlearn.search_spaces": "search_spaces"}

INTEGRATION = ("ray_unlearn.platform", "ray_unlearn.storage", "ray_unlearn.requests")
ENTRY = ("ray_unlearn.cli", "ray_unlearn.__main__")
# third-party packages and the only part of the package that may import them
CONFINED = {"ray": ("ray_unlearn.platform",), "mlflow": ("ray_unlearn.platform",),
            "boto3": ("ray_unlearn.storage",), "botocore": ("ray_unlearn.storage",)}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the package: its dotted name -> its file."""
    files = {p: PKG for p in (root / PKG).rglob("*.py")}
    for name, folder in MAPPED.items():
        files.update({p: name for p in (root / folder).glob("*.py")})
    out = {}
    for path, base in files.items():
        rel = path.relative_to(root / (PKG if base == PKG else MAPPED[base])).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join([base, *parts])] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the file. `from x import y`
    counts as an import of x.y when that is a module of the package, else of x."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((sub if sub in known else source, node.lineno))
    return out


def violations(root: Path) -> list[str]:
    modules = package_modules(root)
    known = set(modules)
    found = []
    for module, path in sorted(modules.items()):
        where = f"{path.relative_to(root)}"
        layer_pure = not _within(module, INTEGRATION + ENTRY)
        for imported, line in imports_of(module, path, known):
            top = imported.split(".")[0]
            if top in CONFINED and not _within(module, CONFINED[top]):
                found.append(f"{where}:{line} imports {imported}: only {', '.join(CONFINED[top])} may")
            if layer_pure and _within(imported, INTEGRATION + ENTRY):
                found.append(f"{where}:{line} imports {imported}: the pure/model layer imports no integration or entry module")
            if _within(module, ("ray_unlearn.storage",)) and top == PKG and not _within(imported, ("ray_unlearn.storage",)):
                found.append(f"{where}:{line} imports {imported}: storage/ stands alone (the other layers use it)")
            if _within(module, INTEGRATION) and _within(imported, ("ray_unlearn.cli",)):
                found.append(f"{where}:{line} imports {imported}: the integration layer imports no entry module")
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = package_modules(root)
    known = set(modules)
    return {m: {i for i, _ in imports_of(m, p, known) if i in known and i != m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _group(module: str) -> str:
    """The part of the package a module belongs to: its subpackage or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GROUPS = sorted({_group(m) for m in package_modules(REPO)})
# parts of the tree still being fixed elsewhere; strict: the mark must go once they pass
KNOWN = {
}


def _param(group: str, kind: str):
    reason = KNOWN.get((kind, group))
    return pytest.param(group, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else group


@pytest.mark.parametrize("group", [_param(g, "layers") for g in GROUPS])
def test_every_import_respects_the_layers(group):
    found = [v for v in _repo_violations() if _group(_module_of(v)) == group]
    assert found == []


@pytest.mark.parametrize("group", [_param(g, "cycles") for g in GROUPS])
def test_no_module_imports_itself_through_a_cycle(group):
    found = [c for c in _repo_cycles() if any(_group(m) == group for m in c)]
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@functools.cache
def _repo_violations() -> list[str]:
    return violations(REPO)


@functools.cache
def _repo_cycles() -> list[list[str]]:
    return cycles(import_graph(REPO))


def _module_of(violation: str) -> str:
    """The module a `violations` line is about (its file, as a dotted name)."""
    path = REPO / violation.split(":", 1)[0]
    return next(m for m, p in package_modules(REPO).items() if p == path)


def test_the_walk_sees_every_module_and_late_imports():
    modules = package_modules(REPO)
    assert {"ray_unlearn", "ray_unlearn.engine", "ray_unlearn.cli", "ray_unlearn.platform.train",
            "ray_unlearn.storage.s3", "ray_unlearn.search_spaces"} <= set(modules)
    # storage.s3 imports boto3 inside a method: the walk must see it
    assert "boto3" in {m for m, _ in imports_of("ray_unlearn.storage.s3", modules["ray_unlearn.storage.s3"], set(modules))}


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The package's sources in a scratch folder, to plant violations in."""
    shutil.copytree(REPO / PKG, tmp_path / PKG, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for folder in MAPPED.values():
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("module, line, expected", [
    ("engine.py", "def _late():\n    import ray\n", "ray_unlearn/engine.py:{n} imports ray: only ray_unlearn.platform may"),
    ("engine.py", "def _late():\n    from ray_unlearn.storage import materialize\n", "imports ray_unlearn.storage: the pure/model layer"),
    ("metrics/__init__.py", "def _late():\n    import mlflow.tracking\n", "imports mlflow.tracking: only ray_unlearn.platform may"),
    ("requests/queue.py", "def _late():\n    import boto3\n", "imports boto3: only ray_unlearn.storage may"),
    ("cli.py", "def _late():\n    from ray import tune\n", "imports ray: only ray_unlearn.platform may"),
    ("storage/local.py", "def _late():\n    from ray_unlearn import config\n", "storage/ stands alone"),
])
def test_a_planted_late_import_is_caught(tree_copy, module, line, expected):
    path = tree_copy / PKG / module
    text = path.read_text()
    path.write_text(text + "\n\n" + line)
    n = len((text + "\n\n").splitlines()) + 2
    found = violations(tree_copy)
    assert any(expected.format(n=n) in v for v in found), found


def test_a_planted_cycle_is_caught(tree_copy):
    assert not any("ray_unlearn.hashing" in c for c in cycles(import_graph(tree_copy)))
    for module, line in (("hashing.py", "from ray_unlearn import surgery"), ("surgery.py", "from ray_unlearn.hashing import content_hash")):
        path = tree_copy / PKG / module
        path.write_text(path.read_text() + f"\n\ndef _late():\n    {line}\n")
    assert any({"ray_unlearn.hashing", "ray_unlearn.surgery"} <= set(c) for c in cycles(import_graph(tree_copy)))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
