"""Held-out evaluation (`eval_data_path` / `validation_split_percentage` with `eval_strategy`) and the console's
log lines: eval metrics through the Trainer's own evaluate(), equal to an independent forward over the held-out
samples; printed numbers rounded, log_history at full precision."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from _train_fixtures import TINY_STAGE1, build

from movekd_hf.distill.losses import mole_balance_loss
from movekd_hf.errors import SettingsError
from movekd_hf.models import from_preset
from movekd_hf.training.console import format_logs
from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data
from movekd_hf.training.toy_data import make_toy_llava_dataset

TEACHERS = ("clip", "convnext", "sam")
EVAL_KEYS = {
    "eval_loss",
    "eval_lm_loss",
    "eval_kd_loss",
    "eval_balance_loss",
    *(f"eval_kd/{t}_loss" for t in TEACHERS),
}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """Two steps on 9 toy samples, evaluating 3 held-out ones (one batch) after each step, progress bars on."""
    root = tmp_path_factory.mktemp("eval")
    trainer = build(
        TINY_STAGE1, root / "run", "--data_path", "toy:pretrain:12", "--validation_split_percentage", "25",
        "--eval_strategy", "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "4", "--max_steps", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "false",
    )  # fmt: skip
    return trainer


def test_eval_metrics_are_logged_at_the_eval_steps(eval_run, capsys):
    trainer = eval_run
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (9, 3)
    trainer.train()
    printed = capsys.readouterr().out
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    for entry in evals:
        assert EVAL_KEYS <= set(entry) and all(math.isfinite(entry[key]) for key in EVAL_KEYS)
        total = entry["eval_lm_loss"] + 0.5 * entry["eval_kd_loss"] + 0.01 * entry["eval_balance_loss"]
        assert entry["eval_loss"] == pytest.approx(total, rel=1e-5)  # one batch, every sample with an image
    # Training logs keep their own, unprefixed components.
    assert not any(key.startswith("eval_") for entry in trainer.state.log_history if "loss" in entry for key in entry)

    # The console: one line per log, each starting on its own line, numbers to 4 significant digits.
    lines = [line for line in printed.splitlines() if "loss" in line]
    assert lines and all(line.startswith("step ") for line in lines), printed[-2000:]
    training = next(entry for entry in trainer.state.log_history if "loss" in entry and entry["step"] == 2)
    line = next(line for line in lines if line.startswith("step 2 | loss "))
    shown = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
    for key in ("loss", "lm_loss", "kd/sam_loss", "grad_norm"):
        assert shown[key] == f"{training[key]:.4g}"
        assert len(re.sub(r"e[-+]\d+$|[^0-9]", "", shown[key]).lstrip("0")) <= 4
        assert training[key] != float(shown[key])  # log_history is not rounded
    eval_line = next(line for line in lines if line.startswith("step 2 | eval_loss "))
    assert f"eval_kd/sam_loss {evals[-1]['eval_kd/sam_loss']:.4g}" in eval_line


def test_eval_equals_an_independent_forward_over_the_held_out_samples(eval_run):
    """After training, the last eval (step 2, final weights) equals the VLM's own loss, the distiller's KD loss
    and the balance loss computed here on the held-out samples as one batch."""
    trainer = eval_run
    if trainer.state.global_step == 0:
        trainer.train()
    last = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    module = trainer.model.eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        out = module.vlm(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels", "pixel_values")})
        teacher_outputs = trainer.teacher_source(batch)
        kd = module.distiller(out.vision_hidden_states, module.student_grid, teacher_outputs)
    assert last["eval_lm_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert last["eval_kd_loss"] == pytest.approx(kd["loss"].item(), rel=1e-5)
    per_teacher = kd["per_teacher_loss"].mean(0)
    for index, name in enumerate(module.distiller.teacher_names):
        assert last[f"eval_kd/{name}_loss"] == pytest.approx(per_teacher[index].item(), rel=1e-5)
    assert last["eval_balance_loss"] == pytest.approx(mole_balance_loss(out.router_logits)["loss"].item(), rel=1e-5)

    # Evaluating changes nothing: teachers stay frozen, the standardisers' running statistics stay put, and a
    # second evaluate() on the same weights repeats the values.
    buffers = {name: value.clone() for name, value in module.distiller.named_buffers()}
    again = trainer.evaluate()
    for name, value in module.distiller.named_buffers():
        assert torch.equal(value, buffers[name]), name
    for key in EVAL_KEYS:
        assert again[key] == pytest.approx(last[key], rel=1e-6)
    assert all(not teacher.training for teacher in trainer.teacher_source.teachers.values())


def test_validation_split_is_disjoint_and_follows_the_seed(tmp_path):
    _, processor = from_preset("tiny")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=12)
    data_args = MoVEKDDataArguments(
        data_path=toy.finetune_json, image_folder=toy.image_folder, template="v1", validation_split_percentage=25
    )
    splits = {seed: build_train_data(data_args, processor, seed=seed) for seed in (1, 2)}
    again = build_train_data(data_args, processor, seed=1)
    ids = {seed: (set(data.dataset["id"]), set(data.eval_dataset["id"])) for seed, data in splits.items()}
    train, held_out = ids[1]
    assert len(held_out) == math.ceil(0.25 * (len(train) + len(held_out))) and not train & held_out
    assert (set(again.dataset["id"]), set(again.eval_dataset["id"])) == ids[1]
    assert ids[2][1] != held_out and ids[2][0] | ids[2][1] == train | held_out
    assert splits[1].modality_lengths == list(splits[1].dataset["modality_length"])  # the sampler's lengths
    with pytest.raises(SettingsError, match="validation_split_percentage"):
        build_train_data(dataclasses.replace(data_args, validation_split_percentage=99.9), processor)


def test_eval_data_path_is_tokenised_like_the_training_data(tmp_path):
    _, processor = from_preset("tiny")
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=6)
    data_args = MoVEKDDataArguments(
        data_path=toy.finetune_json, eval_data_path=toy.pretrain_json, image_folder=toy.image_folder, template="v1"
    )  # the eval file's images are found in `image_folder`
    data = build_train_data(data_args, processor)
    plain = build_train_data(
        MoVEKDDataArguments(data_path=toy.pretrain_json, image_folder=toy.image_folder), processor
    )
    assert len(data.eval_dataset) == 6 and data.eval_dataset["input_ids"] == plain.dataset["input_ids"]
    alone = MoVEKDDataArguments(data_path=toy.finetune_json, image_folder=toy.image_folder, template="v1")
    assert data.dataset["input_ids"] == build_train_data(alone, processor).dataset["input_ids"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("--eval_strategy", "steps", "--eval_steps", "1"), "eval_data_path"),
        (("--eval_data_path", "a.json", "--validation_split_percentage", "10"), "eval_data_path/validation_split"),
        (("--validation_split_percentage", "100"), "validation_split_percentage"),
    ],
    ids=["no-held-out-data", "both", "out-of-range"],
)
def test_eval_settings_fail_clearly_before_any_model_is_built(tmp_path, overrides, field):
    with pytest.raises(SettingsError, match=re.escape(field)):
        build(TINY_STAGE1, tmp_path / "run", *overrides)


def test_standalone_evaluate_prints_its_line_too(tmp_path, capsys):
    trainer = build(
        TINY_STAGE1, tmp_path / "run", "--data_path", "toy:pretrain:8", "--validation_split_percentage", "25",
        "--per_device_eval_batch_size", "2",
    )  # fmt: skip
    metrics = trainer.evaluate()
    line = next(line for line in capsys.readouterr().out.splitlines() if "eval_loss" in line)
    assert line.startswith("step 0 | eval_loss ") and f"eval_lm_loss {metrics['eval_lm_loss']:.4g}" in line
    assert format_logs({"trainable_params/llm": 6738415616.0, "lr": 2e-05, "total_flos": 1.5}, 3) == (
        "step 3 | trainable_params/llm 6738415616 | lr 2e-05"
    )
