"""Where the trainer gets teacher outputs from, and how the frozen teachers of a run are built.

A `TeacherSource` turns a collated batch into `{slug: TeacherOutput}`. `OnlineTeachers` runs the frozen teachers on
the batch's `teacher_images` (the paper's way); a feature cache (distill/cache.py) answers the same call from
`sample_ids`. Teachers are never part of the module the Trainer, DDP or DeepSpeed wrap: they are not saved, not
optimised, not partitioned, and stay in eval mode in the training dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from ..distill.cache import CacheSettings
from ..distill.distiller import TeacherShape
from ..distill.plan import meta_teacher_shape
from ..distill.presets import clip_teacher, teacher_specs
from ..distill.teachers import Teacher, TeacherOutput, TeacherSpec, build_teacher
from ..modeling.llava_conventions import mean_colour, student_grid

ANCHOR = "clip"


class TeacherSource(Protocol):
    """batch (as collated, on device) -> {slug: TeacherOutput}; empty when the batch has no image."""

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, TeacherOutput]: ...


class OnlineTeachers:
    """Runs frozen teachers on `inputs["teacher_images"]` ([N_img, 3, S, S] in [0, 1]) every step."""

    def __init__(self, teachers: Mapping[str, Teacher]):
        self.teachers = dict(teachers)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> OnlineTeachers:
        for teacher in self.teachers.values():
            teacher.to(device=device, dtype=dtype).eval()
        return self

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, TeacherOutput]:
        images = inputs.get("teacher_images")
        if images is None:
            return {}
        return {slug: teacher(images) for slug, teacher in self.teachers.items()}


@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """Build modules without DeepSpeed ZeRO-3's `zero.Init` partitioning (transformers applies it to every model
    built while a ZeRO-3 config is registered); teachers must stay whole on every rank."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _is_mole_key(name: str) -> bool:
    return ".lora_" in name or ".router." in name


def _gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of `module`'s state, also when ZeRO-3 loaded it partitioned (each rank holding a shard)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def clip_teacher_from_student(vlm: nn.Module, image_mean=None, image_std=None) -> Teacher:
    """The paper's `clip` teacher: a frozen stock CLIP vision model holding the student tower's weights minus MoLE
    (LoRA experts and routers), read at the student's `vision_feature_layer` with its CLS attention row."""
    from transformers import CLIPVisionModel

    vision = vlm.config.vision_config
    if getattr(vision, "model_type", "") != "clip_vision_model":
        raise ValueError(f"the `clip` teacher copies a CLIP student tower; this student is {vision.model_type!r}")
    state = {k: v for k, v in _gathered_state(vlm.model.vision_tower).items() if not _is_mole_key(k)}
    model = CLIPVisionModel(vision)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"student tower does not fit a stock CLIP: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    spec = clip_teacher_spec(vlm.config, image_mean, image_std)
    return Teacher(spec, model)


def clip_teacher_spec(config, image_mean=None, image_std=None) -> TeacherSpec:
    """The spec of the `clip` teacher copied from a student with this VLM config (no weights involved)."""
    # No architecture config (`config={}`): the weights and their shapes come from the student's tower.
    return clip_teacher(
        slug=ANCHOR,
        model_id="student-initial-vision-tower",
        image_size=config.vision_config.image_size,
        feature_layer=config.vision_feature_layer,
        pretrained=False,
        config={},
        **({"mean": tuple(image_mean), "std": tuple(image_std)} if image_mean is not None else {}),
    )


def teacher_view_size(config, specs: list[TeacherSpec]) -> int:
    """Side of the one raw square view the collator gives every teacher: large enough for the largest input."""
    return max([spec.image_size for spec in specs] + [config.vision_config.image_size])


def teacher_cache_settings(
    config, image_processor, specs: list[TeacherSpec], grid: str, image_aspect: str, **compression
):
    """The `CacheSettings` a training run with this student, processor and data view reads its cache with;
    `movekd-hf cache-teachers --model` writes with the same, so the cache keys agree. `compression`: the
    `CacheSettings` compression fields (`compress`, `compression`, `compression_seed`, `calibration_images`,
    `token_dtype`) the cache was written with."""

    return CacheSettings(
        student_grid=student_grid(config.vision_config),
        grid=grid,
        teacher_image_size=teacher_view_size(config, specs),
        image_aspect=image_aspect,
        background=mean_colour(image_processor),
        **compression,
    )


def run_teacher_specs(teacher_set: str, pretrained: bool, checkpoints: Mapping[str, str]) -> list[TeacherSpec]:
    """Specs of the non-anchor teachers of a set (the anchor is the student's own tower), with local checkpoints
    swapped in."""
    specs = [spec for spec in teacher_specs(teacher_set, pretrained=pretrained) if spec.slug != ANCHOR]
    unknown = sorted(set(checkpoints) - {spec.slug for spec in specs})
    if unknown:
        raise ValueError(f"`teacher_checkpoints` names {unknown}, not teachers of set {teacher_set!r}")
    return [replace(spec, checkpoint=checkpoints[spec.slug]) if spec.slug in checkpoints else spec for spec in specs]


def build_teachers(vlm: nn.Module, specs: list[TeacherSpec], image_mean=None, image_std=None) -> dict[str, Teacher]:
    """The clip teacher (copied from `vlm`, which must still hold its initial tower) plus one per spec."""
    with outside_zero3():
        teachers = {ANCHOR: clip_teacher_from_student(vlm, image_mean, image_std)}
        for spec in specs:
            teachers[spec.slug] = build_teacher(spec)
    return teachers


def teacher_shapes(vlm: nn.Module, specs: list[TeacherSpec]) -> dict[str, TeacherShape]:
    """Token width and count of every teacher at its input size (non-anchor ones measured on the meta device)."""
    vision = vlm.config.vision_config
    height, width = student_grid(vision)
    shapes = {ANCHOR: TeacherShape(dim=vision.hidden_size, num_tokens=height * width)}
    for spec in specs:
        with outside_zero3():
            _, (num_tokens, dim, _) = meta_teacher_shape(spec)
        shapes[spec.slug] = TeacherShape(dim=dim, num_tokens=num_tokens)
    return shapes
