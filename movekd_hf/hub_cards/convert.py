"""`movekd-hf convert SRC DST`: turn a checkpoint of the authors' MoVE-KD code into this package's format.

SRC is a folder their training wrote (github.com/hey-cjj/MoVE-KD, `llava/train/train.py`: stage 2 ends in
`trainer.save_model`, i.e. `save_pretrained` of `MoVELlavaLlamaForCausalLM`, with the slow tokenizer):

- `config.json`: `model_type` `move_llava_llama`, LLaMA fields, LLaVA's `mm_*` fields and the `moe` block
  (`moe_encoder`, `moe_encoder_dense`, `moe_encoder_lora_rank`, `moe_encoder_lora_alpha`,
  `moe_encoder_num_experts`; `language_model/move_llava_llama.py:35-56, 115-120`);
- the weights: `model.safetensors` or `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`
  (read by default), or `pytorch_model*.bin` (pickles, read only with `allow_pickle=True`, `weights_only=True`);
  the stage-1 files `mm_projector.bin`, `mole_encoder.bin`, `encoder_adapter.bin` are merged in when present;
- the tokenizer: LLaMA's slow sentencepiece tokenizer (`tokenizer.model`, `tokenizer_config.json`,
  `use_fast=False` at `train.py:950-956`), read through the `sentencepiece` extra.

DST receives, with MoLE (`moe.moe_encoder` true), a MoVE-KD checkpoint in faithful mode (Kaiming-initialised B and
unscaled sparse experts, as the authors trained it) with `lora_alpha`, dense/sparse routing, the number of
experts and the rank taken from the `moe` block (their routing is top-1 or dense; there is no top-k setting).
Without MoLE it receives a stock llava-hf `LlavaForConditionalGeneration` checkpoint (MoVEKDConfig cannot express
a tower without experts; `movekd_hf.models.from_llava` adds fresh MoLE to it). Both get the processor when SRC
has a tokenizer, and the sam/eva/convnext teacher adapters as `distill_adapters.safetensors` (training state,
not part of the VLM; pix2struct adapters are dropped: the package has no such teacher).

Every key is mapped (see `convert_keys`); an unknown key stops the conversion with its name. Like llava-hf's
conversion, `<image>` and `<pad>` tokens are appended to the vocabulary (new embedding rows are the mean of the
existing ones, the vocabulary padded to a multiple of 64).
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, SettingsError, UnsafeFileError
from ..modeling import MoVEKDConfig, MoVEKDForConditionalGeneration
from ..modeling.llava_conventions import IMAGE_TOKEN, VICUNA_V1_CHAT_TEMPLATE, student_grid
from ..modeling.processing_movekd import portable_tokenizer_config
from ..models import build_image_processor, build_processor
from .convert_keys import VISION_PREFIX, align_to_model_keys, convert_state_dict

SEPARATE_FILES = ("mm_projector.bin", "mole_encoder.bin", "encoder_adapter.bin")
# (index file, single file) per format, safetensors first: what `save_pretrained` writes.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
AUTHORS_MODEL_TYPES = ("move_llava_llama", "llava_llama")
LLAMA_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "bos_token_id",
    "eos_token_id", "attention_bias", "tie_word_embeddings",
)  # fmt: skip
ADAPTERS_FILE = "distill_adapters.safetensors"
EMBED_KEY, LM_HEAD_KEY = "model.language_model.embed_tokens.weight", "lm_head.weight"
# moe_lora.py:71,78: every LoRALayer is built with lora_dropout_p=0.05, whatever the config says.
AUTHORS_LORA_DROPOUT = 0.05
SENTENCEPIECE_MODULES = ("sentencepiece", "google.protobuf")
PICKLE_OPTION = "--allow-pickle (Python: allow_pickle=True)"


class MissingDependencyError(ImportError):
    """An optional dependency the checkpoint needs is not installed; the message names the pip command."""


@dataclass
class ConvertedCheckpoint:
    """What `convert_authors_checkpoint` wrote. Usable as a path (`os.fspath`, `Path(result)`).

    path: DST. model_type: `movekd_llava` (with MoLE) or `llava` (without). mole: the MoLE settings read from the
    authors' `moe` block, None without MoLE. adapters: teacher slugs written to `distill_adapters.safetensors`.
    dropped: authors' keys left out, with the reason.
    """

    path: Path
    model_type: str
    mole: dict | None = None
    adapters: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def summary(self) -> list[str]:
        """Human-readable lines: the model written, the adapters kept, and every dropped key."""
        if self.mole is None:
            lines = [f"{self.path}: stock LLaVA (llava-hf layout): the authors' checkpoint has no MoLE"]
        else:
            settings = ", ".join(f"{k}={v}" for k, v in self.mole.items())
            lines = [f"{self.path}: MoVE-KD ({settings})"]
        if self.adapters:
            lines.append(f"teacher adapters kept in {ADAPTERS_FILE}: {', '.join(self.adapters)}")
        lines += [f"dropped {key}: {reason}" for key, reason in sorted(self.dropped.items())]
        return lines


# ------------------------------------------------------------------------------------------------- weights


def _load_tensor_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise UnsafeFileError(
            "is a pickle, which can run code when loaded; it is read only on request",
            file=path,
            field="allow_pickle",
            expected=f"safetensors weights, or {PICKLE_OPTION} to read it with torch.load(weights_only=True)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(
            f"holds objects other than tensors, which weights_only=True refuses ({error})".splitlines()[0],
            file=path,
            expected="a state dict of tensors",
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"holds {type(state).__name__}, not a state dict", file=path, expected="{name: tensor}")
    return state


def weight_files(src: Path) -> tuple[list[Path], dict[str, str]]:
    """The main weight files of SRC (safetensors first) and the index's key -> shard map ({} without index).

    Raises `FileNotFoundError` when there are none, `InputError` for an unreadable index or a missing shard.
    """
    for index_name, single_name in WEIGHT_LAYOUTS:
        index_path = src / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(f"is not a weight index ({error})", file=index_path, field="weight_map") from error
            shards = [src / name for name in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise InputError(f"names shards that are not there: {missing}", file=index_path, field="weight_map")
            return shards, weight_map
        if (src / single_name).is_file():
            return [src / single_name], {}
    raise FileNotFoundError(
        f"No weights in {src}: expected model.safetensors, model-*.safetensors with model.safetensors.index.json, "
        "or pytorch_model*.bin."
    )


def load_authors_state_dict(src: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Main weights plus the separately saved stage-1 files; a key found twice with different values is an error.

    Raises `UnsafeFileError` for a `.bin` file without `allow_pickle`, `InputError` when a shard lacks a key its
    index assigns to it.
    """
    main, weight_map = weight_files(src)
    separate = [src / name for name in SEPARATE_FILES if (src / name).is_file()]
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in main + separate:
        for key, tensor in _load_tensor_file(path, allow_pickle).items():
            if key in state and not torch.equal(state[key], tensor):
                raise InputError(
                    f"key {key!r} is also in {origin[key].name} with different values", file=path, field=key
                )
            state[key], origin[key] = tensor, path
    absent = sorted(key for key, shard in weight_map.items() if origin.get(key, Path()).name != shard)
    if absent:
        raise InputError(
            f"{len(absent)} indexed keys are not in their shards: {absent[:5]}", file=src, field="weight_map"
        )
    return state


