"""The demo's VLM: assembled from the pretrained `clip` teacher and a small pretrained LLM, then trained in the
paper's two stages through the real `MoVEKDTrainer`, once per arm and training seed.

Each stage builds its trainer from objects, as a Python user would: the VLM and processor loaded from the previous
folder, `MoVEKDTrainingArguments`, the teachers as a ready teacher source (the demo's teacher-feature cache,
`CachedTeachers`, written once and read by every arm and seed) with the arm's `MoVEKDDistiller`, and for stage 2
the stage-1 adapters (`adapters_from`). The `clip` teacher is, as always, the frozen copy of the student's initial
tower.

Arms differ only in the KD loss: every KD arm is the authors' `faithful` loss (`KDLossConfig.from_preset
("faithful")`) plus the named options of `Arm.kd_options`, one change per arm, so each arm against `faithful`
isolates one option; every arm (the no-KD baseline included) starts from the same faithful-MoLE VLM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import ProgressCallback

from ..distill.distiller import MoVEKDDistiller, TeacherShape
from ..distill.losses import KDLossConfig
from ..modeling import MoVEKDForConditionalGeneration, MoVEKDProcessor
from ..training.arguments import MoVEKDTrainingArguments
from ..training.data_args import MoVEKDDataArguments, build_train_data
from ..training.trainer import MoVEKDTrainer
from .teachers import GAP_TEACHER


@dataclass(frozen=True)
class Arm:
    """One row of the tables: a KD preset of `KDLossConfig` ("none" = the LLaVA baseline) and the named
    `KDLossConfig` options changed from it (`kd_options`)."""

    name: str
    label: str
    kd_preset: str
    kd_options: dict = field(default_factory=dict)

    def loss_config(self) -> KDLossConfig | None:
        return None if self.kd_preset == "none" else KDLossConfig.from_preset(self.kd_preset, **self.kd_options)


BASELINE_ARM = "llava"
ARMS = (
    Arm(BASELINE_ARM, "LLaVA (no distillation)", "none"),
    Arm("faithful", "MoVE-KD faithful (authors' setting)", "faithful"),
    Arm("anchor_0.4", "faithful, clip anchor weight 0.4 (not 0.8)", "faithful", {"anchor_weight": 0.4}),
    Arm("standardized", "faithful, teacher features standardised", "faithful", {"standardize_features": True}),
    Arm("gap_x4", f"faithful, {GAP_TEACHER} loss x4", "faithful", {"teacher_loss_scale": {GAP_TEACHER: 4.0}}),
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


def stage_arguments(
    settings: StageSettings, kd_preset: str, output_dir: str, adapters_from: str | None = None
) -> MoVEKDTrainingArguments:
    """The training arguments of one stage of one arm (arms differ only in `kd_preset`)."""
    return MoVEKDTrainingArguments(
        output_dir=output_dir,
        stage=settings.stage,
        kd_preset=kd_preset,
        lambda_kd=0.5,
        lambda_bal=0.01,
        adapters_from=adapters_from,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=max(1, settings.max_steps // 40),
        save_strategy="no",
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=False,
        use_cpu=True,
        full_determinism=False,  # set by the demo itself (torch.use_deterministic_algorithms)
    )


def stage_data(settings: StageSettings) -> MoVEKDDataArguments:
    return MoVEKDDataArguments(
        data_path=settings.data_path,
        image_folder=settings.image_folder,
        template=settings.template,
        image_aspect="pad",
        max_length=512,
    )


class _BarOnly(ProgressCallback):
    """The Trainer's progress bar without its printed log dicts (the demo plots them instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def build_distiller(arm: Arm, shapes: Mapping[str, TeacherShape], vlm, seed: int) -> MoVEKDDistiller | None:
    """The arm's adapters and loss for teachers of `shapes` (slug -> TeacherShape, the anchor included), seeded
    as the trainer seeds its own (`training.distillation.build_distiller`); None for the no-KD arm."""
    config = arm.loss_config()
    if config is None:
        return None
    vision = vlm.config.vision_config
    side = vision.image_size // vision.patch_size
    torch.manual_seed(seed)
    return MoVEKDDistiller(dict(shapes), vision.hidden_size, side * side, config)


def build_stage_trainer(
    settings: StageSettings,
    model_path: str,
    arm: Arm,
    output_dir: str,
    teacher_source=None,
    shapes: Mapping[str, TeacherShape] | None = None,
    previous: str | None = None,
) -> MoVEKDTrainer:
    """One stage's trainer, from objects. `teacher_source` (the demo's `CachedTeachers`) gives every teacher's
    output, the anchor's included; `shapes` sizes the arm's adapters. `previous` (the stage-1 folder) hands its
    trained adapters to stage 2, so the distiller carries on instead of starting again."""

    kd = arm.kd_preset != "none"
    vlm = MoVEKDForConditionalGeneration.from_pretrained(model_path)
    processor = MoVEKDProcessor.from_pretrained(model_path)
    data = build_train_data(stage_data(settings), processor)
    trainer = MoVEKDTrainer(
        model=vlm,
        args=stage_arguments(settings, arm.kd_preset, output_dir, previous if kd else None),
        teachers=teacher_source if kd else None,
        distiller=build_distiller(arm, shapes, vlm, settings.seed) if kd else None,
        train_dataset=data.dataset,
        processing_class=processor,
        train_config={
            "teacher_set": "demo" if kd else None,
            "base_model": model_path,
            "template": settings.template,
            "demo_arm": arm.name,
        },  # fmt: skip
    )
    # The Trainer adds its progress bar itself (no constructor argument replaces it); swap it, through the
    # documented callback API, for the same bar without the printed log dicts.
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_BarOnly())
    return trainer


def run_stage(
    settings: StageSettings,
    model_path: str,
    arm: Arm,
    output_dir: str,
    teacher_source=None,
    shapes: Mapping[str, TeacherShape] | None = None,
    previous: str | None = None,
) -> dict:
    """Train one stage and save its folder. Returns {"history": the trainer's log history (also saved as
    log_history.json), "training_args": TrainingArguments as a dict, "train_config": the run's settings}."""
    trainer = build_stage_trainer(settings, model_path, arm, output_dir, teacher_source, shapes, previous)
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
