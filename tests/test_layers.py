"""The package's layers point one way and its modules import no cycle: read from the source, not trusted."""

from __future__ import annotations

import ast

from tests.conftest import REPO

# Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS = [
    # foundations
    {"paths", "config", "registry", "checkpoint", "cluster", "metrics", "device", "guard", "distributed"},
    {"splits"},  # what every dataset loader returns and shares
    {"models", "resnet_attn", "probes", "augment", "pets", "data", "feed"},  # the groups' options; batches
    {"logger", "wandb_logger", "tensorboard_logger"},  # the logger sinks
    {"optim"},  # builds from models' parameter groups
    {"groups", "engine"},  # every registry; the training loop
    {"averaging", "stopping", "probing", "figures", "samples"},  # engine hooks: averages, stopping, probe, pictures
    {"rundir"},  # a run directory's files and checks
    {"run"},  # the Hydra task
    {"jobs"},  # a sweep's jobs and their states
    {"cells", "report_plots", "search_report", "report", "launcher"},  # a sweep's report and plots; launchers
    # sweeps and sweepers (Optuna's); benches; tools
    {"sweep", "search", "bench_trainer", "bench", "cli", "lr_find", "explain", "preview", "evaluate"},
    {"train"},  # the Hydra entry point (train.py, vitexp-train)
]
TOP = "__init__"


def imports() -> dict[str, set[str]]:
    """vitexp module -> the vitexp modules it imports anywhere in its source (functions included)."""
    graph = {}
    for path in sorted((REPO / "vitexp").glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "vitexp":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitexp."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vitexp.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_every_module_has_a_layer() -> None:
    assert set(imports()) - {TOP} == set().union(*LAYERS)


def test_no_module_imports_a_layer_above_its_own() -> None:
    layer = {module: rank for rank, modules in enumerate(LAYERS) for module in modules}
    upward = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        if module != TOP
        for target in targets
        if layer[target] > layer[module]
    ]
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target] if target in path else [*path, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(imports()) is None
    assert find_cycle({"sweep": {"report"}, "report": {"jobs", "sweep"}, "jobs": set()}) == [
        "report",
        "sweep",
        "report",
    ]


def test_hydra_plugins_stays_a_namespace_package() -> None:
    """An __init__.py would hide Hydra's own plugins (hydra_submitit_launcher) behind ours."""
    assert (REPO / "hydra_plugins" / "vitexp_launcher.py").exists()
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()