# -------------------------------------------------------------------------------------------------- config


def read_authors_config(src: Path) -> dict:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"is not valid JSON ({error.msg})", file=path, line=error.lineno) from error
    if config.get("model_type") not in AUTHORS_MODEL_TYPES:
        raise SettingsError(
            f"model_type is {config.get('model_type')!r}",
            file=path,
            field="model_type",
            expected=f"one of {AUTHORS_MODEL_TYPES} (a checkpoint of the authors' LLaVA fork)",
        )
    for name, allowed in (("mm_projector_type", "mlp2x_gelu"), ("mm_patch_merge_type", "flat")):
        if config.get(name, allowed) != allowed:
            raise SettingsError(f"is {config[name]!r}; only {allowed!r} converts", file=path, field=name)
    if config.get("mm_use_im_start_end", False):
        raise SettingsError("is true; image start/end tokens do not convert", file=path, field="mm_use_im_start_end")
    return config


def read_moe_block(config: dict, path: Path) -> dict | None:
    """The authors' `moe` block as our MoLE fields (None when `moe_encoder` is false or the block is absent).

    Source: `MoVELlavaLlamaConfig` (move_llava_llama.py:35-56) writes the block; `EvalMoVELlavaLlamaForCausalLM`
    (474-501) builds MoE_LoRA_CLIP from it. Raises `SettingsError` naming the field for a value out of domain.
    """
    block = config.get("moe")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise SettingsError(f"is {block!r}", file=path, field="moe", expected="an object")
    if not block.get("moe_encoder", False):
        return None

    def read(name: str, kinds: tuple, check, expected: str):
        value = block.get(name)
        if isinstance(value, bool) is not (kinds == (bool,)) or not isinstance(value, kinds) or not check(value):
            raise SettingsError(f"is {value!r}", file=path, field=f"moe.{name}", expected=expected)
        return value

    return dict(
        num_experts=read("moe_encoder_num_experts", (int,), lambda v: v > 0, "a positive integer"),
        lora_rank=read("moe_encoder_lora_rank", (int,), lambda v: v > 0, "a positive integer"),
        lora_alpha=float(
            read("moe_encoder_lora_alpha", (int, float), lambda v: math.isfinite(v) and v > 0, "a positive number")
        ),
        mole_routing="dense" if read("moe_encoder_dense", (bool,), lambda v: True, "true or false") else "sparse",
    )


