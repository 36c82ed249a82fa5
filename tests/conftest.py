"""Shared fixtures. Tests run offline; tiny configs and helpers live in `_model_fixtures.py`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from _model_fixtures import perturb_lora  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def second_photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


@pytest.fixture()
def tiny():
    """A fresh tiny model and processor (default, improved MoLE settings)."""
    from movekd_hf.models import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny checkpoint with trained-looking (non-zero) LoRA weights, so MoLE matters in outputs."""
    from movekd_hf.models import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    perturb_lora(model, seed=1)
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
