"""Tiny teachers for the distill tests: the real architectures (CLIP, SAM, ViTDet EVA-02, timm ConvNeXt and
EVA-02) at tiny sizes, every width distinct so a shape mix-up fails loudly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from movekd_hf.distill.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec  # noqa: E402
from movekd_hf.training.teacher_source import TINY_SAM_CONFIG as _TINY_SAM_CONFIG  # noqa: E402

STUDENT_DIM = 32  # the tiny CLIP's width: the clip teacher is the student's own architecture
STUDENT_GRID = (4, 4)  # 32 px / patch 8
NUM_STUDENT_TOKENS = 16

TINY_CLIP_CONFIG = dict(
    model_type="clip_vision_model",
    hidden_size=STUDENT_DIM,
    intermediate_size=37,
    projection_dim=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
# The package's tiny SAM (the `tiny` teacher set the tiny training configs use).
TINY_SAM_CONFIG = dict(_TINY_SAM_CONFIG)
# head dim 12 (divisible by 4 for 2D rotary), 8 x 8 grid at 64 px, windows of 4, block 1 global.
TINY_EVA_CONFIG = dict(
    image_size=64,
    patch_size=8,
    hidden_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    window_size=4,
    global_attn_indexes=(1,),
    pretrain_image_size=48,
    rope_reference_grid=4,
)
TINY_CONVNEXT_KWARGS = dict(dims=(8, 12, 16, 40), depths=(1, 1, 1, 1))  # 40 channels, stride 32


def tiny_spec(slug: str, **overrides) -> TeacherSpec:
    """A tiny, weightless (`pretrained=False`) spec of each teacher kind."""
    base = {
        "clip": dict(
            backend="transformers",
            model_id="tiny-clip",
            model_class="CLIPVisionModel",
            image_size=32,
            num_prefix_tokens=1,
            has_cls=True,
            cls_attention=True,
            config=TINY_CLIP_CONFIG,
        ),
        "sam": dict(
            backend="transformers",
            model_id="tiny-sam",
            model_class="SamVisionModel",
            image_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize_mode="pad",
            interpolation="bilinear",
            output="feature_map",
            config=TINY_SAM_CONFIG,
        ),
        "eva": dict(
            backend="vitdet", model_id="tiny-eva", image_size=64, output="feature_map", config=TINY_EVA_CONFIG
        ),
        "convnext": dict(
            backend="timm", model_id="convnext_atto", image_size=64, output="feature_map", config=TINY_CONVNEXT_KWARGS
        ),
        "evaclip": dict(
            backend="timm",
            model_id="eva02_tiny_patch14_224",
            image_size=56,
            num_prefix_tokens=1,
            has_cls=True,
            config=dict(embed_dim=48, depth=3, num_heads=2, img_size=56),
        ),
        "siglip": dict(
            backend="transformers",
            model_id="tiny-siglip",
            image_size=32,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            resize_mode="squash",
            config=dict(
                model_type="siglip_vision_model",
                hidden_size=36,
                intermediate_size=44,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
        ),
        "dinov2": dict(
            backend="transformers",
            model_id="tiny-dinov2",
            image_size=32,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_prefix_tokens=1,
            has_cls=True,
            config=dict(
                model_type="dinov2",
                hidden_size=44,
                intermediate_size=52,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
        ),
    }[slug]
    base.update(pretrained=False)
    base.update(overrides)
    return TeacherSpec(slug=slug, **base)


def images(batch: int = 2, height: int = 40, width: int = 52, seed: int = 0) -> torch.Tensor:
    """A batch of non-square images in [0, 1]: [B, 3, H, W]."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
