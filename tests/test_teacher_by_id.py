"""Any teacher by its id (issue 17): `teacher_from_pretrained` reads a model folder as a Hub id would be read, and the
modern presets carry the published models' sizes.

Where the presets' numbers come from (read here through the code search over public GitHub files; the Hub's own
config.json files are not reachable offline):
- SigLIP 2 so400m/16-384 (`google/siglip2-so400m-patch16-384`, a fixed-resolution SigLIP 2, model_type "siglip"):
  the so400m tower (hidden 1152, MLP 4304, 27 layers, 16 heads, gelu_pytorch_tanh, eps 1e-6) as published in the
  so400m `vision_config`s (PaliGemma, LLaVA-OneVision), patch 16 at 384 px from the checkpoint's name.
- DINOv3 ViT-L/16: transformers `models/dinov3_vit/convert_dinov3_vit_to_hf.py`, `get_dinov3_config("vitl")`
  (1024 wide, 24 layers, 16 heads, MLP ratio 4, 4 registers, eps 1e-5) and its processor (224 x 224, bilinear,
  ImageNet mean/std).
- DINOv3 ConvNeXt-Large: transformers `models/dinov3_convnext/convert_dinov3_convnext_to_hf.py`
  (depths [3, 3, 27, 3], widths [192, 384, 768, 1536]; same 224 px processor).
- AIMv2-L/14-224: `Aimv2VisionConfig`'s defaults, documented as `apple/aimv2-large-patch14-224` (1024 wide, MLP
  2816, 24 layers, 8 heads, patch 14, 224 px); its processor is CLIP's (transformers' image-processor auto map).
- SAM 2.1 Hiera-L: transformers `models/sam2/convert_sam2_to_hf.py`, the `hiera_large` branch (embed dims
  [144, 288, 576, 1152], blocks [2, 6, 36, 4], global blocks [23, 33, 43], windows [8, 4, 16, 8]);
  `Sam2ImageProcessor`'s 1024 x 1024 bilinear view with ImageNet mean/std.
- SAM3: `Sam3ViTConfig` / `Sam3VisionConfig` defaults, documented as `facebook/sam3` (1024 wide, MLP 4736,
  32 layers, 16 heads, patch 14, 1008 px, windows of 24, global [7, 15, 23, 31]; FPN 256 at scales
  [4, 2, 1, 0.5]); `Sam3ImageProcessor`'s 1008 x 1008 bilinear view with mean/std 0.5.
- C-RADIOv4-H: `RadioConfig` defaults, documented as `nvidia/C-RADIOv4-H` (1280 wide, 32 layers, 16 heads,
  patch 16, 3 CLS + 7 register tokens, positions up to 2048 px); 512 px is RADIO's preferred resolution
  (NVlabs RADIO `common.py` resource table). 651.7 M parameters on the meta device (NVIDIA: 653 M).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import transformers
from _distill_fixtures import images
from timm.models import save_for_hf

from movekd_hf.distill.presets import MODERN_TEACHERS, TEACHER_SETS, teacher_specs
from movekd_hf.distill.teacher_by_id import teacher_from_pretrained
from movekd_hf.distill.teachers import IMAGENET_MEAN, IMAGENET_STD, build_teacher, prepare_images
from movekd_hf.errors import InputError, SettingsError
from movekd_hf.modeling.llava_conventions import CLIP_MEAN, CLIP_STD

HALF = [0.5, 0.5, 0.5]


def _square(size: int, resample: int, mean, std) -> dict:
    return dict(
        do_resize=True,
        size={"height": size, "width": size},
        resample=resample,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


# Tiny configs of each family's real class (every width distinct), the processor config its Hub repository ships
# (at the tiny size), and what the config predicts: (grid side, width, prefix tokens).
FAMILIES = {
    "siglip2": (
        transformers.SiglipVisionConfig(
            hidden_size=36, intermediate_size=44, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        _square(32, 2, HALF, HALF),
        (4, 36, 0),
    ),
    "dinov3": (
        transformers.DINOv3ViTConfig(
            hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, num_register_tokens=4,
        ),
        _square(32, 2, IMAGENET_MEAN, IMAGENET_STD),
        (4, 40, 5),
    ),
    "dinov3_convnext": (
        transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 12, 16, 28], depths=[1, 1, 1, 1], image_size=64),
        _square(64, 2, IMAGENET_MEAN, IMAGENET_STD),
        (2, 28, 1),
    ),
    "aimv2": (
        transformers.Aimv2VisionConfig(
            hidden_size=48, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=7,
        ),
        {**_square(28, 3, CLIP_MEAN, CLIP_STD), "size": {"shortest_edge": 28}, "do_center_crop": True,
         "crop_size": {"height": 28, "width": 28}},
        (4, 48, 0),
    ),
    "sam2": (
        transformers.Sam2VisionConfig(
            backbone_config=dict(
                model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
                embed_dim_per_stage=[8, 16, 24, 32], num_attention_heads_per_stage=[1, 1, 2, 2],
                blocks_per_stage=[1, 1, 2, 1], global_attention_blocks=[3], window_size_per_stage=[2, 2, 2, 2],
                window_positional_embedding_background_size=[2, 2], image_size=[128, 128],
            ),
            backbone_channel_list=[32, 24, 16, 8],
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
            fpn_hidden_size=20,
        ),
        _square(128, 2, IMAGENET_MEAN, IMAGENET_STD),
        (8, 20, 0),
    ),
    "sam3": (
        transformers.Sam3VisionConfig(
            backbone_config=dict(
                model_type="sam3_vit_model", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=2, image_size=56, patch_size=7, window_size=4, global_attn_indexes=[1],
                pretrain_image_size=28,
            ),
            fpn_hidden_size=44,
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        ),
        _square(56, 2, HALF, HALF),
        (8, 44, 0),
    ),
    "radio": (  # no preprocessor_config.json: RADIO normalises inside, its config gives the size
        transformers.RadioConfig(
            hidden_size=52, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, max_img_size=64,
            num_cls_tokens=3, num_registers=7,
        ),
        None,
        (4, 52, 10),
    ),
}  # fmt: skip


def _save(tmp_path, family: str) -> str:
    """The tiny model of `family` with random weights, saved as its Hub repository would hold it."""
    config, processor, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    folder = tmp_path / family
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(folder)


def _own_output(teacher, batch):
    """The model's own forward on the spec's pixels, as a user of the model would call it."""
    with torch.no_grad():
        return teacher.model(pixel_values=prepare_images(batch, teacher.spec), output_hidden_states=True)


# What makes a preset's kind: these fields must be what `teacher_from_pretrained` reads from the same model type.
KIND_FIELDS = (
    "backend", "model_class", "output", "num_prefix_tokens", "has_cls", "resize_mode", "interpolation", "mean",
    "std", "map_layout", "neck_index", "weights_prefix",
)  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_from_a_model_folder_reads_its_config_and_runs(tmp_path, family):
    side, width, prefix = FAMILIES[family][2]
    spec = teacher_from_pretrained(_save(tmp_path, family))
    assert (spec.grid, spec.channels, spec.num_prefix_tokens) == ((side, side), width, prefix)
    assert {f: getattr(spec, f) for f in KIND_FIELDS} == {f: getattr(MODERN_TEACHERS[family], f) for f in KIND_FIELDS}
    teacher = build_teacher(spec)  # the saved weights, loaded through the tower's class
    batch = images()
    out = teacher(batch)
    assert out.tokens.shape == (2, side * side, width) and out.grid == (side, side)
    assert torch.isfinite(out.tokens).all() and out.prefix is None
    own = _own_output(teacher, batch)
    if spec.output == "neck":  # the neck level of the model's own pyramid, as h * w tokens
        fmap = own.fpn_hidden_states[spec.neck_index]
        torch.testing.assert_close(out.tokens, fmap.flatten(2).transpose(1, 2))
    else:  # CLS/register (or pooled) tokens dropped; CLS kept apart
        torch.testing.assert_close(out.tokens, own.last_hidden_state[:, prefix:])
        assert (out.cls is not None) == spec.has_cls
        if spec.has_cls:
            torch.testing.assert_close(out.cls, own.last_hidden_state[:, 0])


# Plain ViT-layout families (no preset uses them): config, processor config as their Hub repositories ship it,
# (grid side, width, prefix tokens). DeiT's distilled checkpoints carry a distillation token after the CLS.
PLAIN_VITS = {
    "vit": (
        transformers.ViTConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
        _square(32, 2, HALF, HALF),
        (4, 32, 1),
    ),
    "deit": (
        transformers.DeiTConfig(hidden_size=36, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8),
        {**_square(40, 3, IMAGENET_MEAN, IMAGENET_STD), "do_center_crop": True,
         "crop_size": {"height": 32, "width": 32}},
        (4, 36, 2),
    ),
    "beit": (
        transformers.BeitConfig(hidden_size=28, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8),
        _square(32, 3, HALF, HALF),
        (4, 28, 1),
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", list(PLAIN_VITS))
def test_plain_vit_families_are_teachers_by_id(tmp_path, family):
    config, processor, (side, width, prefix) = PLAIN_VITS[family]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    model.save_pretrained(tmp_path / family)
    (tmp_path / family / "preprocessor_config.json").write_text(json.dumps(processor))
    spec = teacher_from_pretrained(str(tmp_path / family))
    assert (spec.grid, spec.channels, spec.num_prefix_tokens, spec.has_cls) == ((side, side), width, prefix, True)
    teacher = build_teacher(spec)
    batch = images()
    out = teacher(batch)
    hidden = _own_output(teacher, batch).last_hidden_state  # the model's own forward on the spec's pixels
    torch.testing.assert_close(out.tokens, hidden[:, prefix:])
    torch.testing.assert_close(out.cls, hidden[:, 0])


def test_keep_prefix_tokens_returns_cls_and_registers_apart(tmp_path):
    spec = teacher_from_pretrained(_save(tmp_path, "dinov3"), keep_prefix_tokens=True)
    teacher = build_teacher(spec)
    out = teacher(images())
    hidden = _own_output(teacher, images()).last_hidden_state
    assert out.prefix.shape == (2, 5, 40) and out.tokens.shape == (2, 16, 40)
    torch.testing.assert_close(out.prefix, hidden[:, :5])


def test_a_layer_index_reads_that_hidden_state(tmp_path):
    folder = _save(tmp_path, "dinov3")
    spec = teacher_from_pretrained(folder, read="-2")  # as a command line passes it
    assert (spec.output, spec.feature_layer) == ("hidden_state", -2)
    teacher = build_teacher(spec)
    out = teacher(images())
    torch.testing.assert_close(out.tokens, _own_output(teacher, images()).hidden_states[-2][:, 5:])
    # SAM-family blocks are [B, h, w, C] maps: layer 2 of the tiny Hiera is stage 2 (stride 8 at 128 px, 16 wide).
    sam2 = teacher_from_pretrained(_save(tmp_path, "sam2"), read=2)
    assert (sam2.map_layout, sam2.grid, sam2.channels) == ("nhwc", (16, 16), 16)


def test_image_size_and_crop_view_follow_the_processor(tmp_path):
    aimv2 = _save(tmp_path, "aimv2")
    spec = teacher_from_pretrained(aimv2)
    assert (spec.resize_mode, spec.image_size, spec.resize_size, spec.interpolation) == ("crop", 28, 28, "bicubic")
    assert (spec.mean, spec.std, spec.grid) == (CLIP_MEAN, CLIP_STD, (4, 4))
    with pytest.raises(SettingsError, match=r"aimv2' cannot run at 56 px"):  # fixed position embeddings
        teacher_from_pretrained(aimv2, image_size=56)
    dinov3 = teacher_from_pretrained(_save(tmp_path, "dinov3"), image_size=64)  # rotary positions: any size
    assert (dinov3.image_size, dinov3.grid, dinov3.resize_mode) == (64, (8, 8), "squash")
    assert build_teacher(dinov3)(images()).tokens.shape == (2, 64, 40)
    radio = teacher_from_pretrained(_save(tmp_path, "radio"), pretrained=False, slug="cradio")
    assert (radio.slug, radio.mean, radio.std, radio.image_size) == ("cradio", (0.0,) * 3, (1.0,) * 3, 32)


def test_sam_neck_by_id_equals_the_paper_sam_teacher(tmp_path):
    """SAM (v1) read by id as "neck" gives the paper preset's feature map, on SAM's padded view."""
    from movekd_hf.distill.presets import TINY_SAM, sam_teacher

    torch.manual_seed(0)
    model = transformers.SamVisionModel(transformers.SamVisionConfig(**TINY_SAM))
    model.save_pretrained(tmp_path / "sam")
    processor = {**_square(64, 2, IMAGENET_MEAN, IMAGENET_STD), "size": {"longest_edge": 64}, "do_pad": True}
    (tmp_path / "sam" / "preprocessor_config.json").write_text(json.dumps(processor))
    spec = teacher_from_pretrained(str(tmp_path / "sam"))
    assert (spec.output, spec.resize_mode, spec.grid, spec.channels) == ("neck", "pad", (8, 8), 20)
    paper = build_teacher(sam_teacher(TINY_SAM, checkpoint=str(tmp_path / "sam")))
    torch.testing.assert_close(build_teacher(spec)(images()).tokens, paper(images()).tokens)


def test_timm_model_by_id_drops_cls_and_registers(tmp_path):
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, reg_tokens=2)
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()
    save_for_hf(source, str(tmp_path / "vit"), model_args=args)
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, 32, 32], crop_pct=0.875)  # as a 32 px timm repository says
    (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
    spec = teacher_from_pretrained(str(tmp_path / "vit"))
    assert (spec.backend, spec.model_id, spec.num_prefix_tokens, spec.has_cls) == (
        "timm",
        "vit_small_patch16_224",
        3,
        True,
    )
    assert (spec.resize_mode, spec.image_size, spec.resize_size, spec.grid, spec.channels) == (
        "crop",
        32,
        36,  # floor(32 / 0.875), timm's eval resize
        (4, 4),
        24,
    )
    teacher = build_teacher(spec)
    batch = images()
    out = teacher(batch)
    with torch.no_grad():
        expected = source.forward_features(prepare_images(batch, spec))
    torch.testing.assert_close(out.tokens, expected[:, 3:])
    torch.testing.assert_close(out.cls, expected[:, 0])
    layer = teacher_from_pretrained(str(tmp_path / "vit"), read=0)
    assert (layer.output, layer.feature_layer, layer.grid) == ("hidden_state", 0, (4, 4))


def test_errors_name_the_id_and_what_was_expected(tmp_path):
    folder = _save(tmp_path, "dinov3")
    with pytest.raises(SettingsError, match=r"dinov3.*no layer 3: it has 3 hidden states.*-3\.\.2"):
        teacher_from_pretrained(folder, read=3)
    with pytest.raises(SettingsError, match=r"cannot read 'neck'.*'last_hidden_state'"):
        teacher_from_pretrained(folder, read="neck")
    config = json.loads((tmp_path / "dinov3" / "config.json").read_text())
    (tmp_path / "dinov3" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(SettingsError, match=r"model_type 'bert'.*expected one of \["):
        teacher_from_pretrained(folder)
    with pytest.raises(InputError, match=r"'.*nowhere'.*config.json"):
        teacher_from_pretrained(str(tmp_path / "nowhere"))
    bad = _save(tmp_path, "siglip2")
    processor = {**FAMILIES["siglip2"][1], "size": {"height": 32, "width": 48}}
    (tmp_path / "siglip2" / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(SettingsError, match=r"siglip2/preprocessor_config.json: field 'size'.*not a fixed square"):
        teacher_from_pretrained(bad)


@pytest.mark.parametrize("slug", list(MODERN_TEACHERS))
def test_modern_presets_have_their_published_shapes_on_meta(slug):
    spec = MODERN_TEACHERS[slug]
    with torch.device("meta"):
        teacher = build_teacher(dataclasses.replace(spec, pretrained=False))
        out = teacher(torch.empty(2, 3, 480, 640))
    side = spec.grid[0]
    assert tuple(out.tokens.shape) == (2, side * side, spec.channels) and out.grid == spec.grid
    assert (out.cls is not None) == spec.has_cls
    assert all(p.device.type == "meta" and not p.requires_grad for p in teacher.parameters())


def test_modern_set_keeps_the_paper_sets_and_builds_by_slug():
    assert TEACHER_SETS["v1.1"] == ("clip", "eva", "convnext", "sam") and TEACHER_SETS["v1.0"][-1] == "convnext"
    specs = teacher_specs("modern", pretrained=False)
    assert [s.slug for s in specs] == ["clip", "siglip2", "dinov3", "sam2"] and not any(s.pretrained for s in specs)
    expected = {
        "siglip2": ("google/siglip2-so400m-patch16-384", 384, (24, 24), 1152),
        "dinov3": ("facebook/dinov3-vitl16-pretrain-lvd1689m", 224, (14, 14), 1024),
        "dinov3_convnext": ("facebook/dinov3-convnext-large-pretrain-lvd1689m", 224, (7, 7), 1536),
        "aimv2": ("apple/aimv2-large-patch14-224", 224, (16, 16), 1024),
        "sam2": ("facebook/sam2.1-hiera-large", 1024, (64, 64), 256),
        "sam3": ("facebook/sam3", 1008, (72, 72), 256),
        "radio": ("nvidia/C-RADIOv4-H", 512, (32, 32), 1280),
    }
    got = {s: (p.model_id, p.image_size, p.grid, p.channels) for s, p in MODERN_TEACHERS.items()}
    assert got == expected
    assert MODERN_TEACHERS["dinov3"].num_prefix_tokens == 5 and MODERN_TEACHERS["radio"].num_prefix_tokens == 10


def test_sam2_encoder_loads_from_a_full_sam2_checkpoint(tmp_path):
    """`facebook/sam2.1-hiera-large` holds the whole promptable model: the encoder's weights sit under
    `vision_encoder.`, which `Sam2VisionModel.from_pretrained` alone would not find (it would start random)."""
    torch.manual_seed(0)
    full = transformers.Sam2Model(transformers.Sam2Config(vision_config=FAMILIES["sam2"][0].to_dict())).eval()
    full.save_pretrained(tmp_path / "sam2")
    (tmp_path / "sam2" / "preprocessor_config.json").write_text(json.dumps(FAMILIES["sam2"][1]))
    spec = teacher_from_pretrained(str(tmp_path / "sam2"))
    assert (spec.model_class, spec.grid, spec.channels) == ("Sam2VisionModel", (8, 8), 20)
    teacher = build_teacher(spec)
    batch = images()
    with torch.no_grad():
        expected = full.vision_encoder(prepare_images(batch, spec)).fpn_hidden_states[-1]
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_extra_teachers_join_a_set_by_id_for_training_and_the_cache(tmp_path, capsys):
    """`extra_teachers: slug=ID` (training) and `--extra-teacher SLUG=ID` (cache-teachers) add a model by its Hub
    id or folder to a set, read by `teacher_from_pretrained`; a slug the set has is refused in one line."""
    from _train_fixtures import SGD_ONE_STEP, TINY_STAGE1, build

    from movekd_hf.cli import main

    folder = _save(tmp_path, "dinov3")
    trainer = build(TINY_STAGE1, tmp_path / "run", *SGD_ONE_STEP, "--extra_teachers", f"dino={folder}")
    assert trainer.model.distiller.teacher_names == ["clip", "convnext", "sam", "dino"]
    recorded = {entry["name"]: entry for entry in trainer.train_config["teachers"]}
    assert recorded["dino"]["model_id"] == folder
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["kd/dino_loss"] > 0 and "kd/sam_loss" in logged

    model = tmp_path / "student"
    assert main(["init", "--preset", "tiny", "--out", str(model)]) == 0
    estimate = ["cache-teachers", "--model", str(model), "--teacher-set", "tiny", "--estimate", "--num-images", "10"]
    capsys.readouterr()
    assert main([*estimate, "--extra-teacher", f"dino={folder}"]) == 0
    assert "| dino | 16 x 40 (4x4) | 16 x 40 |" in capsys.readouterr().out  # its own row, on the student grid
    # With a teacher list of one's own (`--teachers-json`, no --model) the extra teacher joins it as well.
    listed = tmp_path / "teachers.json"
    listed.write_text(json.dumps([dataclasses.asdict(spec) for spec in teacher_specs("tiny") if spec.slug == "sam"]))
    own = ["cache-teachers", "--teachers-json", str(listed), "--estimate", "--num-images", "10", "--student-grid", "4"]
    assert main([*own, "--extra-teacher", f"dino={folder}"]) == 0
    assert "| sam |" in (table := capsys.readouterr().out) and "| dino | 16 x 40 (4x4) | 16 x 40 |" in table
    assert main([*estimate, "--extra-teacher", f"sam={folder}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "movekd-hf cache-teachers: error: field '--extra-teacher': names ['sam'], already teachers of this set (or "
        "the anchor); expected new slugs"
    )
