"""The demo's VLM: assembled from the pretrained `clip` teacher and a small pretrained LLM, then trained in the
paper's two stages through the real `MoVEKDTrainer`, once per arm.

Each stage is a command line for `accelerate launch -m movekd_hf.train`, built into a trainer by the same
`movekd_hf.training.train.build_trainer`; the demo only hands it its own pretrained teachers
(`teachers.DEMO_TEACHERS`), which a YAML teacher set cannot name, and the stage-1 adapters for stage 2. The `clip`
teacher is, as always, the frozen copy of the student's initial tower.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PrinterCallback, ProgressCallback

from ..distill.losses import KDLossConfig
from ..distill.teachers import TeacherSpec
from ..training.arguments import parse_args
from ..training.train import build_trainer


@dataclass(frozen=True)
class Arm:
    """One row of the table: a KD preset of `KDLossConfig` ("none" = LLaVA baseline) and the MoLE settings."""

    name: str
    label: str
    kd_preset: str
    faithful_mole: bool = False


ARMS = (
    Arm("llava", "LLaVA (no distillation)", "none"),
    Arm("mse", "+ MSE baseline", "mse_baseline"),
    Arm("movekd_faithful", "+ MoVE-KD (faithful)", "faithful", faithful_mole=True),
    Arm("movekd_improved", "+ MoVE-KD (improved defaults)", "improved"),
)


@dataclass(frozen=True)
class StageSettings:
    """Sizes of one stage; everything else follows configs/train/tiny_stage{1,2}.yaml."""

    stage: str
    data_path: str
    image_folder: str
    template: str
    max_steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0


def stage_argv(settings: StageSettings, model_path: str, kd_preset: str, output_dir: str) -> list[str]:
    """The command line `accelerate launch -m movekd_hf.train` would get for this stage (as a list)."""
    values = {
        "model_name_or_path": model_path,
        "teacher_set": "tiny",  # replaced by the demo teachers in `build_demo_trainer`
        "kd_preset": kd_preset,
        "stage": settings.stage,
        "data_path": settings.data_path,
        "image_folder": settings.image_folder,
        "template": settings.template,
        "image_aspect": "pad",
        "max_length": 512,
        "output_dir": output_dir,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "lambda_kd": 0.5,
        "lambda_bal": 0.01,
        "logging_steps": max(1, settings.max_steps // 40),
        "save_strategy": "no",
        "seed": settings.seed,
        "data_seed": settings.seed,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": False,
        "use_cpu": True,
        "full_determinism": False,  # set by the demo itself (torch.use_deterministic_algorithms)
    }
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


def build_demo_trainer(argv: list[str], specs: Mapping[str, TeacherSpec], previous: str | None = None):
    """`build_trainer` of movekd_hf.training.train with the demo's pretrained teachers; `previous` (the stage-1
    folder) hands its trained adapters to stage 2, so the distiller carries on instead of starting again."""
    others = [spec for slug, spec in specs.items() if slug != "clip"]  # clip: the student's own tower, as there
    kd = parse_args(argv)[0].kd_preset != "none"
    trainer = build_trainer(argv, teacher_specs=others, adapters_from=previous if kd and previous else None)
    trainer.train_config.update(
        teacher_set="demo" if kd else None, kd_loss=_kd_dict(trainer.train_config["kd_preset"])
    )
    return trainer


def _kd_dict(preset: str) -> dict | None:
    return None if preset == "none" else KDLossConfig.from_preset(preset).to_dict()


class _BarOnly(ProgressCallback):
    """The Trainer's progress bar without its printed log dicts (the demo plots them instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def run_stage(argv: list[str], specs: Mapping[str, TeacherSpec], previous: str | None = None) -> dict:
    """Train one stage and save its folder. Returns {"history": the trainer's log history (also saved as
    log_history.json), "training_args": TrainingArguments as a dict, "train_config": the run's settings}."""
    trainer = build_demo_trainer(argv, specs, previous)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(_BarOnly())
    trainer.train()
    trainer.save_model()
    history = trainer.state.log_history
    with open(os.path.join(trainer.args.output_dir, "log_history.json"), "w", encoding="utf-8") as handle:
        json.dump(history, handle, indent=1)
    return {
        "history": history,
        "training_args": json.loads(trainer.args.to_json_string()),
        "train_config": trainer.train_config,
    }
