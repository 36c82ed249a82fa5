"""Key mapping from the authors' MoVE-KD checkpoints (their LLaVA fork, `move_llava_llama`) to this package.

Pure functions on state dicts; `convert.py` does the file handling. The authors' layout, read from
github.com/hey-cjj/MoVE-KD (commit c822da0):

    model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*          the LLaMA LLM (LlamaForCausalLM)
    model.mm_projector.{0,2}.{weight,bias}                                     mlp2x_gelu projector, an nn.Sequential
                                                                               (multimodal_projector/builder.py)
    model.vision_tower.vision_tower.vision_model.*                             the CLIP student (clip_encoder.py:
                                                                               CLIPVisionTower.vision_tower)
    with MoLE (language_model/move_llava_llama.py:139-150 wraps each layer's CLIPMLP in MoE_LoRA_CLIP):
        encoder.layers.N.mlp.original_module.{fc1,fc2}.{weight,bias}           the base MLP (moe_lora.py:55)
        encoder.layers.N.mlp.moe_down.K.lora_{A,B}.{weight,bias}               expert K on fc1, D -> r -> I
        encoder.layers.N.mlp.moe_up.K.lora_{A,B}.{weight,bias}                 expert K on fc2, I -> r -> D
                                                                               (moe_lora.py:58-80, used at 116-126)
        encoder.layers.N.mlp.router.{weight,bias}                              router D -> E (moe_lora.py:82)
    without MoLE: encoder.layers.N.mlp.{fc1,fc2}.* as in stock CLIP
    <teacher>_adapter_{1,2}.{weight,bias}, teacher in sam/eva/convnext/pix2struct   teacher adapters at the top
        level of MoVELlavaLlamaForCausalLM (move_llava_llama.py:99-111): _1 = Linear(C_t -> D) on channels,
        _2 = Linear(N_t -> N_s) across tokens (applied at 314-337)

Each LoRA half is an `nn.Linear` (moe_lora.py:28-29), so `lora_A.weight` is `[r, in]` and `lora_B.weight` is
`[out, r]`: the same orientation as ours, no transpose.

Ours (in memory, transformers 5): `model.language_model.*`, `lm_head.*`, `model.multi_modal_projector.linear_{1,2}.*`,
`model.vision_tower.*` with experts stacked per fc: `mlp.fc1.lora_A` [E, r, D], `lora_A_bias` [E, r],
`lora_B` [E, I, r], `lora_B_bias` [E, I] (fc2 likewise with D and I swapped), `mlp.router.*` unchanged. Teacher
adapters become the distiller's `adapters.<slug>.channel_proj.*` / `adapters.<slug>.token_proj.*`
(`movekd_hf.distill.adapters.TokenMixAdapter`, the same maths).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import InputError

AUTHORS_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
VISION_PREFIX = "model.vision_tower."
# name-level renames, first match wins; anything unmatched is an error
_RENAMES = (
    (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
    (re.compile(r"^model\.mm_projector\.0\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^model\.mm_projector\.2\.(weight|bias)$"), r"model.multi_modal_projector.linear_2.\1"),
    # MoE_LoRA_CLIP keeps the wrapped CLIPMLP as `original_module`; our MoLE MLP keeps fc1/fc2 at its top.
    (
        re.compile("^" + re.escape(AUTHORS_VISION_PREFIX) + r"(encoder\.layers\.\d+\.mlp)\.original_module\.(.+)$"),
        VISION_PREFIX + r"\1.\2",
    ),
    (re.compile("^" + re.escape(AUTHORS_VISION_PREFIX) + r"(.+)$"), VISION_PREFIX + r"\1"),
)
# Buffers older transformers versions saved; they are recomputed at load time, so nothing is lost.
_DROPPED = (re.compile(r"\.position_ids$"), re.compile(r"\.rotary_emb\.inv_freq$"))
_MOLE = re.compile(
    r"^(?P<mlp>.+\.encoder\.layers\.\d+\.mlp)\.(?P<group>moe_up|moe_down)\.(?P<expert>\d+)"
    r"\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$"
)
# moe_lora.py:67-80: moe_down maps fc1's in -> out (D -> I) and is added to fc1 (line 119), moe_up to fc2 (126).
_NAMED_SIDE = {"moe_down": "fc1", "moe_up": "fc2"}
_ADAPTER = re.compile(r"^(?P<teacher>sam|eva|convnext|pix2struct)_adapter_(?P<index>[12])\.(?P<param>weight|bias)$")
# Authors' teacher name -> this package's teacher slug; teachers the package does not implement are dropped.
ADAPTER_SLUGS = {"sam": "sam", "eva": "eva", "convnext": "convnext"}
_ADAPTER_PART = {"1": "channel_proj", "2": "token_proj"}


@dataclass
class ConvertedState:
    """An authors' state dict split for this package.

    model: the VLM's weights in our names (MoLE experts stacked).
    adapters: teacher adapters in the distiller's names (`adapters.<slug>.{channel_proj,token_proj}.*`).
    dropped: authors' keys left out, each with the reason.
    """

    model: dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def map_adapter_key(key: str) -> str | None:
    """The distiller's name for an authors' teacher-adapter key (`eva_adapter_1.weight` ->
    `adapters.eva.channel_proj.weight`); `None` for an adapter of a teacher this package lacks (pix2struct).
    Raises `KeyError` for a key that is no teacher adapter."""
    match = _ADAPTER.match(key)
    if match is None:
        raise KeyError(key)
    slug = ADAPTER_SLUGS.get(match["teacher"])
    if slug is None:
        return None
    return f"adapters.{slug}.{_ADAPTER_PART[match['index']]}.{match['param']}"


def map_plain_key(key: str, source: str | None = None) -> str | None:
    """Our name for a non-MoLE, non-adapter key of the authors' checkpoint; `None` for buffers that are recomputed.

    Raises `InputError` naming the key when it is not understood, so nothing is silently dropped.
    """
    if any(pattern.search(key) for pattern in _DROPPED):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise InputError(
        f"unknown key {key!r} in the authors' checkpoint; conversion stops rather than drop it",
        file=source,
        expected="LLM (model.layers.*), projector (model.mm_projector.*), vision tower "
        "(model.vision_tower.vision_tower.vision_model.*), MoLE or <teacher>_adapter_{1,2} weights",
    )


def _side_from_shapes(key: str, a_shape, b_shape, fc1_shape, fc2_shape, named: str, source) -> str:
    """`"fc1"` or `"fc2"` for an expert with LoRA A weight `[r, in]` and B weight `[out, r]`.

    fc1 weight is `[I, D]` (D -> I), fc2 is `[D, I]`. The name decides (moe_down -> fc1, moe_up -> fc2); the
    shapes must agree with it, which they cannot contradict only when D == I.
    """
    fits = {
        side: a_shape[1] == fc_shape[1] and b_shape[0] == fc_shape[0]
        for side, fc_shape in (("fc1", fc1_shape), ("fc2", fc2_shape))
    }
    if not fits[named]:
        other = "fc2" if named == "fc1" else "fc1"
        fit_text = (
            f"they fit {other}" if fits[other] else f"they fit neither fc1 {list(fc1_shape)} nor fc2 {list(fc2_shape)}"
        )
        raise InputError(
            f"{key}: LoRA shapes A {list(a_shape)} / B {list(b_shape)} do not fit {named} of the same MLP ({fit_text})",
            file=source,
            expected=f"A [r, in] and B [out, r] of {named} (moe_down experts act on fc1, moe_up experts on fc2)",
        )
    return named


def _collect_experts(state_dict: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]]:
    """Group MoLE tensors by (mlp prefix, group name) then expert index; parts keyed like `lora_A.weight`."""
    groups: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, tensor in state_dict.items():
        match = _MOLE.match(key)
        if match:
            part = f"{match['part']}.{match['param']}"
            groups[(match["mlp"], match["group"])][int(match["expert"])][part] = tensor
    return groups


def _stack_group(label: str, experts: dict[int, dict[str, torch.Tensor]], bias: bool, source) -> dict:
    if sorted(experts) != list(range(len(experts))):
        raise InputError(f"{label}: expert indices are {sorted(experts)}", file=source, expected="0..E-1")
    parts = ["lora_A.weight", "lora_B.weight"] + (["lora_A.bias", "lora_B.bias"] if bias else [])
    for index, tensors in experts.items():
        if sorted(tensors) != sorted(parts):
            raise InputError(
                f"{label}.{index}: found parts {sorted(tensors)}", file=source, expected=f"parts {sorted(parts)}"
            )
    ordered = [experts[index] for index in range(len(experts))]
    stacked = {
        "lora_A": torch.stack([t["lora_A.weight"] for t in ordered]),  # [E, r, in]
        "lora_B": torch.stack([t["lora_B.weight"] for t in ordered]),  # [E, out, r]
    }
    if bias:
        stacked["lora_A_bias"] = torch.stack([t["lora_A.bias"] for t in ordered])  # [E, r]
        stacked["lora_B_bias"] = torch.stack([t["lora_B.bias"] for t in ordered])  # [E, out]
    return stacked


def convert_mole(state_dict: dict[str, torch.Tensor], source: str | None = None) -> dict[str, torch.Tensor]:
    """Stack the authors' per-expert LoRA tensors into our `[E, ...]` parameters, keyed by the AUTHORS' prefix.

    Returns `{authors_mlp_prefix + ".fc1.lora_A": tensor, ...}`; `map_plain_key` then renames the prefix. Raises
    `InputError` when the base MLP (`mlp.original_module.fc1/fc2`) is missing, an expert's shapes do not fit its
    side, or the expert sets are incomplete or of different sizes.
    """
    out: dict[str, torch.Tensor] = {}
    num_experts: dict[str, int] = {}
    for (mlp, group), experts in sorted(_collect_experts(state_dict).items()):
        label = f"{mlp}.{group}"
        fc1 = state_dict.get(f"{mlp}.original_module.fc1.weight")
        fc2 = state_dict.get(f"{mlp}.original_module.fc2.weight")
        if fc1 is None or fc2 is None:
            raise InputError(
                f"{label}: the MLP's base weights are missing",
                file=source,
                expected=f"{mlp}.original_module.fc1.weight and .fc2.weight, where MoE_LoRA_CLIP keeps them",
            )
        first = experts[min(experts)]
        if "lora_A.weight" not in first or "lora_B.weight" not in first:
            raise InputError(
                f"{label}.{min(experts)}: lora_A.weight or lora_B.weight is missing", file=source, expected="both"
            )
        side = _side_from_shapes(
            f"{label}.{min(experts)}", first["lora_A.weight"].shape, first["lora_B.weight"].shape,
            fc1.shape, fc2.shape, _NAMED_SIDE[group], source,
        )  # fmt: skip
        stacked = _stack_group(label, experts, bias="lora_A.bias" in first, source=source)
        if num_experts.setdefault(mlp, len(experts)) != len(experts):
            raise InputError(
                f"{label}: {len(experts)} experts, but the other side of this MLP has {num_experts[mlp]}",
                file=source,
                expected="the same number of moe_down and moe_up experts",
            )
        for name, tensor in stacked.items():
            out[f"{mlp}.{side}.{name}"] = tensor
    return out


def convert_state_dict(state_dict: dict[str, torch.Tensor], source: str | None = None) -> ConvertedState:
    """Split and rename an authors' state dict: VLM weights in our names, teacher adapters in the distiller's
    names, and the keys dropped with their reason. Raises `InputError` for an unknown key or for two keys that
    would land on the same name (for example `mlp.fc1` next to `mlp.original_module.fc1`)."""
    result = ConvertedState()
    origin: dict[str, str] = {}
    stacked = convert_mole(state_dict, source)
    for key, tensor in list(state_dict.items()) + list(stacked.items()):
        if _MOLE.match(key):
            continue  # consumed by convert_mole
        if _ADAPTER.match(key):
            target = map_adapter_key(key)
            if target is None:
                result.dropped[key] = "adapter of a teacher this package does not implement"
            else:
                result.adapters[target] = tensor
            continue
        target = map_plain_key(key, source)
        if target is None:
            result.dropped[key] = "buffer recomputed at load time"
            continue
        if target in origin:
            raise InputError(
                f"keys {origin[target]!r} and {key!r} both map to {target!r}",
                file=source,
                expected="one source for each weight (MoLE checkpoints keep the base MLP under mlp.original_module)",
            )
        origin[target] = key
        result.model[target] = tensor
    return result


def align_to_model_keys(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """On transformers 4.x the tower keeps a `.vision_model` level in memory; insert it where the model has it."""
    aligned = {}
    for key, tensor in state_dict.items():
        legacy = key.replace(VISION_PREFIX, VISION_PREFIX + "vision_model.", 1)
        aligned[legacy if key not in model_keys and legacy in model_keys else key] = tensor
    return aligned
