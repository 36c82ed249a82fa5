"""Mixture of LoRA Experts (MoLE) for the student's encoder MLPs (METHOD.md section 2).

Per token x (the MLP input after the layer norm):

    p = softmax(router(x));  k = argmax(p)
    h = act(fc1(x) + s * B1_k A1_k drop(x));   y = fc2(h) + s * B2_k A2_k drop(h),   s = alpha / r

Sparse (top-1) routing computes only the chosen expert per token: each LoRA input is sorted by expert (one
gather in, one index-add back into the base output), so every expert works on a contiguous slice; the
per-expert loop has `num_experts` steps of plain matmuls and no index scatter inside it. The base fc1/fc2 run
on the tokens in their own order, so a zero LoRA leaves plain CLIP bit for bit. Dense routing needs every
expert: all experts' A run as one matmul (E * r columns), the result is weighted by p per token and sent
through all experts' B as one matmul. benchmarks/bench_mole_overhead.py measures both against plain CLIP and
against other dispatches.

LoRA dropout (`drop`) is inverted dropout as `nn.Dropout` draws it: each element kept independently with
probability 1 - p and scaled by 1 / (1 - p). On CPU, where one Bernoulli draw per element cost more than the
expert's matmuls, the dropped elements are drawn as the gaps between successive drops (`dropped_positions`,
~p * numel random numbers) and zeroed in place in the sorted copy of the LoRA input, and the 1 / (1 - p)
multiplies the A weights (r x in numbers) instead of the input. Other devices use `F.dropout`'s fused kernel.
Dropout cannot move after the A projection: A (m * x) is not a function of A x for a random mask m.

Remote code: imports only torch, runs on transformers 4.57 and 5.x.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoLELinear(nn.Linear):
    """`nn.Linear` plus `num_experts` LoRA experts, stacked.

    Subclassing `nn.Linear` keeps the base `weight`/`bias` names, so stock CLIP/LLaVA checkpoints load
    into it with only the `lora_*` keys missing.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, lora_bias: bool):
        super().__init__(in_features, out_features)
        self.num_experts = num_experts
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank))  # [E, out, r]
        if lora_bias:
            self.lora_A_bias = nn.Parameter(torch.empty(num_experts, rank))  # [E, r]
            self.lora_B_bias = nn.Parameter(torch.empty(num_experts, out_features))  # [E, out]
        else:
            self.register_parameter("lora_A_bias", None)
            self.register_parameter("lora_B_bias", None)

    def lora_parameters(self) -> dict:
        names = ("lora_A", "lora_B", "lora_A_bias", "lora_B_bias")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def lora_delta(self, x: torch.Tensor, gate: torch.Tensor, input_scale: float = 1.0) -> torch.Tensor:
        """Gated sum of the experts' LoRA outputs (unscaled).

        Args:
            x: `[T, in]` LoRA input (already dropped out).
            gate: `[T, E]` expert weights per token (one-hot for sparse routing).
            input_scale: factor on `x` (dropout's 1 / (1 - p) when `x` is only masked), applied to the A weights
                (r x in numbers instead of T x in); the biases are not scaled.
        Returns:
            `[T, out]`.
        """
        num_experts, rank = self.num_experts, self.rank
        a_bias = None if self.lora_A_bias is None else self.lora_A_bias.reshape(-1)
        a_weight = self.lora_A if input_scale == 1.0 else self.lora_A * input_scale
        low_rank = F.linear(x, a_weight.reshape(num_experts * rank, -1), a_bias)  # [T, E*r]
        low_rank = (low_rank.view(-1, num_experts, rank) * gate.unsqueeze(-1)).view(-1, num_experts * rank)
        b_weight = self.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank)  # [out, E*r]
        delta = F.linear(low_rank, b_weight)  # [T, out]
        if self.lora_B_bias is not None:
            delta = delta + gate @ self.lora_B_bias
        return delta

    def grouped_lora_deltas(
        self, x: torch.Tensor, counts: list, weight: torch.Tensor, input_scale: float = 1.0
    ) -> list:
        """Each token's own expert's LoRA output, for tokens grouped by expert (sparse routing).

        Args:
            x: `[T, in]` LoRA input (already dropped out), the first `counts[0]` rows routed to expert 0, the
                next `counts[1]` to expert 1, and so on.
            counts: tokens per expert (Python ints summing to T).
            weight: `[T, 1]` per-token output weight (the gate value of the chosen expert, times any scaling).
            input_scale: factor on `x`, applied to the A weights (see `lora_delta`).
        Returns:
            one `[counts[e], out]` tensor per expert: weight * (B_e (A_e x + bA_e) + bB_e) per token.
        """
        # `unbind` gives all experts' weights in one autograd node: their gradients are stacked once, where
        # indexing `lora_A[e]` per expert would build a zero-filled full-size gradient per expert.
        a_weights = (self.lora_A if input_scale == 1.0 else self.lora_A * input_scale).unbind(0)
        b_weights = self.lora_B.unbind(0)
        a_biases = self.lora_A_bias.unbind(0) if self.lora_A_bias is not None else [None] * self.num_experts
        b_biases = self.lora_B_bias.unbind(0) if self.lora_B_bias is not None else [None] * self.num_experts
        deltas = []
        for expert, (tokens, scale) in enumerate(zip(x.split(counts), weight.split(counts))):
            rows = tokens.shape[0]
            if rows == 1:
                # A one-row matmul takes BLAS's matrix-vector path, whose rounding depends on the weights' memory
                # alignment (checkpoints loaded by mmap are not 64-byte aligned): with two rows it stays a GEMM
                # and a loaded model computes bit for bit what the saved one did.
                tokens, scale = tokens.expand(2, -1), scale.expand(2, -1)
            # The weight goes on the rank-r side: r columns to scale instead of `out`.
            low_rank = F.linear(tokens, a_weights[expert], a_biases[expert]) * scale  # [T_e, r]
            out = F.linear(low_rank, b_weights[expert])  # [T_e, out]
            if b_biases[expert] is not None:
                out = out + scale * b_biases[expert]
            deltas.append(out[:rows])
        return deltas