def mole_settings(model_sd: dict[str, torch.Tensor], moe: dict, path: Path) -> dict:
    """Our MoLE config fields: the `moe` block, checked against the stacked expert shapes; faithful switches on."""
    lora_a = model_sd[VISION_PREFIX + "encoder.layers.0.mlp.fc1.lora_A"]  # [E, r, D]
    for name, found in (("num_experts", lora_a.shape[0]), ("lora_rank", lora_a.shape[1])):
        if moe[name] != found:
            field_name = "moe.moe_encoder_" + ("num_experts" if name == "num_experts" else "lora_rank")
            raise SettingsError(f"is {moe[name]} but the weights have {found}", file=path, field=field_name)
    return dict(
        **moe,
        lora_bias=VISION_PREFIX + "encoder.layers.0.mlp.fc1.lora_A_bias" in model_sd,
        lora_dropout=AUTHORS_LORA_DROPOUT,
        faithful=True,
    )


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
            raise SettingsError(
                f"the vision tower's width {hidden} is not a multiple of 64, so its number of attention heads "
                "cannot be inferred",
                field="num_attention_heads",
                expected="--vision-config '{\"num_attention_heads\": N}'",
            )
        config["num_attention_heads"] = hidden // 64  # CLIP's head width
    return config


# ---------------------------------------------------------------------------------------------- tokenizer


