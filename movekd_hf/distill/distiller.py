"""The trainable side of distillation: one adapter (and optional feature standardiser) per teacher, and the
loss of METHOD.md section 4 assembled from the pure functions in losses.py.

`MoVEKDDistiller(student tokens, teacher outputs)` returns the KD loss and its components. Teachers stay outside
this module (they are frozen and never part of the training state); adapters are inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.llava_conventions import resample_tokens
from ..modeling.mole import upcast
from .adapters import build_adapter
from .losses import (
    KDLossConfig,
    apply_teacher_dropout,
    cls_similarity_teacher_weights,
    equal_teacher_weights,
    kd_total,
    mse_baseline_loss,
    resample_token_weights,
    sample_teacher_keep_mask,
    teacher_loss_scales,
    teacher_token_loss,
    token_weights_from_cls_attention,
)
from .teachers import TeacherOutput


class FeatureStandardizer(nn.Module):
    """Per-channel standardisation of one teacher's tokens with running statistics (buffers).

    In training mode each batch updates the running mean/variance (exponential average with `momentum`; the
    first batch sets them) before they are applied; in eval mode the stored statistics are applied as they are.
    """

    def __init__(self, num_channels: int, momentum: float = 0.01, eps: float = 1e-6):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, tokens: torch.Tensor) -> None:
        flat = upcast(tokens.detach()).reshape(-1, tokens.shape[-1])
        mean, var = flat.mean(dim=0), flat.var(dim=0, unbiased=False)
        # The first batch sets the statistics outright, so early steps are not scaled by the zero/one init.
        dtype = self.running_mean.dtype
        momentum = torch.where(self.num_batches_tracked == 0, 1.0, self.momentum).to(dtype)
        self.running_mean.lerp_(mean.to(dtype), momentum)
        self.running_var.lerp_(var.to(dtype), momentum)
        self.num_batches_tracked += 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C] -> (tokens - running_mean) / sqrt(running_var + eps), same shape and dtype."""
        if self.training:
            self.update(tokens)
        scale = (self.running_var + self.eps).rsqrt()
        return ((upcast(tokens) - self.running_mean) * scale).to(tokens.dtype)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device` where it has one (the loss math, run on upcast tensors, must stay there:
    autocast would send the teacher-weight einsum back to half precision)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _parameter_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


@dataclass(frozen=True)
class TeacherShape:
    """What an adapter needs to know about a teacher: channel width and token count at its input size."""

    dim: int
    num_tokens: int


class MoVEKDDistiller(nn.Module):
    """Adapters, standardisers and the KD loss for one teacher set.

    teachers: slug -> TeacherShape. The anchor teacher (`config.anchor_teacher`, the frozen copy of the student)
    gets no adapter: its raw tokens are compared with the student directly, as in the paper.
    """

    def __init__(
        self,
        teachers: Mapping[str, TeacherShape],
        student_dim: int,
        num_student_tokens: int,
        config: KDLossConfig | None = None,
    ):
        super().__init__()
        self.config = config or KDLossConfig()
        self.teacher_names = list(teachers)
        self.student_dim = student_dim
        anchor = self.config.anchor_teacher
        if anchor in teachers and teachers[anchor].dim != student_dim:
            raise ValueError(f"anchor teacher {anchor!r} has width {teachers[anchor].dim}, the student {student_dim}")
        self.adapters = nn.ModuleDict()
        self.standardizers = nn.ModuleDict()
        for name, shape in teachers.items():
            if name == anchor:
                continue
            self.adapters[name] = build_adapter(
                self.config.adapter, shape.dim, student_dim, shape.num_tokens, num_student_tokens
            )
            if self.config.standardize_features:
                self.standardizers[name] = FeatureStandardizer(shape.dim, self.config.standardize_momentum)

    def pair(
        self, name: str, student: torch.Tensor, student_grid: tuple[int, int], output: TeacherOutput
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(prediction, target, grid they share) for one teacher, in whichever space its adapter maps to."""
        tokens = output.tokens
        if name in self.standardizers:
            tokens = self.standardizers[name](tokens)
        if name not in self.adapters:
            return student, resample_tokens(tokens, output.grid, student_grid), student_grid
        adapter = self.adapters[name]
        if adapter.direction == "student_to_teacher":
            return adapter(student, student_grid, output.grid), tokens, output.grid
        # Teachers may run in another precision than the adapters (fp16 teachers, fp32 adapters and no autocast:
        # the Trainer's fp16 on a CPU); autocast, when on, still runs the adapter in half precision.
        tokens = tokens.to(_parameter_dtype(adapter, tokens.dtype))
        return student, adapter(tokens, output.grid, student_grid), student_grid

    def token_weights(self, outputs: Mapping[str, TeacherOutput], student_grid: tuple[int, int]):
        if self.config.token_weighting == "none":
            return None
        anchor = outputs.get(self.config.anchor_teacher)
        if anchor is None or anchor.cls_attention is None:
            raise ValueError(
                f"token_weighting='cls_attention' needs the {self.config.anchor_teacher!r} teacher's cls_attention"
            )
        weights = token_weights_from_cls_attention(anchor.cls_attention)["token_weights"]
        return resample_token_weights(weights, anchor.grid, student_grid)  # [B, N_s]

    def forward(
        self,
        student_tokens: torch.Tensor,
        student_grid: tuple[int, int],
        teacher_outputs: Mapping[str, TeacherOutput],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """student_tokens [B, N_s, D] on `student_grid`; teacher_outputs: slug -> TeacherOutput (all teachers).

        Returns {"loss", "per_teacher_loss" [B, T], "teacher_weights" [B, T], "token_weights" [B, N_s] | None,
        ...}; columns follow `self.teacher_names`. The adapters run in the ambient precision (autocast included);
        the loss is computed from there on in at least float32 (float64 stays float64), outside autocast.
        """
        missing = [n for n in self.teacher_names if n not in teacher_outputs]
        if missing:
            raise ValueError(
                f"teacher outputs missing for {missing}; the distiller was built for {self.teacher_names}"
            )
        pairs = {n: self.pair(n, student_tokens, student_grid, teacher_outputs[n]) for n in self.teacher_names}
        with autocast_off(student_tokens.device):
            student = upcast(student_tokens)  # one copy, shared by every pair that compares the student itself
            pairs = {
                n: (student if pred is student_tokens else upcast(pred), upcast(target), grid)
                for n, (pred, target, grid) in pairs.items()
            }
            return self._loss(student, student_grid, pairs, teacher_outputs, generator)

    def _loss(
        self,
        student_tokens: torch.Tensor,
        student_grid: tuple[int, int],
        pairs: Mapping[str, tuple],
        teacher_outputs: Mapping[str, TeacherOutput],
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """The loss of `forward` from every teacher's (prediction, target, grid)."""
        if self.config.objective == "mse_baseline":
            # Teacher-to-student targets already sit on the student grid; the baseline compares them plainly.
            targets = {n: (target, grid) for n, (_pred, target, grid) in pairs.items()}
            return mse_baseline_loss(student_tokens, student_grid, targets)
        token_weights = self.token_weights(teacher_outputs, student_grid)
        losses = []
        for pred, target, grid in pairs.values():
            weights = token_weights
            if weights is not None and tuple(grid) != tuple(student_grid):
                weights = resample_token_weights(weights, student_grid, grid)
            losses.append(teacher_token_loss(pred, target, weights)["loss"])
        per_teacher = torch.stack(losses, dim=1)  # [B, T]
        teacher_weights = self.teacher_weights(pairs, teacher_outputs, per_teacher)
        if self.training and self.config.teacher_dropout > 0:
            anchor = self.config.anchor_teacher
            protected = [i for i, n in enumerate(self.teacher_names) if n == anchor]
            keep = sample_teacher_keep_mask(
                *teacher_weights.shape, self.config.teacher_dropout, protected, generator, teacher_weights.device
            )
            teacher_weights = apply_teacher_dropout(teacher_weights, keep)["weights"]
        scaled = per_teacher
        if self.config.teacher_loss_scale:  # a stronger lambda for some teachers; the logged L_t stay unscaled
            scaled = per_teacher * teacher_loss_scales(self.teacher_names, self.config.teacher_loss_scale, per_teacher)
        total = kd_total(scaled, teacher_weights)
        return {
            **total,
            "per_teacher_loss": per_teacher,
            "teacher_weights": teacher_weights,
            "token_weights": token_weights,
        }

    def teacher_weights(self, pairs, outputs: Mapping[str, TeacherOutput], per_teacher: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.teacher_weighting == "equal":
            return equal_teacher_weights(*per_teacher.shape, like=per_teacher)["weights"]
        anchor = outputs.get(cfg.anchor_teacher)
        if anchor is None or anchor.cls is None:
            raise ValueError(
                f"teacher_weighting='cls_similarity' needs the {cfg.anchor_teacher!r} teacher's CLS token"
            )
        adapted = {n: target for n, (_pred, target, _grid) in pairs.items()}
        return cls_similarity_teacher_weights(
            anchor.cls,
            adapted,
            cfg.anchor_teacher,
            cfg.anchor_weight,
            cfg.resoftmax_threshold,
            detach=cfg.detach_teacher_weights,
        )["weights"]