def dropped_positions(numel: int, p: float, device: torch.device, draws: int = 0) -> torch.Tensor:
    """The elements inverted dropout zeroes in a tensor of `numel` elements: each one independently with
    probability `p` (the Bernoulli draws of `nn.Dropout`, drawn by their gaps).

    The gaps between successive drops in a sequence of independent Bernoulli(p) trials are independent
    Geometric(p) variables on 1, 2, ...; their running sum gives the drop positions with the same joint
    distribution as one draw per element, from ~p * numel random numbers (`Tensor.geometric_`) instead of
    `numel`. The default generator of `device` draws them, so `torch.manual_seed` and checkpointing's RNG-state
    replay reproduce them.

    Args:
        draws: gaps drawn at a time (0: enough for all but ~1e-9 of calls; more are drawn when needed).
    Returns:
        `[K]` int64 flat indices, increasing, K ~ Binomial(numel, p).
    """
    mean = numel * p
    draws = draws or int(mean + 6.0 * math.sqrt(mean * (1.0 - p))) + 16  # the mean + 6 standard deviations
    chunks, start = [], 0.0
    while True:
        # float64 keeps the sums exact; a gap is inf with probability 2^-53 (uniform 0), which ends the run.
        ends = torch.empty(draws, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(start - 1.0)
        inside = int(torch.searchsorted(ends, float(numel)))
        chunks.append(ends[:inside])
        if inside < draws:
            return torch.cat(chunks).long()
        start = float(ends[-1]) + 1.0


class _SortedDroppedRows(torch.autograd.Function):
    """`x.index_select(0, order)` with the elements at the flat positions `dropped` (of the result) set to zero.

    The copy that sorting makes anyway takes the dropout in place; the backward saves only `order` and the
    positions (no float mask) and scatters the gradient with one `index_copy_` (`order` is a permutation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        out = x.index_select(0, order)  # [T, in]
        if dropped.numel():
            out.view(-1).index_fill_(0, dropped, 0.0)
        ctx.save_for_backward(order, dropped)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        order, dropped = ctx.saved_tensors
        grad_x = torch.empty_like(grad, memory_format=torch.contiguous_format).index_copy_(0, order, grad)
        if dropped.numel():
            width = grad.shape[1]  # the same positions, in x's row order
            grad_x.view(-1).index_fill_(0, order[dropped // width] * width + dropped % width, 0.0)
        return grad_x, None, None


def _uniform_like_linear(tensor: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(tensor, -bound, bound)


def init_mole_linear(module: MoLELinear, lora_b_init: str) -> None:
    """Initialise LoRA weights as `nn.Linear` does per expert (Kaiming-uniform, a=sqrt(5)).

    `lora_b_init="zeros"` zeroes B so a fresh adapter changes nothing; `"kaiming"` initialises B like A, as
    the authors' code does (the student moves away from CLIP at step 0). Parameters already loaded from a
    checkpoint (transformers marks them `_is_hf_initialized`) are left untouched.
    """

    def fresh(param) -> bool:
        return param is not None and not getattr(param, "_is_hf_initialized", False)

    with torch.no_grad():
        if fresh(module.lora_A):
            for expert in module.lora_A:  # per expert: fan-in is `in`, not `r * in`
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if fresh(module.lora_A_bias):
            _uniform_like_linear(module.lora_A_bias, module.in_features)
        if fresh(module.lora_B):
            if lora_b_init == "zeros":
                nn.init.zeros_(module.lora_B)
            else:
                for expert in module.lora_B:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if fresh(module.lora_B_bias):
            if lora_b_init == "zeros":
                nn.init.zeros_(module.lora_B_bias)
            else:
                _uniform_like_linear(module.lora_B_bias, module.rank)


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in at least float32: half precision is raised, float64 kept (never downcast)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def expert_gate(router_logits: torch.Tensor, routing: str, output_scale: str) -> torch.Tensor:
    """Per-token expert weights from router logits.

    Args:
        router_logits: `[T, E]`.
        routing: `"sparse"` (top-1) or `"dense"` (all experts weighted by p).
        output_scale: sparse only. `"none"`: the chosen expert at weight 1 (authors' code: the router then
            learns from the balance loss alone); `"probability"`: weight p_k; `"straight_through"`: weight 1
            in the forward, gradient of p_k in the backward.
    Returns:
        `[T, E]` gate, in the logits' dtype.
    """
    if routing == "dense":
        return upcast(router_logits).softmax(dim=-1).to(router_logits.dtype)
    chosen, weight = top1_route(router_logits, output_scale)
    return F.one_hot(chosen, router_logits.shape[-1]).to(weight.dtype) * weight


def top1_route(router_logits: torch.Tensor, output_scale: str) -> tuple:
    """Sparse routing: each token's expert and the weight its output gets (see `expert_gate`).

    Args:
        router_logits: `[T, E]`.
    Returns:
        `chosen` `[T]` (long) and `weight` `[T, 1]` in the logits' dtype: 1 (`"none"`), p_k (`"probability"`),
        or 1 with the gradient of p_k (`"straight_through"`).
    """
    probs = upcast(router_logits).softmax(dim=-1)
    chosen = probs.argmax(dim=-1)  # [T]
    p_chosen = probs.gather(-1, chosen.unsqueeze(-1))  # [T, 1]
    if output_scale == "probability":
        weight = p_chosen
    elif output_scale == "straight_through":
        weight = 1.0 + p_chosen - p_chosen.detach()
    else:
        weight = torch.ones_like(p_chosen)
    return chosen, weight.to(router_logits.dtype)


class MoLEMLP(nn.Module):
    """Drop-in replacement for CLIP's/SigLIP's MLP (`fc1` -> act -> `fc2`) with a router shared by both."""

    def __init__(self, config, hidden_size: int, intermediate_size: int, activation_fn: nn.Module):
        super().__init__()
        self.num_experts = config.num_experts
        self.routing = config.mole_routing
        self.output_scale = config.expert_output_scale
        self.scaling = config.lora_alpha / config.lora_rank
        self.activation_fn = activation_fn
        self.fc1 = MoLELinear(hidden_size, intermediate_size, config.num_experts, config.lora_rank, config.lora_bias)
        self.fc2 = MoLELinear(intermediate_size, hidden_size, config.num_experts, config.lora_rank, config.lora_bias)
        self.router = nn.Linear(hidden_size, config.num_experts)
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        # The encoder layer only passes hidden states on, so the router logits of the latest forward are
        # kept here for the model to collect (the balance loss needs them).
        self.router_logits = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # [B, N, D]
        x = hidden_states.reshape(-1, shape[-1])  # [T, D]
        logits = self.router(x)  # [T, E]
        self.router_logits = logits.view(*shape[:-1], self.num_experts)  # [B, N, E]
        if self.routing == "dense":
            gate = expert_gate(logits, self.routing, self.output_scale)
            h = self.fc1(x) + self.scaling * self.fc1.lora_delta(self._dense_drop(x), gate, self._input_scale(x))
            h = self.activation_fn(h)
            y = self.fc2(h) + self.scaling * self.fc2.lora_delta(self._dense_drop(h), gate, self._input_scale(h))
            return y.view(*shape[:-1], -1)
        return self._sparse_forward(x, logits).view(*shape[:-1], -1)

    def _sampled_dropout(self, x: torch.Tensor) -> bool:
        """Whether dropout on `x` is drawn by `dropped_positions` (CPU), its 1 / (1 - p) left to the A weights."""
        return self.training and self.lora_dropout.p > 0 and x.device.type == "cpu"

    def _input_scale(self, x: torch.Tensor) -> float:
        """The dropout's 1 / (1 - p) where `_sampled_dropout` only masked the LoRA input, else 1."""
        return 1.0 / (1.0 - self.lora_dropout.p) if self._sampled_dropout(x) else 1.0

    def _dense_drop(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] LoRA input of the dense path, dropped out (unscaled on CPU, see `_input_scale`)."""
        if not self._sampled_dropout(x):
            return self.lora_dropout(x)
        dropped = dropped_positions(x.numel(), self.lora_dropout.p, x.device)
        return x.reshape(-1).index_fill(0, dropped, 0.0).view_as(x)

    def _sorted_drop(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """[T, in] LoRA input in expert order, dropped out (unscaled on CPU, see `_input_scale`)."""
        if self._sampled_dropout(x):
            dropped = dropped_positions(x.numel(), self.lora_dropout.p, x.device)
            return _SortedDroppedRows.apply(x, order, dropped)
        return self.lora_dropout(_SortedDroppedRows.apply(x, order, order.new_empty(0)))

    def _sparse_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 MoLE: [T, D] -> [T, D]. The LoRA inputs are sorted by expert so each expert reads a contiguous
        slice; the base fc1/fc2 run on the tokens in their own order (see the module docstring)."""
        chosen, weight = top1_route(logits, self.output_scale)
        order = torch.argsort(chosen, stable=True)  # [T]
        # One host sync per MLP for the slice sizes (a one-hot sum, deterministic on every device).
        counts = F.one_hot(chosen, self.num_experts).sum(dim=0).tolist()
        weight = weight.index_select(0, order) * self.scaling  # [T, 1], sorted

        def with_lora(layer: MoLELinear, inputs: torch.Tensor) -> torch.Tensor:
            out = layer(inputs)  # [T, out]; first, as before, so hooks that gather weights (ZeRO-3) have run
            lora_input = self._sorted_drop(inputs, order)
            deltas = layer.grouped_lora_deltas(lora_input, counts, weight, self._input_scale(inputs))
            # Each expert's rows are added in place into the base output at their tokens' positions. (The
            # linear's backward does not need its output; `order` is a permutation, so no row adds twice.)
            for positions, delta in zip(order.split(counts), deltas):
                # Under autocast the base output is half precision while a bias term may be float32.
                out.index_add_(0, positions, delta.to(out.dtype))
            return out

        h = self.activation_fn(with_lora(self.fc1, x))
        return with_lora(self.fc2, h)


def mole_mlp_from(mlp: nn.Module, config) -> MoLEMLP:
    """Build a `MoLEMLP` shaped like an existing CLIP/SigLIP MLP, taking over its activation and base weights.

    The base `Parameter` objects are moved over, not copied: nothing is read, so this also works while
    DeepSpeed ZeRO-3 holds them partitioned (`zero3_init_flag`) or on the meta device. New LoRA/router
    weights are created in the same construction context (device, default dtype, ZeRO-3 partitioning).
    """
    mole = MoLEMLP(config, mlp.fc1.in_features, mlp.fc1.out_features, mlp.activation_fn)
    for name in ("fc1", "fc2"):
        ours, theirs = getattr(mole, name), getattr(mlp, name)
        ours.weight, ours.bias = theirs.weight, theirs.bias
    return mole
