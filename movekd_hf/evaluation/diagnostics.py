"""Vision-side diagnostics: how close the student's tokens are to each adapted teacher's, and linear probes on
frozen features."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def teacher_fidelity(
    student: torch.Tensor, teachers: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-teacher agreement of the student's tokens with the teacher's adapted tokens.

    Args:
        student: [B, N, D] student tokens (hidden state -2, CLS dropped).
        teachers: {name: [B, N, D]} adapted teacher tokens on the same images.
    Returns:
        {name: {"cosine": mean token cosine similarity, "mse": mean squared error}}, scalar tensors.
    """
    if student.dim() != 3:
        raise ValueError(f"student tokens must be [B, N, D], got shape {tuple(student.shape)}")
    result = {}
    for name, tokens in teachers.items():
        if tokens.shape != student.shape:
            raise ValueError(
                f"teacher {name!r} tokens have shape {tuple(tokens.shape)}, expected {tuple(student.shape)}"
            )
        tokens = tokens.to(student.dtype)
        cosine = F.cosine_similarity(student, tokens, dim=-1)  # [B, N]
        result[name] = {"cosine": cosine.mean(), "mse": (student - tokens).pow(2).mean()}
    return result


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    steps: int = 50,
) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on frozen features, fitted with L-BFGS (full batch).

    Args:
        features: [M, D] frozen features (standardised inside with the training statistics).
        labels: [M] integer classes.
    Returns:
        {"weight": [C, D], "bias": [C], "mean": [D], "std": [D], "train_accuracy": scalar}.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be [M, D] and labels [M], got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    num_classes = num_classes or int(labels.max()) + 1
    features = features.detach().float()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)  # [D], [D]
    x = (features - mean) / std  # [M, D]
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)  # [C, D]
    bias = torch.zeros(num_classes, requires_grad=True)  # [C]
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    probe = {"weight": weight.detach(), "bias": bias.detach(), "mean": mean, "std": std}
    probe["train_accuracy"] = probe_accuracy(probe, features, labels)
    return probe


def probe_accuracy(probe: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy in [0, 1] of a fitted probe on features [M, D] with labels [M]."""
    x = (features.detach().float() - probe["mean"]) / probe["std"]  # [M, D]
    predicted = (x @ probe["weight"].T + probe["bias"]).argmax(-1)  # [M]
    return (predicted == labels).float().mean()


def linear_probe_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Fit on the training features, report {"train_accuracy", "test_accuracy"}."""
    probe = fit_linear_probe(train_features, train_labels)
    return {
        "train_accuracy": probe["train_accuracy"],
        "test_accuracy": probe_accuracy(probe, test_features, test_labels),
    }


@torch.no_grad()
def student_teacher_fidelity(
    model: torch.nn.Module, pixel_values: torch.Tensor, adapted_teachers: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Run the student's vision tower on held-out images and compare with adapted teacher tokens.

    `model` is a MoVE-KD / LLaVA model; the student tokens are the vision tower's hidden state at
    `config.vision_feature_layer` with CLS dropped. Teacher tokens come from the distillation side
    (teachers + trained adapters), computed by the caller on the same images.
    """
    tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    layer = model.config.vision_feature_layer
    hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states[layer][:, 1:]  # [B, N, D]
    scores = teacher_fidelity(hidden, adapted_teachers)
    return {name: {k: float(v) for k, v in values.items()} for name, values in scores.items()}
