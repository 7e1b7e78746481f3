"""The package's layering, checked on the source: every module under src/lmtune imports only its own package and
the packages of the layers below it, and the packages import each other without a cycle.

Bottom to top (each package's docstring says what it holds):

    core        errors, atomic file writes, progress, digests, secret redaction, the entry points' checks
    data        records, sources, prompt formatting, prepared data, batching, the data module
    model       loading, architecture, loss, rank scoring, precision policy, the LightningModule
    artifacts   checkpoints (read, write, the checkpoint callback), the export format, model card, merging
    evaluation  metrics, predictor, evaluation modes and outputs, the end-of-training report, TF-IDF
    training    the config made ready, instantiation, loggers, callbacks, throughput, `train()`, the kinds' lookup
    tasks       the task kinds (classify, generate), plug-ins that training finds by name and never imports
    arxiv       the arXiv API: ids, feed, client, queries, fetching datasets and papers by id, the source plug-in
    commands    what eval, baseline, predict and serve run

Imports inside functions count as well: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmtune"
# bottom to top; packages in one layer may not import each other
LAYERS = [
    ("core",),
    ("data",),
    ("model",),
    ("artifacts",),
    ("evaluation",),
    ("training",),
    ("tasks", "arxiv"),  # plug-ins: the generic layers below never import them
    ("commands",),
]
LAYER_OF = {package: n for n, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str) -> str | None:
    """`lmtune.data.records` -> `data`; None for a module outside lmtune or lmtune itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lmtune" and len(parts) > 1 else None


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """The dotted name of the module at `path` in the package folder `root` (`lmtune`)."""
    parts = ("lmtune", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative imports resolved."""
    name = module_name(path, root)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from lmtune import data` imports the package `lmtune.data`
            found += [(node.lineno, f"{base}.{alias.name}" if base == "lmtune" else base) for alias in node.names]
    return found


def package_imports(root: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where (`module:line`), for imports between packages of lmtune."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        source = package_of(name)
        for line, module in imported_modules(path, root):
            target = package_of(module)
            if target is not None and source != target:
                graph.setdefault(str(source), {}).setdefault(target, []).append(f"{name}:{line}")
    return graph


def layer_violations(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    problems = []
    for source, targets in sorted(graph.items()):
        if source not in LAYER_OF:
            problems.append(f"lmtune.{source} is in no layer: add it to LAYERS")
            continue
        for target, where in sorted(targets.items()):
            if target not in LAYER_OF:
                problems.append(f"{where[0]} imports lmtune.{target}, which is in no layer")
            elif LAYER_OF[target] >= LAYER_OF[source]:
                problems.append(
                    f"{', '.join(where)}: lmtune.{source} imports lmtune.{target}, which is "
                    f"{'in the same layer' if LAYER_OF[target] == LAYER_OF[source] else 'a layer above it'}"
                )
    return problems


def package_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every cycle of the package graph, once each (as the path that closes it)."""
    cycles, done = [], set()

    def visit(package: str, path: list[str]) -> None:
        for target in sorted(graph.get(package, {})):
            if target in path:
                cycle = path[path.index(target) :] + [target]
                key = frozenset(cycle)
                if key not in done:
                    done.add(key)
                    cycles.append(cycle)
            elif target not in finished:
                visit(target, [*path, target])
        finished.add(package)

    finished: set[str] = set()
    for package in sorted(graph):
        if package not in finished:
            visit(package, [package])
    return cycles


def test_every_package_imports_only_the_layers_below_it():
    graph = package_imports()
    assert set(LAYER_OF) <= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"], "every module belongs to a package"
    assert layer_violations(graph) == []


def test_packages_import_each_other_without_a_cycle():
    assert package_cycles(package_imports()) == []


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        ("data/planted.py", "from lmtune.training.train import train\n", "lmtune.data imports lmtune.training"),
        ("core/planted.py", "def f():\n    import lmtune.arxiv.client\n", "lmtune.core imports lmtune.arxiv"),
        ("data/planted.py", "from lmtune.arxiv.source import ArxivSource\n", "lmtune.data imports lmtune.arxiv"),
        ("model/planted.py", "from lmtune import evaluation\n", "lmtune.model imports lmtune.evaluation"),
        ("training/planted.py", "from ..commands import eval\n", "lmtune.training imports lmtune.commands"),
        (
            "training/planted.py",
            "def f():\n    from lmtune.tasks.generate import KIND\n",
            "lmtune.training imports lmtune.tasks",
        ),
        ("artifacts/planted.py", "from lmtune.tasks import classify\n", "lmtune.artifacts imports lmtune.tasks"),
    ],
    ids=[
        "from-import",
        "lazy-import",
        "data-imports-arxiv",
        "package-import",
        "relative-import",
        "training-imports-a-kind",
        "export-imports-a-kind",
    ],
)
def test_a_planted_upward_import_is_found(tmp_path, module, text, expected):
    """The check itself: a copy of the package with one upward import added fails with a message naming it."""
    import shutil

    copy = tmp_path / "lmtune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / module).write_text(text)
    problems = layer_violations(package_imports(copy))
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_cycle_between_packages_is_found():
    graph = {"a": {"b": ["a.x:1"]}, "b": {"c": ["b.y:2"]}, "c": {"a": ["c.z:3"]}, "d": {"a": ["d.w:4"]}}
    assert package_cycles(graph) == [["a", "b", "c", "a"]]
