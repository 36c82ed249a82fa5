"""Parameter plan of a teacher set and its adapters, built on the meta device (no memory, no download).

`teacher_plan_rows` and `teacher_profiles` feed `movekd-hf plan --teachers NAME`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import build_adapter
from .memory import forward_flops, forward_peak_bytes
from .presets import teacher_specs
from .teachers import TeacherSpec, build_teacher


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_teacher_shape(spec: TeacherSpec) -> tuple[int, tuple[int, int, int]]:
    """Build `spec` without weights on the meta device and run one meta image through it.

    Returns (parameter count, (N_t, C_t, has_cls)) where N_t, C_t are its token count and width.
    """
    with torch.device("meta"):
        teacher = build_teacher(replace(spec, pretrained=False))
        images = torch.empty(1, 3, spec.image_size, spec.image_size)
        out = teacher(images)
    return _count(teacher), (out.tokens.shape[1], out.tokens.shape[2], int(out.cls is not None))


def teacher_plan_rows(
    teacher_set: str, num_student_tokens: int, student_dim: int, adapter: str = "token_mix", anchor: str = "clip"
) -> list[tuple[str, int, bool]]:
    """Rows (component, parameter count, trainable) for the teachers (frozen) and adapters (trainable) of a
    teacher set, given the student's token count and width. The anchor teacher has no adapter."""
    rows: list[tuple[str, int, bool]] = []
    for spec in teacher_specs(teacher_set, pretrained=False):
        params, (num_tokens, dim, _) = meta_teacher_shape(spec)
        rows.append((f"teacher/{spec.slug} ({spec.model_id}, {spec.image_size}px, {num_tokens}x{dim})", params, False))
        if spec.slug == anchor:
            continue
        with torch.device("meta"):
            module = build_adapter(adapter, dim, student_dim, num_tokens, num_student_tokens)
        rows.append(
            (
                f"adapter/{spec.slug} ({adapter}, {num_tokens}x{dim} -> {num_student_tokens}x{student_dim})",
                _count(module),
                True,
            )
        )
    return rows


def teacher_profile(spec: TeacherSpec) -> dict[str, int]:
    """What one teacher costs per image, measured on the meta device in bf16 (its training dtype).

    Returns image_size_px, tokens (N_t), channels (C_t), parameters, forward_flops (FlopCounterMode: 2 per
    multiply-add), activation_peak_bytes (its no-grad forward's working memory, `memory.forward_peak_bytes`)
    and output_bytes (what the forward's result holds: the tokens, CLS and CLS attention kept for the loss).
    """
    with torch.device("meta"):
        teacher = build_teacher(replace(spec, pretrained=False)).to(torch.bfloat16)
        images = torch.empty(1, 3, spec.image_size, spec.image_size, dtype=torch.bfloat16)
        out, peak, held = forward_peak_bytes(lambda: teacher(images))
        flops = forward_flops(lambda: teacher(images))
    return {
        "image_size_px": spec.image_size,
        "tokens": out.tokens.shape[1],
        "channels": out.tokens.shape[2],
        "parameters": _count(teacher),
        "forward_flops": flops,
        "activation_peak_bytes": peak,
        "output_bytes": held,
    }


def teacher_profiles(teacher_set: str) -> dict[str, dict[str, int]]:
    """`teacher_profile` of every teacher of a set (a key of `TEACHER_SETS`), by slug, in the set's order."""
    return {spec.slug: teacher_profile(spec) for spec in teacher_specs(teacher_set, pretrained=False)}
