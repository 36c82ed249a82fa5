"""MoLE against a plainly written per-token re-computation of METHOD.md section 2."""

import pytest
import torch
from torch import nn

from movekd_hf import MoVEKDConfig
from movekd_hf.modeling.mole import MoLEMLP, expert_gate

HIDDEN, INTERMEDIATE, EXPERTS, RANK = 12, 20, 3, 5


def make_mlp(**settings) -> MoLEMLP:
    config = MoVEKDConfig(num_experts=EXPERTS, lora_rank=RANK, lora_alpha=2.0, lora_dropout=0.0, **settings)
    torch.manual_seed(0)
    mlp = MoLEMLP(config, HIDDEN, INTERMEDIATE, nn.GELU())
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return mlp


def reference(mlp: MoLEMLP, x: torch.Tensor, routing: str, scale: str) -> torch.Tensor:
    """Token by token, expert by expert, exactly as the formulas read."""
    s = 2.0 / RANK
    rows = []
    for token in x.reshape(-1, HIDDEN):
        p = torch.softmax(mlp.router.weight @ token + mlp.router.bias, dim=-1)
        k = int(p.argmax())
        weights = p if routing == "dense" else torch.zeros(EXPERTS).index_fill(0, torch.tensor([k]), 1.0)
        if routing == "sparse" and scale == "probability":
            weights = weights * p

        def lora(layer, inp, e):
            return layer.lora_B[e] @ (layer.lora_A[e] @ inp + layer.lora_A_bias[e]) + layer.lora_B_bias[e]

        h = mlp.fc1.weight @ token + mlp.fc1.bias + s * sum(weights[e] * lora(mlp.fc1, token, e) for e in range(3))
        h = nn.functional.gelu(h)
        y = mlp.fc2.weight @ h + mlp.fc2.bias + s * sum(weights[e] * lora(mlp.fc2, h, e) for e in range(3))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], HIDDEN)


@pytest.mark.parametrize(
    ("routing", "scale"),
    [("sparse", "none"), ("sparse", "probability"), ("sparse", "straight_through"), ("dense", "none")],
)
def test_matches_the_per_token_formula(routing, scale):
    mlp = make_mlp(mole_routing=routing, expert_output_scale=scale)
    x = torch.randn(2, 7, HIDDEN)
    torch.testing.assert_close(mlp(x), reference(mlp, x, routing, scale), rtol=1e-5, atol=1e-5)
    assert mlp.router_logits.shape == (2, 7, EXPERTS)


def test_sparse_routing_uses_one_expert_for_fc1_and_fc2():
    """Zeroing every expert but the chosen one (per token) must not change the output."""
    mlp = make_mlp(mole_routing="sparse", expert_output_scale="none")
    x = torch.randn(1, 1, HIDDEN)
    before = mlp(x)
    chosen = int(mlp.router_logits.argmax())
    with torch.no_grad():
        for layer in (mlp.fc1, mlp.fc2):
            for name in ("lora_A", "lora_B", "lora_A_bias", "lora_B_bias"):
                others = [e for e in range(EXPERTS) if e != chosen]
                getattr(layer, name)[others] = 0.0
    torch.testing.assert_close(mlp(x), before)


def test_router_gradient_depends_on_the_output_scale():
    """Faithful (`none`): only the balance loss can train the router; the other modes let the task reach it."""
    x = torch.randn(2, 4, HIDDEN)
    grads = {}
    for scale in ("none", "probability", "straight_through"):
        mlp = make_mlp(mole_routing="sparse", expert_output_scale=scale)
        mlp(x).square().sum().backward()
        grads[scale] = mlp.router.weight.grad
    assert grads["none"] is None or grads["none"].abs().sum() == 0
    assert grads["probability"].abs().sum() > 0
    assert grads["straight_through"].abs().sum() > 0


def test_straight_through_keeps_faithful_values():
    x = torch.randn(3, 5, HIDDEN)
    faithful = make_mlp(mole_routing="sparse", expert_output_scale="none")
    straight = make_mlp(mole_routing="sparse", expert_output_scale="straight_through")
    torch.testing.assert_close(straight(x), faithful(x))


def test_gate_rows_sum_to_one_for_dense_and_are_one_hot_for_sparse():
    logits = torch.randn(10, EXPERTS)
    dense = expert_gate(logits, "dense", "none")
    torch.testing.assert_close(dense.sum(-1), torch.ones(10))
    sparse = expert_gate(logits, "sparse", "none")
    assert torch.equal(sparse.sum(-1), torch.ones(10)) and torch.equal(sparse.argmax(-1), logits.argmax(-1))


def test_zero_init_b_leaves_the_base_mlp_and_kaiming_moves_it():
    from movekd_hf.modeling.mole import init_mole_linear

    x = torch.randn(2, 3, HIDDEN)
    for b_init, changes in (("zeros", False), ("kaiming", True)):
        mlp = make_mlp(lora_b_init=b_init)
        init_mole_linear(mlp.fc1, b_init)
        init_mole_linear(mlp.fc2, b_init)
        base = mlp.fc2(nn.functional.gelu(mlp.fc1(x)))
        assert torch.allclose(mlp(x), base) is not changes
