"""The demo's figures (matplotlib, Agg backend, PNG): loss components, teacher weights and expert use over the
training steps of every arm, expert use per layer on held-out images, and the `clip` teacher's CLS-attention
token weights over a real photo."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

LOSS_KEYS = ("lm_loss", "kd_loss", "balance_loss")
# y-axis label per logged loss, with its unit.
LOSS_UNITS = {
    "lm_loss": "LM loss (cross-entropy, nats per answer token)",
    "kd_loss": "KD loss (weighted MSE per token, teacher units)",
    "balance_loss": "balance loss (MoLE load balance, unitless)",
}
# Arms share an axis: each gets a line style and a marker too, so a curve lying on another stays visible.
ARM_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (1, 1)))
ARM_MARKERS = ("o", "s", "^", "v", "D", "x")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(histories: Sequence[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """(step, value) of `key` over consecutive stages; stage k's steps continue after stage k-1's last step."""
    steps, values, offset = [], [], 0
    for history in histories:
        last = 0
        for entry in history:
            if key in entry and "step" in entry:
                steps.append(offset + entry["step"])
                values.append(float(entry[key]))
            last = max(last, entry.get("step", 0))
        offset += last
    return steps, values


def plot_losses(
    histories: Mapping[str, Sequence[list[dict]]], labels: Mapping[str, str], path: str, run: str = ""
) -> str:
    """One panel per loss component (LM, KD, balance), one line per arm (its own colour, style and marker, and a
    legend in every panel), stage 2 continuing after stage 1 (dotted line). `run` names what the figure shows."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(LOSS_KEYS), figsize=(4.6 * len(LOSS_KEYS), 3.8))
    for axis, key in zip(axes, LOSS_KEYS):
        for index, (arm, stages) in enumerate(histories.items()):
            steps, values = series(stages, key)
            if steps:  # one colour per arm in every panel, even where an arm logs nothing
                axis.plot(steps, values, color=f"C{index}", label=labels[arm], linewidth=1.2,
                          linestyle=ARM_STYLES[index % len(ARM_STYLES)], marker=ARM_MARKERS[index % len(ARM_MARKERS)],
                          markersize=3, markevery=max(1, len(steps) // 8))  # fmt: skip
        stage_one = series(next(iter(histories.values()))[:1], "loss")[0]
        if stage_one:
            axis.axvline(stage_one[-1], color="grey", linestyle=":", linewidth=1, label="stage 1 | stage 2")
        axis.set_title(key.replace("_", " "))
        axis.set_xlabel("optimizer step (stage 1, then stage 2)")
        axis.set_ylabel(LOSS_UNITS[key], fontsize=8)
        if axis.lines:
            axis.legend(fontsize=6)
    return _save(figure, plt, path, run)


def plot_teacher_weights(
    histories: Mapping[str, Sequence[list[dict]]], labels: Mapping[str, str], path: str, run: str = ""
) -> str:
    """Mean teacher weight a_t per logging window for every arm that logs them (the CLS-similarity arms)."""
    plt = _pyplot()
    arms = {arm: stages for arm, stages in histories.items() if series(stages, "kd/clip_weight")[0]}
    figure, axes = plt.subplots(1, max(1, len(arms)), figsize=(4.5 * max(1, len(arms)), 3.4), squeeze=False)
    for axis, (arm, stages) in zip(axes[0], arms.items()):
        keys = sorted({k for h in stages for e in h for k in e if k.startswith("kd/") and k.endswith("_weight")})
        for key in keys:
            axis.plot(*series(stages, key), label=key[3:-7], linewidth=1.2)
        axis.set_title(labels[arm], fontsize=9)
        axis.set_xlabel("optimizer step (stage 1, then stage 2)")
        axis.set_ylabel("teacher weight a_t (fraction; sums to 1)", fontsize=8)
        axis.set_ylim(0, 1)
        axis.legend(fontsize=7, title="teacher", title_fontsize=7)
    return _save(figure, plt, path, run)


def plot_experts(
    per_layer: np.ndarray,
    histories: Mapping[str, Sequence[list[dict]]],
    labels: Mapping[str, str],
    path: str,
    run: str = "",
) -> str:
    """Left: share of held-out image tokens routed to each expert, per encoder layer (final model). Right: the
    logged share per expert over training, one line style per arm."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    image = left.imshow(per_layer, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    left.set_xticks(range(per_layer.shape[1]))
    left.set_yticks(range(per_layer.shape[0]))
    left.set_xlabel("expert")
    left.set_ylabel("encoder layer")
    left.set_title("tokens per expert, held-out images")
    for (row, col), value in np.ndenumerate(per_layer):
        left.text(col, row, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=left, label="fraction of image tokens")
    for style, (arm, stages) in zip(ARM_STYLES, histories.items()):
        for expert in range(per_layer.shape[1]):
            steps, values = series(stages, f"mole/expert_{expert}_tokens")
            right.plot(steps, values, linestyle=style, color=f"C{expert}", linewidth=1,
                       label=f"{labels[arm]}, expert {expert}")  # fmt: skip
    right.set_title("token share per expert during training")
    right.set_xlabel("optimizer step (stage 1, then stage 2)")
    right.set_ylabel("fraction of image tokens")
    right.legend(fontsize=5, ncol=2)
    return _save(figure, plt, path, run)


def plot_cls_attention(
    photo: np.ndarray, cls_attention: torch.Tensor, token_weights: torch.Tensor, path: str, run: str = ""
) -> str:
    """The photo, and the CLS-attention row and the resulting token weights w (METHOD.md section 4) upsampled
    over it. cls_attention, token_weights: [N] on a square grid."""
    plt = _pyplot()
    side = int(round(cls_attention.numel() ** 0.5))
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    axes[0].imshow(photo)
    axes[0].set_title("input (skimage astronaut)")
    height, width = photo.shape[:2]
    for axis, values, title, unit in (
        (axes[1], cls_attention, "CLS attention (clip teacher, layer -2)", "attention probability"),
        (axes[2], token_weights, "token weights w = softmax(attention)", "token weight (sums to 1)"),
    ):
        grid = values.detach().float().reshape(side, side).numpy()
        axis.imshow(photo)
        overlay = axis.imshow(grid, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
        figure.colorbar(overlay, ax=axis, fraction=0.046, label=unit)
        axis.set_title(title, fontsize=9)
    for axis in axes:
        axis.axis("off")
    return _save(figure, plt, path, run)


def _save(figure, plt, path: str, run: str = "") -> str:
    """Write the figure as PNG, titled with the run it shows."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if run:
        figure.suptitle(run, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
