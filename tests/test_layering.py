"""The packages' layering, read from the source: kitcore at the bottom, no cycles (imports
inside functions count), no package reaching into another's private modules, and the
libraries other projects import load no FSDP."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kitcore", "fsdpkit", "planner", "ckpt", "seer_train")
# What each package may import (the lazy wrapper calls of planner/_wrapper.py included).
ALLOWED = {
    "kitcore": set(),
    "fsdpkit": {"kitcore"},
    "planner": {"kitcore", "fsdpkit"},
    "ckpt": {"kitcore"},
    "seer_train": {"kitcore", "fsdpkit", "planner", "ckpt"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (top level and inside functions), absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out += [(mod, node.lineno)]
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def _edges() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for mod, line in _imports(path):
                top = mod.split(".")[0]
                if top in PACKAGES and top != pkg:
                    edges[pkg].setdefault(top, []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_each_package_imports_only_the_layers_below_it():
    edges = _edges()
    for pkg, targets in edges.items():
        extra = set(targets) - ALLOWED[pkg]
        assert not extra, f"{pkg} imports {sorted(extra)}: {[targets[t] for t in extra]}"


def test_no_import_cycle_counting_imports_inside_functions():
    edges = {p: set(t) for p, t in _edges().items()}

    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in edges[a])

    cycles = [p for p in PACKAGES if reaches(p, p)]
    assert not cycles, f"import cycles through {cycles}: {edges}"


def test_planner_reaches_the_wrapper_in_one_place_only():
    where = {loc.split(":")[0] for loc in _edges()["planner"].get("fsdpkit", [])}
    assert where <= {"planner/_wrapper.py"}, where


def test_no_package_imports_another_packages_private_module():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for mod, line in _imports(path):
                parts = mod.split(".")
                private = any(p.startswith("_") and not p.startswith("__") for p in parts[1:])
                if parts[0] in PACKAGES and parts[0] != pkg and private:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, bad


@pytest.mark.parametrize("libs", ["planner, ckpt", "kitcore"])
def test_the_libraries_load_no_fsdp(libs):
    code = (
        f"import sys, {libs}; "
        "print([m for m in sys.modules if m.startswith('torch.distributed.fsdp') "
        "or m.split('.')[0] == 'fsdpkit'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
