"""Pure loss functions: small cases computed by hand, and the identities METHOD.md section 4 implies."""

from __future__ import annotations

import math

import pytest
import torch

from movekd_hf.distill.losses import (
    KDLossConfig,
    apply_teacher_dropout,
    cls_similarity_teacher_weights,
    equal_teacher_weights,
    kd_total,
    mole_balance_loss,
    mse_baseline_loss,
    resample_token_weights,
    sample_teacher_keep_mask,
    teacher_token_loss,
    token_weights_from_cls_attention,
)


def test_token_weights_are_a_second_softmax_by_hand():
    attention = torch.tensor([[0.0, math.log(3.0)]])
    torch.testing.assert_close(
        token_weights_from_cls_attention(attention)["token_weights"], torch.tensor([[0.25, 0.75]])
    )


def test_teacher_token_loss_by_hand():
    student = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [3.0, -3.0]]])  # per-token losses 1 and 9
    out = teacher_token_loss(student, target, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(out["per_token"], torch.tensor([[1.0, 9.0]]))
    torch.testing.assert_close(out["mean_term"], torch.tensor([5.0]))
    torch.testing.assert_close(out["weighted_term"], torch.tensor([7.0]))  # 0.25 + 6.75
    torch.testing.assert_close(out["loss"], torch.tensor([12.0]))
    torch.testing.assert_close(teacher_token_loss(student, target)["loss"], torch.tensor([5.0]))


def test_identical_tokens_give_zero_loss():
    tokens = torch.randn(3, 16, 32)
    weights = torch.rand(3, 16).softmax(-1)
    per_teacher = torch.stack([teacher_token_loss(tokens, tokens.clone(), weights)["loss"]] * 2, dim=1)
    assert kd_total(per_teacher, torch.full((3, 2), 0.5))["loss"] == 0


def test_uniform_token_weights_reduce_to_the_plain_mean():
    student, target = torch.randn(2, 9, 5), torch.randn(2, 9, 5)
    out = teacher_token_loss(student, target, torch.full((2, 9), 1 / 9))
    torch.testing.assert_close(out["weighted_term"], out["mean_term"])
    torch.testing.assert_close(out["mean_term"], ((student - target) ** 2).mean(dim=(1, 2)))


def _tokens_with_score(score: float) -> torch.Tensor:
    """Tokens whose mean dot product with cls = [1, 0] is `score`."""
    return torch.tensor([[[score - 1.0, 7.0], [score + 1.0, -7.0]]])


def test_teacher_weights_by_hand_without_resoftmax():
    cls = torch.tensor([[1.0, 0.0]])
    tokens = {
        "clip": torch.zeros(1, 2, 2),
        "eva": _tokens_with_score(math.log(3.0)),
        "convnext": _tokens_with_score(0),
    }
    out = cls_similarity_teacher_weights(cls, tokens, anchor="clip", anchor_weight=0.8, resoftmax_threshold=0.8)
    torch.testing.assert_close(out["logits"], torch.tensor([[math.log(3.0), 0.0]]))
    assert not out["resoftmaxed"]
    torch.testing.assert_close(out["weights"], torch.tensor([[0.8, 0.15, 0.05]]))


def test_teacher_weights_by_hand_with_one_resoftmax():
    cls = torch.tensor([[1.0, 0.0]])
    tokens = {
        "clip": torch.zeros(1, 2, 2),
        "eva": _tokens_with_score(math.log(9.0)),
        "convnext": _tokens_with_score(0),
    }
    out = cls_similarity_teacher_weights(cls, tokens)
    assert out["resoftmaxed"]  # shares [0.9, 0.1], max 0.9 > 0.8
    first = 1 / (1 + math.exp(-0.8))  # softmax([0.9, 0.1])[0]
    torch.testing.assert_close(out["weights"], torch.tensor([[0.8, 0.2 * first, 0.2 * (1 - first)]]))


def test_resoftmax_is_decided_on_the_batch_mean():
    # Sample 0 alone would pass 0.8 (0.9), but the batch mean of the shares is 0.5: no re-softmax.
    cls = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    eva = torch.cat([_tokens_with_score(math.log(9.0)), _tokens_with_score(-math.log(9.0))])
    out = cls_similarity_teacher_weights(cls, {"eva": eva, "sam": torch.zeros(2, 2, 2)}, anchor="clip")
    assert not out["resoftmaxed"]
    torch.testing.assert_close(out["weights"], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


def test_teacher_weights_sum_to_one():
    cls = torch.randn(4, 8)
    tokens = {n: torch.randn(4, 6, 8) for n in ("clip", "eva", "convnext", "sam")}
    for anchor in ("clip", None):
        weights = cls_similarity_teacher_weights(cls, tokens, anchor=anchor)["weights"]
        torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    alone = cls_similarity_teacher_weights(cls, {"clip": tokens["clip"]})["weights"]
    torch.testing.assert_close(alone, torch.ones(4, 1))
    torch.testing.assert_close(equal_teacher_weights(4, 3, cls)["weights"].sum(-1), torch.ones(4))


def test_teacher_weights_carry_gradient_unless_detached():
    cls = torch.randn(2, 8)
    eva = torch.randn(2, 6, 8, requires_grad=True)
    tokens = {"clip": torch.randn(2, 6, 8), "eva": eva, "sam": torch.randn(2, 6, 8)}
    attached = cls_similarity_teacher_weights(cls, tokens, detach=False)["weights"]
    attached[:, 1].sum().backward()
    assert eva.grad is not None and eva.grad.abs().sum() > 0
    detached = cls_similarity_teacher_weights(cls, tokens, detach=True)["weights"]
    assert not detached.requires_grad
    torch.testing.assert_close(detached, attached.detach())  # same values, no gradient path


def test_kd_total_by_hand():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    out = kd_total(losses, weights)
    torch.testing.assert_close(out["per_sample"], torch.tensor([1.5, 3.75]))
    torch.testing.assert_close(out["loss"], torch.tensor(2.625))
    with pytest.raises(ValueError, match="differ"):
        kd_total(losses, weights[:, :1])


def test_teacher_dropout_renormalises_and_keeps_the_anchor():
    keep = sample_teacher_keep_mask(64, 4, 0.5, protected=[0], generator=torch.Generator().manual_seed(0))
    assert keep[:, 0].all() and not keep.all()
    weights = torch.tensor([0.8, 0.1, 0.05, 0.05]).expand(64, 4)
    out = apply_teacher_dropout(weights, keep)["weights"]
    torch.testing.assert_close(out.sum(-1), torch.ones(64))
    assert (out[~keep] == 0).all()
    # Without a protected column, a row that drops everything keeps everything.
    keep = sample_teacher_keep_mask(32, 3, 0.99, generator=torch.Generator().manual_seed(1))
    assert keep.any(dim=1).all()


def test_mse_baseline_by_hand_and_with_interpolation():
    student = torch.zeros(1, 4, 3)
    teachers = {"a": (torch.ones(1, 4, 3), (2, 2)), "b": (torch.full((1, 16, 3), 2.0), (4, 4))}
    out = mse_baseline_loss(student, (2, 2), teachers)
    torch.testing.assert_close(out["per_teacher"], torch.tensor([1.0, 4.0]))  # a constant map stays constant
    torch.testing.assert_close(out["loss"], torch.tensor(2.5))  # equal teacher weights


def test_resampled_token_weights_stay_a_distribution():
    weights = torch.rand(2, 16).softmax(-1)
    moved = resample_token_weights(weights, (4, 4), (8, 8))
    assert moved.shape == (2, 64) and (moved >= 0).all()
    torch.testing.assert_close(moved.sum(-1), torch.ones(2))


def test_balance_loss_by_hand():
    third = math.log(3.0)
    # One sample, two layers of two tokens, two experts. Layer 0 prefers expert 1 (p = 0.75) on both tokens;
    # layer 1 is uniform on one token (argmax picks expert 0) and prefers expert 0 (p = 0.75) on the other.
    layer0 = torch.tensor([[[0.0, third], [0.0, third]]])
    layer1 = torch.tensor([[[0.0, 0.0], [third, 0.0]]])
    out = mole_balance_loss((layer0, layer1))
    importance = torch.tensor([[(0.25 + 0.25 + 0.5 + 0.75) / 4, (0.75 + 0.75 + 0.5 + 0.25) / 4]])
    load = torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(out["importance"], importance)
    torch.testing.assert_close(out["load"], load)
    torch.testing.assert_close(out["loss"], (importance * load).sum())


def test_balance_loss_is_per_sample_then_batch_mean():
    logits = (torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    out = mole_balance_loss(logits)
    singles = torch.stack([mole_balance_loss((logits[0][i : i + 1], logits[1][i : i + 1]))["loss"] for i in range(3)])
    torch.testing.assert_close(out["per_sample"], singles)
    torch.testing.assert_close(out["loss"], singles.mean())
    # All tokens routed to one expert with certainty: sum_e mean(p_e) mean(onehot_e) = 1.
    certain = torch.zeros(2, 4, 3)
    certain[..., 1] = 50.0
    torch.testing.assert_close(mole_balance_loss((certain,))["loss"], torch.tensor(1.0))


def test_kd_loss_config_presets_and_errors():
    faithful = KDLossConfig.from_preset("faithful")
    assert (faithful.token_weighting, faithful.teacher_weighting, faithful.adapter) == (
        "cls_attention",
        "cls_similarity",
        "token_mix",
    )
    assert (faithful.anchor_weight, faithful.resoftmax_threshold, faithful.detach_teacher_weights) == (0.8, 0.8, False)
    assert not faithful.standardize_features and faithful.teacher_dropout == 0.0
    assert KDLossConfig().detach_teacher_weights
    improved = KDLossConfig.from_preset("improved")
    assert improved.standardize_features and improved.teacher_dropout > 0 and improved.adapter == "resample"
    baseline = KDLossConfig.from_preset("mse_baseline")
    assert (baseline.objective, baseline.token_weighting, baseline.teacher_weighting) == (
        "mse_baseline",
        "none",
        "equal",
    )
    with pytest.raises(ValueError, match="teacher_weighting"):
        KDLossConfig(teacher_weighting="learned")
    with pytest.raises(ValueError, match="teacher_dropout"):
        KDLossConfig(teacher_dropout=1.0)
    with pytest.raises(ValueError, match="student_head"):
        KDLossConfig(adapter="student_head")
    with pytest.raises(ValueError, match="unknown KD loss preset"):
        KDLossConfig.from_preset("paper")
