"""A tiny checkpoint laid out exactly as the MoVE-KD authors' code writes one, built from their model classes.

Read from github.com/hey-cjj/MoVE-KD at commit c822da0 (`git show HEAD:<file>`), not from our converter:

- `llava/model/multimodal_encoder/moe_lora.py`
    - 25-45 `LoRALayer`: `lora_A = nn.Linear(in, rank)`, `lora_B = nn.Linear(rank, out)`, `scaling = alpha / rank`,
      forward `lora_B(lora_A(dropout(x))) * scaling`; dropout p = 0.05 (71, 78).
    - 47-82 `MoE_LoRA_CLIP`: keeps CLIP's MLP as `original_module`; `moe_down[k] = LoRALayer(D -> I)`,
      `moe_up[k] = LoRALayer(I -> D)` (D = fc1.in_features, I = fc1.out_features); `router = nn.Linear(D, E)`.
    - 84-127 forward: p = softmax(router(x)), index = argmax p; fc1 gets `moe_down` (116-119), fc2 gets `moe_up`
      (123-126); dense: sum_k p_k * lora_k(x) (84-95); sparse: the chosen expert, not scaled by p (97-106).
- `llava/model/language_model/move_llava_llama.py`
    - 35-56 `MoVELlavaLlamaConfig`: the `moe` block (`moe_encoder`, `moe_encoder_dense`, `moe_encoder_lora_rank`,
      `moe_encoder_lora_alpha`, `moe_encoder_num_experts`) and the `kd` block, on top of `LlamaConfig`.
    - 66-79: `model` (LLaMA + LLaVA parts) and `lm_head` at the top level.
    - 99-111: teacher adapters as top-level attributes `<teacher>_adapter_1` (Linear C_t -> 1024) and
      `<teacher>_adapter_2` (Linear N_t -> 576), teacher in sam / eva / pix2struct / convnext; 314-337 applies
      `adapter_2(gelu(adapter_1(tokens)).T).T`.
    - 115-150: `moe` filled from the training arguments only when `moe_encoder` (else the defaults stay, with
      `moe_encoder` false); each CLIP layer's `mlp` wrapped in `MoE_LoRA_CLIP`.
- `llava/model/multimodal_encoder/clip_encoder.py` 27: the student is `CLIPVisionModel` under
  `model.vision_tower.vision_tower` (so `...vision_tower.vision_tower.vision_model.*`); 32-40: hidden state
  `mm_vision_select_layer`, `patch` drops CLS.
- `llava/model/multimodal_projector/builder.py` 33-44: `mlp2x_gelu` = `nn.Sequential(Linear, GELU, Linear)`, so
  `model.mm_projector.{0,2}.*`.
- `llava/model/llava_arch.py` 72-77 and `llava/train/train.py` 987-1000: the `mm_*` / tokenizer fields of
  config.json; `train.py` 202-271: stage 2 (`--finetune True`) ends in `trainer.save_model`, i.e.
  `save_pretrained` (transformers 4.37.2: safetensors shards `model-0000x-of-0000y.safetensors` + index by
  default, `pytorch_model-*.bin` + index with `save_safetensors=False`); 943-967: the slow LLaMA tokenizer
  (`use_fast=False`), `pad_token = unk_token`, saved with the model.
- `scripts/move-kd/finetune-v1.1.sh`: the released settings (rank 32, alpha 1, 3 experts, sparse,
  teachers clip sam eva convnext).

Shapes here are tiny with every dimension distinct. The LoRA/router tensors are drawn at random (biases too,
as training would move them), the rest keeps transformers' seeded initialisation.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
TEXT = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=331, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, hidden_act="silu", tie_word_embeddings=False)  # fmt: skip
NUM_PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 16 student tokens
# teacher -> (channels C_t, tokens N_t) of its features at its input size (tiny stand-ins for 1024x4096 etc.)
TEACHERS = {"sam": (20, 64), "eva": (24, 100), "convnext": (28, 36), "pix2struct": (12, 25)}
AUTHORS_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SP_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A red square on a white table.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Answer the question using a single word or phrase.",
]


@dataclass(frozen=True)
class AuthorsVariant:
    """One training configuration of the authors' code (their `--moe_encoder*` arguments and save format)."""

    name: str
    moe_encoder: bool = True
    dense: bool = False
    lora_alpha: float = 1
    num_experts: int = 3
    lora_rank: int = 4
    safetensors: bool = True
    teachers: tuple[str, ...] = ("sam", "eva", "convnext")


