"""Every teacher preset, at full size and at test size (issue 17, "Done when"), and the shipped modern recipes.

- Full size: each preset of `PRESET_TEACHERS` (the paper's clip, eva, convnext, sam; the modern siglip2, dinov3,
  dinov3_convnext, aimv2, sam2, sam3, radio) builds on the meta device, and its token grid and width are what its own
  config gives, computed here from the config fields alone (patch grid x width for ViTs, stride-32 grid x last width
  for ConvNeXts, the neck level's feature size x FPN width for SAM2/SAM3, timm's `feature_info` for timm models);
  `movekd-hf plan --teachers SET` prints those shapes and the parameter count of the meta build (for v1.1 and
  modern-2; tests/test_recipes.py checks `modern`), and, for plain ViTs, the forward FLOPs a hand count gives.
- Test size: `tiny-modern-2` holds the presets `tiny` and `tiny-modern` leave out (eva, aimv2, dinov3_convnext, sam3,
  radio) as the same classes read the same way; it trains through `movekd-hf train`.
- Weights: SAM3's encoder and C-RADIO load through their presets from checkpoints of the real full classes, saved
  offline at test size (SAM3 as its image model `Sam3Model` and as the video model `Sam3VideoModel` the `facebook/sam3`
  repository holds, RADIO in the checkpoint layout transformers' conversion maps from), every tensor compared.
- Recipes: the modern YAMLs (CLIP-L/336 LLaVA-1.5-7B and LLaVA-OneVision-0.5B students) parse with the package's
  own argument parser, without building anything.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import re
from dataclasses import replace

import pytest
import timm
import torch
import transformers
import yaml
from _distill_fixtures import images
from _train_fixtures import REPO, TINY_STAGE1
from safetensors.torch import load_file

from movekd_hf.cli import build_parser
from movekd_hf.cli import main as cli_main
from movekd_hf.distill.plan import student_anchor_spec, teacher_plan_rows, teacher_profile
from movekd_hf.distill.presets import (
    PAPER_TEACHERS,
    PRESET_TEACHERS,
    TEACHER_SETS,
    TINY_MODERN_2_TEACHERS,
    TINY_RADIO,
    TINY_SAM3,
    TINY_SETS,
    radio_teacher,
    sam3_teacher,
    teacher_specs,
)
from movekd_hf.distill.teacher_by_id import meta_output_shape
from movekd_hf.distill.teachers import build_teacher, prepare_images
from movekd_hf.distill.vitdet_eva import EVA02ViTDetConfig
from movekd_hf.models import build_config
from movekd_hf.training.arguments import parse_args

TRAIN = REPO / "configs" / "train"
# Full-size sets that together hold every preset; `plan` runs here on those tests/test_recipes.py leaves out.
FULL_SETS = ("v1.1", "modern", "modern-2")
PLANNED_SETS = ("v1.1", "modern-2")
TINY_2 = TEACHER_SETS["tiny-modern-2"]
# What makes a teacher's kind (its class and how it is read); a tiny teacher shares it with its preset.
KIND_FIELDS = (
    "backend", "model_class", "output", "num_prefix_tokens", "has_cls", "resize_mode", "interpolation", "mean",
    "std", "map_layout", "neck_index", "weights_prefix",
)  # fmt: skip
PLAN_ROW = re.compile(r"^(\w+)\s+(\d+) px\s+(\d+) x (\d+)\s+([\d,]+)\s+([\d.]+) GFLOPs\s+[\d.]+ GiB$", re.M)


def _config_shape(spec) -> tuple[tuple[int, int], int]:
    """(grid, channels) of a teacher's output at `spec.image_size` from its architecture config alone."""
    sizes = {k: v for k, v in spec.config.items() if k != "model_type"}
    if spec.backend == "vitdet":
        config = EVA02ViTDetConfig(**sizes)
        side = spec.image_size // config.patch_size
        return (side, side), config.hidden_size
    if spec.backend == "timm":  # timm's own record of the last stage: its stride and width
        with torch.device("meta"):
            info = timm.create_model(spec.model_id, pretrained=False, **sizes).feature_info[-1]
        side = spec.image_size // info["reduction"]
        return (side, side), info["num_chs"]
    config = transformers.AutoConfig.for_model(spec.config["model_type"], **sizes)
    if spec.model_class == "Sam2VisionModel":  # the neck level's feature size, as the config states it
        height, width = config.backbone_feature_sizes[spec.neck_index]
        return (height, width), config.fpn_hidden_size
    if spec.model_class == "Sam3VisionModel":  # the ViT's patch grid scaled by the neck level's factor
        side = round(spec.image_size // config.backbone_config.patch_size * config.scale_factors[spec.neck_index])
        return (side, side), config.fpn_hidden_size
    if spec.model_class == "DINOv3ConvNextModel":  # a 4 x 4 patchify stem, then one 2 x 2 downsampling per stage
        side = spec.image_size // (4 * 2 ** (len(config.depths) - 1))
        return (side, side), config.hidden_sizes[-1]
    if spec.model_class == "SamVisionModel":
        side = spec.image_size // config.patch_size
        return (side, side), config.output_channels
    side = spec.image_size // config.patch_size  # ViTs: CLIP, SigLIP, DINOv3, AIMv2, RADIO
    return (side, side), config.hidden_size


@functools.cache
def _meta_build(slug: str) -> tuple[int, tuple[int, int], tuple[int, ...], bool, bool]:
    """A preset built at full size on the meta device, run on a non-square meta image: (parameters, grid, token
    shape, has a CLS output, every parameter frozen and on meta)."""
    with torch.device("meta"):
        teacher = build_teacher(replace(PRESET_TEACHERS[slug], pretrained=False))
        out = teacher(torch.empty(2, 3, 480, 640))
    frozen = all(p.device.type == "meta" and not p.requires_grad for p in teacher.parameters())
    return sum(p.numel() for p in teacher.parameters()), out.grid, tuple(out.tokens.shape), out.cls is not None, frozen


def test_every_preset_is_in_a_full_size_set_and_a_tiny_one():
    assert set().union(*(TEACHER_SETS[name] for name in FULL_SETS)) == set(PRESET_TEACHERS)
    tiny = set().union(*(TEACHER_SETS[name] for name in TINY_SETS))
    assert tiny == set(PRESET_TEACHERS), "a preset without a tiny twin never trains in the tests"
    assert TEACHER_SETS["modern-2"] == ("clip", "aimv2", "dinov3_convnext", "sam3", "radio")
    assert TINY_2 == ("clip", "eva", "aimv2", "dinov3_convnext", "sam3", "radio")


@pytest.mark.parametrize("slug", list(PRESET_TEACHERS))
def test_every_preset_builds_at_full_size_on_meta_with_its_configs_shape(slug):
    spec = PRESET_TEACHERS[slug]
    grid, channels = _config_shape(spec)
    _, out_grid, shape, has_cls, frozen = _meta_build(slug)
    assert (out_grid, shape) == (grid, (2, math.prod(grid), channels)) and frozen
    assert has_cls == spec.has_cls
    if spec.grid is not None:  # the preset's published figures agree with the config
        assert (spec.grid, spec.channels) == (grid, channels)


@pytest.fixture(scope="module")
def plan_tables() -> dict[str, str]:
    """`movekd-hf plan --preset tiny --teachers SET` printed for every full-size set (the teachers' table does not
    depend on the student; the tiny one keeps the VLM part quick)."""
    tables = {}
    for name in PLANNED_SETS:
        with contextlib.redirect_stdout(io.StringIO()) as out:  # a module fixture cannot take capsys
            assert cli_main(["plan", "--preset", "tiny", "--teachers", name]) == 0
        tables[name] = out.getvalue()
    return tables


@pytest.mark.parametrize("teacher_set", PLANNED_SETS)
def test_plan_prints_each_teachers_config_shape_and_meta_parameters(plan_tables, teacher_set):
    out = plan_tables[teacher_set]
    table = out.split("teacher     input")[1].split("\n\n")[0]
    printed = {slug: row for slug, *row in PLAN_ROW.findall(table)}
    assert list(printed) == list(TEACHER_SETS[teacher_set])
    for slug, (size, tokens, channels, parameters, _) in printed.items():
        spec = PRESET_TEACHERS[slug]
        grid, width = _config_shape(spec)
        assert (int(size), int(tokens), int(channels)) == (spec.image_size, math.prod(grid), width), slug
        assert int(parameters.replace(",", "")) == _meta_build(slug)[0], slug
        row = f"teacher/{slug} ({spec.model_id}, {spec.image_size}px, {math.prod(grid)}x{width})"
        assert row in out, row
        if slug != "clip":  # the anchor has no adapter; the others map into the tiny student's 4 x 4 x 32 tokens
            assert f"adapter/{slug} (token_mix, {math.prod(grid)}x{width} -> 16x32)" in out


@pytest.mark.parametrize(
    "slug, tokens, prefix, hidden, mlp, layers",
    [("dinov3", 196, 5, 1024, 4096, 24), ("radio", 1024, 10, 1280, 5120, 32)],
)
def test_plain_vit_flops_are_a_hand_count(plan_tables, slug, tokens, prefix, hidden, mlp, layers):
    """Patch embedding 2 x N x 3p^2 x D, then per layer q/k/v/o 4 x 2TD^2, MLP 2 x 2TDI and attention's two
    matmuls 2 x 2T^2D over T = N + prefix tokens (2 FLOPs per multiply-add)."""
    seq, patch = tokens + prefix, PRESET_TEACHERS[slug].config["patch_size"]
    per_layer = 2 * seq * 4 * hidden**2 + 2 * seq * 2 * hidden * mlp + 2 * 2 * seq**2 * hidden
    hand = 2 * tokens * 3 * patch**2 * hidden + layers * per_layer
    assert teacher_profile(PRESET_TEACHERS[slug])["forward_flops"] == hand
    if slug == "radio":  # and `plan` prints it in GFLOPs
        gflops = {row[0]: float(row[-1]) for row in PLAN_ROW.findall(plan_tables["modern-2"])}[slug]
        assert gflops == round(hand / 1e9, 2)


def test_a_siglip_students_anchor_is_sized_as_its_own_tower():
    """LLaVA-OneVision's tower (SigLIP so400m/14-384, 26 layers, no pooling head) as the anchor of the modern set:
    27 x 27 tokens of 1152, no adapter; a CLIP-L/336 student's anchor is the `clip` preset."""
    onevision = transformers.LlavaOnevisionConfig()
    vision = onevision.vision_config
    spec = student_anchor_spec(onevision)
    profile = teacher_profile(spec)
    assert (spec.slug, profile["tokens"], profile["channels"], profile["image_size_px"]) == ("siglip", 729, 1152, 384)
    with torch.device("meta"):
        tower = transformers.SiglipVisionModel(vision)
    assert profile["parameters"] == sum(p.numel() for p in tower.parameters())
    rows = teacher_plan_rows("modern", 729, 1152, anchor_spec=spec)
    assert [name.split(" ")[0] for name, _, _ in rows] == [
        "teacher/siglip", "teacher/siglip2", "adapter/siglip2", "teacher/dinov3", "adapter/dinov3", "teacher/sam2",
        "adapter/sam2",
    ]  # fmt: skip
    clip = student_anchor_spec(build_config("llava-1.5-7b"))
    assert teacher_profile(clip) == teacher_profile(PAPER_TEACHERS["clip"])
    with pytest.raises(ValueError, match="no anchor teacher for a 'dinov3_vit' student tower"):
        student_anchor_spec(transformers.LlavaConfig(vision_config=transformers.DINOv3ViTConfig().to_dict()))


# ------------------------------------------------------------------------------------------- test size


@pytest.mark.parametrize("slug", TINY_2)
def test_tiny_modern_2_teachers_are_their_presets_classes_read_the_same_way(slug):
    tiny, full = TINY_MODERN_2_TEACHERS[slug], PRESET_TEACHERS[slug]
    assert {f: getattr(tiny, f) for f in KIND_FIELDS} == {f: getattr(full, f) for f in KIND_FIELDS}
    assert tiny.config.get("model_type") == full.config.get("model_type") and not tiny.pretrained
    if slug != "clip":  # the clip teacher is the student's own tower in training
        assert meta_output_shape(tiny) == (tiny.grid, tiny.channels) == _config_shape(tiny)
    assert not any(s.pretrained for s in teacher_specs("tiny-modern-2", pretrained=True))  # never downloads


def test_tiny_modern_2_sizes_differ_from_each_other_and_the_students():
    shapes = [(math.prod(spec.grid), spec.channels) for slug, spec in TINY_MODERN_2_TEACHERS.items() if slug != "clip"]
    tokens, widths = zip(*shapes)
    assert len(set(tokens)) == len(set(widths)) == len(shapes)
    assert 16 not in tokens and 32 not in widths  # the tiny student: 4 x 4 tokens of 32


def test_tiny_modern_2_trains_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train", TINY_STAGE1, "--output_dir", str(run), "--data_path", "toy:pretrain:8", "--teacher_set",
        "tiny-modern-2", "--kd_preset", "faithful", "--per_device_train_batch_size", "4", "--warmup_steps", "0",
        "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "true", "--report_to",
        "none",
    ]  # fmt: skip
    assert cli_main(argv) == 0, capsys.readouterr().err[-3000:]
    history = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert all(math.isfinite(entry[f"kd/{slug}_loss"]) for slug in TINY_2), entry
        assert all(entry[f"kd/{slug}_loss"] > 0 for slug in TINY_2[1:]), entry  # random teachers: never matched
    # Each teacher's adapter maps its own tokens and width (as its class output them) into the student's 16 x 32.
    adapters = load_file(run / "distill_adapters.safetensors")
    for slug in TINY_2[1:]:
        spec = TINY_MODERN_2_TEACHERS[slug]
        assert adapters[f"adapters.{slug}.token_proj.weight"].shape == (16, math.prod(spec.grid))
        assert adapters[f"adapters.{slug}.channel_proj.weight"].shape == (32, spec.channels)
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["teacher_set"] == "tiny-modern-2" and [t["name"] for t in recorded["teachers"]] == list(TINY_2)
    card = (run / "README.md").read_text()
    for slug in TINY_2[1:]:  # the card names them as random test-size architectures, with no licence
        model_id = TINY_MODERN_2_TEACHERS[slug].model_id
        assert re.search(rf"^\| `{slug}` \| `{model_id}` architecture[^|]*random weights \| none ", card, re.M), slug


