"""MoLE against a plainly written per-token re-computation of METHOD.md section 2."""

import pytest
import torch
from torch import nn

from movekd_hf import MoVEKDConfig
from movekd_hf.modeling.mole import MoLEMLP, expert_gate
from movekd_hf.modeling.mole_sorted import dropped_positions

HIDDEN, INTERMEDIATE, EXPERTS, RANK = 12, 20, 3, 5


def make_mlp(**settings) -> MoLEMLP:
    settings = {"lora_dropout": 0.0, **settings}
    config = MoVEKDConfig(num_experts=EXPERTS, lora_rank=RANK, lora_alpha=2.0, **settings)
    torch.manual_seed(0)
    mlp = MoLEMLP(config, HIDDEN, INTERMEDIATE, nn.GELU())
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return mlp


def route_by_first_channel(mlp: MoLEMLP) -> None:
    """Router logits (10 x_0, 1, -9): a token with x_0 = 1 goes to expert 0, tokens with x_0 ~ 0 to expert 1, none to
    expert 2 (an expert of one token and one of none)."""
    with torch.no_grad():
        mlp.router.weight.zero_()
        mlp.router.bias.copy_(torch.tensor([0.0, 1.0, -9.0]))
        mlp.router.weight[0, 0] = 10.0


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


def run_dispatches(mlp: MoLEMLP, paths, x: torch.Tensor, probe: torch.Tensor, seed: int | None = 3) -> list:
    """For each dispatch `path(x, logits)`: output, input gradient and parameter gradients of `(out * probe).sum()`,
    each from the same RNG state (`seed`) so that dropout draws alike."""
    results = []
    for path in paths:
        if seed is not None:
            torch.manual_seed(seed)
        inputs = x.reshape(-1, HIDDEN).clone().requires_grad_(True)
        out = path(inputs, mlp.router(inputs))
        (out * probe.reshape(out.shape)).sum().backward()
        grads = {name: param.grad.clone() for name, param in mlp.named_parameters() if param.grad is not None}
        results.append((out.detach(), inputs.grad, grads))
        mlp.zero_grad(set_to_none=True)
    return results


def assert_same_results(result, reference) -> None:
    (out, grad_in, grads), (ref_out, ref_grad_in, ref_grads) = result, reference
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_in, ref_grad_in, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


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


# ------------------------------------------------------------------------------------------------ LoRA dropout
# On CPU the dropout of the LoRA inputs is drawn by the gaps between drops (`dropped_positions`) and applied in
# the sorted copy; these tests hold it to nn.Dropout's distribution: each element kept independently with
# probability 1 - p and scaled by 1 / (1 - p).

WIDE = 6  # channels of the revealing MLP below


def revealing_mlp(p: float, routing: str) -> MoLEMLP:
    """A MoLE MLP whose output is its fc1 LoRA input after dropout: fc1's base is zero and every expert's LoRA is
    the identity (scaling 1, no biases), the activation is the identity, fc2's base is the identity and its LoRA
    zero. Tokens are routed by which of the first three channels is largest."""
    config = MoVEKDConfig(
        num_experts=EXPERTS, lora_rank=WIDE, lora_alpha=float(WIDE), lora_dropout=p, lora_bias=False,
        mole_routing=routing, expert_output_scale="none",
    )  # fmt: skip
    mlp = MoLEMLP(config, WIDE, WIDE, nn.Identity())
    with torch.no_grad():
        for param in mlp.parameters():
            param.zero_()
        mlp.fc1.lora_A.copy_(torch.eye(WIDE).expand(EXPERTS, -1, -1))
        mlp.fc1.lora_B.copy_(torch.eye(WIDE).expand(EXPERTS, -1, -1))
        mlp.fc2.weight.copy_(torch.eye(WIDE))
        mlp.router.weight[:, :EXPERTS] = torch.eye(EXPERTS) * 10.0
    return mlp.train()


def within_binomial(count: int, trials: int, prob: float, sigmas: float = 5.0) -> bool:
    return abs(count - trials * prob) <= sigmas * (trials * prob * (1 - prob)) ** 0.5


