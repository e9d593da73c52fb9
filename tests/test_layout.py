"""The package's layout holds: imports run one way (no cycle), code outside a subpackage uses
only its face, and each face names its public API and nothing else."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sweeper"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# Everything that imports the package: its own modules, the tests, the benchmark, the plugin shim.
IMPORTERS = {**MODULES, **{_module(p): p for d in ("tests", "benchmarks", "hydra_plugins")
                           for p in sorted((ROOT / d).rglob("*.py"))}}


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) for every import of the package in ``path``, including
    those inside functions: a deferred import is a dependency all the same."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None, node.lineno) if sub in MODULES
                             else (node.module, a.name, node.lineno))
    return [i for i in found if i[0] == "sweeper" or i[0].startswith("sweeper.")]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_import_cycle():
    graph = {m: {dep for dep, _, _ in _imports(p) if dep != m} for m, p in MODULES.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail("import cycle: " + " -> ".join(e.args[1]))


def test_private_modules_and_names_stay_inside():
    wrong = []
    for importer, path in IMPORTERS.items():
        for module, name, line in _imports(path):
            parts = module.split(".")
            private = [i for i, part in enumerate(parts) if _private(part)]
            owner = ".".join(parts[:private[0]]) if private else None
            if owner is not None and importer != owner and not importer.startswith(owner + "."):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}, private to {owner}")
            if name is not None and _private(name):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}.{name}, private")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("face", sorted(m for m, p in MODULES.items()
                                        if p.name == "__init__.py" and m != "sweeper"))
def test_a_subpackage_face_names_its_api_and_nothing_else(face):
    body = ast.parse(MODULES[face].read_text()).body
    imported, exported, other = set(), None, []
    for node in body:
        if isinstance(node, ast.ImportFrom):
            imported |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]:
            exported = set(ast.literal_eval(node.value))
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            other.append(type(node).__name__)  # the docstring aside: code belongs in a module
    assert ast.get_docstring(ast.Module(body=body, type_ignores=[])), f"{face} says nothing"
    assert not other and exported == imported, (other, exported, imported)
