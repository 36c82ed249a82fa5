"""Never downcast: float64 inputs stay float64 through the loss (token and teacher weights, balance loss, CLS row,
standardiser, whole distiller), the cache writer and the trainer's metrics. `gradcheck` compares each analytic
gradient with float64 finite differences at 1e-6 steps, which a hidden float32 round trip (`.float()`) fails."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _distill_fixtures import NUM_STUDENT_TOKENS, STUDENT_DIM, STUDENT_GRID, images, tiny_spec
from torch.autograd import gradcheck

from movekd_hf.distill.cache import CacheSettings
from movekd_hf.distill.cache_writer import TeacherCacheWriter, stored_rows
from movekd_hf.distill.distiller import FeatureStandardizer, MoVEKDDistiller, TeacherShape
from movekd_hf.distill.losses import (
    KDLossConfig,
    cls_similarity_teacher_weights,
    mole_balance_loss,
    token_weights_from_cls_attention,
)
from movekd_hf.distill.teachers import TeacherOutput, build_teacher, cls_attention_row
from movekd_hf.training.trainer import MoVEKDTrainer

F64 = torch.float64


def rand(*shape: int, seed: int = 0, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(grad)


def test_token_weights_stay_float64_with_exact_gradients():
    attention = (rand(2, 16).abs() / 16).detach().requires_grad_()
    assert token_weights_from_cls_attention(attention)["token_weights"].dtype == F64
    assert gradcheck(lambda a: token_weights_from_cls_attention(a)["token_weights"], (attention,))


@pytest.mark.parametrize("resoftmax_threshold", [0.8, 0.0], ids=["plain", "resoftmaxed"])
def test_teacher_weights_stay_float64_with_exact_gradients(resoftmax_threshold):
    cls, eva, sam = rand(2, 4, seed=1), rand(2, 3, 4, seed=2), rand(2, 3, 4, seed=3)
    clip = rand(2, 3, 4, seed=4, grad=False)

    def weights(cls, eva, sam):
        tokens = {"clip": clip, "eva": eva, "sam": sam}
        return cls_similarity_teacher_weights(cls, tokens, resoftmax_threshold=resoftmax_threshold)["weights"]

    out = weights(cls, eva, sam)
    assert out.dtype == F64 and out[:, 0].eq(0.8).all()  # 0.8 exactly as a float64, not float32's 0.800000011920929
    assert gradcheck(weights, (cls, eva, sam))


def test_balance_loss_stays_float64_with_exact_gradients():
    layers = (rand(2, 5, 3, seed=5), rand(2, 5, 3, seed=6))
    out = mole_balance_loss(layers)
    assert all(value.dtype == F64 for value in out.values())
    assert gradcheck(lambda *logits: mole_balance_loss(logits)["loss"], layers)


def test_cls_attention_row_stays_float64_with_exact_gradients():
    torch.manual_seed(0)
    # What the row reads of an attention module: q/k projections, heads and scale (2 heads of 4 channels here).
    attention = SimpleNamespace(
        q_proj=torch.nn.Linear(8, 8, dtype=F64), k_proj=torch.nn.Linear(8, 8, dtype=F64), num_heads=2, head_dim=4
    )
    attention.scale = attention.head_dim**-0.5
    normed = rand(2, 5, 8, seed=7)  # CLS + 4 patches
    assert cls_attention_row(normed, attention).dtype == F64
    assert gradcheck(lambda x: cls_attention_row(x, attention), (normed,))
    clip = build_teacher(tiny_spec("clip")).double()
    assert clip(images().double()).cls_attention.dtype == F64  # and through a real teacher's forward


def test_standardizer_keeps_float64_statistics_and_gradients():
    tokens = rand(2, 6, 5, seed=8, grad=False) * 3 + 1
    standardizer = FeatureStandardizer(5, momentum=0.5).double().train()
    standardizer(tokens)  # the first batch sets the statistics outright
    flat = tokens.reshape(-1, 5)
    assert torch.equal(standardizer.running_mean, flat.mean(0))  # a float32 round trip would not be equal
    assert torch.equal(standardizer.running_var, flat.var(0, unbiased=False))
    standardizer.eval()
    assert standardizer(tokens).dtype == F64
    assert gradcheck(standardizer, (tokens.clone().requires_grad_(),))


@pytest.mark.parametrize("preset", ["faithful", "improved"])
def test_distiller_loss_stays_float64_with_exact_gradients(preset):
    # Two non-anchor teachers, so their weights (a softmax between them) depend on the adapted tokens; attached
    # weights (as in the faithful preset), so autograd's gradient is the one finite differences see.
    shapes = {"clip": TeacherShape(STUDENT_DIM, NUM_STUDENT_TOKENS), "eva": TeacherShape(24, 4)}
    shapes["convnext"] = TeacherShape(40, 4)
    config = KDLossConfig.from_preset(preset, detach_teacher_weights=False)
    torch.manual_seed(0)
    distiller = MoVEKDDistiller(shapes, STUDENT_DIM, NUM_STUDENT_TOKENS, config)
    distiller = distiller.double().eval()  # eval: no teacher dropout, fixed standardiser statistics
    clip = TeacherOutput(tokens=rand(1, 16, STUDENT_DIM, seed=9, grad=False), grid=STUDENT_GRID)
    clip.cls, clip.cls_attention = rand(1, STUDENT_DIM, seed=10, grad=False), rand(1, 16, seed=11, grad=False) / 16
    eva = TeacherOutput(tokens=rand(1, 4, 24, seed=12, grad=False), grid=(2, 2))
    student, convnext = rand(1, 16, STUDENT_DIM, seed=13), rand(1, 4, 40, seed=14)

    def run(student, convnext):
        outputs = {"clip": clip, "eva": eva, "convnext": TeacherOutput(convnext, (2, 2))}
        return distiller(student, STUDENT_GRID, outputs)

    out = run(student, convnext)
    assert out["loss"].dtype == out["teacher_weights"].dtype == out["token_weights"].dtype == F64
    assert gradcheck(lambda *inputs: run(*inputs)["loss"], (student, convnext))


def test_cache_writer_computes_in_float64_and_rounds_once_on_storing(tmp_path):
    torch.manual_seed(0)
    teacher = build_teacher(tiny_spec("clip")).double()
    output = teacher(images().double())
    settings = CacheSettings(student_grid=STUDENT_GRID, teacher_image_size=32, compress={"clip": 8})
    rows = stored_rows(output, settings, codec=None)
    assert rows["cls"].dtype == rows["cls_attention"].dtype == np.float64  # float32 only in the Arrow column
    writer = TeacherCacheWriter(tmp_path, teacher, settings)
    writer.add([("a", 0), ("b", 0)], output)
    writer.flush()
    tokens, projection = output.tokens, writer.projection.double()
    kept = (tokens @ projection).square().sum().item() / tokens.square().sum().item()
    assert writer.meta["energy_kept_fraction"] == pytest.approx(kept, rel=1e-12, abs=0)


def test_trainer_metrics_keep_float64_values():
    third = torch.tensor(1 / 3, dtype=F64)  # not a float32 number: a round trip through float32 changes it
    per_teacher = torch.tensor([[1 / 3, 2 / 3], [1 / 7, 5 / 7]], dtype=F64)
    weights = torch.tensor([[0.8, 0.2], [0.8, 0.2]], dtype=F64)
    out = {
        "lm_loss": third,
        "kd": {"loss": third / 2, "per_teacher_loss": per_teacher, "teacher_weights": weights},
        "balance": mole_balance_loss((rand(2, 5, 3, seed=14, grad=False),)),
        "num_images": 2,
    }
    fake = SimpleNamespace(_metrics=defaultdict(list), model=SimpleNamespace(distiller=SimpleNamespace()))
    fake.model.distiller.teacher_names = ["clip", "eva"]
    MoVEKDTrainer._record(fake, out, labels=None, num_items_in_batch=None)
    assert fake._metrics["lm_loss"] == [1 / 3]
    assert fake._metrics["kd/eva_loss"] == [(2 / 3 + 5 / 7) / 2]
    assert fake._metrics["kd/clip_weight"] == [0.8] and fake._metrics["kd/eva_weight"] == [0.2]
    assert math.isclose(sum(fake._metrics[f"mole/expert_{e}_tokens"][0] for e in range(3)), 1.0, rel_tol=1e-15)
