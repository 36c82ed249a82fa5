"""Trainer callbacks of a MoVE-KD run: a per-rank run report (what each process saw) and a fault injector that
kills the process with SIGKILL after a given step (the kill-and-resume test uses it to die at an exact step)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

SIGKILL_ENV = "MOVEKD_SIGKILL_AFTER_STEP"


class RunReportCallback(TrainerCallback):
    """Each rank writes `rank<N>.json`: world size, rank, distributed backend, ZeRO stage, logged losses.

    Raises inside the rank when a logged loss is not finite, so a multi-process run fails where it broke.
    """

    def __init__(self, folder: str, trainer):
        self.folder = Path(folder)
        self.trainer = trainer
        self.losses: list[float] = []
        self.components: dict[str, list[float]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if key == "loss" or key.endswith("_loss"):
                if not math.isfinite(value):
                    raise ValueError(f"step {state.global_step}: logged {key} is {value}")
                (self.losses if key == "loss" else self.components.setdefault(key, [])).append(float(value))

    def on_train_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
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


class SigkillAfterStepCallback(TrainerCallback):
    """SIGKILL this process at the end of optimizer step `step` (no cleanup, no final save: a hard crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def sigkill_from_env() -> SigkillAfterStepCallback | None:
    value = os.environ.get(SIGKILL_ENV)
    return SigkillAfterStepCallback(int(value)) if value else None