@pytest.mark.parametrize(
    ("routing", "autograd"),
    [("sparse", True), ("sparse", False), ("sparse-one-hot", True), ("dense", True)],
    ids=["sparse-training", "sparse-no-autograd", "sparse-one-hot", "dense"],
)
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_lora_dropout_keeps_each_element_independently_with_probability_1_minus_p(p, routing, autograd):
    """Every sparse dispatch (CPU training: the whole MLP sorted; without autograd: the LoRA inputs sorted; other
    devices: the one-hot gate, run here on the CPU) and the dense one."""
    mlp = revealing_mlp(p, routing.removesuffix("-one-hot"))
    if routing == "sparse-one-hot":
        mlp._sparse_forward = mlp._one_hot_forward
    x = torch.rand(1, 20000, WIDE, generator=torch.Generator().manual_seed(0)) + 1.0  # no zeros: drops show
    torch.manual_seed(1)
    with torch.set_grad_enabled(autograd):
        first, second = (mlp(x).detach() / x for _ in range(2))  # per element: 0 (dropped) or 1 / (1 - p) (kept)
    chosen = mlp.router_logits.argmax(-1)[0]
    kept = first != 0
    # Kept values are scaled by exactly 1 / (1 - p) (dense: through the gate, which sums to 1 up to rounding).
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / (1 - p)), rtol=2e-6, atol=0)
    assert torch.equal(first[~kept], torch.zeros_like(first[~kept]))
    mask = kept[0]  # [T, WIDE]
    assert within_binomial(int(mask.sum()), mask.numel(), 1 - p)
    for expert in range(EXPERTS):  # the same rate for every expert's tokens
        rows = mask[chosen == expert]
        assert rows.shape[0] > 5000 and within_binomial(int(rows.sum()), rows.numel(), 1 - p)
    # Independence: both of a pair kept with probability (1 - p)^2, for neighbouring channels of a token,
    # the same channel of neighbouring tokens (routed to the same or to different experts), and the same element
    # in two calls.
    both = (1 - p) ** 2
    pairs = {
        "channels": (mask[:, :-1], mask[:, 1:]),
        "tokens": (mask[:-1], mask[1:]),
        "experts": (mask[:-1][chosen[:-1] != chosen[1:]], mask[1:][chosen[:-1] != chosen[1:]]),
        "calls": (mask, second[0] != 0),
    }
    for name, (a, b) in pairs.items():
        assert within_binomial(int((a & b).sum()), a.numel(), both), name
    assert not torch.equal(mask, second[0] != 0)


def test_dropped_positions_draw_more_gaps_when_a_batch_runs_short():
    torch.manual_seed(0)
    counts = [dropped_positions(1000, 0.2, torch.device("cpu"), draws=3) for _ in range(200)]
    drops = torch.cat(counts)
    assert all(bool((c[1:] > c[:-1]).all()) and int(c.min()) >= 0 and int(c.max()) < 1000 for c in counts)
    assert within_binomial(drops.numel(), 200 * 1000, 0.2)
    assert within_binomial(sum(int(c[0] == 0) for c in counts), 200, 0.2)  # the first element too
    # each position is as likely as any other: the first and second halves get the same share
    assert within_binomial(int((drops < 500).sum()), drops.numel(), 0.5)


def test_dropped_positions_gaps_are_geometric():
    """The gaps between drops (and the first position + 1) follow P(k) = (1 - p)^(k - 1) p, k = 1, 2, ..."""
    p = 0.05
    torch.manual_seed(7)
    positions = torch.cat([dropped_positions(200_000, p, torch.device("cpu")) for _ in range(5)])
    gaps = positions.diff()
    gaps = gaps[gaps > 0]  # drop the jumps back between calls
    assert within_binomial(gaps.numel() + 5, 5 * 200_000, p)
    for k in (1, 2, 3, 10, 40):
        assert within_binomial(int((gaps == k).sum()), gaps.numel(), (1 - p) ** (k - 1) * p), k
    assert within_binomial(int((gaps > 60).sum()), gaps.numel(), (1 - p) ** 60)  # the tail


@pytest.mark.parametrize("lora_bias", [True, False])
@pytest.mark.parametrize("scale", ["none", "probability", "straight_through"])
def test_training_dispatch_matches_the_token_order_dispatch_with_the_same_dropout(scale, lora_bias):
    """Training on CPU runs the whole MLP sorted by expert (`_sorted_mlp`); inference and other devices sort the
    LoRA inputs only (`_sorted_lora_forward`). Same values and gradients, with dropout on (both draw the same
    positions in expert order), an expert with one token and one with none."""
    mlp = make_mlp(mole_routing="sparse", expert_output_scale=scale, lora_dropout=0.3, lora_bias=lora_bias).train()
    route_by_first_channel(mlp)  # a token whose channel 0 is 1 goes to expert 0, the rest to 1, none to 2
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(4)) * 0.01
    x[1, 2, 0] = 1.0
    assert torch.bincount(mlp.router(x.reshape(-1, HIDDEN)).argmax(-1), minlength=EXPERTS).tolist() == [1, 11, 0]
    (out, grad_in, grads), reference = run_dispatches(
        mlp, (mlp._sorted_mlp, mlp._sorted_lora_forward), x, torch.randn(12, HIDDEN)
    )
    assert_same_results((out, grad_in, grads), reference)
    assert ("router.weight" in grads) is (scale != "none")
    for name in grads:
        if ".lora_" in name:  # the expert without tokens gets zero gradients
            assert torch.equal(grads[name][2], torch.zeros_like(grads[name][2])), name


