"""`movekd-hf convert SRC DST`: turn a checkpoint of the authors' MoVE-KD code into this package's format.

SRC is a folder their training wrote: `config.json` (`model_type` `move_llava_llama`, LLaMA fields plus LLaVA's
`mm_*` fields), the weights (`pytorch_model*.bin` or `model*.safetensors`), and optionally the separately saved
`mm_projector.bin`, `mole_encoder.bin`, `encoder_adapter.bin` and the tokenizer. DST receives a MoVE-KD
checkpoint in faithful mode (Kaiming-initialised B and unscaled sparse experts, as the authors trained it):
`config.json`, `model.safetensors`, the remote code, the processor when SRC has a tokenizer, and the teacher
adapters as `distill_adapters.safetensors` (training state, not part of the VLM).

Every key is mapped (see `convert_keys`); an unknown key stops the conversion with its name. Like llava-hf's
conversion, `<image>` and `<pad>` tokens are appended to the vocabulary (new embedding rows are the mean of the
existing ones, the vocabulary padded to a multiple of 64).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..modeling import MoVEKDConfig, MoVEKDForConditionalGeneration
from ..modeling.llava_conventions import IMAGE_TOKEN, student_grid
from ..models import build_processor
from .convert_keys import VISION_PREFIX, align_to_model_keys, convert_state_dict

SEPARATE_FILES = ("mm_projector.bin", "mole_encoder.bin", "encoder_adapter.bin")
AUTHORS_MODEL_TYPES = ("move_llava_llama", "llava_llama")
LLAMA_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "bos_token_id",
    "eos_token_id", "attention_bias", "tie_word_embeddings",
)  # fmt: skip
ADAPTERS_FILE = "distill_adapters.safetensors"
EMBED_KEY, LM_HEAD_KEY = "model.language_model.embed_tokens.weight", "lm_head.weight"
# Paper values (METHOD.md section 2), used when the authors' config.json does not record them.
DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT = 1.0, 0.05


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return state


def load_authors_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Main weights plus the separately saved files; a key found twice with different values is an error."""
    main = sorted(src.glob("pytorch_model*.bin")) + sorted(src.glob("model*.safetensors"))
    separate = [src / name for name in SEPARATE_FILES if (src / name).is_file()]
    if not main:
        raise FileNotFoundError(f"No weights in {src}: expected pytorch_model*.bin or model*.safetensors.")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in main + separate:
        for key, tensor in _load_tensor_file(path).items():
            if key in state and not torch.equal(state[key], tensor):
                raise ValueError(f"Key {key!r} appears in {origin[key].name} and {path.name} with different values.")
            state[key], origin[key] = tensor, path
    return state


