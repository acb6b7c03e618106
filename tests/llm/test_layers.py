"""The layers of `llm/` (README, "Layout"): every module imports only modules of lower layers.

The import graph is read from the source (every `import` and `from ... import`, at module level
or inside functions; imports under `if TYPE_CHECKING:` are annotations only and are skipped).
A module that reaches up -- an objective importing `llm/train.py`, the config importing the
judges -- fails here, and so does any cycle, since no two layers import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

LLM = Path(__file__).resolve().parents[2] / "llm"

LAYERS = [
    {"llm.objectives.base", "llm.losses", "llm.cache", "llm.preference_store", "llm.data"},
    {"llm.config", "llm.models"},
    {"llm.evaluate", "llm.testbed", "llm.reward_model"},
    {"llm.judges"},
    {"llm.run"},
    {"llm.rollout", "llm.checkpoint"},
    {"llm.teacher_topk"},
    {"llm.objectives.policy_gradient"},
    {"llm.objectives.token_level", "llm.objectives.dpkd", "llm.objectives.preference_game"},
    {"llm.train"},
    {"llm.experiments", "llm.bridge", "llm.bench"},
]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LLM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from llm import losses`
    return {name for name in out if name in LAYER}


def test_every_llm_module_has_a_layer():
    modules = {_module_name(p) for p in LLM.rglob("*.py")} - {"llm", "llm.objectives"}
    assert modules == set(LAYER), f"unplaced: {sorted(modules - set(LAYER))}, gone: {sorted(set(LAYER) - modules)}"


def test_no_module_imports_its_own_layer_or_one_above():
    upward = []
    for path in LLM.rglob("*.py"):
        name = _module_name(path)
        if name not in LAYER:
            continue
        upward += [f"{name} (layer {LAYER[name]}) imports {other} (layer {LAYER[other]})"
                   for other in sorted(_imports(path)) if other != name and LAYER[other] >= LAYER[name]]
    assert not upward, upward


def test_only_the_experiments_and_the_benchmark_import_train():
    importers = sorted(_module_name(p) for p in LLM.rglob("*.py") if "llm.train" in _imports(p))
    assert importers == ["llm.bench", "llm.experiments"]
