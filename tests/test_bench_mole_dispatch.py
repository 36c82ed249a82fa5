"""The sorted sparse dispatch of `MoLEMLP` (chosen for speed by benchmarks/bench_mole_overhead.py) computes the
same values and gradients as the gate formula applied to every expert, including experts left with no token or
with a single one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from movekd_hf import MoVEKDConfig
from movekd_hf.modeling.mole import MoLEMLP, expert_gate

HIDDEN, INTERMEDIATE, EXPERTS, RANK = 12, 20, 4, 5


def make_mlp(scale: str) -> MoLEMLP:
    config = MoVEKDConfig(
        num_experts=EXPERTS, lora_rank=RANK, lora_alpha=2.0, lora_dropout=0.0, expert_output_scale=scale
    )
    torch.manual_seed(0)
    mlp = MoLEMLP(config, HIDDEN, INTERMEDIATE, nn.GELU())
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        # Route by the first two input channels: expert 0 gets one token, expert 3 none (see `tokens`).
        mlp.router.weight.zero_()
        mlp.router.bias.copy_(torch.tensor([0.0, 1.0, 0.5, -9.0]))
        mlp.router.weight[0, 0] = 10.0
        mlp.router.weight[2, 1] = 10.0
    return mlp


def tokens() -> torch.Tensor:
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.01
    x[0, 3, 0] = 1.0  # the single token of expert 0
    x[1, :2, 1] = 1.0  # two tokens of expert 2; the rest go to expert 1
    return x


def gate_formula(mlp: MoLEMLP, x: torch.Tensor) -> torch.Tensor:
    """Every expert computed, weighted by the (one-hot) gate: the dense path's matmuls."""
    flat = x.reshape(-1, HIDDEN)
    gate = expert_gate(mlp.router(flat), mlp.routing, mlp.output_scale)
    h = mlp.activation_fn(mlp.fc1(flat) + mlp.scaling * mlp.fc1.lora_delta(flat, gate))
    return (mlp.fc2(h) + mlp.scaling * mlp.fc2.lora_delta(h, gate)).view_as(x)


@pytest.mark.parametrize("scale", ["none", "probability", "straight_through"])
def test_sorted_dispatch_matches_the_gate_formula_in_values_and_gradients(scale):
    mlp = make_mlp(scale)
    x = tokens()
    counts = torch.bincount(mlp.router(x.reshape(-1, HIDDEN)).argmax(-1), minlength=EXPERTS).tolist()
    assert counts[0] == 1 and counts[3] == 0 and counts[2] == 2
    probe = torch.randn_like(x)
    results = []
    for forward in (mlp, lambda inputs: gate_formula(mlp, inputs)):
        inputs = x.clone().requires_grad_(True)
        out = forward(inputs)
        (out * probe).sum().backward()
        grads = {name: p.grad.clone() for name, p in mlp.named_parameters() if p.grad is not None}
        results.append((out.detach(), inputs.grad, grads))
        mlp.zero_grad(set_to_none=True)
    (out, grad_in, grads), (ref_out, ref_grad_in, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_in, ref_grad_in, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert grads["fc1.lora_A"][3].abs().sum() == 0  # the empty expert gets a zero gradient, not none


def test_sorted_dispatch_follows_the_data_dtype():
    mlp = make_mlp("straight_through").to(torch.bfloat16)
    out = mlp(tokens().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), gate_formula(mlp, tokens().to(torch.bfloat16)).float(), rtol=2e-2, atol=2e-2
    )
