"""Adapters: the faithful token-mixing adapter, the resolution-free one and the student-to-teacher head."""

from __future__ import annotations

import pytest
import torch

from movekd_hf.distill.adapters import (
    ResampleAdapter,
    StudentPredictionHead,
    TokenMixAdapter,
    build_adapter,
)
from movekd_hf.modeling.llava_conventions import resample_tokens


def test_token_mix_adapter_is_channel_linear_gelu_token_linear():
    torch.manual_seed(0)
    adapter = TokenMixAdapter(teacher_dim=24, student_dim=32, num_teacher_tokens=64, num_student_tokens=16)
    x = torch.randn(2, 64, 24)
    expected = torch.nn.functional.gelu(x @ adapter.channel_proj.weight.T + adapter.channel_proj.bias)
    expected = (expected.transpose(1, 2) @ adapter.token_proj.weight.T + adapter.token_proj.bias).transpose(1, 2)
    torch.testing.assert_close(adapter(x), expected)
    assert adapter(x).shape == (2, 16, 32)
    # Paper size (eva, 4096 x 1024 -> 576 x 1024): 1024 * 1024 + 1024 + 4096 * 576 + 576 parameters.
    with torch.device("meta"):
        paper = TokenMixAdapter(1024, 1024, 4096, 576)
    assert sum(p.numel() for p in paper.parameters()) == 1024 * 1024 + 1024 + 4096 * 576 + 576
    with pytest.raises(ValueError, match="built for 64 teacher tokens, got 16"):
        adapter(torch.randn(2, 16, 24))


def test_resample_adapter_works_at_any_input_size():
    torch.manual_seed(0)
    adapter = ResampleAdapter(teacher_dim=40, student_dim=32)
    for grid in ((8, 8), (12, 12), (3, 5)):
        out = adapter(torch.randn(2, grid[0] * grid[1], 40), grid, (4, 4))
        assert out.shape == (2, 16, 32)
    # A constant teacher map stays constant after resampling, so each output token is the MLP of that value.
    value = torch.randn(40)
    out = adapter(value.expand(1, 64, 40), (8, 8), (4, 4))
    torch.testing.assert_close(out, adapter.mlp(value).expand(1, 16, 32))


def test_resample_tokens_keeps_grid_order_and_checks_counts():
    tokens = torch.arange(16.0).view(1, 16, 1)  # value = row * 4 + col
    up = resample_tokens(tokens, (4, 4), (4, 4))
    assert torch.equal(up, tokens)
    down = resample_tokens(tokens, (4, 4), (2, 2)).view(2, 2)
    assert down[0, 0] < down[0, 1] < down[1, 0] < down[1, 1]  # row-major order survives
    with pytest.raises(ValueError, match="grid \\(3, 3\\) has 9"):
        resample_tokens(tokens, (3, 3), (2, 2))


def test_student_head_maps_student_tokens_into_the_teacher_space():
    torch.manual_seed(0)
    head = StudentPredictionHead(student_dim=32, teacher_dim=20)
    assert head.direction == "student_to_teacher"
    out = head(torch.randn(2, 16, 32), (4, 4), (8, 8))
    assert out.shape == (2, 64, 20)


def test_build_adapter_kinds_and_errors():
    assert isinstance(build_adapter("token_mix", 24, 32, 64, 16), TokenMixAdapter)
    assert isinstance(build_adapter("resample", 24, 32), ResampleAdapter)
    assert build_adapter("student_head", 24, 32).direction == "student_to_teacher"
    assert build_adapter("resample", 24, 32).direction == "teacher_to_student"
    with pytest.raises(ValueError, match="needs num_teacher_tokens"):
        build_adapter("token_mix", 24, 32)
    with pytest.raises(ValueError, match="adapter kind 'conv'"):
        build_adapter("conv", 24, 32)


@pytest.mark.parametrize("kind", ["token_mix", "resample", "student_head"])
def test_every_adapter_parameter_gets_a_gradient(kind):
    torch.manual_seed(0)
    adapter = build_adapter(kind, 24, 32, 64, 16)
    if kind == "student_head":
        out = adapter(torch.randn(2, 16, 32), (4, 4), (8, 8))
    else:
        out = adapter(torch.randn(2, 64, 24), (8, 8), (4, 4))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
