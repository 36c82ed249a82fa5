"""Parameter plan of a teacher set and its adapters, built on the meta device (no memory, no download).

`teacher_plan_rows` and `teacher_profiles` feed `movekd-hf plan --teachers NAME`. A set's anchor (`clip`, listed
first) is the student's own initial tower in training; `student_anchor_spec` sizes it from the student's VLM
config (a SigLIP tower, e.g. LLaVA-OneVision's, instead of the CLIP-L/336 preset).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import build_adapter
from .anchor import anchor_teacher_spec
from .memory import forward_flops, forward_peak_bytes
from .presets import teacher_specs
from .teachers import TeacherSpec, build_teacher


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_teacher_shape(spec: TeacherSpec) -> tuple[int, tuple[int, int, int]]:
    """Build `spec` without weights on the meta device and run one meta image through it.

    Returns (parameter count, (N_t, C_t, has_summary)) where N_t, C_t are its token count and width and
    has_summary is 1 when its output carries a summary vector (a CLS token or an attention-pooled output).
    """
    with torch.device("meta"):
        teacher = build_teacher(replace(spec, pretrained=False))
        images = torch.empty(1, 3, spec.image_size, spec.image_size)
        out = teacher(images)
    return _count(teacher), (
        out.tokens.shape[1],
        out.tokens.shape[2],
        int(out.cls is not None or out.pooled is not None),
    )


def student_anchor_spec(config) -> TeacherSpec:
    """The anchor teacher of a student with this VLM config, sized as its own tower (anchor.py
    `anchor_teacher_spec(sized=True)`: what training copies the student's weights into), random weights, for
    meta-device plans (a SigLIP tower, e.g. LLaVA-OneVision's, instead of the CLIP-L/336 preset).

    Raises `SettingsError` (a ValueError) for a tower without an anchor.
    """
    return anchor_teacher_spec(config, sized=True)


def _plan_specs(teacher_set: str, anchor: str, anchor_spec: TeacherSpec | None) -> list[TeacherSpec]:
    """The set's specs without weights, its `anchor` entry replaced by `anchor_spec` when one is given."""
    specs = teacher_specs(teacher_set, pretrained=False)
    return specs if anchor_spec is None else [anchor_spec if s.slug == anchor else s for s in specs]


def teacher_plan_rows(
    teacher_set: str,
    num_student_tokens: int,
    student_dim: int,
    adapter: str = "token_mix",
    anchor: str = "clip",
    anchor_spec: TeacherSpec | None = None,
) -> list[tuple[str, int, bool]]:
    """Rows (component, parameter count, trainable) for the teachers (frozen) and adapters (trainable) of a
    teacher set, given the student's token count and width. The anchor teacher has no adapter; `anchor_spec`
    (e.g. `student_anchor_spec(vision_config)`) stands for it instead of the set's preset."""
    rows: list[tuple[str, int, bool]] = []
    anchor_slug = anchor if anchor_spec is None else anchor_spec.slug
    for spec in _plan_specs(teacher_set, anchor, anchor_spec):
        params, (num_tokens, dim, _) = meta_teacher_shape(spec)
        rows.append((f"teacher/{spec.slug} ({spec.model_id}, {spec.image_size}px, {num_tokens}x{dim})", params, False))
        if spec.slug == anchor_slug:
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


def teacher_profiles(
    teacher_set: str, anchor: str = "clip", anchor_spec: TeacherSpec | None = None
) -> dict[str, dict[str, int]]:
    """`teacher_profile` of every teacher of a set (a key of `TEACHER_SETS`), by slug, in the set's order;
    `anchor_spec` stands for the set's `anchor` entry when given (as in `teacher_plan_rows`)."""
    return {spec.slug: teacher_profile(spec) for spec in _plan_specs(teacher_set, anchor, anchor_spec)}