def add_special_token_rows(model_sd: dict[str, torch.Tensor], new_vocab: int) -> None:
    """Grow embeddings and LM head to `new_vocab` rows; new rows are the mean of the existing rows."""
    for key in (EMBED_KEY, LM_HEAD_KEY):
        weight = model_sd[key]  # [V, H]
        extra = new_vocab - weight.shape[0]
        if extra > 0:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, H]
            model_sd[key] = torch.cat([weight, mean.expand(extra, -1)], dim=0)  # [V', H]


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def load_authors_tokenizer(src: Path):
    """The tokenizer of SRC; a slow sentencepiece one (`tokenizer.model`, no `tokenizer.json`) needs the
    `sentencepiece` extra. Raises `MissingDependencyError` naming `pip install movekd_hf[sentencepiece]`."""
    from transformers import AutoTokenizer

    if (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        missing = _missing_modules(SENTENCEPIECE_MODULES)
        if missing:
            raise MissingDependencyError(
                f"{src / 'tokenizer.model'} is a slow sentencepiece tokenizer (the authors' LLaMA tokenizer); "
                f"reading it needs {' and '.join(missing)}: pip install movekd_hf[sentencepiece]"
            )
    return AutoTokenizer.from_pretrained(str(src))


def _plan_tokens(src: Path, vocab_size: int):
    """(tokenizer or None, image token id, pad token id, new vocab size)."""
    if not (src / "tokenizer_config.json").is_file():
        return None, vocab_size, vocab_size + 1, math.ceil((vocab_size + 2) / 64) * 64
    tokenizer = load_authors_tokenizer(src)
    # One call each, in llava-hf's order (`<image>` first, then `<pad>`): one dict would let the tokenizer choose.
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # LLaVA's training sets pad = unk (train.py:967); llava-hf gives padding its own token.
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    new_vocab = vocab_size if len(tokenizer) <= vocab_size else math.ceil(len(tokenizer) / 64) * 64
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id, new_vocab


# ------------------------------------------------------------------------------------------------- convert


def build_converted_config(authors_config: dict, image_id: int, pad_id: int, vocab: int, vision: dict, mole):
    """`MoVEKDConfig` with `mole` settings, or a stock `LlavaConfig` when `mole` is None."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        **{k: authors_config[k] for k in LLAMA_FIELDS if authors_config.get(k) is not None},
        vocab_size=vocab,
        pad_token_id=pad_id,
    )
    # LLaVA's "patch" drops CLS (transformers' "default"); "cls_patch" keeps it ("full").
    strategy = "default" if authors_config.get("mm_vision_select_feature", "patch") == "patch" else "full"
    common = dict(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=math.prod(student_grid(vision)),
        projector_hidden_act="gelu",
        vision_feature_layer=authors_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
    )
    return LlavaConfig(**common) if mole is None else MoVEKDConfig(**common, **mole)


def _model_with_weights(config, model_sd: dict[str, torch.Tensor], src: Path):
    """Our model with the converted weights assigned (built on `meta`, so a 7B conversion holds one copy)."""
    from transformers import LlavaForConditionalGeneration

    model_class = MoVEKDForConditionalGeneration if isinstance(config, MoVEKDConfig) else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    model_sd = align_to_model_keys(model_sd, set(expected))
    missing, unexpected = sorted(set(expected) - set(model_sd)), sorted(set(model_sd) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"converted weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}", file=src
        )
    for key, tensor in model_sd.items():
        if tensor.shape != expected[key].shape:
            raise InputError(
                f"{key}: converted shape {list(tensor.shape)}, model expects {list(expected[key].shape)}", file=src
            )
    model.load_state_dict(model_sd, strict=True, assign=True)
    return model.eval()


def _check_adapters(adapters: dict[str, torch.Tensor], vision: dict, src: Path) -> None:
    """Adapters map onto the student's grid and width (channel_proj: C_t -> D, token_proj: N_t -> N_s)."""
    width, tokens = vision["hidden_size"], math.prod(student_grid(vision))
    for key, tensor in adapters.items():
        if key.endswith(".weight"):
            want = width if ".channel_proj." in key else tokens
            if tensor.shape[0] != want:
                raise InputError(f"adapter {key} maps to {tensor.shape[0]} outputs", file=src, expected=str(want))


def _save_processor(dst: Path, config, tokenizer) -> None:
    if isinstance(config, MoVEKDConfig):
        build_processor(config, tokenizer).save_pretrained(dst)
        return
    from transformers import LlavaProcessor

    vision = config.vision_config
    LlavaProcessor(
        image_processor=build_image_processor(vision.image_size),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS
    ).save_pretrained(dst)
    portable_tokenizer_config(str(dst / "tokenizer_config.json"))


def convert_authors_checkpoint(
    src: str | Path, dst: str | Path, vision_config: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConvertedCheckpoint:
    """Convert SRC (the authors' format) into DST (ours); see the module docstring for both layouts.

    Raises `InputError` (and its `SettingsError`, `UnsafeFileError`) for a folder that does not convert,
    `FileNotFoundError` without weights, `MissingDependencyError` for a slow tokenizer without sentencepiece.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise InputError("output folder is not empty", file=dst, expected="a new or empty folder")
    authors_config = read_authors_config(src)
    moe = read_moe_block(authors_config, src / "config.json")
    converted = convert_state_dict(load_authors_state_dict(src, allow_pickle), source=str(src))
    model_sd, has_experts = converted.model, any(".mlp.fc1.lora_A" in key for key in converted.model)
    required = (EMBED_KEY, LM_HEAD_KEY, VISION_PREFIX + "embeddings.patch_embedding.weight")
    if not all(key in model_sd for key in required):
        raise InputError(
            "holds no complete VLM (LLM, vision tower): a stage-1 folder has only the trained parts",
            file=src,
            expected="the folder stage 2 (finetune) wrote",
        )
    if has_experts != (moe is not None):
        raise SettingsError(
            f"says moe_encoder={moe is not None} but the weights {'have' if has_experts else 'lack'} MoLE experts",
            file=src / "config.json",
            field="moe.moe_encoder",
        )
    tokenizer, image_id, pad_id, vocab = _plan_tokens(src, model_sd[EMBED_KEY].shape[0])
    add_special_token_rows(model_sd, vocab)
    vision = vision_config_from_weights(model_sd, vision_config)
    _check_adapters(converted.adapters, vision, src)
    mole = None if moe is None else mole_settings(model_sd, moe, src / "config.json")
    config = build_converted_config(authors_config, image_id, pad_id, vocab, vision, mole)
    model = _model_with_weights(config, model_sd, src)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    if tokenizer is not None:
        _save_processor(dst, config, tokenizer)
    if converted.adapters:
        save_file({k: v.contiguous() for k, v in converted.adapters.items()}, str(dst / ADAPTERS_FILE))
    slugs = tuple(sorted({key.split(".")[1] for key in converted.adapters}))
    return ConvertedCheckpoint(
        dst, config.model_type, None if mole is None else {k: v for k, v in mole.items() if k != "faithful"},
        slugs, converted.dropped,
    )  # fmt: skip
