"""The remote code's surface on transformers stays small and public.

Every checkpoint carries `movekd_hf/modeling/*.py` frozen inside it, and must keep loading on transformers
releases that do not exist yet. A name from a private or model-internal module (`transformers.models.llava.
modeling_llava`'s output classes, helper functions) can change in any release, as 5.24 showed. This test lists
every transformers name the remote code imports or reads, and fails on any that is not exported by the top-level
`transformers` package unless it is on the allow-list below, with its reason."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import transformers

MODELING = Path(__file__).resolve().parents[1] / "movekd_hf" / "modeling"

# (module, name): why the remote code needs it, and what happens where it is missing.
ALLOWED_INTERNAL = {
    ("transformers.conversion_mapping", "get_checkpoint_conversion_mapping"): (
        "5.x's registry of key renamings: lets our model types read llava-hf's key layout; ImportError on 4.x "
        "is caught (4.x uses `_checkpoint_conversion_mapping`)"
    ),
    ("transformers.conversion_mapping", "register_checkpoint_conversion_mapping"): "as above",
}
# Top-level attributes that are modules or dunders, read as `transformers.X`: why each is public.
ALLOWED_ATTRIBUTES = {
    "__version__": "the release, for the tested-range check",
    "logging": "transformers' documented logging module (`from transformers import logging`)",
}


def _transformers_names(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module, name, line) for every `from transformers... import name`, `import transformers...` and
    `transformers.name` in a module, function-level imports included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("transformers")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "transformers":
            found.append(("transformers", node.attr, node.lineno))
    return found


def _problems(path: Path) -> list[str]:
    problems = []
    for module, name, line in _transformers_names(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.name}:{line}: {module}{'.' + name if name else ''}"
        if (module, name) in ALLOWED_INTERNAL:
            continue
        if module == "transformers" and not name:
            continue  # `import transformers` itself
        if module != "transformers":
            problems.append(f"{where} comes from a submodule (not on the allow-list)")
        elif name.startswith("_") and name not in ALLOWED_ATTRIBUTES:
            problems.append(f"{where} is private")
        elif name not in ALLOWED_ATTRIBUTES and not hasattr(transformers, name):
            problems.append(f"{where} is not exported by transformers {transformers.__version__}")
        elif name not in ALLOWED_ATTRIBUTES and isinstance(getattr(transformers, name, None), types.ModuleType):
            problems.append(f"{where} is a submodule (not on the allow-list)")
    return problems


def test_remote_code_uses_only_public_transformers_names():
    files = sorted(MODELING.glob("*.py"))
    assert {p.name for p in files} >= {"modeling_movekd.py", "configuration_movekd.py", "mole.py"}
    problems = [problem for path in files for problem in _problems(path)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_broke_before(tmp_path):
    """The import that stopped every forward on 5.24 would be reported (the test is not vacuous)."""
    old = tmp_path / "old_modeling.py"
    old.write_text(
        "import transformers\n"
        "from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast\n"
        "from transformers import _private\n"
        "x = transformers.modeling_utils\n"
    )
    problems = _problems(old)
    assert len(problems) == 3
    assert "modeling_llava.LlavaCausalLMOutputWithPast comes from a submodule" in problems[0]
    assert "private" in problems[1] and "modeling_utils" in problems[2]


def test_allow_list_entries_are_still_used():
    used = {(m, n) for path in MODELING.glob("*.py") for m, n, _ in _transformers_names(ast.parse(path.read_text()))}
    assert set(ALLOWED_INTERNAL) <= used, set(ALLOWED_INTERNAL) - used


def _sibling_imports(path: Path) -> set[str]:
    """The sibling modules a remote-code file imports (`from .x import y`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_remote_code_imports_siblings_one_level_deep():
    """transformers (4.57 and 5.x) copies a local checkpoint's remote code into its module cache one import deep:
    the loaded file and the siblings it imports, not what those import. So every sibling a file needs must be
    imported by that file itself, or loading the processor alone fails with a missing module."""
    problems = []
    for path in sorted(MODELING.glob("[!_]*.py")):  # __init__.py is the package's, never copied
        direct = _sibling_imports(path)
        for sibling in sorted(direct):
            missing = _sibling_imports(MODELING / f"{sibling}.py") - direct
            if missing:
                problems.append(f"{path.name} imports {sibling}.py, which imports {sorted(missing)} that it does not")
    assert not problems, "\n".join(problems)