# ------------------------------------------------------------------------------ weights from full checkpoints


def _tiny_sam3_config() -> transformers.Sam3Config:
    """SAM3's image model at test size: the `tiny-modern-2` encoder, a one-layer CLIP text encoder, DETR and heads."""
    small = dict(hidden_size=56, num_layers=1, num_attention_heads=2, intermediate_size=40)
    return transformers.Sam3Config(
        vision_config=copy.deepcopy(TINY_SAM3),
        text_config=dict(
            model_type="clip_text_model", vocab_size=99, hidden_size=16, intermediate_size=24, projection_dim=16,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        geometry_encoder_config=small,
        detr_encoder_config=small,
        detr_decoder_config={**small, "num_queries": 5},
        mask_decoder_config=dict(hidden_size=56, num_attention_heads=2),
    )  # fmt: skip


def _assert_loaded(teacher, tower: torch.nn.Module) -> None:
    """Every tensor of the teacher's model is the saved tower's (nothing left at its random initialisation)."""
    loaded, saved = teacher.model.state_dict(), tower.state_dict()
    assert sorted(loaded) == sorted(saved)
    different = [key for key in saved if not torch.equal(loaded[key], saved[key])]
    assert different == []


def _assert_same_neck(teacher, tower: torch.nn.Module) -> None:
    batch = images()
    with torch.no_grad():
        expected = tower(prepare_images(batch, teacher.spec)).fpn_hidden_states[teacher.spec.neck_index]
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_sam3_encoder_loads_from_a_full_sam3_image_checkpoint(tmp_path):
    torch.manual_seed(0)
    full = transformers.Sam3Model(_tiny_sam3_config()).eval()
    full.save_pretrained(tmp_path / "sam3")
    assert any(key.startswith("vision_encoder.") for key in load_file(tmp_path / "sam3" / "model.safetensors"))
    teacher = build_teacher(sam3_teacher(TINY_SAM3, checkpoint=str(tmp_path / "sam3")))
    _assert_loaded(teacher, full.vision_encoder)
    _assert_same_neck(teacher, full.vision_encoder)


def test_sam3_encoder_loads_from_a_sam3_video_checkpoint(tmp_path):
    """`facebook/sam3` holds the video model: the detector's encoder under `detector_model.vision_encoder.`, and a
    config.json whose tower config is two levels down (`detector_config.vision_config`)."""
    tiny = _tiny_sam3_config()
    tracker = dict(
        vision_config=tiny.vision_config.to_dict(),
        prompt_encoder_config=dict(hidden_size=56, image_size=56, patch_size=7, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=56, mlp_dim=40, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
        memory_attention_hidden_size=56, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=40,
        memory_attention_rope_feat_sizes=[8, 8], memory_encoder_hidden_size=56, memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=56, memory_fuser_num_layers=1, memory_fuser_embed_dim=56,
        memory_fuser_intermediate_dim=40, max_object_pointers_in_encoder=2,
    )  # fmt: skip
    torch.manual_seed(0)
    video = transformers.Sam3VideoModel(
        transformers.Sam3VideoConfig(detector_config=tiny.to_dict(), tracker_config=tracker)
    ).eval()
    video.save_pretrained(tmp_path / "sam3")
    keys = load_file(tmp_path / "sam3" / "model.safetensors")
    assert any(key.startswith("detector_model.vision_encoder.") for key in keys)
    assert any(key.startswith("tracker_neck.") for key in keys)  # a second neck, which must not load instead
    teacher = build_teacher(sam3_teacher(TINY_SAM3, checkpoint=str(tmp_path / "sam3")))
    _assert_loaded(teacher, video.detector_model.vision_encoder)
    _assert_same_neck(teacher, video.detector_model.vision_encoder)


def test_radio_loads_from_the_checkpoint_layout_transformers_converts(tmp_path):
    """RADIO's checkpoints keep NVIDIA's key names (`radio_model.model.blocks.N.attn.qkv`, one fused q/k/v), which
    transformers' conversion maps onto `RadioModel` as it loads; `save_pretrained` writes that layout back."""
    torch.manual_seed(0)
    model = transformers.RadioModel(transformers.RadioConfig(**TINY_RADIO)).eval()
    model.save_pretrained(tmp_path / "radio")
    keys = load_file(tmp_path / "radio" / "model.safetensors")
    assert "radio_model.model.blocks.0.attn.qkv.weight" in keys and not any(k.startswith("encoder.") for k in keys)
    teacher = build_teacher(radio_teacher(TINY_RADIO, checkpoint=str(tmp_path / "radio")))
    _assert_loaded(teacher, model)
    batch = images()
    with torch.no_grad():
        own = model(pixel_values=prepare_images(batch, teacher.spec)).last_hidden_state
    out = teacher(batch)
    torch.testing.assert_close(out.tokens, own[:, 10:])  # 3 CLS and 7 register tokens dropped
    torch.testing.assert_close(out.cls, own[:, 0])


# ------------------------------------------------------------------------------------------------ recipes

MODERN_RECIPES = ("movekd-modern-7b", "movekd-modern-onevision-0.5b")
ONEVISION_0_5B = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


@pytest.mark.parametrize("recipe", MODERN_RECIPES)
def test_modern_recipes_parse_and_chain_their_stages(recipe):
    stages = {}
    for stage in (1, 2):
        path = TRAIN / f"{recipe}-stage{stage}.yaml"
        model_args, data_args, args = parse_args([str(path), "--use_cpu", "true"])  # no model is built
        assert model_args.teacher_set in TEACHER_SETS and TEACHER_SETS[model_args.teacher_set][0] == "clip"
        assert (args.stage, args.kd_preset, args.bf16, args.activation_checkpointing) == (
            f"stage{stage}",
            "faithful",
            True,
            True,
        )
        assert args.learning_rate == (1e-3 if stage == 1 else 2e-5)
        stages[stage] = (yaml.safe_load(path.read_text()), path.read_text())
    (first, first_text), (second, _) = stages[1], stages[2]
    assert second["model_name_or_path"] == first["output_dir"]  # stage 2 continues stage 1
    assert first["teacher_set"] == second["teacher_set"] == "modern"
    if recipe.startswith("movekd-modern-onevision"):
        # Stage 1 starts from the folder the documented `init --onevision` command writes.
        command = re.search(r"^#\s+movekd-hf (init --onevision .+)$", first_text, re.M).group(1).split()
        init = build_parser().parse_args(command)
        assert (init.onevision, init.out) == (ONEVISION_0_5B, first["model_name_or_path"])
        assert first["template"] == "plain" and second["template"] == "chat_template"
        assert first["max_length"] == second["max_length"] == 8192  # up to 10 AnyRes tiles of 729 tokens