class LoRALayer(nn.Module):
    """moe_lora.py:25-45."""

    def __init__(self, in_channel: int, out_channel: int, rank: int, lora_alpha: float):
        super().__init__()
        self.lora_A = nn.Linear(in_channel, rank)
        self.lora_B = nn.Linear(rank, out_channel)
        self.scaling = lora_alpha / rank
        self.lora_dropout = nn.Dropout(p=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class MoELoRACLIP(nn.Module):
    """moe_lora.py:47-127 (`MoE_LoRA_CLIP`), returning the hidden states only (the routing is kept on `routing`)."""

    def __init__(self, original_module: nn.Module, rank: int, lora_alpha: float, num_experts: int, dense: bool):
        super().__init__()
        self.original_module, self.num_experts, self.dense_moe = original_module, num_experts, dense
        d, i = original_module.fc1.in_features, original_module.fc1.out_features
        self.moe_down = nn.ModuleList(LoRALayer(d, i, rank, lora_alpha) for _ in range(num_experts))
        self.moe_up = nn.ModuleList(LoRALayer(i, d, rank, lora_alpha) for _ in range(num_experts))
        self.router = nn.Linear(d, num_experts)
        self.routing = None

    def _lora_moe(self, x, proj, routing, index, moe):
        base = proj(x)  # [B, N, out]
        if self.dense_moe:  # moe_lora.py:84-95
            lora = torch.stack([expert(x) for expert in moe], 2)  # [B, N, E, out]
            return base + (lora * routing[:, :, :, None]).sum(2)
        lora = torch.zeros_like(base)  # moe_lora.py:97-106
        for k in range(self.num_experts):
            rows, cols, _ = torch.where(index == k)
            lora[rows, cols] = moe[k](x[rows, cols])
        return base + lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.softmax(self.router(x), dim=-1)  # [B, N, E]
        index = routing.max(-1, keepdim=True)[1]  # [B, N, 1]
        self.routing = routing
        h = self._lora_moe(x, self.original_module.fc1, routing, index, self.moe_down)
        h = self.original_module.activation_fn(h)
        return self._lora_moe(h, self.original_module.fc2, routing, index, self.moe_up)


def clip_transformer(clip: nn.Module) -> nn.Module:
    """The module whose keys follow `vision_model.` in a saved CLIPVisionModel (transformers 4.x wraps it)."""
    return getattr(clip, "vision_model", clip)


def build_authors_model(variant: AuthorsVariant, seed: int = 0) -> nn.Module:
    """`MoVELlavaLlamaForCausalLM` as their `initialize_teachers` leaves it; its `state_dict()` has their key names."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(**TEXT))
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION))
    tower = nn.Module()  # CLIPVisionTower: its `vision_tower` is the CLIPVisionModel
    tower.vision_tower = nn.Module()
    tower.vision_tower.vision_model = clip_transformer(clip)
    llm.model.vision_tower = tower
    d, h = VISION["hidden_size"], TEXT["hidden_size"]
    llm.model.mm_projector = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h))
    for teacher in variant.teachers:
        channels, tokens = TEACHERS[teacher]
        setattr(llm, f"{teacher}_adapter_1", nn.Linear(channels, d))
        setattr(llm, f"{teacher}_adapter_2", nn.Linear(tokens, NUM_PATCHES))
    if variant.moe_encoder:
        generator = torch.Generator().manual_seed(seed + 1)
        for layer in clip_transformer(clip).encoder.layers:
            layer.mlp = MoELoRACLIP(
                layer.mlp, variant.lora_rank, variant.lora_alpha, variant.num_experts, variant.dense
            )
            with torch.no_grad():  # trained values: nothing zero, routers that disagree across tokens
                for name, param in layer.mlp.named_parameters():
                    if "moe_" in name or "router" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "router" in name else 0.3))
    return llm.eval()


def authors_config(variant: AuthorsVariant) -> dict:
    """config.json as `save_pretrained` of `MoVELlavaLlamaConfig` writes it after their stage 2."""
    moe = dict(
        moe_encoder=False,
        moe_encoder_dense=False,
        moe_encoder_lora_rank=32,
        moe_encoder_lora_alpha=1,
        moe_encoder_num_experts=3,
    )  # fmt: skip  (the config class's defaults, move_llava_llama.py:38-43)
    if variant.moe_encoder:
        moe = dict(moe_encoder=True, moe_encoder_dense=variant.dense, moe_encoder_lora_rank=variant.lora_rank,
                   moe_encoder_lora_alpha=variant.lora_alpha, moe_encoder_num_experts=variant.num_experts)  # fmt: skip
    return {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["MoVELlavaLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        **TEXT,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "kd": {"kd_mode": True},
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "model_type": "move_llava_llama",
        "moe": moe,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
    }


def write_slow_tokenizer(folder: Path) -> None:
    """A LLaMA-style sentencepiece BPE model (byte fallback, ids 0/1/2 = unk/bos/eos) trained here, saved as
    transformers 4.37's `LlamaTokenizer.save_pretrained` does (no tokenizer.json), with LLaVA's pad = unk."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT * 20), model_writer=model, vocab_size=TEXT["vocab_size"], model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", split_digits=True, remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    decoder = {str(i): {**special, "content": t, "special": True} for i, t in enumerate(names.values())}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, **names,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048, "pad_token": "<unk>",
        "padding_side": "right", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    }  # fmt: skip
    special_map = {name: {**special, "content": token} for name, token in names.items()} | {"pad_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def write_authors_checkpoint(folder: Path, variant: AuthorsVariant, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `variant` into `folder` (sharded safetensors or sharded .bin, with their index; config; slow
    tokenizer); returns every saved tensor by its original key."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().clone() for key, tensor in build_authors_model(variant, seed).state_dict().items()}
    # A shard limit well under the model's size, so the index and several shards are exercised.
    save_torch_state_dict(state, folder, max_shard_size=80_000, safe_serialization=variant.safetensors,
                          metadata={"format": "pt"} if variant.safetensors else None)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(authors_config(variant), indent=2))
    write_slow_tokenizer(folder)
    return state
