"""Import layering the design relies on: RL and evaluation both sit on the task registry and the
engine, and neither imports the other; ``pear_mega.cpu`` sits below the models, the optimizer and
the engine and imports none of them."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pear_mega"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _files(*parts: str) -> list[Path]:
    path = PKG.joinpath(*parts)
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("files, forbidden", [
    (_files("evaluation.py") + _files("evaluate.py"), ("pear_mega.rl",)),
    (_files("rl"), ("pear_mega.evaluation", "pear_mega.evaluate")),
    (_files("engine.py") + _files("tasks.py"), ("pear_mega.rl", "pear_mega.evaluation", "pear_mega.evaluate")),
    (_files("cpu"), ("pear_mega.models", "pear_mega.optim", "pear_mega.engine", "pear_mega.rl", "pear_mega.parallel")),
], ids=["evaluation", "rl", "engine-and-tasks", "cpu"])
def test_layer_imports(files, forbidden):
    bad = [f"{f.relative_to(PKG.parent)}: {name}" for f in files for name in sorted(_imports(f))
           if any(name == b or name.startswith(b + ".") for b in forbidden)]
    assert not bad, "imports across the layering:\n" + "\n".join(bad)
