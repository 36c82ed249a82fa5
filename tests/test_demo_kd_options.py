"""The KD-loss options the demo's arms use, each on a hand-computed case: `teacher_loss_scale` (a stronger lambda
for one teacher), `anchor_weight` (the clip anchor's share) and `standardize_features` (per-teacher
standardisation), and the demo arms built from them (faithful plus one named option each)."""

from __future__ import annotations

import pytest
import torch

from movekd_hf.distill.distiller import MoVEKDDistiller, TeacherShape
from movekd_hf.distill.losses import KDLossConfig, cls_similarity_teacher_weights, kd_total, teacher_loss_scales
from movekd_hf.distill.teachers import TeacherOutput

SHAPES = {"clip": TeacherShape(4, 4), "convnext": TeacherShape(3, 4)}


def _outputs(seed: int = 0) -> dict[str, TeacherOutput]:
    g = torch.Generator().manual_seed(seed)
    clip = TeacherOutput(torch.randn(2, 4, 4, generator=g), (2, 2), torch.randn(2, 4, generator=g),
                         torch.rand(2, 4, generator=g) / 4)  # fmt: skip
    return {"clip": clip, "convnext": TeacherOutput(torch.randn(2, 4, 3, generator=g) * 5 + 2, (2, 2))}


def _distiller(**options) -> MoVEKDDistiller:
    torch.manual_seed(0)
    return MoVEKDDistiller(SHAPES, 4, 4, KDLossConfig.from_preset("faithful", **options))


def test_teacher_loss_scale_by_hand():
    per_teacher = torch.tensor([[1.0, 2.0]])  # L_clip, L_convnext
    weights = torch.tensor([[0.8, 0.2]])
    scales = teacher_loss_scales(["clip", "convnext"], {"convnext": 4.0}, per_teacher)
    assert scales.tolist() == [1.0, 4.0]
    assert kd_total(per_teacher * scales, weights)["loss"].item() == pytest.approx(0.8 * 1.0 + 0.2 * 4.0 * 2.0)
    with pytest.raises(ValueError, match="not among the teachers"):
        teacher_loss_scales(["clip"], {"sam": 2.0}, per_teacher)
    with pytest.raises(ValueError, match="positive"):
        KDLossConfig(teacher_loss_scale={"convnext": 0.0})
    with pytest.raises(ValueError, match="movekd"):
        KDLossConfig.from_preset("mse_baseline", teacher_loss_scale={"convnext": 2.0})


def test_teacher_loss_scale_in_the_distiller_changes_only_that_teachers_term():
    student = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    plain = _distiller()(student, (2, 2), _outputs())
    scaled = _distiller(teacher_loss_scale={"convnext": 4.0})(student, (2, 2), _outputs())
    torch.testing.assert_close(scaled["per_teacher_loss"], plain["per_teacher_loss"])  # logged L_t unscaled
    torch.testing.assert_close(scaled["teacher_weights"], plain["teacher_weights"])  # a_t unchanged
    a, loss = plain["teacher_weights"], plain["per_teacher_loss"]
    expected = (a[:, 0] * loss[:, 0] + 4.0 * a[:, 1] * loss[:, 1]).mean()
    torch.testing.assert_close(scaled["loss"], expected)
    assert KDLossConfig.from_preset("faithful").teacher_loss_scale == {}  # the authors' loss is untouched


def test_anchor_weight_by_hand():
    cls = torch.tensor([[1.0, 0.0]])
    tokens = {"clip": torch.zeros(1, 2, 2), "convnext": torch.ones(1, 2, 2), "sam": torch.zeros(1, 2, 2)}
    weights = cls_similarity_teacher_weights(cls, tokens, "clip", anchor_weight=0.4)["weights"]
    # z_convnext = 1, z_sam = 0: shares softmax([1, 0]) = [e / (e + 1), 1 / (e + 1)], max 0.73 < 0.8 (no re-softmax)
    e = torch.e
    assert weights[0].tolist() == pytest.approx([0.4, 0.6 * e / (e + 1), 0.6 / (e + 1)])


def test_standardize_features_by_hand():
    distiller = _distiller(standardize_features=True).train()
    outputs = _outputs()
    tokens = outputs["convnext"].tokens
    student = torch.zeros(2, 4, 4)
    distiller(student, (2, 2), outputs)  # the first training batch sets the statistics outright
    standardizer = distiller.standardizers["convnext"]
    flat = tokens.reshape(-1, 3)
    torch.testing.assert_close(standardizer.running_mean, flat.mean(0))
    torch.testing.assert_close(standardizer.running_var, flat.var(0, unbiased=False))
    standardized = standardizer.eval()(tokens)
    torch.testing.assert_close(standardized.reshape(-1, 3).mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert "clip" not in distiller.standardizers  # the anchor is compared raw


def test_demo_arms_are_faithful_plus_one_named_option():
    from movekd_hf.demo.arms import ARMS, BASELINE_ARM

    faithful = KDLossConfig.from_preset("faithful").to_dict()
    changed = {}
    for arm in ARMS:
        if arm.name == BASELINE_ARM:
            assert arm.loss_config() is None
            continue
        config = arm.loss_config().to_dict()
        changed[arm.name] = {k for k in faithful if config[k] != faithful[k]}
    assert changed == {"faithful": set(), "anchor_0.4": {"anchor_weight"}, "standardized": {"standardize_features"},
                       "gap_x4": {"teacher_loss_scale"}}  # fmt: skip
