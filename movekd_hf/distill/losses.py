"""The MoVE-KD distillation loss (METHOD.md section 4) as pure functions, plus its options.

Each function takes tensors, returns a dict of named components, and holds no state: no config objects, no
`.item()`, no logging. `KDLossConfig` names the options; `MoVEKDDistiller` (distiller.py) wires them together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from ..modeling.llava_conventions import resample_tokens
from ..modeling.mole import upcast
from .adapters import ADAPTER_KINDS

# ------------------------------------------------------------------------------------------------- options

TOKEN_WEIGHTINGS = ("cls_attention", "pool_attention", "uniform", "none")
TEACHER_WEIGHTINGS = ("cls_similarity", "equal")
OBJECTIVES = ("movekd", "mse_baseline")
FEATURE_STANDARDIZATIONS = ("none", "running", "phi_s")
TOKEN_LOSSES = ("mse", "cosine_smooth_l1")
TEACHER_DROPOUT_MODES = ("random", "lowest_loss")
ANCHOR_SUMMARIES = ("cls", "pooled", "mean_token")
# Options the `mse_baseline` objective (plain MSE, equal weights) has no place for, with their neutral values.
MOVEKD_ONLY = {"token_loss": "mse", "summary_loss_weight": 0.0, "teacher_dropout_mode": "random"}


@dataclass
class KDLossConfig:
    """Options of the distillation loss. Faithful values (METHOD.md sections 4 and 6) are noted per field.

    token_weighting: "cls_attention" (faithful: L_t = mean_j l + sum_j w_j l_j, w = softmax of the anchor's CLS
        attention row), "pool_attention" (the same with the anchor's attention-pooling probe row
        `TeacherOutput.pool_attention`, for towers without CLS such as SigLIP), "uniform" (w_j = 1/N, so
        L_t = 2 mean_j l_j, the faithful scale with no attention) or "none" (L_t = mean_j l_j).
    teacher_weighting: "cls_similarity" (faithful: anchor gets `anchor_weight`, the others share the rest by
        softmax of mean_j s . T_t[j], s the anchor summary of `anchor_summary`, re-softmaxed once past
        `resoftmax_threshold`) or "equal".
    anchor_summary: the vector s of cls_similarity: "cls" (faithful: the anchor's CLS token), "pooled" (its
        attention-pooling head's output `TeacherOutput.pooled`) or "mean_token" (the mean of its patch tokens).
    detach_teacher_weights: faithful False (the weights carry gradient into the adapters); True stops the
        adapters from shrinking a teacher's weight instead of matching it.
    feature_standardization: how each non-anchor teacher's raw tokens are standardised before its adapter:
        "none" (faithful), "running" (per-channel running mean/variance, as UNIC and DUNE do; `FeatureStandardizer`)
        or "phi_s" (RADIO's PHI-S: Hadamard-rotated isotropic standardisation, every channel unit variance, from
        statistics of a calibration pass over the first `phi_s_calibration_batches` training batches before step 1,
        saved with the adapters; phi_s.py). Either way a teacher's feature scale no longer sets its loss size.
    standardize_features: the older switch for running statistics, kept so saved configs and the demo's arms
        load: True means "running" (with feature_standardization left at "none" or "running"). The property
        `standardization` is the one in effect.
    phi_s_calibration_batches: K, the training batches (per process) the PHI-S statistics come from (default 16).
    token_loss: the per-token loss l_t[j]: "mse" (faithful: mean_c (S - T)^2) or "cosine_smooth_l1"
        (cosine_weight (1 - cos(S_j, T_j)) + smooth_l1_weight mean_c smoothL1_beta(S - T), as AM-RADIO, Theia and
        UNIC match features; defaults 0.9 / 0.1 / beta 1 are AM-RADIO's and Theia's, UNIC uses 0.5 / 0.5). Token
        and teacher weights apply to it exactly as to MSE.
    teacher_dropout: faithful 0.0; the probability p of dropping a non-anchor teacher per sample in training,
        the remaining weights renormalised to sum to one per sample.
    teacher_dropout_mode: "random" (each non-anchor teacher dropped with probability p) or "lowest_loss" (UNIC's
        teacher dropping, Sariyildiz et al. ECCV 2024, naver/unic `modeling/teacher_dropping.py`: per sample the
        teacher with the highest loss L_t is always kept and every other one is dropped with probability p, so
        the teachers already matched well are the ones left out). The anchor is never dropped in either mode.
    summary_loss_weight: faithful 0.0; weight of a summary loss added to L_kd: for every teacher whose output has
        `pooled` (preferred) or `cls`, a linear summary adapter maps the mean of the student's patch tokens
        to that teacher's width and L_sum = mean_b mean_t (1 - cos), the cosine distance AM-RADIO uses for
        summary tokens. Needs at least one teacher with a summary (TeacherShape.has_summary).
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
    feature_standardization: str = "none"
    phi_s_calibration_batches: int = 16
    token_loss: str = "mse"
    cosine_weight: float = 0.9
    smooth_l1_weight: float = 0.1
    smooth_l1_beta: float = 1.0
    teacher_dropout_mode: str = "random"
    summary_loss_weight: float = 0.0
    anchor_summary: str = "cls"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("token_weighting", TOKEN_WEIGHTINGS),
            ("teacher_weighting", TEACHER_WEIGHTINGS),
            ("objective", OBJECTIVES),
            ("adapter", ADAPTER_KINDS),
            ("feature_standardization", FEATURE_STANDARDIZATIONS),
            ("token_loss", TOKEN_LOSSES),
            ("teacher_dropout_mode", TEACHER_DROPOUT_MODES),
            ("anchor_summary", ANCHOR_SUMMARIES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"KDLossConfig.{name} is {getattr(self, name)!r}; expected one of {allowed}")
        if self.standardize_features and self.feature_standardization not in ("none", "running"):
            raise ValueError(
                f"KDLossConfig: standardize_features=True (running statistics) contradicts "
                f"feature_standardization={self.feature_standardization!r}; set feature_standardization alone"
            )
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
        self._check_new_options()

    @property
    def standardization(self) -> str:
        """The feature standardisation in effect: `feature_standardization`, or "running" for the old
        `standardize_features=True`."""
        return "running" if self.standardize_features else self.feature_standardization

    def _check_new_options(self) -> None:
        for name in ("cosine_weight", "smooth_l1_weight", "summary_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
                raise ValueError(f"KDLossConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.token_loss == "cosine_smooth_l1" and self.cosine_weight + self.smooth_l1_weight == 0:
            raise ValueError("KDLossConfig: token_loss='cosine_smooth_l1' needs cosine_weight or smooth_l1_weight > 0")
        if not self.smooth_l1_beta > 0:
            raise ValueError(f"KDLossConfig.smooth_l1_beta must be > 0, got {self.smooth_l1_beta!r}")
        calibration = self.phi_s_calibration_batches
        if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
            raise ValueError(f"KDLossConfig.phi_s_calibration_batches must be an integer >= 1, got {calibration!r}")
        if self.objective != "movekd":
            changed = [name for name, neutral in MOVEKD_ONLY.items() if getattr(self, name) != neutral]
            if changed:
                raise ValueError(f"KDLossConfig: {changed} apply to objective='movekd' only")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> KDLossConfig:
        """The preset `name` with `overrides` (KDLossConfig field -> value). Raises ValueError for an unknown
        preset or field, or a bad value. Giving one of standardize_features / feature_standardization replaces
        the preset's value of the other (they name one choice)."""
        if name not in KD_LOSS_PRESETS:
            raise ValueError(f"unknown KD loss preset {name!r}; expected one of {sorted(KD_LOSS_PRESETS)}")
        preset = KD_LOSS_PRESETS[name]
        unknown = sorted(set(overrides) - set(KD_LOSS_FIELDS))
        if unknown:
            raise ValueError(f"unknown KDLossConfig option(s) {unknown}; expected among {list(KD_LOSS_FIELDS)}")
        overrides = dict(overrides)
        if "feature_standardization" in overrides and "standardize_features" not in overrides:
            overrides["standardize_features"] = False
        elif "standardize_features" in overrides and "feature_standardization" not in overrides:
            overrides["feature_standardization"] = "none"
        return replace(preset, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


KD_LOSS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(KDLossConfig))

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


def per_token_cosine_smooth_l1(
    student: torch.Tensor,
    target: torch.Tensor,
    cosine_weight: float = 0.9,
    smooth_l1_weight: float = 0.1,
    beta: float = 1.0,
) -> torch.Tensor:
    """l[b, j] = cosine_weight (1 - cos(student[b, j], target[b, j])) + smooth_l1_weight mean_c smoothL1_beta(
    student[b, j, c] - target[b, j, c]). [B, N, D] x [B, N, D] -> [B, N].

    The feature-matching loss of AM-RADIO (Ranzinger et al., CVPR 2024, arXiv 2312.06709, section 3: alpha 0.9
    cosine + beta 0.1 smooth-L1), Theia (Shang et al., CoRL 2024: bdaiinstitute/theia train_rvfm.py, 0.9 cosine +
    0.1 smooth-L1, its cosine over the whole flattened map) and UNIC (naver/unic modeling/losses.py: 0.5 + 0.5, per
    token, smooth-L1 beta 1 averaged over channels). smoothL1_beta(d) = d^2 / (2 beta) for |d| < beta, else
    |d| - beta / 2 (torch's `smooth_l1_loss`). The cosine of a zero vector counts as 0.
    """
    if student.shape != target.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and target tokens {tuple(target.shape)} differ")
    cosine = 1.0 - F.cosine_similarity(student, target, dim=-1, eps=1e-8)
    smooth = F.smooth_l1_loss(student, target, reduction="none", beta=beta).mean(dim=-1)
    return cosine_weight * cosine + smooth_l1_weight * smooth


def teacher_token_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    per_token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_token_mse,
) -> dict[str, torch.Tensor]:
    """Per-teacher loss L_t = mean_j l[j] + sum_j w[j] l[j] for each sample.

    student, target [B, N, D]; token_weights [B, N] (rows sum to 1) or None (the weighted term is dropped);
    per_token_loss: (student, target) -> l [B, N], `per_token_mse` (faithful) or e.g. `per_token_cosine_smooth_l1`.
    Returns {"per_token": [B, N], "mean_term": [B], "weighted_term": [B], "loss": [B]}.
    """
    per_token = per_token_loss(student, target)
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


def uniform_token_weights(batch_size: int, num_tokens: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """w_j = 1 / N for every token: {"token_weights": [B, N]} in `like`'s dtype (at least float32) and device.
    With them L_t = mean_j l + sum_j l / N = 2 mean_j l, the faithful loss's scale without attention."""
    dtype = upcast(like.new_zeros(())).dtype
    return {"token_weights": like.new_full((batch_size, num_tokens), 1.0 / num_tokens, dtype=dtype)}


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


def lowest_loss_keep_mask(
    per_teacher_loss: torch.Tensor,
    drop_probability: float,
    protected: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UNIC's teacher dropping (Sariyildiz et al., ECCV 2024; naver/unic `modeling/teacher_dropping.py`): keep
    mask [B, T] (True = keep) where, per sample, the teacher with the highest loss is always kept and every other
    teacher is dropped with probability `drop_probability` (one uniform draw per entry, as
    `sample_teacher_keep_mask` draws them). Columns in `protected` (the anchor) are always kept.

    per_teacher_loss [B, T] (read only, no gradient); ties go to the first column. Every row keeps >= 1 teacher.
    """
    batch, num = per_teacher_loss.shape
    draws = torch.rand(batch, num, generator=generator, device=per_teacher_loss.device)
    keep = draws >= drop_probability
    keep[torch.arange(batch, device=keep.device), per_teacher_loss.detach().argmax(dim=1)] = True
    if protected:
        keep[:, list(protected)] = True
    return keep


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


def anchor_summary_vector(
    kind: str, cls: torch.Tensor | None, pooled: torch.Tensor | None, tokens: torch.Tensor
) -> torch.Tensor | None:
    """The anchor summary s of `KDLossConfig.anchor_summary`: "cls" -> cls [B, D], "pooled" -> pooled [B, D],
    "mean_token" -> tokens [B, N, D] averaged over N. None when the anchor output lacks the one asked for."""
    if kind == "mean_token":
        return tokens.mean(dim=1)
    return {"cls": cls, "pooled": pooled}[kind]


def summary_cosine_loss(
    predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Summary loss L_sum = mean_b mean_t (1 - cos(p_t[b], z_t[b])), the cosine distance AM-RADIO uses for its
    summary (CLS) tokens (Ranzinger et al., CVPR 2024, section 3).

    predictions, targets: one [B, C_t] pair per teacher with a summary (the student summary after that teacher's
    summary adapter, and the teacher's pooled/CLS vector). Returns {"loss": [], "per_sample": [B],
    "per_teacher": [B, T_s]}.
    """
    if not predictions or len(predictions) != len(targets):
        raise ValueError(f"summary_cosine_loss needs matching non-empty lists, got {len(predictions)}, {len(targets)}")
    per_teacher = torch.stack(
        [1.0 - F.cosine_similarity(p, z.to(p.dtype), dim=-1, eps=1e-8) for p, z in zip(predictions, targets)], dim=1
    )
    per_sample = per_teacher.mean(dim=1)
    return {"loss": per_sample.mean(), "per_sample": per_sample, "per_teacher": per_teacher}


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
