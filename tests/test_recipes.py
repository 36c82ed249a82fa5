"""Shipped recipes for the modern teacher set (issue 17, point 4): configs/train/movekd-modern-7b-stage{1,2}.yaml.

The recipe is the paper's LLaVA-1.5-7B one (CLIP-L/336 + Vicuna-7B, METHOD.md section 5) with `teacher_set: modern`
(the student's own CLIP, SigLIP 2 so400m/16-384, DINOv3 ViT-L/16, SAM 2.1 Hiera-L). Checked here: the YAMLs parse with
the package's own parser and differ from the v1.1 recipe in the teacher set and folders only; `movekd-hf plan` builds
every modern teacher at full size on the meta device and prints the token grid and width their configs give; and
both stages train through `movekd-hf train` on `tiny-modern`, the same classes at test sizes, with every modern
teacher's KD loss logged.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import transformers
import yaml
from _train_fixtures import REPO, TINY_STAGE1, TINY_STAGE2

from movekd_hf.cli import main as cli_main
from movekd_hf.distill.presets import (
    MODERN_TEACHERS,
    PAPER_TEACHERS,
    TEACHER_SETS,
    TINY_MODERN_TEACHERS,
    teacher_specs,
)
from movekd_hf.distill.teacher_by_id import meta_output_shape
from movekd_hf.training.arguments import parse_args

TRAIN = REPO / "configs" / "train"
MODERN = ("clip", "siglip2", "dinov3", "sam2")
# What makes a teacher's kind (its class and how it is read); the tiny set must share it with the full-size one.
KIND_FIELDS = (
    "backend", "model_class", "output", "num_prefix_tokens", "has_cls", "resize_mode", "interpolation", "mean",
    "std", "map_layout", "neck_index", "weights_prefix",
)  # fmt: skip
RUN_FLAGS = (
    "--teacher_set", "tiny-modern", "--kd_preset", "faithful", "--per_device_train_batch_size", "4",
    "--warmup_steps", "0", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2",
    "--disable_tqdm", "true", "--report_to", "none",
)  # fmt: skip


def _config_shape(spec) -> tuple[int, int]:
    """(tokens, channels) of a full-size teacher as its transformers config states them, independently of any
    forward pass: patch grid x width for ViTs, the config's own stride-16 feature size x FPN width for SAM2."""
    sizes = {k: v for k, v in spec.config.items() if k != "model_type"}
    if spec.model_class == "Sam2VisionModel":
        config = transformers.Sam2VisionConfig(**sizes)
        height, width = config.backbone_feature_sizes[spec.neck_index]
        return height * width, config.fpn_hidden_size
    side = sizes["image_size"] // sizes["patch_size"]
    return side * side, sizes["hidden_size"]


@pytest.mark.parametrize("stage", [1, 2])
def test_modern_recipe_parses_and_is_the_paper_recipe_with_the_modern_set(stage):
    path = TRAIN / f"movekd-modern-7b-stage{stage}.yaml"
    model_args, data_args, args = parse_args([str(path), "--use_cpu", "true"])  # bf16 is let through on a CPU
    assert model_args.teacher_set == "modern" and TEACHER_SETS["modern"] == MODERN
    assert (args.stage, args.kd_preset, args.lambda_kd, args.lambda_bal) == (f"stage{stage}", "faithful", 0.5, 0.01)
    assert (args.learning_rate, args.per_device_train_batch_size) == ((1e-3, 16) if stage == 1 else (2e-5, 8))
    assert data_args.template == ("plain" if stage == 1 else "v1") and args.bf16 and args.activation_checkpointing
    # Every other key is the paper's v1.1 recipe for the same model.
    modern = yaml.safe_load(path.read_text())
    paper = yaml.safe_load((TRAIN / f"movekd-v1.1-7b-stage{stage}.yaml").read_text())
    differs = {key for key in modern.keys() | paper.keys() if modern.get(key) != paper.get(key)}
    assert differs == {"teacher_set", "model_name_or_path", "output_dir"}
    if stage == 2:  # stage 2 continues the modern stage 1
        stage1 = yaml.safe_load((TRAIN / "movekd-modern-7b-stage1.yaml").read_text())
        assert modern["model_name_or_path"] == stage1["output_dir"]


