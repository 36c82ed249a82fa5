"""Teacher specs from one place: one factory per teacher kind, the paper's teachers and teacher sets (METHOD.md
section 1, real ids, input sizes and normalisation), and the `tiny` set for CPU runs.

A factory fixes what makes its kind (backend, model class, normalisation, resize mode, which output is read) and
takes the architecture's size as `sizes` (the paper's teacher by default) plus any other `TeacherSpec` field
(`model_id`, `pretrained`, `image_size`, ...), which override the preset's. What a factory leaves out is
`TeacherSpec`'s default, CLIP's view: centre crop, bicubic, CLIP normalisation, the hidden state at layer -2. Each spec also carries the full
architecture config, so `pretrained=False` builds the same model with random weights (or, under
`torch.device("meta")`, without memory) and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec
from .vitdet_eva import EVA02ViTDetConfig

# CLIP ViT-L/14-336 (CLIPVisionConfig fields): LLaVA-1.5's vision tower, so the student's architecture and
# initial weights as well as the `clip` teacher.
CLIP_L_336_ID = "openai/clip-vit-large-patch14-336"
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
)
# SAM ViT-L image encoder (SamVisionConfig fields of facebook/sam-vit-large): windows of 14, global blocks
# 5/11/17/23, 256-channel neck.
SAM_L_ID = "facebook/sam-vit-large"
SAM_L = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_dim=4096,
    image_size=1024,
    patch_size=16,
    output_channels=256,
    window_size=14,
    global_attn_indexes=[5, 11, 17, 23],
    num_pos_feats=128,
)
# EVA-02-L ViTDet (the COCO detector's backbone); its sizes are `EVA02ViTDetConfig`'s defaults.
EVA02_L_ID = "Yuxin-CV/EVA-02"
EVA02_L_FILENAME = "eva02/det/eva02_L_coco_det_sys_o365.pth"
# ConvNeXt-XXLarge (open_clip, LAION-2B): timm's model name decides its sizes; its input is LLaVA-scale 1024 px.
CONVNEXT_XXL_ID = "convnext_xxlarge.clip_laion2b_soup"
CONVNEXT_XXL_IMAGE_SIZE = 1024


def _spec(fields: Mapping[str, Any], **preset: Any) -> TeacherSpec:
    """A `TeacherSpec` of the preset's fields, with the caller's `fields` overriding them."""
    return TeacherSpec(**{**preset, **fields})


def clip_teacher(sizes: Mapping[str, Any] = CLIP_L_336, **fields: Any) -> TeacherSpec:
    """A transformers CLIP vision tower read at `feature_layer` (-2, as LLaVA), its CLS token dropped from the
    patch tokens and kept, with the CLS-to-patch attention row that weights the distillation loss.

    sizes: `CLIPVisionConfig` fields (CLIP ViT-L/14-336 by default); `image_size` is also the input size.
    """
    return _spec(
        fields,
        slug="clip",
        backend="transformers",
        model_id=CLIP_L_336_ID,
        model_class="CLIPVisionModel",
        image_size=sizes["image_size"],
        num_prefix_tokens=1,
        has_cls=True,
        cls_attention=True,
        config={"model_type": "clip_vision_model", **sizes},
    )


def eva_teacher(sizes: Mapping[str, Any] | None = None, **fields: Any) -> TeacherSpec:
    """The EVA-02 ViTDet backbone's final feature map (EVA-02-L at 1024 px by default).

    sizes: `EVA02ViTDetConfig` fields that differ from EVA-02-L (none by default); `image_size` is also the
    input size.
    """
    sizes = dict(sizes or {})
    paper_weights = fields.get("model_id", EVA02_L_ID) == EVA02_L_ID  # the file is one of that Hub repo's
    return _spec(
        fields,
        slug="eva",
        backend="vitdet",
        model_id=EVA02_L_ID,
        filename=EVA02_L_FILENAME if paper_weights else None,
        image_size=sizes.get("image_size", EVA02ViTDetConfig.image_size),
        output="feature_map",
        config=sizes,
    )


def convnext_teacher(sizes: Mapping[str, Any] | None = None, **fields: Any) -> TeacherSpec:
    """A timm ConvNeXt's final feature map (`forward_features`; ConvNeXt-XXLarge at 1024 px by default).

    sizes: keyword arguments of `timm.create_model` that change the named model (`dims`, `depths`,
    `output_stride`, ...); none by default. Pass a small `model_id` (e.g. `convnext_atto`) and `image_size` for
    tiny teachers.
    """
    return _spec(
        fields,
        slug="convnext",
        backend="timm",
        model_id=CONVNEXT_XXL_ID,
        image_size=CONVNEXT_XXL_IMAGE_SIZE,
        output="feature_map",
        config=dict(sizes or {}),
    )


def sam_teacher(sizes: Mapping[str, Any] = SAM_L, **fields: Any) -> TeacherSpec:
    """The SAM image encoder's neck output, on SAM's own view: longest side resized (bilinear), ImageNet
    normalisation, zero padding at the bottom and right.

    sizes: `SamVisionConfig` fields (SAM ViT-L by default; small random ones want `initializer_range=0.02`, as
    SAM's stock 1e-10 makes every output vanish); `image_size` is also the input size. The vision encoder
    loads alone from a full SAM checkpoint (same `vision_encoder.` key prefix).
    """
    return _spec(
        fields,
        slug="sam",
        backend="transformers",
        model_id=SAM_L_ID,
        model_class="SamVisionModel",
        image_size=sizes["image_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_mode="pad",
        interpolation="bilinear",
        output="feature_map",
        config={"model_type": "sam_vision_model", **sizes},
    )


PAPER_TEACHERS: dict[str, TeacherSpec] = {
    "clip": clip_teacher(),
    "eva": eva_teacher(),
    "convnext": convnext_teacher(),
    "sam": sam_teacher(),
}

# The `tiny` set: real architectures at CPU-test sizes, random weights. TINY_CLIP is also the tiny student's
# tower (movekd_hf.models), as the paper's student starts as its CLIP teacher; in training the clip teacher is
# always the student's own initial tower. The other widths differ from the student's (32 wide, 16 tokens), so a
# shape mix-up fails.
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
    hidden_act="quick_gelu",
)
TINY_CONVNEXT = dict(dims=(8, 12, 16, 40), depths=(1, 1, 1, 1))  # 40 channels, stride 32
TINY_SAM = dict(
    hidden_size=28,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_dim=44,
    image_size=64,
    patch_size=8,
    output_channels=20,
    window_size=4,
    global_attn_indexes=[1],
    num_pos_feats=12,
    initializer_range=0.02,
)
TINY_TEACHERS: dict[str, TeacherSpec] = {
    "clip": clip_teacher(TINY_CLIP, model_id="tiny-clip", pretrained=False),
    "convnext": convnext_teacher(TINY_CONVNEXT, model_id="convnext_atto", image_size=64, pretrained=False),
    "sam": sam_teacher(TINY_SAM, model_id="tiny-sam", pretrained=False),
}

# Teacher set name -> its teachers' slugs. v1.0 / v1.1 are the paper's; `tiny` always has random weights.
TEACHER_SETS: dict[str, tuple[str, ...]] = {
    "v1.0": ("clip", "eva", "convnext"),
    "v1.1": ("clip", "eva", "convnext", "sam"),
    "tiny": ("clip", "convnext", "sam"),
}


def teacher_specs(teacher_set: str, pretrained: bool = True, sam_layout: str = "grid") -> list[TeacherSpec]:
    """The specs of a teacher set (a key of `TEACHER_SETS`), in the set's order.

    pretrained: load real weights (paper sets; `tiny` never has any). sam_layout "faithful" reproduces the authors'
    SAM reshape (METHOD.md section 6) for adapters trained by them; "grid" (default) keeps the true grid.
    """
    if teacher_set not in TEACHER_SETS:
        raise ValueError(f"unknown teacher set {teacher_set!r}; expected one of {sorted(TEACHER_SETS)}")
    presets = TINY_TEACHERS if teacher_set == "tiny" else PAPER_TEACHERS
    specs = []
    for slug in TEACHER_SETS[teacher_set]:
        spec = presets[slug]
        if teacher_set != "tiny":
            spec = replace(spec, pretrained=pretrained)
        if slug == "sam":
            spec = replace(spec, sam_layout=sam_layout)
        specs.append(spec)
    return specs
