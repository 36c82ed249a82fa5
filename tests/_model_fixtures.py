"""Helpers shared by the model tests: tiny configs with every dimension distinct (so shape mix-ups fail
loudly), inputs, and the side environments `make test` builds for remote-code loading."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from movekd_hf.distill.presets import TINY_CLIP
from movekd_hf.models import TINY_TEXT as _TINY_TEXT

REPO = Path(__file__).resolve().parents[1]

# The package's tiny preset: vision 32 wide / 48 MLP / 3 layers, LLM 40 wide / 56 MLP, 16 patches + CLS.
TINY_VISION = dict(TINY_CLIP)
TINY_TEXT = dict(vocab_size=261, bos_token_id=1, eos_token_id=2, pad_token_id=3, **_TINY_TEXT)


class SideEnv(NamedTuple):
    """One cell of the transformers version matrix: a side environment `make test` builds, where `movekd_hf` is
    not importable and a checkpoint loads through its own remote code."""

    name: str  # the test id, e.g. "tf4.57.6"
    venv: str  # its folder at the repo root, e.g. ".venv-tf4"
    auto_class: str  # the Auto class that release loads an image-text-to-text checkpoint through

    @property
    def expected_transformers(self) -> str | None:
        """The transformers release the environment must hold (None for `tf-latest`: whatever is newest)."""
        return {"tf4.57.6": "4.57.6", "tf5-oldest": "5.0.0", "tf-locked": locked_version("transformers")}.get(
            self.name
        )


# The transformers version matrix (the Makefile builds these folders; tests/test_matrix.py checks they agree):
# the last 4.x, the oldest 5.x that pyproject.toml allows, the locked release (constraints.txt; .venv-remote
# has no transformers of its own and sees the main environment's), and the newest release on the registry
# when the environment was built.
REMOTE_MATRIX = [
    SideEnv("tf4.57.6", ".venv-tf4", "AutoModelForVision2Seq"),
    SideEnv("tf5-oldest", ".venv-tf5-oldest", "AutoModelForImageTextToText"),
    SideEnv("tf-locked", ".venv-remote", "AutoModelForImageTextToText"),
    SideEnv("tf-latest", ".venv-tf-latest", "AutoModelForImageTextToText"),
]
MATRIX_BY_NAME = {env.name: env for env in REMOTE_MATRIX}


def locked_version(package: str) -> str | None:
    """The version of `package` in the lock (constraints.txt), or None if it is not pinned there."""
    wanted = _canonical(package)
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and _canonical(name) == wanted:
            return version.split(";", 1)[0].strip()
    return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _purelib(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else venv / "lib" / "site-packages"


def side_transformers_version(env: SideEnv | str) -> str | None:
    """The transformers release a side environment imports, read from the files (no interpreter started): its
    own if it installed one, else the main environment's (which it sees through its path line)."""
    venv = REPO / _venv_name(env)
    for folder in (_purelib(venv), _purelib(REPO / ".venv")):
        found = sorted(folder.glob("transformers-*.dist-info"))
        if found:
            return found[0].name.removeprefix("transformers-").removesuffix(".dist-info")
    return None


def remote_matrix_params(unpacked: bool = False) -> list:
    """`REMOTE_MATRIX` as pytest params with the cell names as ids: one `SideEnv` per param (for `params=` of a
    fixture or a single argument name), or with `unpacked=True` its three fields (for
    `parametrize(("env", "venv", "auto_class"), ...)`). `tf-latest` is left out when it installed no transformers
    of its own: the newest release is then the locked one, which `tf-locked` already runs."""
    params = []
    for env in REMOTE_MATRIX:
        if env.name == "tf-latest" and (REPO / env.venv).exists():
            if not sorted(_purelib(REPO / env.venv).glob("transformers-*.dist-info")):
                continue
        values = tuple(env) if unpacked else (env,)
        params.append(pytest.param(*values, id=env.name))
    return params


def _venv_name(env: SideEnv | str) -> str:
    """A `SideEnv`, a matrix cell name ("tf4.57.6") or a side environment folder (".venv-tf4") -> the folder."""
    if isinstance(env, SideEnv):
        return env.venv
    return MATRIX_BY_NAME[env].venv if env in MATRIX_BY_NAME else env


def side_python(name: SideEnv | str) -> str:
    """The interpreter of a side environment built by `make test`: a `SideEnv`, a matrix cell name or a folder
    (`.venv-remote`, `.venv-tf4`, ...)."""
    python = REPO / _venv_name(name) / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} is missing: run the tests through `make test`, which builds it.")
    return str(python)


def run_side(name: SideEnv | str, script: str, *args: str, timeout: float = 600) -> str:
    """Run `script` in a side environment (see `side_python`), from a folder outside the repo; returns its
    stdout."""
    result = subprocess.run(
        [side_python(name), "-c", script, *args],
        cwd="/",
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"{_venv_name(name)} run failed:\n{result.stderr[-4000:]}")
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
