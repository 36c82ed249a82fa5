"""`MoVEKDTrainer` built from Python objects alone (no YAML, no argv), as the README's Training section shows it,
and the same run through the command line's `build_trainer`: argv only becomes those objects."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _train_fixtures import TINY_STAGE1, build

from movekd_hf.distill.presets import teacher_specs
from movekd_hf.models import from_preset
from movekd_hf.training.arguments import MoVEKDTrainingArguments
from movekd_hf.training.data import BadSampleError
from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data, image_token_id, num_image_tokens
from movekd_hf.training.module import llm_lora_config
from movekd_hf.training.toy_data import make_toy_llava_dataset
from movekd_hf.training.trainer import MoVEKDTrainer

# The values of configs/train/tiny_stage1.yaml that the comparison with the command line needs.
TINY_RECIPE = dict(
    learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03, seed=42, data_seed=42,
    per_device_train_batch_size=4, ddp_find_unused_parameters=True,
)  # fmt: skip


def python_trainer(tmp_path, **overrides) -> MoVEKDTrainer:
    """What the README shows: model, data, arguments and teachers as objects."""
    model, processor = from_preset("tiny")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=8)
    data = build_train_data(
        MoVEKDDataArguments(data_path=toy.pretrain_json, image_folder=toy.image_folder, template="plain"), processor
    )
    args = MoVEKDTrainingArguments(
        output_dir=str(tmp_path / "run"), stage="stage1", kd_preset="default", lambda_kd=0.5, lambda_bal=0.01,
        max_steps=2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, **TINY_RECIPE,
    )  # fmt: skip
    kwargs = dict(model=model, args=args, teachers="tiny", train_dataset=data.dataset, processing_class=processor)
    return MoVEKDTrainer(**{**kwargs, **overrides})


def test_python_objects_train_as_the_command_line_does(tmp_path):
    trainer = python_trainer(tmp_path / "python")
    # built by the trainer: each teacher's own uint8 view (issue 18.3), no float `teacher_images`
    assert set(trainer.data_collator.teacher_views) == {"clip", "convnext", "sam"}
    assert trainer.data_collator.teacher_image_size is None
    before = {name: p.detach().clone() for name, p in trainer.model.distiller.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and {"lm_loss", "kd_loss", "balance_loss", "kd/sam_weight"} <= set(logs[0])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.distiller.named_parameters())
    # The specs the teachers were built from (the model card's shape); `clip` is the student's own initial tower.
    assert trainer.train_config["teachers"] == [
        {"name": "clip", "model_id": None, "pretrained": None},
        {"name": "convnext", "model_id": "convnext_atto", "pretrained": False},
        {"name": "sam", "model_id": "tiny-sam", "pretrained": False},
    ]
    # The collator the trainer builds checks every sample's image tokens, as build_train_data's does.
    collator, processor = trainer.data_collator, trainer.processing_class
    image_token = image_token_id(processor)
    assert (collator.image_token_id, collator.num_image_tokens) == (image_token, num_image_tokens(processor))
    sample = dict(trainer.train_dataset[0])  # one image token fewer than its image needs
    image_at = sample["input_ids"].index(image_token)
    sample["input_ids"] = sample["input_ids"][:image_at] + sample["input_ids"][image_at + 1 :]
    sample["labels"] = sample["labels"][:image_at] + sample["labels"][image_at + 1 :]
    with pytest.raises(BadSampleError, match="image tokens"):
        collator([sample])
    assert trainer.train_config["teacher_set"] == "tiny" and trainer.train_config["kd_loss"]["objective"] == "movekd"

    cli = build(
        TINY_STAGE1, tmp_path / "cli", "--data_path", "toy:pretrain:8", "--max_steps", "2", "--logging_steps", "1",
        "--save_strategy", "no",
    )  # fmt: skip
    cli.train()
    cli_logs = [entry for entry in cli.state.log_history if "loss" in entry]
    for ours, theirs in zip(logs, cli_logs, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_the_collator_must_give_online_teachers_their_view(tmp_path):
    model, processor = from_preset("tiny")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=2)
    data = build_train_data(MoVEKDDataArguments(data_path=toy.pretrain_json, image_folder=toy.image_folder), processor)
    with pytest.raises(ValueError, match="teacher_image_size=64"):
        python_trainer(tmp_path, data_collator=data.collator)


@pytest.mark.parametrize(
    ("args", "overrides", "error", "match"),
    [
        ({}, {"teachers": None}, ValueError, "no `teachers` were given"),
        ({"kd_preset": "none"}, {}, ValueError, "kd_preset='none'"),
        ({}, {"teachers": lambda batch: {}}, ValueError, "needs `distiller=`"),
        ({}, {"peft_config": llm_lora_config(r=4, lora_alpha=8)}, ValueError, "applies to stage2"),
        ({}, {"processing_class": None}, ValueError, "processing_class"),
    ],
    ids=["kd-without-teachers", "teachers-without-kd", "source-without-distiller", "lora-in-stage1", "no-processor"],
)
def test_contradictory_objects_fail_clearly(tmp_path, args, overrides, error, match):
    if args:
        overrides = {**overrides, "args": MoVEKDTrainingArguments(output_dir=str(tmp_path), **args)}
    with pytest.raises(error, match=match):
        python_trainer(tmp_path, **overrides)


def test_a_teacher_list_mixes_a_set_name_and_specs(tmp_path):
    # A set plus one teacher of one's own, as a user adds one (here a second, smaller SAM under its own slug).
    extra = replace(next(spec for spec in teacher_specs("tiny") if spec.slug == "sam"), slug="sam_small")
    trainer = python_trainer(tmp_path, teachers=["tiny", extra])
    assert trainer.model.distiller.teacher_names == ["clip", "convnext", "sam", "sam_small"]
    assert set(trainer.data_collator.teacher_views) == {"clip", "convnext", "sam", "sam_small"}
    # The set's own list (its `clip` entry stands for the anchor), a repeated slug, something else: one message each.
    with pytest.raises(ValueError, match=r"leave \['clip'\] out of `teachers`: 'clip' names the anchor, always"):
        python_trainer(tmp_path, teachers=teacher_specs("tiny"))
    with pytest.raises(ValueError, match=r"`teachers` names \['sam'\] more than once"):
        python_trainer(tmp_path, teachers=["tiny", replace(extra, slug="sam")])
    with pytest.raises(TypeError, match="a list may mix both"):
        python_trainer(tmp_path, teachers=["tiny", 3])


def test_cpu_training_does_not_ask_for_pinned_memory(tmp_path, recwarn):
    # Pinning needs an accelerator: on a CPU-only machine torch warned once per data loader.
    args = MoVEKDTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.dataloader_pin_memory is (torch.accelerator.is_available() and not args.use_cpu)
    trainer = python_trainer(tmp_path)
    next(iter(trainer.get_train_dataloader()))
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]


def test_plain_training_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    model, _ = from_preset("tiny")
    with pytest.raises(TypeError, match="MoVEKDTrainingArguments"):
        MoVEKDTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)))
