"""Checkpoints written by earlier releases keep working.

`tests/fixtures/checkpoints/movekd-*-tiny/` are frozen folders, each written once by the release in its name
(`make_tiny_checkpoint.py` beside them) with its own remote code, config, processor, safetensors weights and the
greedy tokens it produced. Every later version of the package, and every transformers release of the version
matrix (through the checkpoint's own remote code, where movekd_hf is not importable), must reproduce those tokens.
A change that has to break the format ships a conversion and a clear error instead, and a test here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _model_fixtures import remote_matrix_params, run_side
from PIL import Image
from skimage import data
from transformers import AutoProcessor

from movekd_hf import MoVEKDForConditionalGeneration

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "checkpoints").glob("movekd-*-tiny"))

GENERATE = """
import json, sys, torch, transformers
try:
    import movekd_hf
    raise SystemExit("movekd_hf is importable in the side environment")
except ImportError:
    pass
from PIL import Image
from skimage import data
from transformers import AutoProcessor
folder, auto_name = sys.argv[1], sys.argv[2]
expected = json.load(open(folder + "/expected.json"))
model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.fromarray(getattr(data, name.rsplit(".", 1)[1])()) for name in expected["images"]]
inputs = processor(images=images, text=[expected["prompt"]] * len(images), return_tensors="pt", padding=True)
with torch.no_grad():
    tokens = model.generate(**inputs, max_new_tokens=expected["max_new_tokens"], do_sample=False)
print(json.dumps({"transformers": transformers.__version__, "module": type(model).__module__,
                  "input_ids": inputs["input_ids"].tolist(), "tokens": tokens.tolist()}))
"""


def _copy(fixture: Path, tmp_path: Path) -> Path:
    """Loading may write caches next to the files: work on a copy, the committed fixture stays untouched."""
    return Path(shutil.copytree(fixture, tmp_path / fixture.name))


def test_fixtures_exist():
    assert FIXTURES, "no frozen checkpoint fixture found"
    for fixture in FIXTURES:
        names = {p.name for p in fixture.iterdir()}
        assert {"config.json", "model.safetensors", "modeling_movekd.py", "expected.json"} <= names


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_this_package_loads_old_checkpoints(fixture, tmp_path):
    """The installed package's own classes (not the checkpoint's code) on an old checkpoint."""
    folder = _copy(fixture, tmp_path)
    expected = json.loads((folder / "expected.json").read_text())
    model = MoVEKDForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    images = [Image.fromarray(getattr(data, name.rsplit(".", 1)[1])()) for name in expected["images"]]
    inputs = processor(images=images, text=[expected["prompt"]] * len(images), return_tensors="pt", padding=True)
    assert inputs["input_ids"].tolist() == expected["input_ids"]
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=expected["max_new_tokens"], do_sample=False)
    assert tokens.tolist() == expected["tokens"]


@pytest.mark.parametrize(("env", "venv", "auto_class"), remote_matrix_params(unpacked=True))
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_old_checkpoints_load_through_their_remote_code(fixture, env, venv, auto_class, tmp_path):
    folder = _copy(fixture, tmp_path)
    expected = json.loads((folder / "expected.json").read_text())
    result = json.loads(run_side(venv, GENERATE, str(folder), auto_class).strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["input_ids"] == expected["input_ids"], f"{env} (transformers {result['transformers']})"
    assert result["tokens"] == expected["tokens"], f"{env} (transformers {result['transformers']})"
