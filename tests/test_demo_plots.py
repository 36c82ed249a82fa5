"""Every demo figure says what it shows: axis labels with units on every visible axis, a legend wherever several
arms (or teachers, or experts) share an axis, labelled colour bars, and the run it shows in its title."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from movekd_hf.demo import plots

# As many arms as the demo has (5), so every line style is drawn.
ARMS = {"none": "LLaVA (no distillation)", "faithful": "MoVE-KD faithful", "anchor": "anchor 0.4",
        "standardised": "standardised", "gap_x4": "convnext loss x4", "extra": "a sixth arm"}  # fmt: skip


def history(offset: float) -> list[list[dict]]:
    """Two stages of logs as the Trainer writes them, with the MoVE-KD components."""
    stages = []
    for _stage in range(2):
        entries = []
        for step in range(1, 6):
            entry = {"step": step, "loss": 3.0 - 0.1 * step + offset, "lm_loss": 2.0 - 0.1 * step + offset,
                     "balance_loss": 1.0 + 0.01 * step, "mole/expert_0_tokens": 0.5, "mole/expert_1_tokens": 0.5}  # fmt: skip
            if offset:  # the KD arms
                entry.update({"kd_loss": 1.0 - 0.05 * step, "kd/clip_weight": 0.6, "kd/convnext_weight": 0.4})
            entries.append(entry)
        stages.append(entries)
    return stages


@pytest.fixture
def figures(monkeypatch):
    """The figures as `_save` receives them, before they are written and closed."""
    seen = []
    original = plots._save

    def keep(figure, plt, path, run=""):
        seen.append((figure, run))
        figure.canvas.draw()  # suptitle and legends laid out as in the file
        return original(figure, plt, path, run)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_every_figure_is_labelled(tmp_path, figures):
    histories = {arm: history(0.0 if arm == "none" else 0.2) for arm in ARMS}  # the KD arms' curves coincide
    run = "movekd-hf demo, run demo: training seed 0 of every arm"
    plots.plot_losses(histories, ARMS, str(tmp_path / "loss.png"), run)
    plots.plot_teacher_weights(histories, ARMS, str(tmp_path / "weights.png"), run)
    plots.plot_experts(np.full((2, 2), 0.5), histories, ARMS, str(tmp_path / "experts.png"), run)
    photo = np.zeros((32, 32, 3), dtype=np.uint8)
    plots.plot_cls_attention(photo, torch.rand(16), torch.rand(16), str(tmp_path / "cls.png"), run)
    assert len(figures) == 4 and all((tmp_path / name).is_file() for name in ("loss.png", "cls.png"))
    for figure, shown in figures:
        assert figure._suptitle is not None and figure._suptitle.get_text() == shown == run
        for axis in figure.axes:
            if axis.get_label() == "<colorbar>":
                assert axis.get_ylabel(), "a colour bar without a label"
                continue
            if not axis.axison:  # pictures (the photo and its overlays)
                continue
            if axis.lines or axis.images:
                assert axis.get_xlabel() and axis.get_ylabel(), f"unlabelled axis {axis.get_title()!r}"
            if len([line for line in axis.lines if not line.get_label().startswith("_")]) > 1:
                assert axis.get_legend() is not None, f"several curves, no legend: {axis.get_title()!r}"
    loss_axes = figures[0][0].axes
    faithful, anchor = (next(line for line in loss_axes[0].lines if line.get_label() == ARMS[a])
                        for a in ("faithful", "anchor"))  # fmt: skip
    # Identical curves: told apart by style and marker, not hidden under each other.
    assert (faithful.get_linestyle(), faithful.get_marker()) != (anchor.get_linestyle(), anchor.get_marker())
    assert "nats" in loss_axes[0].get_ylabel()
