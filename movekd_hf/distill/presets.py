"""The paper's teachers and teacher sets (METHOD.md section 1), with real ids, input sizes and normalisation.

Each spec also carries the full architecture config, so `pretrained=False` builds the same model with random
weights (or, under `torch.device("meta")`, without memory) and nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import replace

from .teachers import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, TeacherSpec

# CLIP ViT-L/14-336: the student's architecture and initial weights.
CLIP_L_336_CONFIG = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
)

# SAM ViT-L image encoder (facebook/sam-vit-large): windows of 14, global blocks 5/11/17/23, 256-channel neck.
SAM_L_VISION_CONFIG = dict(
    model_type="sam_vision_model",
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

PAPER_TEACHERS: dict[str, TeacherSpec] = {
    "clip": TeacherSpec(
        slug="clip",
        backend="transformers",
        model_id="openai/clip-vit-large-patch14-336",
        model_class="CLIPVisionModel",
        image_size=336,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize_mode="crop",
        output="hidden_state",
        feature_layer=-2,
        num_prefix_tokens=1,
        has_cls=True,
        cls_attention=True,
        config=CLIP_L_336_CONFIG,
    ),
    "eva": TeacherSpec(
        slug="eva",
        backend="vitdet",
        model_id="Yuxin-CV/EVA-02",
        filename="eva02/det/eva02_L_coco_det_sys_o365.pth",
        image_size=1024,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize_mode="crop",
        output="feature_map",
        config={},  # EVA02ViTDetConfig defaults are EVA-02-L at 1024 px
    ),
    "convnext": TeacherSpec(
        slug="convnext",
        backend="timm",
        model_id="convnext_xxlarge.clip_laion2b_soup",
        image_size=1024,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize_mode="crop",
        output="feature_map",
    ),
    "sam": TeacherSpec(
        slug="sam",
        backend="transformers",
        model_id="facebook/sam-vit-large",
        # Loads the vision encoder alone from the full SAM checkpoint (same `vision_encoder.` key prefix).
        model_class="SamVisionModel",
        image_size=1024,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_mode="pad",
        interpolation="bilinear",
        output="feature_map",
        config=SAM_L_VISION_CONFIG,
    ),
}

TEACHER_SETS: dict[str, tuple[str, ...]] = {
    "v1.0": ("clip", "eva", "convnext"),
    "v1.1": ("clip", "eva", "convnext", "sam"),
}


def teacher_specs(teacher_set: str, pretrained: bool = True, sam_layout: str = "grid") -> list[TeacherSpec]:
    """The specs of a teacher set ("v1.0" or "v1.1"). sam_layout "faithful" reproduces the authors' SAM
    reshape (METHOD.md section 6) for adapters trained by them; "grid" (default) keeps the true grid."""
    if teacher_set not in TEACHER_SETS:
        raise ValueError(f"unknown teacher set {teacher_set!r}; expected one of {sorted(TEACHER_SETS)}")
    specs = []
    for slug in TEACHER_SETS[teacher_set]:
        spec = replace(PAPER_TEACHERS[slug], pretrained=pretrained)
        if slug == "sam":
            spec = replace(spec, sam_layout=sam_layout)
        specs.append(spec)
    return specs