def vision_config_from_weights(model_sd: dict[str, torch.Tensor], overrides: dict[str, Any] | None) -> dict:
    """A CLIP vision config read off the tower's weight shapes; `overrides` adds what shapes cannot tell."""
    patch = model_sd[VISION_PREFIX + "embeddings.patch_embedding.weight"]  # [D, 3, p, p]
    positions = model_sd[VISION_PREFIX + "embeddings.position_embedding.weight"].shape[0] - 1  # minus CLS
    fc1 = model_sd[VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"]  # [I, D]
    layers = {
        int(m[1]) for k in model_sd if (m := re.match(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.", k))
    }
    hidden, grid = patch.shape[0], math.isqrt(positions)
    config = dict(
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=len(layers),
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
        hidden_act="quick_gelu",  # OpenAI CLIP, the student of the authors' code
        layer_norm_eps=1e-5,
    )
    config.update(overrides or {})
    if "num_attention_heads" not in config:
        if hidden % 64:
            raise ValueError(
                f"The vision tower's width {hidden} is not a multiple of 64, so its number of attention heads "
                "cannot be inferred: pass it with --vision-config '{\"num_attention_heads\": N}'."
            )
        config["num_attention_heads"] = hidden // 64  # CLIP's head width
    return config


def mole_settings(model_sd: dict[str, torch.Tensor], authors_config: dict) -> dict:
    """MoLE fields read off the stacked expert shapes, faithful switches on."""
    lora_a = model_sd[VISION_PREFIX + "encoder.layers.0.mlp.fc1.lora_A"]  # [E, r, D]
    return dict(
        num_experts=lora_a.shape[0],
        lora_rank=lora_a.shape[1],
        lora_bias=VISION_PREFIX + "encoder.layers.0.mlp.fc1.lora_A_bias" in model_sd,
        lora_alpha=float(authors_config.get("lora_alpha", DEFAULT_LORA_ALPHA)),
        lora_dropout=float(authors_config.get("lora_dropout", DEFAULT_LORA_DROPOUT)),
        mole_routing="sparse",
        faithful=True,
    )


def add_special_token_rows(model_sd: dict[str, torch.Tensor], new_vocab: int) -> None:
    """Grow embeddings and LM head to `new_vocab` rows; new rows are the mean of the existing rows."""
    for key in (EMBED_KEY, LM_HEAD_KEY):
        weight = model_sd[key]  # [V, H]
        extra = new_vocab - weight.shape[0]
        if extra > 0:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, H]
            model_sd[key] = torch.cat([weight, mean.expand(extra, -1)], dim=0)  # [V', H]


def _plan_tokens(src: Path, vocab_size: int):
    """(tokenizer or None, image token id, pad token id, new vocab size)."""

    if not (src / "tokenizer_config.json").is_file():
        return None, vocab_size, vocab_size + 1, math.ceil((vocab_size + 2) / 64) * 64
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    added = {} if IMAGE_TOKEN in tokenizer.get_vocab() else {"additional_special_tokens": [IMAGE_TOKEN]}
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    new_vocab = vocab_size if len(tokenizer) <= vocab_size else math.ceil(len(tokenizer) / 64) * 64
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id, new_vocab


def build_converted_config(authors_config: dict, model_sd: dict, image_id: int, pad_id: int, vocab: int, vision: dict):
    from transformers import CLIPVisionConfig, LlamaConfig

    if authors_config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {authors_config['mm_projector_type']!r}: only 'mlp2x_gelu' converts.")
    text = LlamaConfig(
        **{k: authors_config[k] for k in LLAMA_FIELDS if k in authors_config}, vocab_size=vocab, pad_token_id=pad_id
    )
    # LLaVA's "patch" drops CLS (transformers' "default"); "cls_patch" keeps it ("full").
    strategy = "default" if authors_config.get("mm_vision_select_feature", "patch") == "patch" else "full"
    return MoVEKDConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=math.prod(student_grid(vision)),
        projector_hidden_act="gelu",
        vision_feature_layer=authors_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        **mole_settings(model_sd, authors_config),
    )


def _model_with_weights(config, model_sd: dict[str, torch.Tensor]):
    """Our model with the converted weights assigned (built on `meta`, so a 7B conversion holds one copy)."""

    with torch.device("meta"):
        model = MoVEKDForConditionalGeneration(config)
    expected = model.state_dict()
    model_sd = align_to_model_keys(model_sd, set(expected))
    missing, unexpected = sorted(set(expected) - set(model_sd)), sorted(set(model_sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Converted weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}."
        )
    for key, tensor in model_sd.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{key}: converted shape {list(tensor.shape)}, model expects {list(expected[key].shape)}."
            )
    model.load_state_dict(model_sd, strict=True, assign=True)
    return model.eval()


def convert_authors_checkpoint(src: str | Path, dst: str | Path, vision_config: dict[str, Any] | None = None) -> Path:
    """Convert SRC (the authors' format) into DST (ours); returns DST."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"Output folder {dst} is not empty; choose a new folder.")
    authors_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if authors_config.get("model_type") not in AUTHORS_MODEL_TYPES:
        raise ValueError(
            f"{src / 'config.json'}: model_type {authors_config.get('model_type')!r}, expected one of "
            f"{AUTHORS_MODEL_TYPES} (a checkpoint of the authors' LLaVA fork)."
        )
    model_sd, adapters = convert_state_dict(load_authors_state_dict(src))
    tokenizer, image_id, pad_id, vocab = _plan_tokens(src, model_sd[EMBED_KEY].shape[0])
    add_special_token_rows(model_sd, vocab)
    vision = vision_config_from_weights(model_sd, vision_config)
    config = build_converted_config(authors_config, model_sd, image_id, pad_id, vocab, vision)
    model = _model_with_weights(config, model_sd)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    if tokenizer is not None:
        build_processor(config, tokenizer).save_pretrained(dst)
    if adapters:
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(dst / ADAPTERS_FILE))
    return dst
