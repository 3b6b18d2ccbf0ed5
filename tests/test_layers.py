"""The package's layers run one way: base → data → models → losses → train → tasks → runners → api → apps → cli.

Every `import` of an evl module — at the top of a file, inside a function or under TYPE_CHECKING — must
name a module of the same or a lower layer, and no chain of imports may come back to where it started.
A technique's folder (`evl/techniques/<paper>/`) is a vertical slice: each of its modules sits in the
layer of what it is (a module, a loss term, a runner, CLI commands), listed in `TECHNIQUE_LAYERS`.
A new module must be placed in a layer here: the test names it. See docs/design.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "evl"

LAYERS = ["base", "data", "models", "losses", "train", "tasks", "runners", "api", "apps", "cli"]

CORE_LAYERS = {
    "evl.errors": "base", "evl.config": "base", "evl.checkpoint": "base", "evl.distributed": "base",
    "evl.precision": "base", "evl.techniques": "base",
    "evl.data": "data", "evl.models": "models", "evl.losses": "losses", "evl.train": "train",
    "evl.tasks": "tasks", "evl.efficiency": "tasks",
    "evl.recipes": "runners",
    "evl.api": "api", "evl.export": "api",
    "evl.search": "apps", "evl.quickstart": "apps",
    "evl.cli": "cli", "evl.cli_common": "cli", "evl": "cli",     # the package root only re-exports the API, lazily
}

TECHNIQUE_LAYERS = {
    # package folders: a docstring, nothing imported
    "evilm": "base", "smaug": "base", "egovlpv2": "base", "vlap": "base",
    # EgoVLPv2: fusion in the backbone, EgoNCE
    "egovlpv2.fusion": "models", "egovlpv2.egonce": "losses",
    # SMAUG: video MAE, space-time sparsification
    "smaug.mae_decoder": "models", "smaug.sparsify": "models",
    "smaug.mae": "losses", "smaug.sparsify_term": "losses",
    # E-ViLM: VQ tokenizer, MVM
    "evilm.vq_tokenizer": "models", "evilm.mvm": "losses", "evilm.vq_train": "runners", "evilm.cli": "cli",
    # VLAP: frame-level QA
    "vlap.frame_prompter": "models", "vlap.qformer": "models", "vlap.frame_qa": "models",
    "vlap.features": "tasks", "vlap.evaluate": "tasks", "vlap.train": "runners", "vlap.cli": "cli",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> str:
    if module.startswith("evl.techniques."):
        rest = module.removeprefix("evl.techniques.")
        if rest not in TECHNIQUE_LAYERS:
            raise AssertionError(f"{module} has no layer: add it to TECHNIQUE_LAYERS in {__file__}")
        return TECHNIQUE_LAYERS[rest]
    for prefix in sorted(CORE_LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return CORE_LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to CORE_LAYERS in {__file__}")


def evl_imports(module: str) -> set[str]:
    """The evl modules `module` imports (a `from pkg import name` of a sub-module counts as that module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "evl")
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: relative import; write `from evl.... import ...`")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "evl":
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs or {node.module})
    return {m for m in found if m != module}


GRAPH = {m: evl_imports(m) for m in MODULES}


def test_every_module_has_a_layer_and_imports_exist():
    for module, imported in GRAPH.items():
        layer_of(module)
        missing = imported - MODULES.keys()
        assert not missing, f"{module} imports {sorted(missing)}, which do not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up_the_layers(module):
    mine = LAYERS.index(layer_of(module))
    upward = sorted(m for m in GRAPH[module] if LAYERS.index(layer_of(m)) > mine)
    assert not upward, (f"{module} ({layer_of(module)}) imports from a higher layer: "
                        + ", ".join(f"{m} ({layer_of(m)})" for m in upward))


def test_no_import_cycles():
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(GRAPH[module]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_an_upward_import_and_a_cycle():
    """The rules above are not vacuous: a models module importing a loss, and two modules importing
    each other, are caught."""
    assert LAYERS.index(layer_of("evl.models.model")) < LAYERS.index(layer_of("evl.losses.functional"))
    assert layer_of("evl.techniques.smaug.mae") == "losses" and layer_of("evl.techniques.vlap.cli") == "cli"
    graph = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        saved = dict(GRAPH)
        GRAPH.clear()
        GRAPH.update(graph)
        try:
            test_no_import_cycles()
        finally:
            GRAPH.clear()
            GRAPH.update(saved)
