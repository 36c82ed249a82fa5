"""The MoVE-KD distillation loss (METHOD.md section 4) as pure functions, plus its options.

Each function takes tensors, returns a dict of named components, and holds no state: no config objects, no
`.item()`, no logging. `KDLossConfig` names the options; `MoVEKDDistiller` (distiller.py) wires them together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from ..modeling.llava_conventions import resample_tokens
from ..modeling.mole import upcast
from .adapters import ADAPTER_KINDS

# ------------------------------------------------------------------------------------------------- options

TOKEN_WEIGHTINGS = ("cls_attention", "none")
TEACHER_WEIGHTINGS = ("cls_similarity", "equal")
OBJECTIVES = ("movekd", "mse_baseline")


@dataclass
class KDLossConfig:
    """Options of the distillation loss. Faithful values (METHOD.md sections 4 and 6) are noted per field.

    token_weighting: "cls_attention" (faithful: L_t = mean_j l + sum_j w_j l_j) or "none" (plain mean).
    teacher_weighting: "cls_similarity" (faithful: anchor gets `anchor_weight`, the others share the rest by
        softmax of mean_j cls . T_t[j], re-softmaxed once past `resoftmax_threshold`) or "equal".
    detach_teacher_weights: faithful False (the weights carry gradient into the adapters); True stops the
        adapters from shrinking a teacher's weight instead of matching it.
    standardize_features: faithful False; True standardises each non-anchor teacher's raw tokens with running
        per-channel statistics, so a teacher's feature scale does not decide its weight or its loss size.
    teacher_dropout: faithful 0.0; probability of dropping each non-anchor teacher per sample in training, the
        remaining weights renormalised to sum to one.
    objective: "movekd" or "mse_baseline" (the paper's ablation: interpolated tokens, plain MSE, equal weights).
    adapter: "token_mix" (faithful), "resample" (any input size) or "student_head" (student-to-teacher).
    teacher_loss_scale: faithful {} (every teacher 1.0); teacher slug -> factor c_t > 0 on that teacher's loss in
        L_kd = mean_b sum_t a_t c_t L_t, e.g. {"convnext": 4.0} gives one teacher a stronger lambda without
        changing the teacher weights a_t. Logged per-teacher losses stay the unscaled L_t. `movekd` objective only.
    """

    token_weighting: str = "cls_attention"
    teacher_weighting: str = "cls_similarity"
    anchor_teacher: str = "clip"
    anchor_weight: float = 0.8
    resoftmax_threshold: float = 0.8
    detach_teacher_weights: bool = True
    standardize_features: bool = False
    standardize_momentum: float = 0.01
    teacher_dropout: float = 0.0
    objective: str = "movekd"
    adapter: str = "token_mix"
    teacher_loss_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("token_weighting", TOKEN_WEIGHTINGS),
            ("teacher_weighting", TEACHER_WEIGHTINGS),
            ("objective", OBJECTIVES),
            ("adapter", ADAPTER_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"KDLossConfig.{name} is {getattr(self, name)!r}; expected one of {allowed}")
        if not 0.0 <= self.anchor_weight <= 1.0:
            raise ValueError(f"KDLossConfig.anchor_weight must be in [0, 1], got {self.anchor_weight}")
        if not 0.0 <= self.teacher_dropout < 1.0:
            raise ValueError(f"KDLossConfig.teacher_dropout must be in [0, 1), got {self.teacher_dropout}")
        if not 0.0 < self.standardize_momentum <= 1.0:
            raise ValueError(f"KDLossConfig.standardize_momentum must be in (0, 1], got {self.standardize_momentum}")
        bad = {name: value for name, value in self.teacher_loss_scale.items() if not float(value) > 0.0}
        if bad:
            raise ValueError(f"KDLossConfig.teacher_loss_scale factors must be positive, got {bad}")
        if self.teacher_loss_scale and self.objective != "movekd":
            raise ValueError("KDLossConfig.teacher_loss_scale applies to objective='movekd' only")
        if self.adapter == "student_head" and self.teacher_weighting == "cls_similarity":
            raise ValueError(
                "KDLossConfig: teacher_weighting='cls_similarity' needs teacher tokens in the student's width; "
                "use teacher_weighting='equal' with adapter='student_head'"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> KDLossConfig:
        if name not in KD_LOSS_PRESETS:
            raise ValueError(f"unknown KD loss preset {name!r}; expected one of {sorted(KD_LOSS_PRESETS)}")
        return replace(KD_LOSS_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


KD_LOSS_PRESETS: dict[str, KDLossConfig] = {
    # METHOD.md sections 4 and 6 exactly: attention token weights, beta 0.8, one re-softmax, non-detached.
    "faithful": KDLossConfig(detach_teacher_weights=False),
    # The faithful loss with detached teacher weights (METHOD.md section 6 allows this fix by default).
    "default": KDLossConfig(),
    # Every improvement on: detached weights, standardised features, teacher dropout, resolution-free adapter.
    "improved": KDLossConfig(standardize_features=True, teacher_dropout=0.1, adapter="resample"),
    # The paper's MSE ablation.
    "mse_baseline": KDLossConfig(
        token_weighting="none", teacher_weighting="equal", objective="mse_baseline", adapter="resample"
    ),
}


# ---------------------------------------------------------------------------------------------- token level


def token_weights_from_cls_attention(cls_attention: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token weights w from the anchor's CLS attention row (METHOD.md section 4).

    cls_attention [B, N]: CLS-query probabilities at the patch keys (softmax over all keys, head mean).
    Returns {"token_weights": [B, N], a second softmax over the N positions, rows sum to 1}, in at least float32
    (half precision would put ~0.4 % of error on weights that are all close to 1 / N).
    """
    return {"token_weights": upcast(cls_attention).softmax(dim=-1)}


def per_token_mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l[b, j] = mean_c (student[b, j, c] - target[b, j, c])^2. [B, N, D] x [B, N, D] -> [B, N]."""
    if student.shape != target.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and target tokens {tuple(target.shape)} differ")
    return (student - target).pow(2).mean(dim=-1)


def teacher_token_loss(
    student: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-teacher loss L_t = mean_j l[j] + sum_j w[j] l[j] for each sample.

    student, target [B, N, D]; token_weights [B, N] (rows sum to 1) or None (the weighted term is dropped).
    Returns {"per_token": [B, N], "mean_term": [B], "weighted_term": [B], "loss": [B]}.
    """
    per_token = per_token_mse(student, target)
    mean_term = per_token.mean(dim=-1)
    if token_weights is None:
        weighted_term = torch.zeros_like(mean_term)
    else:
        if token_weights.shape != per_token.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must match tokens {tuple(per_token.shape)}")
        weighted_term = (token_weights * per_token).sum(dim=-1)
    return {
        "per_token": per_token,
        "mean_term": mean_term,
        "weighted_term": weighted_term,
        "loss": mean_term + weighted_term,
    }


def resample_token_weights(
    token_weights: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Move token weights [B, h*w] onto another grid and renormalise the rows to sum to 1: [B, th*tw]."""
    moved = resample_tokens(token_weights.unsqueeze(-1), grid, target_grid).squeeze(-1).clamp_min(0)
    return moved / moved.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(moved.dtype).tiny)


# -------------------------------------------------------------------------------------------- teacher level


def cls_similarity_teacher_weights(
    cls: torch.Tensor,
    tokens: Mapping[str, torch.Tensor],
    anchor: str | None = "clip",
    anchor_weight: float = 0.8,
    resoftmax_threshold: float = 0.8,
    detach: bool = False,
) -> dict[str, torch.Tensor]:
    """Teacher weights a_t of METHOD.md section 4, columns in the order of `tokens`.

    cls [B, D]: the anchor's CLS token; tokens: name -> adapted tokens [B, N, D] (the anchor's own entry is not
    used for a score). z_t = mean_j cls . T_t[j] for every non-anchor t; s = softmax_t z over them, replaced once
    by softmax_t s when the batch mean of s has a maximum above `resoftmax_threshold`; a_anchor = anchor_weight,
    a_t = (1 - anchor_weight) s_t. Alone, the anchor gets weight 1; without an anchor the others share 1.
    Computed in at least float32 (float64 inputs stay float64): in half precision the fixed anchor weight 0.8
    alone is off by 1e-3 and the weights no longer sum to one.
    Returns {"weights": [B, T], "logits": [B, T'], "shares": [B, T'], "resoftmaxed": bool []} with T' non-anchor.
    """
    names = list(tokens)
    others = [n for n in names if n != anchor]
    has_anchor = anchor in names
    batch = cls.shape[0]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (cls, *tokens.values())) else torch.float32
    if not others:
        weights = cls.new_ones(batch, len(names), dtype=dtype)
        empty = cls.new_zeros(batch, 0, dtype=dtype)
        return {"weights": weights, "logits": empty, "shares": empty, "resoftmaxed": torch.tensor(False)}
    stacked = torch.stack([tokens[n].to(dtype) for n in others], dim=1)  # [B, T', N, D]
    if detach:
        stacked = stacked.detach()
    logits = torch.einsum("bd,btnd->btn", cls.to(dtype), stacked).mean(dim=-1)  # [B, T']
    shares = logits.softmax(dim=-1)
    # Data-dependent branch kept on the device (torch.where): no host sync.
    resoftmaxed = shares.mean(dim=0).max() > resoftmax_threshold
    shares = torch.where(resoftmaxed, shares.softmax(dim=-1), shares)
    rest = 1.0 - anchor_weight if has_anchor else 1.0
    columns = iter((rest * shares).unbind(dim=1))
    weights = torch.stack(
        [cls.new_full((batch,), anchor_weight, dtype=shares.dtype) if n == anchor else next(columns) for n in names],
        dim=1,
    )
    return {"weights": weights, "logits": logits, "shares": shares, "resoftmaxed": resoftmaxed}


def equal_teacher_weights(batch_size: int, num_teachers: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """a_t = 1 / T for every sample: {"weights": [B, T]}."""
    return {"weights": like.new_full((batch_size, num_teachers), 1.0 / num_teachers)}


def sample_teacher_keep_mask(
    batch_size: int,
    num_teachers: int,
    drop_probability: float,
    protected: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bernoulli keep mask [B, T] (True = keep). Columns in `protected` (the anchor) are always kept; a row that
    would lose every teacher keeps them all, so each sample still has a target."""
    keep = torch.rand(batch_size, num_teachers, generator=generator, device=device) >= drop_probability
    if protected:
        keep[:, list(protected)] = True
    return keep | ~keep.any(dim=1, keepdim=True)


def apply_teacher_dropout(weights: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero dropped teachers' weights and renormalise each row to sum to one.

    weights [B, T] (rows sum to 1), keep [B, T] bool with at least one True per row.
    Returns {"weights": [B, T], "keep": keep}.
    """
    kept = weights * keep.to(weights.dtype)
    return {"weights": kept / kept.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny), "keep": keep}


def teacher_loss_scales(names: Sequence[str], scales: Mapping[str, float], like: torch.Tensor) -> torch.Tensor:
    """The factors c_t of `KDLossConfig.teacher_loss_scale` as a [T] tensor in the order of `names` (1.0 for a
    teacher not named), in `like`'s dtype and device. Raises ValueError for a scale naming no teacher."""
    unknown = sorted(set(scales) - set(names))
    if unknown:
        raise ValueError(f"teacher_loss_scale names {unknown}, not among the teachers {list(names)}")
    return torch.tensor([float(scales.get(name, 1.0)) for name in names], dtype=like.dtype, device=like.device)


def kd_total(per_teacher_loss: torch.Tensor, teacher_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_kd = mean_b sum_t a[b, t] L[b, t]. Both [B, T].

    Returns {"loss": [], "per_sample": [B], "per_teacher": [T] (batch mean of a_t L_t)}.
    """
    if per_teacher_loss.shape != teacher_weights.shape:
        raise ValueError(
            f"per_teacher_loss {tuple(per_teacher_loss.shape)} and teacher_weights {tuple(teacher_weights.shape)} differ"
        )
    weighted = per_teacher_loss * teacher_weights
    per_sample = weighted.sum(dim=1)
    return {"loss": per_sample.mean(), "per_sample": per_sample, "per_teacher": weighted.mean(dim=0)}


# ----------------------------------------------------------------------------------------------- baselines


def mse_baseline_loss(
    student: torch.Tensor,
    student_grid: tuple[int, int],
    teachers: Mapping[str, tuple[torch.Tensor, tuple[int, int]]],
) -> dict[str, torch.Tensor]:
    """The paper's MSE ablation: each teacher's tokens (already in the student's width) bilinearly
    interpolated onto the student grid, plain MSE, equal teacher weights, no token weights.

    student [B, N_s, D]; teachers: name -> (tokens [B, N_t, D], (h, w)).
    Returns {"loss": [], "per_teacher": [T]} in the order of `teachers`.
    """
    per_teacher = torch.stack(
        [F.mse_loss(student, resample_tokens(tokens, grid, student_grid)) for tokens, grid in teachers.values()]
    )
    return {"loss": per_teacher.mean(), "per_teacher": per_teacher}


# ------------------------------------------------------------------------------------------------- MoLE


def mole_balance_loss(router_logits: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoLE load-balancing loss of METHOD.md section 2.

    router_logits: one [B, N, E] per encoder layer. Per sample, over all layers and tokens together:
    L_i = sum_e mean(p_e) * mean(onehot(argmax p)_e); L = mean_i L_i.
    Returns {"loss": [], "per_sample": [B], "importance": [B, E] (mean p), "load": [B, E] (mean onehot)}, in at
    least float32.
    """
    if not router_logits:
        raise ValueError("mole_balance_loss needs at least one layer of router_logits")
    logits = torch.cat(list(router_logits), dim=1)  # [B, L*N, E]
    probs = upcast(logits).softmax(dim=-1)
    onehot = F.one_hot(probs.argmax(dim=-1), num_classes=probs.shape[-1]).to(probs.dtype)
    importance = probs.mean(dim=1)
    load = onehot.mean(dim=1)
    per_sample = (importance * load).sum(dim=-1)
    return {"loss": per_sample.mean(), "per_sample": per_sample, "importance": importance, "load": load}
