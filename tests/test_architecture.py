"""Imports point one way: `modeling` <- `distill` <- `training` <- `evaluation`, `hub_cards` <- `demo`, `cli`.

Every import in the package is walked, function-level ones included (they hide edges), and mapped to its layer.
An import from a higher layer, or a cycle between modules, fails with the file and line. Function-level imports
of the package's own modules are kept to the command-line edge, where they keep `--help` fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "movekd_hf"

# The first matching prefix gives a module's layer; lower layers never import higher ones.
LAYERS = (
    ("movekd_hf.modeling", 0),
    ("movekd_hf.models", 1),
    ("movekd_hf.distill", 1),
    ("movekd_hf.training", 2),
    ("movekd_hf.train", 5),  # `accelerate launch -m movekd_hf.train`: argv -> objects, like the CLI
    ("movekd_hf.evaluation", 3),
    ("movekd_hf.hub_cards", 3),
    ("movekd_hf.integrations", 3),  # lmms-eval's `--model movekd`
    ("movekd_hf.metrics", 3),  # the scorers as `evaluate` modules
    ("movekd_hf.isolated", 3),
    ("movekd_hf.demo", 4),
    ("movekd_hf.cli", 5),
    ("movekd_hf", 0),  # the package's __init__: registers the Auto classes, the rest is lazy
)
# Where a function-level import of the package's own modules is the point: the command line imports a
# subcommand's implementation only when it runs.
LAZY_EDGES = ("movekd_hf.cli",)
EXACT = {"movekd_hf.train"}


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or (prefix not in EXACT and module.startswith(prefix + ".")):
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a `movekd_hf` module in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if node.module is None or (node.level and not node.module):  # `from . import x`: x is a module
                targets = [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in in_function) for t in targets if t.split(".")[0] == "movekd_hf"]
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p): internal_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(modules: dict) -> list[str]:
    upward = []
    for module, imports in modules.items():
        for target, line, _ in imports:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})")
    return upward


def test_every_import_points_down():
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def import_cycles(modules: dict) -> list[str]:
    edges = defaultdict(set)
    for module, imports in modules.items():
        for target, _, _ in imports:
            # `from .x import y` may name a module or a symbol of it: the edge goes to the module that exists.
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                edges[module].add(target)
    state, stack, cycles = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(modules):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(graph())
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_what_was_there_before():
    """Edges the package had before the layering (distill -> training, a readers <-> hf_readers cycle)."""
    before = {
        "movekd_hf.distill.cache_writer": [("movekd_hf.training.data", 160, True)],
        "movekd_hf.training.data": [],
        "movekd_hf.evaluation.readers": [("movekd_hf.evaluation.hf_readers", 173, True)],
        "movekd_hf.evaluation.hf_readers": [("movekd_hf.evaluation.readers", 17, False)],
    }
    assert upward_imports(before) == [
        "movekd_hf.distill.cache_writer:160 imports movekd_hf.training.data (layer 2 > 1)"
    ]
    assert import_cycles(before) == [
        "movekd_hf.evaluation.hf_readers -> movekd_hf.evaluation.readers -> movekd_hf.evaluation.hf_readers"
    ]


def test_function_level_imports_of_the_package_only_at_the_edge():
    hidden = [
        f"{module}:{line} imports {target} inside a function"
        for module, imports in graph().items()
        if not module.startswith(LAZY_EDGES)
        for target, line, in_function in imports
        if in_function
    ]
    assert not hidden, "\n".join(hidden)


def test_import_and_help_do_not_import_torch_or_transformers():
    code = (
        "import sys, movekd_hf, movekd_hf.cli\n"
        "try:\n    movekd_hf.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]


def test_the_stage_table_does_not_import_the_data_libraries():
    """`movekd_hf.training`'s public names load on first use: its stage table (what benchmarks/bench_gpu.py needs
    on a GPU machine without `datasets`) imports neither `datasets` nor pyarrow, and the names still resolve."""
    code = (
        "import sys\n"
        "import movekd_hf.training.stages\n"
        "print('DATA', sorted(m for m in ('datasets', 'pyarrow') if m in sys.modules))\n"
        "from movekd_hf.training import STAGES, MoVEKDTrainer\n"
        "print('RESOLVED', bool(STAGES), MoVEKDTrainer.__name__, 'datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "DATA []" in out.stdout and "RESOLVED True MoVEKDTrainer True" in out.stdout, out.stdout[-2000:]
