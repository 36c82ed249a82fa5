"""GPU memory of a training step, per GPU, for `movekd-hf plan` ("does it fit").

Model states follow mixed-precision AdamW as DeepSpeed runs it (ZeRO paper, Rajbhandari et al. 2020, section 3.1):
bf16 weights for every VLM parameter (2 B), and for each trained one an fp32 master weight (4 B), an fp32 gradient
(4 B) and AdamW's two fp32 moments (8 B). DDP keeps all of it on every rank; ZeRO-2 shards master weights,
gradients and moments over the N ranks; ZeRO-3 also shards the bf16 weights. Teachers stay whole on every rank
(the trainer keeps them outside DeepSpeed) and hold no gradient or optimizer state.

Activations are an estimate from the shapes (bf16, 2 B per element), per layer `tokens x hidden x 2 B x factor`:
a pre-norm transformer block with a fused attention kernel (flash / memory-efficient SDPA: no tokens^2 scores)
keeps 8 x hidden values per token (two norms' inputs and outputs, q, k, v, attention output) plus its MLP's:
4 x intermediate for a gated (SwiGLU, LLaMA) MLP, 2 x intermediate for a plain one (CLIP). So the factor is
`8 + 4 i/h` (LLaMA) or `8 + 2 i/h` (CLIP). Gradient checkpointing (per layer, as transformers does) keeps each
layer's input (`tokens x hidden x 2 B`) plus one layer's activations while it is recomputed. The LM head's
logits add `tokens x vocab x 6 B` (bf16 logits and the fp32 log-probabilities the loss keeps for backward).
Left out: CUDA context, allocator fragmentation, communication buckets, LoRA/router activations (rank << hidden).

Teachers run without gradient before the student (movekd_hf/training/trainer.py `compute_loss`): their working
memory is measured on the meta device (`forward_peak_bytes`); only their outputs outlive the teacher pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

GIB = 2**30
BF16_BYTES, FP32_BYTES = 2, 4
STRATEGIES = ("ddp", "zero2", "zero3")
STRATEGY_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
LOGIT_BYTES = BF16_BYTES + FP32_BYTES


def model_state_bytes(trainable: int, frozen: int, num_gpus: int, strategy: str) -> dict[str, float]:
    """Bytes per GPU of weights, master weights, gradients and AdamW moments (parameter counts in, bytes out).

    trainable / frozen: parameters of the trained module (VLM + adapters), teachers excluded.
    Raises ValueError for an unknown strategy (one of `STRATEGIES`) or num_gpus < 1.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    optimizer_shards = 1 if strategy == "ddp" else num_gpus
    weight_shards = num_gpus if strategy == "zero3" else 1
    return {
        "weights_bf16": (trainable + frozen) * BF16_BYTES / weight_shards,
        "master_weights_fp32": trainable * FP32_BYTES / optimizer_shards,
        "gradients_fp32": trainable * FP32_BYTES / optimizer_shards,
        "adamw_states_fp32": trainable * 2 * FP32_BYTES / optimizer_shards,
    }


def block_factor(hidden: int, intermediate: int, gated_mlp: bool) -> float:
    """Activation values kept per token per hidden unit by one transformer block (see the module docstring)."""
    return 8 + (4 if gated_mlp else 2) * intermediate / hidden


def stack_activation_bytes(
    tokens: int, hidden: int, intermediate: int, layers: int, gated_mlp: bool, checkpointing: bool
) -> float:
    """Bytes a stack of `layers` blocks keeps for backward over `tokens` tokens (batch x sequence), in bf16.

    Without checkpointing: layers x tokens x hidden x 2 B x factor; with it: layers x tokens x hidden x 2 B (each
    layer's input) + one layer's tokens x hidden x 2 B x factor (the layer being recomputed).
    """
    per_layer = tokens * hidden * BF16_BYTES * block_factor(hidden, intermediate, gated_mlp)
    if checkpointing:
        return layers * tokens * hidden * BF16_BYTES + per_layer
    return layers * per_layer


