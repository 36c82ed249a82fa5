"""Helpers for the training tests: build the real trainer from the tiny configs, run the real entry points in
subprocesses (`python -m movekd_hf.train`, `accelerate launch`), and compare weights.

Faults and observers come from outside the package: callbacks the tests pass to the trainer. A child process gets
them by running this file as its script (`python tests/_train_fixtures.py --report DIR -- CONFIG ...`, also under
`accelerate launch`), which builds the trainer through the entry's own `build_trainer` and `run` with the
callbacks added; production code has no test switch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
TINY_STAGE1 = str(REPO / "configs" / "train" / "tiny_stage1.yaml")
TINY_STAGE2 = str(REPO / "configs" / "train" / "tiny_stage2.yaml")
# DeepSpeed compiles a small CPU op on first use (~80 s); one cache folder lets every later launch reuse it.
TORCH_EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
THIS_FILE = str(Path(__file__).resolve())


def build(config: str, output_dir: Path, *overrides: str, callbacks=None):
    """The `MoVEKDTrainer` that `movekd-hf train CONFIG --output_dir ... OVERRIDES` would run (in this process)."""
    from movekd_hf.train import build_trainer

    argv = [config, "--output_dir", str(output_dir), "--disable_tqdm", "true", *overrides]
    return build_trainer(argv, callbacks=callbacks)


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


def run_with_callbacks(callbacks: list[str], args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """The entry's trainer for ARGS in a child process, with `callbacks` (this file's `--report DIR`,
    `--sigkill-after N` options) added; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, THIS_FILE, *callbacks, "--", *args],
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


def accelerate_launch(
    launch_args: list[str], train_args: list[str], env: dict[str, str], report: Path, timeout: float = 600
):
    """`accelerate launch` of the entry's trainer on `train_args`; every rank writes `report/rank<N>.json`."""
    command = [
        ACCELERATE, "launch", *launch_args, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), THIS_FILE, "--report", str(report),
        "--", *train_args,
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


# ------------------------------------------------------------------------------ callbacks the tests inject


class RunReportCallback(TrainerCallback):
    """Each rank writes `rank<N>.json`: world size, rank, distributed backend, ZeRO stage, logged losses.

    A non-finite loss needs no check here: the trainer itself stops the rank with `NonFiniteError` (the default
    `nonfinite_policy: stop`), so a multi-process run fails where it broke.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.losses: list[float] = []
        self.components: dict[str, list[float]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if key == "loss" or key.endswith("_loss"):
                (self.losses if key == "loss" else self.components.setdefault(key, [])).append(float(value))

    def on_train_end(self, args, state, control, **kwargs):
        from accelerate.state import AcceleratorState

        accelerator = AcceleratorState()
        plugin = getattr(accelerator, "deepspeed_plugin", None)
        report = {
            "rank": accelerator.process_index,
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "distributed_type": str(accelerator.distributed_type),
            "zero_stage": plugin.zero_stage if plugin is not None else None,
            "global_step": state.global_step,
            "losses": self.losses,
            "components": self.components,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(report, indent=1))


class SigkillAfterStep(TrainerCallback):
    """SIGKILL this process at the end of optimizer step `step` (no cleanup, no final save: a hard crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _main(argv: list[str]) -> int:
    """`python tests/_train_fixtures.py [--report DIR] [--sigkill-after N] -- CONFIG [--key value ...]`."""
    from movekd_hf.train import build_trainer, run

    parser = argparse.ArgumentParser()
    parser.add_argument("--report", default=None)
    parser.add_argument("--sigkill-after", type=int, default=None)
    split = argv.index("--")
    options, train_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    callbacks = []
    if options.report:
        callbacks.append(RunReportCallback(options.report))
    if options.sigkill_after is not None:
        callbacks.append(SigkillAfterStep(options.sigkill_after))
    return run(build_trainer(train_args, callbacks=callbacks))


if __name__ == "__main__":
    from movekd_hf.cli import exit_process

    exit_process(_main(sys.argv[1:]))  # as the entry ends (`python -m movekd_hf.train`)
