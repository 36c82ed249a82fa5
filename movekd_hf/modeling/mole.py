"""Mixture of LoRA Experts (MoLE) for the student's encoder MLPs (METHOD.md section 2).

Per token x (the MLP input after the layer norm):

    p = softmax(router(x));  k = argmax(p)
    h = act(fc1(x) + s * B1_k A1_k drop(x));   y = fc2(h) + s * B2_k A2_k drop(h),   s = alpha / r

Sparse (top-1) routing computes only the chosen expert per token on the CPU. Training there (autograd on, no
autocast), the whole MLP runs on the tokens sorted by expert, each linear one autograd node (`mole_sorted.py`). In
CPU inference (or autocast) each LoRA input alone is sorted by expert (one gather in, one index-add back into the
base output) and the base fc1/fc2 and the activation keep token order, so a zero LoRA gives plain CLIP bit for
bit (an elementwise kernel rounds an element differently when a permutation moves it between vector lanes,
scalar tails and threads' chunks). Dense routing needs every expert: all experts' A run as one matmul (E * r
columns), the result is weighted by the gate per token and sent through all experts' B as one matmul. On GPUs
(any device but the CPU) sparse routing takes that path too, with the one-hot gate: the slice sizes of a sort
need a host sync per MLP and a dozen small launches per linear, which cost a GPU far more than the other
experts' rank-r products (benchmarks/bench_gpu.py measures both); the zero gate of an expert not chosen adds
exact zeros, so the values are top-1's (to the rounding of the summation order) and a zero LoRA still gives
plain CLIP bit for bit.
benchmarks/bench_mole_overhead.py measures both against plain CLIP and against other dispatches.

LoRA dropout (`drop`) is inverted dropout as `nn.Dropout` draws it: each element kept independently with
probability 1 - p and scaled by 1 / (1 - p). On CPU the dropped elements are drawn by their gaps
(`mole_sorted.dropped_positions`) and the 1 / (1 - p) scales the A product instead of the input; other devices
use `F.dropout`'s fused kernel. Dropout cannot move after the A projection: A (m * x) is not a function of A x for
a random mask m.

Remote code: imports only torch, runs on transformers 4.57 and 5.x.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mole_sorted import Permute, SortedDroppedRows, SortedMoLELinearFunction, SortedRouting, dropped_positions


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

    def forward(self, x: torch.Tensor, routing: "SortedRouting | GatedRouting | None" = None) -> torch.Tensor:
        """The base linear alone (`routing` None, `x` `[..., in]`), or the MoLE linear (METHOD.md section 2): the
        sparse one on tokens sorted by expert (`SortedRouting`), or every expert weighted per token
        (`GatedRouting`). Called through the module, so hooks that gather weights (ZeRO-3) cover the LoRA weights
        as well.

        Args:
            x: `[..., in]`; with `routing`, `[T, in]`, the LoRA input before dropout; for `SortedRouting` with rows
                grouped by expert (`routing.counts`).
            routing: the per-token gate and the LoRA dropout (see `SortedRouting`, `GatedRouting`).
        Returns:
            `[..., out]` x W^T + b; with `routing`, `[T, out]` x W^T + b + sum_e g_e (B_e (A_e drop(x) + bA_e) + bB_e)
            per token, g its row of the gate (times alpha / r), one-hot for sparse routing.
        """
        if routing is None:
            return super().forward(x)
        if isinstance(routing, GatedRouting):
            # The base output is the C of the one GEMM that adds every expert's B product (and B bias) to it.
            low, b_weight = self.gated_low_rank(routing.drop(x), routing.gate, routing.input_scale)
            return torch.addmm(super().forward(x), low, b_weight.t())
        return SortedMoLELinearFunction.apply(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_A_bias, self.lora_B_bias,
            routing.gate, routing.counts, routing.dropped(x), routing.keep_scale, routing.consume_inputs,
        )  # fmt: skip

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
        low, b_weight = self.gated_low_rank(x, gate, input_scale)
        return F.linear(low, b_weight)

    def gated_low_rank(self, x: torch.Tensor, gate: torch.Tensor, input_scale: float = 1.0) -> tuple:
        """Every expert's gated low-rank activations and the matching B columns, so that one product
        `low @ b_weight^T` is `lora_delta` (the B biases ride along as E extra columns: the gate times bB_e).

        Args:
            x, gate, input_scale: as in `lora_delta`.
        Returns:
            `low` `[T, K]` (g_e (A_e x + bA_e) per expert, then, with B biases, g itself and zero columns up to a
            multiple of 8) and `b_weight` `[out, K]`; K = E*r without B biases.
        """
        num_experts, rank = self.num_experts, self.rank
        a_bias = None if self.lora_A_bias is None else self.lora_A_bias.reshape(-1)
        a_weight = self.lora_A if input_scale == 1.0 else self.lora_A * input_scale
        low = F.linear(x, a_weight.reshape(num_experts * rank, -1), a_bias)  # [T, E*r]
        low = (low.view(-1, num_experts, rank) * gate.unsqueeze(-1).to(low.dtype)).view(-1, num_experts * rank)
        b_weight = self.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank)  # [out, E*r]
        if self.lora_B_bias is None:
            return low, b_weight
        # E*r + E columns padded with zeros to a multiple of 8: a GEMM whose inner size is not 16-byte aligned falls
        # back to a slow kernel on GPUs (H200, E = 3, r = 32: 4.6 ms per CLIP-L step in an sm75 kernel).
        pad = -(num_experts * rank + num_experts) % 8
        low = torch.cat([low, F.pad(gate.to(low.dtype), (0, pad))], dim=1)
        return low, torch.cat([b_weight, F.pad(self.lora_B_bias.t(), (0, pad))], dim=1)

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


class GatedRouting:
    """What a `MoLELinear` needs to add every expert's LoRA weighted per token (dense routing; sparse routing off
    the CPU, with a one-hot gate).

    Attributes:
        gate: `[T, E]` per-token expert weights, times `alpha / r`.
        drop: the LoRA input's dropout, `[T, in]` -> `[T, in]` (identity outside training).
        input_scale: factor on the dropped input, applied to the A weights (see `MoLELinear.lora_delta`).
    """

    def __init__(self, gate: torch.Tensor, drop, input_scale: float):
        self.gate, self.drop, self.input_scale = gate, drop, input_scale


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


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (torch < 2.4 has no `device_type` argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


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

    # CPU training: fc1 and fc2 write the LoRA dropout's zeros into their inputs (the gathered x, the activation's
    # output: intermediates no other autograd node saves) once the frozen base product is done, instead of into
    # copies. False keeps copies (for activations that save their output).
    consume_fc_inputs = True

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
            return self._gated_forward(x, expert_gate(logits, self.routing, self.output_scale)).view(*shape[:-1], -1)
        return self._sparse_forward(x, logits).view(*shape[:-1], -1)

    def _gated_forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T, D] with every expert's A and B as one matmul each, weighted per token by `gate` `[T, E]`
        (dense routing's probabilities, or sparse routing's one-hot gate off the CPU)."""
        routing = GatedRouting(gate * self.scaling, self._dense_drop, self._input_scale(x))
        return self.fc2(self.activation_fn(self.fc1(x, routing)), routing)

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
            return SortedDroppedRows.apply(x, order, dropped)
        return self.lora_dropout(SortedDroppedRows.apply(x, order, order.new_empty(0)))

    def _sparse_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 MoLE: [T, D] -> [T, D]. On the CPU the whole MLP sorted by expert when training, else the LoRA
        inputs only; on other devices every expert with a one-hot gate (see the module docstring)."""
        if x.device.type != "cpu":
            return self._one_hot_forward(x, logits)
        if torch.is_grad_enabled() and not _autocast_enabled("cpu"):
            return self._sorted_mlp(x, logits)
        return self._sorted_lora_forward(x, logits)

    def _one_hot_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 MoLE: [T, D] -> [T, D] as `_gated_forward` with the one-hot gate (zero for the experts not chosen):
        no host sync, no gather or index-add, a fixed set of kernels, at the price of every expert's rank-r
        products (on a GPU far cheaper than the syncs and small launches of sorting)."""
        return self._gated_forward(x, expert_gate(logits, "sparse", self.output_scale))

    def _sorted_mlp(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 MoLE with the whole MLP on the tokens sorted by expert: [T, D] -> [T, D] (see the module
        docstring). The activation runs on sorted rows too; only x and y are gathered."""
        chosen, weight = top1_route(logits, self.output_scale)
        order = torch.argsort(chosen, stable=True)  # [T]
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        counts = F.one_hot(chosen, self.num_experts).sum(dim=0).tolist()
        gate = weight.index_select(0, order) * self.scaling  # [T, 1], sorted
        dropout = self.lora_dropout.p if self.training else 0.0
        routing = SortedRouting(gate, counts, dropout, consume_inputs=self.consume_fc_inputs)
        h = self.activation_fn(self.fc1(Permute.apply(x, order, inverse), routing))
        return Permute.apply(self.fc2(h, routing), inverse, order)

    def _sorted_lora_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 MoLE: [T, D] -> [T, D]. The LoRA inputs are sorted by expert so each expert reads a contiguous
        slice; the base fc1/fc2 run on the tokens in their own order (inference, GPU, autocast; see the module
        docstring)."""
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
