"""The trainable side of distillation: one adapter (and optional feature standardiser, optional summary adapter)
per teacher, and the loss of METHOD.md section 4 assembled from the pure functions in losses.py, with the options
of `KDLossConfig` (running or PHI-S standardisation, cosine + smooth-L1 tokens, random or UNIC lowest-loss teacher
dropping, a summary loss, token weights for towers without CLS).

`MoVEKDDistiller(student tokens, teacher outputs)` returns the KD loss and its components. Teachers stay outside
this module (they are frozen and never part of the training state); adapters are inside it. PHI-S statistics are
buffers set by `calibrate` (MoVEKDTrainer runs it before step 1) and saved with the adapters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.llava_conventions import resample_tokens
from ..modeling.mole import upcast
from .adapters import build_adapter
from .losses import (
    ANCHOR_SUMMARIES,
    TOKEN_WEIGHTINGS,
    KDLossConfig,
    anchor_summary_vector,
    apply_teacher_dropout,
    cls_similarity_teacher_weights,
    equal_teacher_weights,
    kd_total,
    lowest_loss_keep_mask,
    mse_baseline_loss,
    per_token_cosine_smooth_l1,
    per_token_mse,
    resample_token_weights,
    sample_teacher_keep_mask,
    summary_cosine_loss,
    teacher_loss_scales,
    teacher_token_loss,
    token_weights_from_cls_attention,
    uniform_token_weights,
)
from .phi_s import PhiSStandardizer
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
    """What an adapter needs to know about a teacher: channel width and token count at its input size, and
    whether its output carries a summary vector (`TeacherOutput.pooled` or `.cls`; None: not known, then a
    summary adapter is built and the teacher is skipped at run time if it has none)."""

    dim: int
    num_tokens: int
    has_summary: bool | None = None


class MoVEKDDistiller(nn.Module):
    """Adapters, standardisers and the KD loss for one teacher set.

    teachers: slug -> TeacherShape. The anchor teacher (`config.anchor_teacher`, the frozen copy of the student)
    gets no adapter and no standardiser: its raw tokens are compared with the student directly, as in the paper.
    With `summary_loss_weight > 0`, every teacher whose shape does not say has_summary=False (the anchor
    included) gets a summary adapter Linear(D -> C_t) in `summary_adapters`; ValueError when none can have one.
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
            if self.config.standardization == "running":
                self.standardizers[name] = FeatureStandardizer(shape.dim, self.config.standardize_momentum)
            elif self.config.standardization == "phi_s":
                self.standardizers[name] = PhiSStandardizer(shape.dim)
        # Built after the token adapters, so the faithful adapters draw the same initial weights as before.
        self.summary_adapters = nn.ModuleDict()
        if self.config.summary_loss_weight > 0:
            for name, shape in teachers.items():
                if shape.has_summary is not False:
                    self.summary_adapters[name] = nn.Linear(student_dim, shape.dim)
            if not self.summary_adapters:
                raise ValueError(
                    f"summary_loss_weight={self.config.summary_loss_weight} but none of the teachers "
                    f"{self.teacher_names} has a summary (TeacherOutput.pooled or .cls); set summary_loss_weight=0"
                )

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

    def token_weights(self, outputs: Mapping[str, TeacherOutput], student: torch.Tensor, student_grid):
        """Token weights [B, N_s] on the student grid, or None ("none"). "cls_attention" / "pool_attention": the
        anchor's attention row through the second softmax of METHOD.md section 4, resampled to the student grid.
        Raises ValueError naming the option and its alternatives when the anchor output lacks that row."""
        kind = self.config.token_weighting
        if kind == "none":
            return None
        if kind == "uniform":
            return uniform_token_weights(student.shape[0], student.shape[1], student)["token_weights"]
        anchor = outputs.get(self.config.anchor_teacher)
        row = None if anchor is None else getattr(anchor, kind)  # cls_attention | pool_attention, [B, N_a]
        if row is None:
            others = [k for k in TOKEN_WEIGHTINGS if k != kind]
            raise ValueError(
                f"token_weighting={kind!r} needs the {self.config.anchor_teacher!r} teacher's {kind} (its output has "
                f"none: a tower without {'CLS' if kind == 'cls_attention' else 'an attention-pooling head'}); "
                f"choose one of {others}"
            )
        weights = token_weights_from_cls_attention(row)["token_weights"]
        return resample_token_weights(weights, anchor.grid, student_grid)  # [B, N_s]

    def summary_pairs(self, student: torch.Tensor, outputs: Mapping[str, TeacherOutput]) -> dict[str, tuple]:
        """name -> (prediction [B, C_t], summary [B, C_t] or None) for every teacher with a summary adapter; the
        prediction is the adapter applied to the mean of the student's patch tokens [B, D] (ambient precision)."""
        pairs = {}
        for name, adapter in self.summary_adapters.items():
            output = outputs[name]
            summary = output.pooled if output.pooled is not None else output.cls
            mean = student.mean(dim=1).to(_parameter_dtype(adapter, student.dtype))  # [B, D]
            pairs[name] = (adapter(mean), summary)
        return pairs

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
        summaries = self.summary_pairs(student_tokens, teacher_outputs)
        with autocast_off(student_tokens.device):
            student = upcast(student_tokens)  # one copy, shared by every pair that compares the student itself
            pairs = {
                n: (student if pred is student_tokens else upcast(pred), upcast(target), grid)
                for n, (pred, target, grid) in pairs.items()
            }
            out = self._loss(student, student_grid, pairs, teacher_outputs, generator)
            if summaries:
                out = self._add_summary_loss(out, summaries)
            return out

    def _add_summary_loss(self, out: dict, summaries: Mapping[str, tuple]) -> dict:
        """L_kd + summary_loss_weight L_sum over the teachers whose outputs have a summary. A teacher with a
        summary adapter but no summary in its output adds 0 x its adapter's output, so every parameter still gets
        a gradient (DDP requires it)."""
        present = {n: (upcast(p), upcast(z)) for n, (p, z) in summaries.items() if z is not None}
        if not present:
            raise ValueError(
                f"summary_loss_weight={self.config.summary_loss_weight} but no teacher output among "
                f"{list(summaries)} has `pooled` or `cls`; set summary_loss_weight=0"
            )
        summary = summary_cosine_loss([p for p, _ in present.values()], [z for _, z in present.values()])
        idle = sum((upcast(p).sum() * 0.0 for p, z in summaries.values() if z is None), 0.0)
        weight = self.config.summary_loss_weight
        per_sample = out["per_sample"] + weight * summary["per_sample"]
        return {
            **out,
            "loss": per_sample.mean() + idle,
            "per_sample": per_sample,
            "summary_loss": summary["loss"],
            "per_teacher_summary_loss": summary["per_teacher"],
            "summary_teachers": list(present),
        }

    def needs_calibration(self) -> bool:
        """Whether a PHI-S standardiser still lacks its statistics (not calibrated, nor loaded from a file)."""
        return any(isinstance(m, PhiSStandardizer) and not m.calibrated for m in self.standardizers.values())

    @torch.no_grad()
    def calibrate(
        self,
        batches: Iterable[Mapping[str, TeacherOutput]],
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> int:
        """Estimate the PHI-S statistics of every uncalibrated standardiser from teacher outputs (one
        {slug: TeacherOutput} per batch, raw tokens [B, N_t, C_t]), in float64. all_reduce sums a tensor over
        processes (None: one process), so every rank ends with the same statistics. Returns the batches read."""
        pending = {n: m for n, m in self.standardizers.items() if isinstance(m, PhiSStandardizer) and not m.calibrated}
        count = 0
        for outputs in batches if pending else ():
            for name, module in pending.items():
                module.observe(outputs[name].tokens)
            count += 1
        for name in sorted(pending):  # the same order on every rank: the reductions pair up
            try:
                pending[name].finish(all_reduce)
            except ValueError as error:
                raise ValueError(f"PHI-S calibration of teacher {name!r}: {error}") from error
        return count

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
        token_weights = self.token_weights(teacher_outputs, student_tokens, student_grid)
        per_token_loss = self.per_token_loss()
        losses = []
        for pred, target, grid in pairs.values():
            weights = token_weights
            if weights is not None and tuple(grid) != tuple(student_grid):
                weights = resample_token_weights(weights, student_grid, grid)
            losses.append(teacher_token_loss(pred, target, weights, per_token_loss)["loss"])
        per_teacher = torch.stack(losses, dim=1)  # [B, T]
        teacher_weights = self.teacher_weights(pairs, teacher_outputs, per_teacher)
        if self.training and self.config.teacher_dropout > 0:
            teacher_weights = self.drop_teachers(teacher_weights, per_teacher, generator)
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

    def per_token_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-token loss l of `config.token_loss`: (prediction, target) [B, N, D] -> [B, N]."""
        cfg = self.config
        if cfg.token_loss == "mse":
            return per_token_mse
        return functools.partial(
            per_token_cosine_smooth_l1,
            cosine_weight=cfg.cosine_weight,
            smooth_l1_weight=cfg.smooth_l1_weight,
            beta=cfg.smooth_l1_beta,
        )

    def drop_teachers(self, teacher_weights: torch.Tensor, per_teacher: torch.Tensor, generator) -> torch.Tensor:
        """Teacher weights [B, T] after `config.teacher_dropout_mode` dropping (the anchor always kept), each row
        renormalised to sum to one."""
        cfg = self.config
        protected = [i for i, n in enumerate(self.teacher_names) if n == cfg.anchor_teacher]
        if cfg.teacher_dropout_mode == "lowest_loss":
            keep = lowest_loss_keep_mask(per_teacher, cfg.teacher_dropout, protected, generator)
        else:
            keep = sample_teacher_keep_mask(
                *teacher_weights.shape, cfg.teacher_dropout, protected, generator, teacher_weights.device
            )
        return apply_teacher_dropout(teacher_weights, keep)["weights"]

    def teacher_weights(self, pairs, outputs: Mapping[str, TeacherOutput], per_teacher: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.teacher_weighting == "equal":
            return equal_teacher_weights(*per_teacher.shape, like=per_teacher)["weights"]
        anchor = outputs.get(cfg.anchor_teacher)
        summary = None
        if anchor is not None:
            summary = anchor_summary_vector(cfg.anchor_summary, anchor.cls, anchor.pooled, anchor.tokens)
        if summary is None:
            others = [k for k in ANCHOR_SUMMARIES if k != cfg.anchor_summary]
            raise ValueError(
                f"teacher_weighting='cls_similarity' with anchor_summary={cfg.anchor_summary!r} needs the "
                f"{cfg.anchor_teacher!r} teacher's {cfg.anchor_summary} output, which it does not have; choose "
                f"anchor_summary among {others}, or teacher_weighting='equal'"
            )
        adapted = {n: target for n, (_pred, target, _grid) in pairs.items()}
        return cls_similarity_teacher_weights(
            summary,
            adapted,
            cfg.anchor_teacher,
            cfg.anchor_weight,
            cfg.resoftmax_threshold,
            detach=cfg.detach_teacher_weights,
        )["weights"]
