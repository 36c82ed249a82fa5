"""Key mapping from the authors' MoVE-KD checkpoints (their LLaVA fork, `move_llava_llama`) to this package.

Pure functions on state dicts; `convert.py` does the file handling. The authors' layout:

    model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*          the LLaMA LLM
    model.mm_projector.{0,2}.{weight,bias}                                     mlp2x_gelu projector
    model.vision_tower.vision_tower.vision_model.*                             the CLIP student, whose
        encoder.layers.N.mlp.fc1/fc2.{weight,bias}                             base MLP,
        encoder.layers.N.mlp.moe_up.K.lora_{A,B}.{weight,bias}                 expert K on fc1 (D -> r -> I),
        encoder.layers.N.mlp.moe_down.K.lora_{A,B}.{weight,bias}               expert K on fc2 (I -> r -> D),
        encoder.layers.N.mlp.router.{weight,bias}                              router (D -> E)
    *encoder_adapter.*                                                         teacher adapters (training only)

Ours (in memory, transformers 5): `model.language_model.*`, `lm_head.*`, `model.multi_modal_projector.linear_{1,2}.*`,
`model.vision_tower.*` with experts stacked per fc: `mlp.fc1.lora_A` [E, r, D], `lora_A_bias` [E, r],
`lora_B` [E, I, r], `lora_B_bias` [E, I] (fc2 likewise with D and I swapped), `mlp.router.*` unchanged.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

AUTHORS_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
VISION_PREFIX = "model.vision_tower."
# name-level renames, first match wins; anything unmatched is an error
_RENAMES = (
    (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
    (re.compile(r"^model\.mm_projector\.0\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^model\.mm_projector\.2\.(weight|bias)$"), r"model.multi_modal_projector.linear_2.\1"),
    (re.compile("^" + re.escape(AUTHORS_VISION_PREFIX) + r"(.+)$"), VISION_PREFIX + r"\1"),
)
# Buffers older transformers versions saved; they are recomputed at load time, so nothing is lost.
_DROPPED = (re.compile(r"\.position_ids$"), re.compile(r"\.rotary_emb\.inv_freq$"))
_ADAPTER = re.compile(r"(^|\.)encoder_adapter\.")
_MOLE = re.compile(
    r"^(?P<mlp>.+\.encoder\.layers\.\d+\.mlp)\.(?P<group>moe_up|moe_down)\.(?P<expert>\d+)"
    r"\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$"
)
_NAMED_SIDE = {"moe_up": "fc1", "moe_down": "fc2"}


def is_adapter_key(key: str) -> bool:
    return bool(_ADAPTER.search(key))


def map_plain_key(key: str) -> str | None:
    """Our name for a non-MoLE key of the authors' checkpoint; `None` for buffers that are recomputed.

    Raises `ValueError` naming the key when it is not understood, so nothing is silently dropped.
    """
    if any(pattern.search(key) for pattern in _DROPPED):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise ValueError(
        f"Unknown key {key!r} in the authors' checkpoint: it is neither LLM, projector, vision tower, MoLE nor "
        "adapter weight. Conversion stops rather than drop it."
    )


def _side_from_shapes(key: str, a_shape, b_shape, fc1_shape, fc2_shape, named: str) -> str:
    """`"fc1"` or `"fc2"` for an expert with LoRA A weight `[r, in]` and B weight `[out, r]`.

    fc1 weight is `[I, D]` (D -> I), fc2 is `[D, I]`. The shapes decide; the name must agree unless the
    shapes cannot tell the two apart (D == I).
    """
    fits = {
        side: a_shape[1] == fc_shape[1] and b_shape[0] == fc_shape[0]
        for side, fc_shape in (("fc1", fc1_shape), ("fc2", fc2_shape))
    }
    if not any(fits.values()):
        raise ValueError(
            f"{key}: LoRA shapes A {list(a_shape)} / B {list(b_shape)} fit neither fc1 {list(fc1_shape)} nor "
            f"fc2 {list(fc2_shape)} of the same MLP."
        )
    if all(fits.values()):  # D == I: shapes are ambiguous, the name decides
        return named
    side = "fc1" if fits["fc1"] else "fc2"
    if side != named:
        raise ValueError(
            f"{key}: its name says {named} but its shapes A {list(a_shape)} / "
            f"B {list(b_shape)} fit {side}; the checkpoint is inconsistent."
        )
    return side


def _collect_experts(state_dict: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]]:
    """Group MoLE tensors by (mlp prefix, group name) then expert index; parts keyed like `lora_A.weight`."""
    groups: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, tensor in state_dict.items():
        match = _MOLE.match(key)
        if match:
            part = f"{match['part']}.{match['param']}"
            groups[(match["mlp"], match["group"])][int(match["expert"])][part] = tensor
    return groups


def _stack_group(label: str, experts: dict[int, dict[str, torch.Tensor]], bias: bool) -> dict[str, torch.Tensor]:
    if sorted(experts) != list(range(len(experts))):
        raise ValueError(f"{label}: expert indices must be 0..E-1, got {sorted(experts)}.")
    parts = ["lora_A.weight", "lora_B.weight"] + (["lora_A.bias", "lora_B.bias"] if bias else [])
    for index, tensors in experts.items():
        if sorted(tensors) != sorted(parts):
            raise ValueError(f"{label}.{index}: expected parts {sorted(parts)}, found {sorted(tensors)}.")
    ordered = [experts[index] for index in range(len(experts))]
    stacked = {
        "lora_A": torch.stack([t["lora_A.weight"] for t in ordered]),  # [E, r, in]
        "lora_B": torch.stack([t["lora_B.weight"] for t in ordered]),  # [E, out, r]
    }
    if bias:
        stacked["lora_A_bias"] = torch.stack([t["lora_A.bias"] for t in ordered])  # [E, r]
        stacked["lora_B_bias"] = torch.stack([t["lora_B.bias"] for t in ordered])  # [E, out]
    return stacked


def convert_mole(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack the authors' per-expert LoRA tensors into our `[E, ...]` parameters, keyed by the AUTHORS' prefix.

    Returns `{authors_mlp_prefix + ".fc1.lora_A": tensor, ...}`; `map_plain_key` then renames the prefix.
    """
    out: dict[str, torch.Tensor] = {}
    num_experts: dict[str, int] = {}
    for (mlp, group), experts in sorted(_collect_experts(state_dict).items()):
        label = f"{mlp}.{group}"
        fc1, fc2 = state_dict.get(f"{mlp}.fc1.weight"), state_dict.get(f"{mlp}.fc2.weight")
        if fc1 is None or fc2 is None:
            raise ValueError(f"{label}: the MLP's base fc1/fc2 weights are missing, so the expert side is unknown.")
        first = experts[min(experts)]
        if "lora_A.weight" not in first or "lora_B.weight" not in first:
            raise ValueError(f"{label}.{min(experts)}: lora_A.weight and lora_B.weight are both required.")
        side = _side_from_shapes(
            f"{label}.{min(experts)}", first["lora_A.weight"].shape, first["lora_B.weight"].shape,
            fc1.shape, fc2.shape, _NAMED_SIDE[group],
        )  # fmt: skip
        if f"{mlp}.{side}.lora_A" in out:
            raise ValueError(f"{label}: a second expert group maps to {side} of the same MLP.")
        stacked = _stack_group(label, experts, bias="lora_A.bias" in first)
        if num_experts.setdefault(mlp, len(experts)) != len(experts):
            raise ValueError(
                f"{label}: {len(experts)} experts, but the other side of this MLP has {num_experts[mlp]}."
            )
        for name, tensor in stacked.items():
            out[f"{mlp}.{side}.{name}"] = tensor
    return out


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split and rename an authors' state dict into (model weights in our names, adapter weights as they were)."""
    model: dict[str, torch.Tensor] = {}
    adapters: dict[str, torch.Tensor] = {}
    stacked = convert_mole(state_dict)
    for key, tensor in list(state_dict.items()) + list(stacked.items()):
        if _MOLE.match(key):
            continue  # consumed by convert_mole
        if is_adapter_key(key):
            adapters[key] = tensor
            continue
        target = map_plain_key(key)
        if target is not None:
            model[target] = tensor
    return model, adapters


def align_to_model_keys(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """On transformers 4.x the tower keeps a `.vision_model` level in memory; insert it where the model has it."""
    aligned = {}
    for key, tensor in state_dict.items():
        legacy = key.replace(VISION_PREFIX, VISION_PREFIX + "vision_model.", 1)
        aligned[legacy if key not in model_keys and legacy in model_keys else key] = tensor
    return aligned
