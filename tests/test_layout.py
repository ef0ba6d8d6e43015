"""The package's folders are its architecture: commands on top, subpackages with a public face, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PKG = REPO / "fmnist_tl"
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())


def _modules(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_the_commands_sit_at_the_top():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top
    assert len(SUBPACKAGES) >= 5, SUBPACKAGES


def test_modules_and_classes_stay_small():
    too_long = []
    for path in _modules(PKG):
        lines = path.read_text().count("\n")
        if lines > 400:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 210:
                too_long.append(f"{path.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long


def _imported(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


# The trial-cost profiler times phases by wrapping functions in the modules that look them up; the
# pruning bench drives the sweeper's parts (study store, sampler factory, pruner) one by one and reads
# the raw IDX files for its proxy features.
REACHES_INTO_MODULES = {"bench/trial_cost.py", "bench/pruning.py", "bench/pruning_curves.py"}


def test_other_layers_use_a_subpackages_public_face():
    """`from fmnist_tl.training import X`, never `fmnist_tl.training.model`, outside `training/` itself."""
    wrong = []
    for path in _modules(PKG, REPO / "bench", REPO / "hydra_plugins"):
        if str(path.relative_to(REPO)) in REACHES_INTO_MODULES:
            continue
        rel = path.relative_to(REPO)
        own = rel.parts[1] if rel.parts[0] == "fmnist_tl" and len(rel.parts) > 2 else None
        for line, module in _imported(path):
            parts = module.split(".")
            if parts[0] == "fmnist_tl" and len(parts) > 2 and parts[1] in SUBPACKAGES and parts[1] != own:
                wrong.append(f"{rel}:{line}: {module}")
    assert not wrong


def test_train_reads_like_the_template():
    """train(): check, build, fit, test, record; the rest lives in runtime/ and the callbacks."""
    tree = ast.parse((PKG / "train.py").read_text())
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 60