def logits_bytes(tokens: int, vocab: int) -> float:
    """Bytes of the LM head's output kept for the loss: bf16 logits plus fp32 log-probabilities."""
    return tokens * vocab * LOGIT_BYTES


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


class _PeakLiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            del self.live[ref]
        # Views and in-place results share an input's storage: one made before the mode (a weight) is not new.
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _is_tensor(t)}
        for tensor in tree_leaves(out):
            if _is_tensor(tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref not in self.live and ref not in inputs:
                    self.live[ref] = tensor.untyped_storage().nbytes()
        self.peak = max(self.peak, self.current())
        return out

    def current(self) -> int:
        return sum(size for ref, size in self.live.items() if not ref.expired())


class _FusedAttention(TorchFunctionMode):
    """Stands in for a fused SDPA kernel (as on a GPU in bf16): the output alone, no tokens x tokens scores.

    On the meta device SDPA takes its math path, which materialises the scores a GPU kernel never holds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, value = args[0], args[2] if len(args) > 2 else (kwargs or {})["value"]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **(kwargs or {}))


def forward_peak_bytes(run: Callable[[], Any]) -> tuple[Any, int, int]:
    """(result, peak, held): `run()`'s result and the bytes of the tensors it creates: the most alive at once,
    and what its result still holds.

    Meant for meta tensors (shapes only, no memory, no arithmetic): run a no-grad forward of real shapes and get
    its working memory; inputs and weights made before the call are not counted. SDPA counts as a fused kernel.
    """
    tracker = _PeakLiveBytes()
    with _FusedAttention(), tracker:
        result = run()
    return result, tracker.peak, tracker.current()


def forward_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of `run()` by `torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-add of
    matmuls, convolutions and attention; elementwise ops are not counted. Works on meta tensors, where SDPA runs
    its math path, so attention's two matmuls are counted (CPU's fused SDPA kernel has no FLOP formula there)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


# The paper's recipe (METHOD.md section 5, the authors' scripts): batch per GPU and sequence length.
PAPER_BATCH_PER_GPU = {"stage1": 16, "stage2": 8}
PAPER_MAX_LENGTH = 2048


def student_activation_bytes(
    batch: int, max_length: int, llm: dict[str, int], vision: dict[str, int], checkpointing: bool
) -> dict[str, float]:
    """Activation bytes per GPU of the trained VLM's forward, kept for backward: {"llm", "logits", "vision"}.

    llm: hidden, intermediate, layers, vocab (a LLaMA stack over batch x max_length tokens); vision: hidden,
    intermediate, layers, tokens (a CLIP stack over batch images of `tokens` tokens each, CLS included).
    """
    text_tokens, image_tokens = batch * max_length, batch * vision["tokens"]
    return {
        "llm": stack_activation_bytes(
            text_tokens, llm["hidden"], llm["intermediate"], llm["layers"], gated_mlp=True, checkpointing=checkpointing
        ),
        "logits": logits_bytes(text_tokens, llm["vocab"]),
        "vision": stack_activation_bytes(
            image_tokens, vision["hidden"], vision["intermediate"], vision["layers"], False, checkpointing
        ),
    }


def step_memory_gib(
    trainable: int,
    frozen: int,
    num_gpus: int,
    strategy: str,
    activations: dict[bool, float],
    teacher_weight_bytes: float = 0.0,
    teacher_run_bytes: float = 0.0,
    teacher_output_bytes: float = 0.0,
) -> dict[str, float]:
    """Every figure of one stage under one strategy, in GiB per GPU, keys ending in `_gib`.

    activations: student activation bytes by checkpointing (True / False). The teachers run first, so a step's
    activation peak is max(teachers running, student activations + the teachers' outputs it still holds):
    total = model states + teachers' weights + that peak.
    """
    states = model_state_bytes(trainable, frozen, num_gpus, strategy)
    figures = {f"{name}_gib": value / GIB for name, value in states.items()}
    figures["teacher_weights_bf16_gib"] = teacher_weight_bytes / GIB
    figures["teacher_activations_gib"] = teacher_run_bytes / GIB
    figures["teacher_outputs_gib"] = teacher_output_bytes / GIB
    for checkpointing, suffix in ((True, "checkpointing"), (False, "no_checkpointing")):
        peak = max(teacher_run_bytes, activations[checkpointing] + teacher_output_bytes)
        figures[f"activations_{suffix}_gib"] = activations[checkpointing] / GIB
        figures[f"total_{suffix}_gib"] = (sum(states.values()) + teacher_weight_bytes + peak) / GIB
    return figures


def stage_parameters(parts: dict[str, int], trained: tuple[str, ...], llm_lora: int | None = None) -> tuple[int, int]:
    """(trainable, frozen) parameters of the trained module for a stage's trained components.

    parts: parameters per component (`vision_base`, `mole`, `projector`, `llm`, and `adapters` with teachers).
    llm_lora: LoRA parameters on the LLM when it trains through LoRA (then the LLM itself stays frozen).
    """
    trained_parts = set(trained) - ({"llm"} if llm_lora is not None else set())
    trainable = sum(count for name, count in parts.items() if name in trained_parts) + (llm_lora or 0)
    frozen = sum(count for name, count in parts.items() if name not in trained_parts)
    return trainable, frozen


def memory_plan(
    parts: dict[str, int],
    stages: dict[str, tuple[str, ...]],
    llm: dict[str, int],
    vision: dict[str, int],
    teachers: dict[str, dict[str, int]] | None = None,
    num_gpus: int = 8,
    gpu_memory_gib: float = 80.0,
    batch: dict[str, int] | None = None,
    max_length: int = PAPER_MAX_LENGTH,
    llm_lora: int | None = None,
) -> dict[str, dict]:
    """Per stage: its settings and, per strategy, `step_memory_gib`'s figures plus the verdicts `fits_*`.

    teachers: `plan.teacher_profiles` (None: no distillation, the LLaVA baseline). batch: per GPU per stage (the
    paper's by default). llm_lora: LoRA parameters on the LLM in stage 2 (None: the LLM trains in full).
    """
    batch = {**PAPER_BATCH_PER_GPU, **(batch or {})}
    profiles = list((teachers or {}).values())
    teacher_weights = sum(profile["parameters"] for profile in profiles) * BF16_BYTES
    outputs = sum(profile["output_bytes"] for profile in profiles)
    running = max((profile["activation_peak_bytes"] for profile in profiles), default=0) + outputs
    plan = {}
    for stage, trained in stages.items():
        trainable, frozen = stage_parameters(parts, trained, llm_lora if "llm" in trained else None)
        size = batch[stage]
        pieces = {ckpt: student_activation_bytes(size, max_length, llm, vision, ckpt) for ckpt in (True, False)}
        activations = {ckpt: sum(values.values()) for ckpt, values in pieces.items()}
        entry: dict = {
            "trainable_parameters": trainable,
            "frozen_parameters": frozen,
            "teacher_parameters": teacher_weights // BF16_BYTES,
            "batch_per_gpu_samples": size,
            "max_length_tokens": max_length,
            "activation_parts": {
                f"{name}_{'checkpointing' if ckpt else 'no_checkpointing'}_gib": value / GIB
                for ckpt, values in pieces.items()
                for name, value in values.items()
            },
        }
        for strategy in STRATEGIES:
            figures = step_memory_gib(trainable, frozen, num_gpus, strategy, activations,
                                      teacher_weights, size * running, size * outputs)  # fmt: skip
            for suffix in ("checkpointing", "no_checkpointing"):
                figures[f"fits_{suffix}"] = figures[f"total_{suffix}_gib"] <= gpu_memory_gib
            entry[strategy] = figures
        plan[stage] = entry
    return plan