@pytest.mark.parametrize("routing", ["sparse", "dense"])
def test_eval_mode_is_identity(routing):
    mlp = revealing_mlp(0.3, routing).eval()
    x = torch.rand(2, 50, WIDE) + 1.0
    torch.testing.assert_close(mlp(x), x, rtol=2e-6, atol=0)
    assert torch.equal(mlp(x), mlp(x))


def masked_reference(mlp: MoLEMLP, x: torch.Tensor, masks: tuple, p: float) -> torch.Tensor:
    """The gate formula (every expert, weighted by the gate) with nn.Dropout's arithmetic on given keep masks
    (in token order): drop(v) = v * (mask / (1 - p))."""
    flat = x.reshape(-1, x.shape[-1])
    gate = expert_gate(mlp.router(flat), mlp.routing, mlp.output_scale)
    h = mlp.activation_fn(mlp.fc1(flat) + mlp.scaling * mlp.fc1.lora_delta(flat * (masks[0] / (1 - p)), gate))
    return (mlp.fc2(h) + mlp.scaling * mlp.fc2.lora_delta(h * (masks[1] / (1 - p)), gate)).view_as(x)


def nn_dropout_formula_holds(p: float) -> bool:
    """nn.Dropout computes v * (mask / (1 - p)) with its own mask: the arithmetic `masked_reference` uses."""
    dropout, v = nn.Dropout(p).train(), torch.randn(64, 9)
    torch.manual_seed(5)
    mask = dropout(torch.ones_like(v)) != 0
    torch.manual_seed(5)
    return torch.equal(dropout(v), v * (mask / (1 - p)))


@pytest.mark.parametrize("routing", ["sparse", "dense"])
def test_dropout_values_and_gradients_match_nn_dropout_on_the_same_mask(routing):
    p = 0.3
    assert nn_dropout_formula_holds(p)
    mlp = make_mlp(mole_routing=routing, lora_dropout=p, expert_output_scale="straight_through").train()
    x = torch.randn(2, 9, HIDDEN)
    probe = torch.randn_like(x)
    results = []
    for run in ("ours", "reference"):
        torch.manual_seed(3)
        inputs = x.clone().requires_grad_(True)
        if run == "ours":
            out = mlp(inputs)
        else:  # the same draws, in the order the module makes them: fc1's input, then fc2's
            chosen = mlp.router(x.reshape(-1, HIDDEN)).argmax(-1)
            order = torch.argsort(chosen, stable=True) if routing == "sparse" else torch.arange(chosen.numel())
            masks = []
            for width in (HIDDEN, INTERMEDIATE):
                keep = torch.ones(chosen.numel() * width, dtype=torch.bool)
                keep[dropped_positions(keep.numel(), p, torch.device("cpu"))] = False
                token_order = torch.empty_like(keep.view(-1, width))
                token_order[order] = keep.view(-1, width)  # sparse draws are in expert order
                masks.append(token_order.float())
            out = masked_reference(mlp, inputs, tuple(masks), p)
        (out * probe).sum().backward()
        grads = {name: param.grad.clone() for name, param in mlp.named_parameters() if param.grad is not None}
        results.append((out.detach(), inputs.grad, grads))
        mlp.zero_grad(set_to_none=True)
    (out, grad_in, grads), (ref_out, ref_grad_in, ref_grads) = results
    assert not torch.allclose(out, masked_reference(mlp, x, (1.0, 1.0), 0.0))  # dropout did act
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_in, ref_grad_in, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and "fc2.lora_A" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ the one-hot dispatch
# Off the CPU sparse routing runs every expert with a one-hot gate (`_one_hot_forward`): no host sync, no sort.