def test_plan_builds_the_modern_teachers_at_full_size_with_their_configs_shapes(capsys):
    assert cli_main(["plan", "--preset", "llava-1.5-7b", "--teachers", "modern"]) == 0
    out = capsys.readouterr().out
    table = out.split("teacher     input")[1].split("\n\n")[0]
    printed = {
        slug: (int(size), int(tokens), int(channels))
        for slug, size, tokens, channels in re.findall(r"^(\w+)\s+(\d+) px\s+(\d+) x (\d+)\s", table, re.M)
    }
    assert list(printed) == list(MODERN)
    specs = {"clip": PAPER_TEACHERS["clip"], **{slug: MODERN_TEACHERS[slug] for slug in MODERN[1:]}}
    for slug, spec in specs.items():
        tokens, channels = _config_shape(spec)
        assert printed[slug] == (spec.image_size, tokens, channels), slug
        assert f"teacher/{slug} ({spec.model_id}, {spec.image_size}px, {tokens}x{channels})" in out
        if spec.grid is not None:  # the presets' published figures agree with the configs
            assert (math.prod(spec.grid), spec.channels) == (tokens, channels), slug
    assert printed["sam2"][1:] == (4096, 256) and printed["siglip2"][1:] == (576, 1152)
    assert "adapter/sam2 (token_mix, 4096x256 -> 576x1024)" in out  # into the student's 24 x 24 x 1024 tokens


@pytest.mark.parametrize("slug", MODERN)
def test_tiny_modern_teachers_are_the_modern_classes_read_the_same_way(slug):
    tiny = TINY_MODERN_TEACHERS[slug]
    full = PAPER_TEACHERS["clip"] if slug == "clip" else MODERN_TEACHERS[slug]
    assert {f: getattr(tiny, f) for f in KIND_FIELDS} == {f: getattr(full, f) for f in KIND_FIELDS}
    assert tiny.config["model_type"] == full.config["model_type"] and not tiny.pretrained
    if slug != "clip":  # the clip teacher is the student's own tower in training
        assert meta_output_shape(tiny) == (tiny.grid, tiny.channels)
    specs = teacher_specs("tiny-modern", pretrained=True)  # a tiny set never downloads
    assert [s.slug for s in specs] == list(MODERN) and not any(s.pretrained for s in specs)


def _log_history(run) -> list[dict]:
    return json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]


def _check_losses(history: list[dict]) -> None:
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        components = ["loss", "lm_loss", "kd_loss", "balance_loss", *(f"kd/{slug}_loss" for slug in MODERN)]
        assert all(math.isfinite(entry[key]) for key in components), entry
        assert all(entry[f"kd/{slug}_loss"] > 0 for slug in MODERN[1:]), entry  # random teachers: never matched


def test_both_stages_train_on_tiny_modern_through_the_cli(tmp_path, capsys):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    argv = [TINY_STAGE1, "--output_dir", str(stage1), "--data_path", "toy:pretrain:8", *RUN_FLAGS]
    assert cli_main(["train", *argv]) == 0, capsys.readouterr().err[-3000:]
    _check_losses(_log_history(stage1))
    argv = [TINY_STAGE2, "--model_name_or_path", str(stage1), "--output_dir", str(stage2),
            "--data_path", "toy:finetune:8", *RUN_FLAGS]  # fmt: skip
    assert cli_main(["train", *argv]) == 0, capsys.readouterr().err[-3000:]
    history = _log_history(stage2)
    _check_losses(history)
    assert history[0]["trainable_params/llm"] > 0  # stage 2 trains the LLM too
    recorded = json.loads((stage2 / "train_config.json").read_text())
    assert (recorded["teacher_set"], recorded["stage"], recorded["base_model"]) == (
        "tiny-modern",
        "stage2",
        str(stage1),
    )
    assert [t["name"] for t in recorded["teachers"]] == list(MODERN)
    assert json.loads((stage2 / "training_args.json").read_text())["adapters_from"] == str(
        stage1
    )  # stage 1's adapters
    assert "A toy model" in (stage2 / "README.md").read_text()  # the card says its teachers are toys
