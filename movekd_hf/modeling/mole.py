"""Mixture of LoRA Experts (MoLE) for the student's encoder MLPs (METHOD.md section 2).

Per token x (the MLP input after the layer norm):

    p = softmax(router(x));  k = argmax(p)
    h = act(fc1(x) + s * B1_k A1_k drop(x));   y = fc2(h) + s * B2_k A2_k drop(h),   s = alpha / r

Experts are computed batched: every token is projected by all experts' A at once (E * r columns, a few
percent of the base matmul), the result is multiplied by a per-token gate (one-hot for sparse routing,
p for dense) and sent through all experts' B as one matmul. No Python loop over experts, no index scatter.

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

    def lora_delta(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Gated sum of the experts' LoRA outputs (unscaled).

        Args:
            x: `[T, in]` LoRA input (already dropped out).
            gate: `[T, E]` expert weights per token (one-hot for sparse routing).
        Returns:
            `[T, out]`.
        """
        num_experts, rank = self.num_experts, self.rank
        a_bias = None if self.lora_A_bias is None else self.lora_A_bias.reshape(-1)
        low_rank = F.linear(x, self.lora_A.reshape(num_experts * rank, -1), a_bias)  # [T, E*r]
        low_rank = (low_rank.view(-1, num_experts, rank) * gate.unsqueeze(-1)).view(-1, num_experts * rank)
        b_weight = self.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank)  # [out, E*r]
        delta = F.linear(low_rank, b_weight)  # [T, out]
        if self.lora_B_bias is not None:
            delta = delta + gate @ self.lora_B_bias
        return delta


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
    probs = router_logits.float().softmax(dim=-1)
    if routing == "dense":
        return probs.to(router_logits.dtype)
    onehot = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
    if output_scale == "probability":
        onehot = onehot * probs
    elif output_scale == "straight_through":
        onehot = onehot * (1.0 + probs - probs.detach())
    return onehot.to(router_logits.dtype)


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
        gate = expert_gate(logits, self.routing, self.output_scale)
        h = self.fc1(x) + self.scaling * self.fc1.lora_delta(self.lora_dropout(x), gate)
        h = self.activation_fn(h)
        y = self.fc2(h) + self.scaling * self.fc2.lora_delta(self.lora_dropout(h), gate)
        return y.view(*shape[:-1], -1)


def mole_mlp_from(mlp: nn.Module, config) -> MoLEMLP:
    """Build a `MoLEMLP` shaped like an existing CLIP/SigLIP MLP, reusing its activation and base weights."""
    mole = MoLEMLP(config, mlp.fc1.in_features, mlp.fc1.out_features, mlp.activation_fn)
    mole = mole.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
    if mlp.fc1.weight.device.type != "meta":
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                getattr(mole, name).weight.copy_(getattr(mlp, name).weight)
                getattr(mole, name).bias.copy_(getattr(mlp, name).bias)
    return mole
