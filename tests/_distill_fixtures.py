"""Tiny teachers for the distill tests: the real architectures (CLIP, SAM, ViTDet EVA-02, timm ConvNeXt and
EVA-02) at tiny sizes, every width distinct so a shape mix-up fails loudly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from movekd_hf.distill.cache import CacheSettings  # noqa: E402
from movekd_hf.distill.presets import (  # noqa: E402
    TINY_CONVNEXT,
    TINY_SAM,
    clip_teacher,
    convnext_teacher,
    eva_teacher,
    sam_teacher,
)
from movekd_hf.distill.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec  # noqa: E402

STUDENT_DIM = 32  # the tiny CLIP's width: the clip teacher is the student's own architecture
STUDENT_GRID = (4, 4)  # 32 px / patch 8
NUM_STUDENT_TOKENS = 16
TEACHER_SIZE = 64  # the collator's square teacher view in the cache tests


def cache_settings(**overrides) -> CacheSettings:
    """`CacheSettings` for the tiny student grid and teacher view size, with `overrides`."""
    return CacheSettings(**{"student_grid": STUDENT_GRID, "teacher_image_size": TEACHER_SIZE, **overrides})


# CLIPVisionConfig sizes: the student's width and grid, other widths distinct from the package's tiny CLIP.
TINY_CLIP_SIZES = dict(
    hidden_size=STUDENT_DIM,
    intermediate_size=37,
    projection_dim=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
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
# Kinds the package has no factory for (no paper teacher of theirs): TeacherSpec fields written out.
OTHER_KINDS = {
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
}


def tiny_spec(slug: str, **overrides) -> TeacherSpec:
    """A tiny, weightless (`pretrained=False`) spec of each teacher kind: the package's factories for the paper's
    kinds (the package's tiny SAM and ConvNeXt, the `tiny` set's), written out for the others."""
    fields = {"pretrained": False, **overrides}
    if slug == "clip":
        return clip_teacher(TINY_CLIP_SIZES, **{"model_id": "tiny-clip", **fields})
    if slug == "sam":
        return sam_teacher(TINY_SAM, **{"model_id": "tiny-sam", **fields})
    if slug == "eva":
        return eva_teacher(TINY_EVA_CONFIG, **{"model_id": "tiny-eva", **fields})
    if slug == "convnext":
        return convnext_teacher(TINY_CONVNEXT, **{"model_id": "convnext_atto", "image_size": 64, **fields})
    return TeacherSpec(slug=slug, **{**OTHER_KINDS[slug], **fields})


# Architecture configs as the tests build models from them directly.
TINY_CLIP_CONFIG = dict(tiny_spec("clip").config)
TINY_SAM_CONFIG = dict(tiny_spec("sam").config)
TINY_CONVNEXT_KWARGS = dict(TINY_CONVNEXT)


def images(batch: int = 2, height: int = 40, width: int = 52, seed: int = 0) -> torch.Tensor:
    """A batch of non-square images in [0, 1]: [B, 3, H, W]."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
