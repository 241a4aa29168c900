"""The package's layers (docs/library.md, "Layers of the package"): no module imports from a layer above its own.

Every import is read from the source, those inside functions included, so a lazy import cannot hide an upward one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ffnlib"

LAYERS = [
    {"errors", "config", "storage", "progress", "threads", "version", "precision", "reference"},
    {"adapters", "models", "training", "nll", "ffn_variants", "controls", "corpus", "bigbench", "stats", "findings",
     "batching"},
    {"capture", "interventions"},
    {"mining", "evaluate"},
    {"keys", "values", "aggregation", "participation", "related", "corpus_size"},
    {"card", "explorer", "distributed"},
    {"report", "plots", "widgets", "notebook", "suite", "book", "exercises"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def component(path: Path) -> str:
    """The top-level part of the package a file belongs to: ``keys`` for ``ffnlib/keys/_mine.py``."""
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def imported_components(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level parts of ffnlib that a file under ``root`` imports, relative or absolute, wherever the
    import is."""
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]  # the package the file's imports start from
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            if parts[:1] != ["ffnlib"]:
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from . import keys, values (from the package root: each name is a module)
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("ffnlib.") and alias.name.count(".") >= 1)
    return found


FILES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_part_of_the_package_has_a_layer():
    parts = {component(p) for p in FILES}
    assert parts - set(LAYER) == set(), "place the new module in a layer here and in docs/library.md"
    assert set(LAYER) - parts == set(), "a layer names a module that no longer exists"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_imports_from_a_layer_above_its_own(path):
    own = LAYER[component(path)]
    above = {name: LAYER[name] for name in imported_components(path) if name in LAYER and LAYER[name] > own}
    assert not above, f"{path.relative_to(ROOT)} (layer {own + 1}) imports from above: {above}"


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    """The check itself: lazy imports of higher layers, relative and absolute, in a subpackage module too."""
    (tmp_path / "ffnlib" / "keys").mkdir(parents=True)
    low = tmp_path / "ffnlib" / "stats.py"
    low.write_text("import numpy\n\ndef f():\n    from .report import write_report\n    from . import suite\n")
    assert imported_components(low, tmp_path / "ffnlib") == {"report", "suite"}
    inner = tmp_path / "ffnlib" / "keys" / "_mine.py"
    inner.write_text("from ..mining import hooked\nfrom ._request import x\nimport ffnlib.widgets.render\n")
    assert imported_components(inner, tmp_path / "ffnlib") == {"mining", "keys", "widgets"}
