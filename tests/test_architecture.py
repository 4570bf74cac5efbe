"""Knowledge flows one way: the core (adapter, controllers, storage, integrations) never imports the training layer
or the CLI, and the training layer never imports the CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dynarank

PACKAGE = Path(dynarank.__file__).resolve().parent
LAYERS = ("training", "cli")  # the application, in the order it builds on itself


def _layer(path: Path) -> str:
    """'core', 'training' or 'cli': the layer a source file of the package belongs to."""
    parts = path.relative_to(PACKAGE).parts
    if parts == ("__main__.py",):  # `python -m dynarank`: the CLI's entry point at the package's top
        return "cli"
    return parts[0] if parts[0] in LAYERS else "core"


def _module(path: Path) -> str:
    parts = ["dynarank", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every dynarank module ``path`` imports, at the top or inside a function, absolute or relative."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import cli` names a module
    return {name for name in found if name == "dynarank" or name.startswith("dynarank.")}


def _forbidden(layer: str) -> tuple[str, ...]:
    below = {"core": LAYERS, "training": ("cli",), "cli": ()}[layer]
    return tuple(f"dynarank.{name}" for name in below)


CORE = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) == "core")


def test_the_core_and_the_training_layer_import_nothing_above_them():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        forbidden = _forbidden(_layer(path))
        wrong += [f"{_module(path)} imports {name}" for name in _imported(path) if name.startswith(forbidden)]
    assert not wrong, wrong


def test_importing_every_core_module_loads_no_application_module():
    modules = [_module(p) for p in CORE]
    script = (
        f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dynarank.training', 'dynarank.cli'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_the_core_is_what_the_architecture_says():
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in CORE}
    assert "synthetic" not in names and "report" not in names  # a benchmark fixture and the CLI's pictures
    assert {"config", "layer", "attach", "controllers", "storage", "checkpoint", "safe_load", "files"} <= names


def test_every_module_imports_without_the_optional_trl_and_bitsandbytes():
    """trl and bitsandbytes are extras ([trl], [quant]): a process where importing them fails imports all of dynarank
    (and loads neither)."""
    script = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['trl'] = sys.modules['bitsandbytes'] = None  # importing them now fails\n"
        "import dynarank\n"
        "for m in pkgutil.walk_packages(dynarank.__path__, 'dynarank.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('trl', 'bitsandbytes')) and sys.modules[m]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
