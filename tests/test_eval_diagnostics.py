"""Vision-side diagnostics: per-teacher fidelity and the linear probe."""

import pytest
import torch
import torch.nn.functional as F

from movekd_hf.evaluation.diagnostics import linear_probe_accuracy, student_teacher_fidelity, teacher_fidelity
from movekd_hf.models import build_tiny_model


def test_fidelity_known_cases():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 37)  # [B, N, D]
    scores = teacher_fidelity(student, {"clip": student.clone(), "eva": -student, "sam": student + 0.5})
    assert scores["clip"]["cosine"] == pytest.approx(1.0, abs=1e-6) and scores["clip"]["mse"] == 0.0
    assert scores["eva"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert scores["eva"]["mse"] == pytest.approx(float((2 * student).pow(2).mean()), rel=1e-6)
    assert scores["sam"]["mse"] == pytest.approx(0.25, rel=1e-6)


def test_fidelity_independent_recomputation():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 24), torch.randn(3, 4, 24)
    got = teacher_fidelity(student, {"convnext": teacher})["convnext"]
    dots = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    assert got["cosine"] == pytest.approx(float(dots.mean()), rel=1e-5)
    assert got["mse"] == pytest.approx(float(F.mse_loss(student, teacher)), rel=1e-6)


def test_fidelity_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="teacher 'eva' tokens have shape"):
        teacher_fidelity(torch.zeros(1, 4, 8), {"eva": torch.zeros(1, 5, 8)})


def test_student_fidelity_on_the_tiny_model():
    model, _ = build_tiny_model(seed=0)
    pixels = torch.randn(2, 3, 32, 32)
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
    scores = student_teacher_fidelity(
        model, pixels, {"clip": hidden.detach().clone(), "eva": torch.zeros_like(hidden)}
    )
    assert hidden.shape == (2, 16, 32)  # 32 px / patch 8 = 4 x 4 tokens, width 32
    assert scores["clip"]["cosine"] == pytest.approx(1.0, abs=1e-5) and scores["clip"]["mse"] == pytest.approx(0.0)
    assert scores["eva"]["mse"] == pytest.approx(float(hidden.pow(2).mean()), rel=1e-5)


def test_linear_probe_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 40, generator=generator) * 4  # 3 classes, well apart

    def sample(n):
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 40, generator=generator), labels

    train, test = sample(90), sample(60)
    result = linear_probe_accuracy(*train, *test)
    assert result["train_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
    # Shuffled labels carry no signal: the held-out accuracy falls to about chance.
    shuffled = test[1][torch.randperm(60, generator=generator)]
    assert linear_probe_accuracy(*train, test[0], shuffled)["test_accuracy"] < 0.7
