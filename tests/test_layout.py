"""The package's shape: layers that import only downwards, no import cycle, no module over 600
lines (ARCHITECTURE.md is the map). These read the source, so they fail on the change that
breaks the shape, whatever it does at run time."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "admmprune"

#: bottom to top: a module may import its own layer and the layers before it
LAYERS = ["leaves", "sets", "weights", "structure", "solvers", "deployment", "run", "integrations"]
#: modules of no layer, importable by every layer (each imports no other admmprune module)
LEAVES = {"admmprune._io", "admmprune._version", "admmprune.models"}
#: what may sit directly in src/admmprune
TOP_LEVEL = {"__init__.py", "__main__.py", "_io.py", "_version.py"}
MAX_LINES = 600


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every admmprune module ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports the module mod, `from mod import name` the module
            found = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            out.update(found or ([module] if module in MODULES else []))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
    out.discard(name)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int | None:
    """The layer index of a module; None for the package root and __main__ (above every layer)."""
    if name in ("admmprune", "admmprune.__main__"):
        return None
    if name in LEAVES or name.startswith("admmprune.models."):
        return 0
    return LAYERS.index(name.split(".")[1])


def test_every_module_is_in_a_layer():
    for name in MODULES:
        if name not in ("admmprune", "admmprune.__main__"):
            assert (
                name in LEAVES
                or name.startswith("admmprune.models.")
                or (name.split(".")[1] in LAYERS)
            ), f"{name}: put it in one of the layers {LAYERS} (ARCHITECTURE.md)"
    assert {p.name for p in PKG.glob("*.py")} <= TOP_LEVEL


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) is not None))
def test_a_module_imports_only_its_layer_and_those_below(name):
    mine = _layer(name)
    upward = [m for m in GRAPH[name] if _layer(m) is None or _layer(m) > mine]
    assert not upward, f"{name} (layer {LAYERS[mine]}) imports {upward} from above it"
    if mine == 0:  # leaves stand alone (models is a package of its own modules)
        assert all(m.startswith("admmprune.models") for m in GRAPH[name]), GRAPH[name]


def test_no_import_cycle():
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail("import cycle: " + " → ".join(cycle))
        if name in done:
            return
        for dep in sorted(GRAPH[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in MODULES:
        visit(name, [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_600_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by idea (ARCHITECTURE.md)"


def test_the_checks_see_a_cycle_and_an_upward_import(monkeypatch):
    # the graph is built from real imports: known edges are there, so a cycle would show
    assert "admmprune.weights.select" in GRAPH["admmprune.weights.masks"]
    assert "admmprune.structure.attention" in GRAPH["admmprune.structure.graph"]
    monkeypatch.setitem(GRAPH, "admmprune.weights.select", {"admmprune.weights.masks"})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
    monkeypatch.setitem(GRAPH, "admmprune.sets.constraints", {"admmprune.run.config"})
    with pytest.raises(AssertionError, match="from above it"):
        test_a_module_imports_only_its_layer_and_those_below("admmprune.sets.constraints")


def test_every_package_folder_is_a_regular_package():
    # setuptools' find_packages ships only folders with an __init__.py: a namespace folder
    # imports from a checkout and is missing from the wheel
    for folder in sorted({p.parent for p in PKG.rglob("*.py")}):
        assert (folder / "__init__.py").is_file(), f"{folder.relative_to(PKG)} has no __init__.py"


def test_importing_the_package_leaves_torchvision_models_unimported():
    # every process a recipe or a test starts pays for what `import admmprune` imports:
    # torchvision's models (and torch._dynamo behind them) cost seconds and only Swin needs them
    code = "import sys, admmprune; print(sorted(m for m in sys.modules if 'torchvision' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
