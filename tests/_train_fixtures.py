"""Helpers for the training tests: build the real trainer from the tiny configs, run the real entry points in
subprocesses (`python -m movekd_hf.train`, `accelerate launch`), and compare weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_STAGE1 = str(REPO / "configs" / "train" / "tiny_stage1.yaml")
TINY_STAGE2 = str(REPO / "configs" / "train" / "tiny_stage2.yaml")
# DeepSpeed compiles a small CPU op on first use (~80 s); one cache folder lets every later launch reuse it.
TORCH_EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def build(config: str, output_dir: Path, *overrides: str):
    """The `MoVEKDTrainer` that `movekd-hf train CONFIG --output_dir ... OVERRIDES` would run (in this process)."""
    from movekd_hf.training.train import build_trainer

    return build_trainer([config, "--output_dir", str(output_dir), "--disable_tqdm", "true", *overrides])


# One plain SGD step with nothing else moving the weights: updates compare exactly between runs.
SGD_ONE_STEP = (
    "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
    "--max_grad_norm", "1e9", "--weight_decay", "0", "--max_steps", "1", "--save_strategy", "no",
    "--logging_steps", "1",
)  # fmt: skip


def one_step_update(config: str, output_dir: Path, *overrides: str):
    """The change of every trainable parameter after one `SGD_ONE_STEP` step, and the trainer."""
    trainer = build(config, output_dir, *SGD_ONE_STEP, *overrides)
    before = trainable_state(trainer.model)
    trainer.train()
    after = trainable_state(trainer.model)
    return {key: after[key] - before[key] for key in before}, trainer


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def run_module(args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """`python -m movekd_hf.train ARGS` in a child process; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "movekd_hf.train", *args],
        cwd=REPO,
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(launch_args: list[str], train_args: list[str], env: dict[str, str], timeout: float = 600):
    command = [
        ACCELERATE, "launch", *launch_args, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "movekd_hf.train", *train_args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.state_dict().items()}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