@pytest.mark.parametrize("lora_bias", [True, False])
@pytest.mark.parametrize("scale", ["none", "probability", "straight_through"])
def test_one_hot_dispatch_matches_the_sorted_dispatches(scale, lora_bias):
    """Values and every gradient equal both CPU dispatches', with an expert of one token and one of none."""
    mlp = make_mlp(mole_routing="sparse", expert_output_scale=scale, lora_bias=lora_bias).train()
    route_by_first_channel(mlp)  # a token whose channel 0 is 1 goes to expert 0, the rest to 1, none to 2
    x = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(4)) * 0.01
    x[7, 0] = 1.0
    paths = (mlp._one_hot_forward, mlp._sorted_mlp, mlp._sorted_lora_forward)
    (out, grad_in, grads), *references = run_dispatches(mlp, paths, x, torch.randn(12, HIDDEN), seed=None)
    for reference in references:
        assert_same_results((out, grad_in, grads), reference)
    assert ("router.weight" in grads) is (scale != "none")
    for name in grads:
        if ".lora_" in name:  # the expert without tokens gets exactly zero gradients
            assert torch.equal(grads[name][2], torch.zeros_like(grads[name][2])), name


def test_one_hot_dispatch_with_a_zero_lora_is_the_base_mlp_bit_for_bit():
    mlp = make_mlp(mole_routing="sparse")
    with torch.no_grad():
        mlp.fc1.lora_B.zero_(), mlp.fc2.lora_B.zero_(), mlp.fc1.lora_B_bias.zero_(), mlp.fc2.lora_B_bias.zero_()
    x = torch.randn(40, HIDDEN)
    assert torch.equal(mlp._one_hot_forward(x, mlp.router(x)), mlp.fc2(mlp.activation_fn(mlp.fc1(x))))


def test_sparse_routing_off_the_cpu_takes_the_one_hot_dispatch_without_a_host_sync():
    """On the meta device a host sync (`.tolist()`, `int(...)`) raises, so the forward and backward running there
    show that the dispatch other devices take never reads a tensor's values on the host."""
    mlp = make_mlp(mole_routing="sparse", lora_dropout=0.05).to("meta").train()
    x = torch.randn(2, 9, HIDDEN, device="meta", requires_grad=True)
    with pytest.raises(NotImplementedError, match="meta"):  # the CPU dispatches read the slice sizes on the host
        mlp._sorted_lora_forward(x.reshape(-1, HIDDEN), mlp.router(x.reshape(-1, HIDDEN)))
    out = mlp(x)
    out.sum().backward()
    assert out.shape == x.shape and mlp.fc1.lora_A.grad.shape == mlp.fc1.lora_A.shape


@pytest.mark.parametrize("p", [0.3, 0.0])
@pytest.mark.parametrize("frozen_base", [True, False])
def test_sorted_training_masks_fc_inputs_in_place_only_when_the_base_weights_are_frozen(frozen_base, p):
    """With frozen base weights (the student's case) `_sorted_mlp` writes the dropout's zeros into fc1's and fc2's
    inputs once their base products are done, instead of into copies; values and gradients stay those of the
    token-order dispatch under the same draws, with and without dropout."""
    mlp = make_mlp(mole_routing="sparse", lora_dropout=p).train()
    for layer in (mlp.fc1, mlp.fc2):
        layer.weight.requires_grad_(not frozen_base), layer.bias.requires_grad_(not frozen_base)
    zeros_after_fc2 = []  # the share of zeros in fc2's input right after its forward
    mlp.fc2.register_forward_hook(
        lambda module, args, out: zeros_after_fc2.append(float((args[0] == 0).float().mean()))
    )
    x = torch.randn(30, HIDDEN, generator=torch.Generator().manual_seed(2))
    (out, grad_in, grads), reference = run_dispatches(
        mlp, (mlp._sorted_mlp, mlp._sorted_lora_forward), x, torch.randn(30, HIDDEN)
    )
    assert_same_results((out, grad_in, grads), reference)
    assert ("fc1.weight" in grads) is not frozen_base
    assert (zeros_after_fc2[0] > 0.2) is (frozen_base and p > 0)  # dropped in place (p = 0.3), or untouched


def test_sorted_training_keeps_a_retained_graph_usable_for_a_second_backward():
    """The inputs are consumed in the forward only: the saved tensors stay intact, so `retain_graph` works."""
    mlp = make_mlp(mole_routing="sparse", lora_dropout=0.3).train()
    for layer in (mlp.fc1, mlp.fc2):
        layer.weight.requires_grad_(False), layer.bias.requires_grad_(False)
    x = torch.randn(25, HIDDEN, requires_grad=True)
    loss = mlp(x).square().sum()
    loss.backward(retain_graph=True)
    first = {name: param.grad.clone() for name, param in mlp.named_parameters() if param.grad is not None}
    loss.backward()
    for name, grad in first.items():
        torch.testing.assert_close(dict(mlp.named_parameters())[name].grad, 2 * grad, msg=name)
