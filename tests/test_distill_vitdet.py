"""The EVA-02 ViTDet backbone: its pieces behave as specified, and the authors' checkpoint layout loads."""

from __future__ import annotations

import pytest
import torch
from _distill_fixtures import TINY_EVA_CONFIG, images, tiny_spec

from movekd_hf.distill.teachers import build_teacher, prepare_images
from movekd_hf.distill.vitdet_eva import (
    EVA02ViTDet,
    EVA02ViTDetConfig,
    apply_rotary,
    load_eva02_det_state_dict,
    rotary_tables,
    window_partition,
    window_unpartition,
)


@pytest.fixture()
def tiny_eva():
    torch.manual_seed(0)
    return EVA02ViTDet(EVA02ViTDetConfig(**TINY_EVA_CONFIG)).eval()


def test_paper_config_is_eva02_large_vitdet():
    cfg = EVA02ViTDetConfig()
    assert (cfg.patch_size, cfg.image_size, cfg.hidden_size, cfg.num_hidden_layers) == (16, 1024, 1024, 24)
    assert cfg.global_attn_indexes == (2, 5, 8, 11, 14, 17, 20, 23) and cfg.window_size == 16
    with torch.device("meta"):
        model = EVA02ViTDet(cfg)
    assert model.blocks[0].mlp.w1.out_features == 2730  # SwiGLU ratio 8/3
    assert [b.window_size for b in model.blocks[:4]] == [16, 16, 0, 16]
    assert model.blocks[0].attn.k_proj.bias is None and model.blocks[0].attn.q_bias.shape == (1024,)


def test_rotary_scores_depend_only_on_relative_position():
    # With the reference grid equal to the grid, positions are integers and rotations compose.
    cos, sin = rotary_tables(8, (6, 6), reference=6, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rq, rk = apply_rotary(q.expand(36, 8), cos, sin), apply_rotary(k.expand(36, 8), cos, sin)
    at = lambda r, c: r * 6 + c  # noqa: E731
    score = lambda a, b: (rq[a] * rk[b]).sum()  # noqa: E731
    torch.testing.assert_close(score(at(1, 2), at(3, 1)), score(at(2, 4), at(4, 3)))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(36))  # rotations keep the norm


def test_window_partition_round_trips_with_padding():
    x = torch.randn(2, 6, 7, 5)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 5) and padded == (8, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (6, 7)), x)


def test_window_blocks_are_local_and_global_blocks_are_not(tiny_eva):
    x = torch.randn(1, 8, 8, 24)
    changed = x.clone()
    changed[:, 0, 0] += 5.0  # a token in the top-left 4 x 4 window
    cfg = tiny_eva.config
    rope = {
        "window": rotary_tables(12, (4, 4), cfg.rope_reference_grid, cfg.rope_theta),
        "global": rotary_tables(12, (8, 8), cfg.rope_reference_grid, cfg.rope_theta),
    }
    with torch.no_grad():
        windowed, glob = tiny_eva.blocks[0], tiny_eva.blocks[1]
        assert windowed.window_size == 4 and glob.window_size == 0
        w_diff = (windowed(x, rope) - windowed(changed, rope)).abs()
        g_diff = (glob(x, rope) - glob(changed, rope)).abs()
    assert w_diff[:, 4:, 4:].max() == 0 and w_diff[:, :4, :4].max() > 0
    assert g_diff[:, 4:, 4:].max() > 0


def _detectron_checkpoint(model: EVA02ViTDet) -> dict:
    """The authors' key layout: backbone under `backbone.net.`, rotary buffers stored, detector heads beside it."""
    state = {f"backbone.net.{k}": v.clone() for k, v in model.state_dict().items()}
    state["backbone.net.blocks.0.attn.rope.freqs_cos"] = torch.zeros(16, 6)
    state["backbone.net.rope_glb.freqs_sin"] = torch.zeros(64, 6)
    state["backbone.simfp_2.0.weight"] = torch.zeros(3)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(2, 3)
    return {"model": state, "iteration": 5}


def test_authors_checkpoint_layout_loads_through_the_teacher_loader(tmp_path, tiny_eva):
    torch.save(_detectron_checkpoint(tiny_eva), tmp_path / "eva02_det.pth")
    teacher = build_teacher(tiny_spec("eva", pretrained=True, checkpoint=str(tmp_path / "eva02_det.pth")))
    batch = images()
    with torch.no_grad():
        expected = tiny_eva(prepare_images(batch, teacher.spec))
    torch.testing.assert_close(teacher(batch).tokens, expected.flatten(2).transpose(1, 2))


def test_unexpected_missing_and_misshapen_keys_are_named(tiny_eva):
    fresh = EVA02ViTDet(EVA02ViTDetConfig(**TINY_EVA_CONFIG))
    bad = _detectron_checkpoint(tiny_eva)
    bad["model"]["backbone.net.blocks.0.attn.k_bias"] = torch.zeros(24)
    with pytest.raises(ValueError, match="blocks.0.attn.k_bias"):
        load_eva02_det_state_dict(fresh, bad)
    bad = _detectron_checkpoint(tiny_eva)
    del bad["model"]["backbone.net.blocks.2.mlp.w3.weight"]
    with pytest.raises(ValueError, match="blocks.2.mlp.w3.weight"):
        load_eva02_det_state_dict(fresh, bad)
    bad = _detectron_checkpoint(tiny_eva)
    bad["model"]["backbone.net.pos_embed"] = torch.zeros(1, 50, 24)
    with pytest.raises(ValueError, match="pos_embed.*pretrain_image_size"):
        load_eva02_det_state_dict(fresh, bad)


def test_backbone_runs_at_another_input_size(tiny_eva):
    # Rotary and absolute positions are recomputed from the grid, so a 96 px input gives a 12 x 12 map.
    with torch.no_grad():
        out = tiny_eva(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 24, 12, 12) and torch.isfinite(out).all()
