"""No import reaches up a layer (issue 14, "Layers and models").

Every module of ``engine/``, ``indexer/`` and ``query/`` is parsed with :mod:`ast`; every ``import``
and ``from … import`` counts, including those inside functions and under ``TYPE_CHECKING``. A
module may import its own layer and the layers below it, bottom to top:

0. leaves: ``engine.errors``, ``engine.boxes``, ``engine.imaging``, ``engine.device``,
   ``engine.metrics``, ``engine.results``, ``engine.diskspace``, ``engine.datasets``, ``engine.synth``, ``engine.demo``, ``engine.data_fetch``
1. ``engine.models``: the networks and their checkpoints (the model registry)
2. ``indexer``: scanning, backbone, feature cache, stores, indexing pipeline
3. ``engine.protocols``: each paper's targets and metrics on computed features
4. ``query``: the query pipeline
5. ``engine.config``, ``engine.api``: the ``Engine`` facade
6. ``engine.training``, ``engine.evaluation``, ``engine.benchmarking``, ``engine.server``; training and evaluation do
   not import each other
7. ``engine.commands``, ``engine.cli``, the ``engine`` package itself
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "indexer", "query")

LAYERS: dict[str, int] = {
    **dict.fromkeys(
        ("engine.errors", "engine.boxes", "engine.imaging", "engine.device", "engine.metrics", "engine.results", "engine.diskspace", "engine.datasets", "engine.synth", "engine.demo", "engine.data_fetch"), 0
    ),
    "engine.models": 1,
    "indexer": 2,
    "engine.protocols": 3,
    "query": 4,
    "engine.config": 5,
    "engine.api": 5,
    "engine.sharded_index": 5,
    "engine.distributed": 5,  # the engine run on Ray: workers and shard actors hold Engines
    "engine.training": 6,
    "engine.evaluation": 6,
    "engine.benchmarking": 6,
    "engine.server": 6,
    "engine.commands": 7,
    "engine.cli": 7,
    "engine": 7,
}
"""Layer of each group of modules (``engine.X`` for ``engine``'s subpackages and modules, else the package)."""

SIBLINGS_APART = {frozenset({"engine.training", "engine.evaluation"})}
"""Groups of one layer that must not import each other either."""


def group_of(module: str) -> str:
    """``engine.training.grn`` → ``engine.training``; ``indexer.store`` → ``indexer``; ``engine`` → ``engine``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" and len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every absolute import of a project package in ``path`` (function bodies included)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield node.lineno, name


def forbidden(source: str, target: str) -> str | None:
    """Why ``source`` may not import ``target`` (``None`` when it may)."""
    src, dst = group_of(source), group_of(target)
    if src == dst:
        return None
    for group in (src, dst):
        if group not in LAYERS:
            return f"{group} has no layer; add it to tests/test_layers.py LAYERS"
    if LAYERS[dst] > LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]}), which is above it"
    if frozenset({src, dst}) in SIBLINGS_APART:
        return f"{src} and {dst} must not import each other; move the shared piece down (e.g. engine.protocols)"
    return None


def project_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_import_reaches_up() -> None:
    violations = []
    for path in project_modules():
        source = module_name(path)
        for line, target in imported_modules(path):
            reason = forbidden(source, target)
            if reason:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {target}: {reason}")
    assert not violations, "imports that reach up a layer:\n" + "\n".join(violations) + "\n\n" + __doc__


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("engine.training.rpn", "engine.evaluation.proposals_recall"),
        ("engine.evaluation.matching", "engine.training.san"),
        ("query.referring", "engine.training.feature_cache"),
        ("query.referring", "engine.evaluation.ref_nms"),
        ("query.search", "engine.benchmarking.latency"),
        ("engine.models.rpn", "indexer.backbone"),
        ("engine.models.grn", "query.rerank"),
        ("indexer.pipeline", "query.search"),
        ("engine.protocols.proposals", "engine.evaluation.ref_nms"),
        ("engine.nowhere", "engine.errors"),
    ],
)
def test_the_checker_rejects_upward_edges(source: str, target: str) -> None:
    assert forbidden(source, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("engine.training.rpn", "engine.protocols.proposals"),
        ("engine.evaluation.ref_nms", "engine.protocols.ref_nms"),
        ("query.referring", "indexer.feature_cache"),
        ("engine.models.rpn", "engine.imaging"),
        ("engine.commands.train", "engine.training.grn"),
        ("engine.evaluation.stage3", "query.localize"),
    ],
)
def test_the_checker_allows_downward_edges(source: str, target: str) -> None:
    assert forbidden(source, target) is None


def test_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from engine.training.grn import train_grn\n    import indexer.store\n")
    assert [m for _, m in imported_modules(path)] == ["engine.training.grn", "indexer.store"]
