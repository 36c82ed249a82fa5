"""The set-up agrees with itself: the Makefile builds the transformers matrix that `REMOTE_MATRIX` names, the
oldest 5.x cell is the lower bound pyproject.toml allows, and the environment under test is the lock
(constraints.txt), so what CI passed with is what a fresh clone installs."""

from __future__ import annotations

import importlib.metadata
import re
import sys

import pytest
from _model_fixtures import MATRIX_BY_NAME, REMOTE_MATRIX, REPO, locked_version
from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(REPO / "tools"))
import upstream  # noqa: E402


def _make_variables() -> dict:
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z0-9_]+) :?= *(.*?) *$", text, flags=re.M))


def test_makefile_builds_the_matrix():
    variables = _make_variables()
    assert variables["TF4_VERSION"] == MATRIX_BY_NAME["tf4.57.6"].expected_transformers
    assert variables["TF5_OLDEST_VERSION"] == MATRIX_BY_NAME["tf5-oldest"].expected_transformers
    built = {variables[name] for name in ("REMOTE_VENV", "TF4_VENV", "TF5_OLDEST_VENV", "TF_LATEST_VENV")}
    assert built == {env.venv for env in REMOTE_MATRIX}
    assert len({env.name for env in REMOTE_MATRIX}) == len(REMOTE_MATRIX)
    assert MATRIX_BY_NAME["tf-locked"].venv == variables["REMOTE_VENV"]  # no transformers of its own


def test_oldest_5x_cell_is_pyprojects_lower_bound():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (transformers,) = [Requirement(d) for d in dependencies if Requirement(d).name == "transformers"]
    lower = [Version(spec.version) for spec in transformers.specifier if spec.operator == ">="]
    assert lower == [Version(MATRIX_BY_NAME["tf5-oldest"].expected_transformers)]
    assert Version(locked_version("transformers")) in transformers.specifier


def test_environment_under_test_is_the_lock():
    """Every installed distribution is locked at its installed version (after an upgrade by hand: `make lock`)."""
    installed = {}
    for dist in importlib.metadata.distributions():
        name = upstream.canonical(dist.metadata["Name"])
        installed.setdefault(name, dist.version)  # the first on sys.path is the one imported
    locked = upstream.parse_pins((REPO / "constraints.txt").read_text())
    differ = [
        f"{name} {version} (locked {locked[name][1] if name in locked else 'not'})"
        for name, version in sorted(installed.items())
        if not upstream.UNLOCKED.match(name) and (name not in locked or locked[name][1] != version)
    ]
    assert not differ, f"the environment is not the lock (run `make lock` if it should be): {differ}"
