"""Parameter plan of a teacher set and its adapters, built on the meta device (no memory, no download).

`teacher_plan_rows` feeds `movekd-hf plan --teachers NAME`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import build_adapter
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
