"""Helpers shared by the model tests: tiny configs with every dimension distinct (so shape mix-ups fail
loudly), inputs, and the side environments `make test` builds for remote-code loading."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from movekd_hf import presets

REPO = Path(__file__).resolve().parents[1]

# The package's tiny preset: vision 32 wide / 48 MLP / 3 layers, LLM 40 wide / 56 MLP, 16 patches + CLS.
TINY_VISION = dict(presets.TINY_VISION)
TINY_TEXT = dict(vocab_size=261, bos_token_id=1, eos_token_id=2, pad_token_id=3, **presets.TINY_TEXT)


def side_python(name: str) -> str:
    """The interpreter of a side environment built by `make test` (`.venv-remote`, `.venv-tf4`)."""
    python = REPO / name / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} is missing: run the tests through `make test`, which builds it.")
    return str(python)


def run_side(name: str, script: str, *args: str, timeout: float = 600) -> str:
    """Run `script` in a side environment, from a folder outside the repo; returns its stdout."""
    result = subprocess.run(
        [side_python(name), "-c", script, *args],
        cwd="/",
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"{name} run failed:\n{result.stderr[-4000:]}")
    return result.stdout


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Give every LoRA/router weight random values, as training would (zero-init B hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name or ".router." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def chat_inputs(processor, images, question: str = "What is in the picture?"):
    images = images if isinstance(images, list) else [images]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)


def random_image(seed: int, size=(45, 61)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
