"""Model presets and the ways to start a MoVE-KD model.

Presets: `tiny`, a random model (< 2M parameters) with a byte-level tokenizer built offline, for tests and the CPU
demo; and the paper's LLaVA-1.5 sizes (`llava-1.5-7b`, `llava-1.5-13b`, `mobilellama-1.4b`), built on the meta
device for planning. Builders: from a preset, from a vision encoder plus a causal LM (as LLaVA training starts), or
from an existing Hugging Face LLaVA checkpoint (MoLE added, every LLaVA weight kept).

The student's tower is the `clip` teacher's architecture (distill/presets.py), as the paper's student starts as
its CLIP teacher.

Image tokens follow the tower (`llava_conventions.feature_select_strategy`): LLaVA's `vision_feature_select_strategy`
"default" drops the first token, which is CLS on a CLIP tower, so CLIP keeps "default" (the paper's CLIP-L/336: 576
image tokens, one per patch); SigLIP has no CLS, so it gets "full" and keeps every patch (siglip-so400m-patch14-384:
729, where "default" would drop a real patch and leave 728). Either way one `<image>` becomes one token per patch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig

from .distill.presets import CLIP_L_336, TINY_CLIP
from .modeling import MoVEKDConfig, MoVEKDForConditionalGeneration, MoVEKDProcessor
from .modeling.llava_conventions import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    feature_select_strategy,
    image_token_count,
    tower_cls_tokens,
)

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaMA-architecture LLMs of the paper; vocab 32064 = 32000 + <image> + <pad>, padded as llava-hf does.
_LLMS = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "mobilellama-1.4b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
}

TINY_TEXT = dict(
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_MOLE = dict(num_experts=3, lora_rank=4, lora_alpha=1.0, lora_dropout=0.0)

PRESETS = ("tiny", *_LLMS)


def build_config(name: str, **overrides) -> MoVEKDConfig:
    """The `MoVEKDConfig` of a preset; keyword arguments override top-level fields (e.g. `faithful=True`)."""
    if name == "tiny":
        vocab_size = 256 + len(SPECIAL_TOKENS)
        text = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **TINY_TEXT)
        kwargs = dict(vision_config=CLIPVisionConfig(**TINY_CLIP), text_config=text, **TINY_MOLE)
        kwargs.update(image_token_index=256 + SPECIAL_TOKENS.index(IMAGE_TOKEN))
    elif name in _LLMS:
        text = LlamaConfig(
            vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001, **_LLMS[name]
        )
        kwargs = dict(vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=text, image_token_index=32000)
    else:
        raise ValueError(f"Unknown preset {name!r}; expected one of {PRESETS}.")
    kwargs.update(vision_feature_select_strategy=feature_select_strategy(kwargs["vision_config"]))  # CLIP: default
    kwargs.update(overrides)
    strategy = kwargs["vision_feature_select_strategy"]
    kwargs.setdefault("image_seq_length", image_token_count(kwargs["vision_config"], strategy))  # 16 tiny, 576 paper
    return MoVEKDConfig(**kwargs)


def build_byte_tokenizer(special_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)):
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus LLaVA's special tokens.

    It needs no download and encodes any text, which is all a tiny test model needs. Special tokens come
    after the 256 bytes, so `<image>` has id 260.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    for token in special_tokens:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if "<pad>" in special_tokens else None,
        additional_special_tokens=[IMAGE_TOKEN] if IMAGE_TOKEN in special_tokens else [],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    return tokenizer


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable byte mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    return [b for b in range(256) if b not in printable][ord(char) - 256]


def build_image_processor(image_size: int, vision_config=None):
    """The image processor of a tower at `image_size` px. CLIP (and `vision_config=None`): LLaVA-1.5's, shortest
    side resized, centre crop, CLIP normalisation. SigLIP: SigLIP's own, resized to the square (no crop) and
    normalised to [-1, 1] (mean = std = 0.5). Raises `ValueError` for other towers (`tower_cls_tokens`)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if vision_config is not None and not tower_cls_tokens(vision_config):
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor(config, tokenizer=None, image_processor=None, chat_template=None) -> MoVEKDProcessor:
    """A `MoVEKDProcessor` matching the config's vision tower (patch size, feature strategy, CLS token), so
    `<image>` expands to as many tokens as the model's projector gets (`image_token_count`).

    tokenizer / image_processor default to the byte tokenizer and `build_image_processor` for the tower;
    chat_template defaults to the Vicuna `v1` conversation. Raises `ValueError` for a tower other than CLIP/SigLIP.
    """
    vision = config.vision_config
    if image_processor is None:
        image_processor = build_image_processor(vision.image_size, vision)
    return MoVEKDProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_byte_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP prepends a CLS token that LLaVA's "full" strategy keeps; SigLIP has none.
        num_additional_image_tokens=tower_cls_tokens(vision),
        chat_template=chat_template,
    )


def build_tiny_model(seed: int = 0, **overrides):
    """A random tiny MoVE-KD model (< 2M parameters) and its processor, deterministic in `seed`."""
    config = build_config("tiny", **overrides)
    torch.manual_seed(seed)
    model = MoVEKDForConditionalGeneration(config).eval()
    processor = build_processor(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


# ---------------------------------------------------------------------------------------------------- builders


def from_preset(name: str, seed: int = 0, **overrides):
    """A randomly initialised model and processor for a preset that ships its own tokenizer (`tiny`).

    The paper presets describe Vicuna/MobileLLaMA-sized models whose tokenizer and weights come from the Hub,
    so they are assembled with `from_vision_and_llm` instead (`movekd-hf plan` shows their shapes).
    """
    if name != "tiny":
        build_config(name)  # unknown names fail here with the list of presets
        raise ValueError(
            f"Preset {name!r} starts from pretrained weights: pass `--vision openai/clip-vit-large-patch14-336 "
            "--llm lmsys/vicuna-7b-v1.5` (or local copies), or `--llava llava-hf/llava-1.5-7b-hf`."
        )
    return build_tiny_model(seed=seed, **overrides)


def _mark_loaded(module: nn.Module) -> None:
    for param in module.parameters():
        param._is_hf_initialized = True


def _materialize(model: nn.Module) -> None:
    """Give every parameter still on the meta device real (uninitialised) CPU storage."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                fresh = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
                setattr(module, name, fresh)


def _copy_buffers(module: nn.Module, source: nn.Module) -> None:
    """Buffers kept out of state dicts (the LLM's rotary `inv_freq`, the tower's `position_ids`) from `source`,
    the pretrained part `module` was built on the meta device for: without them the model cannot run until saved
    and reloaded."""
    values = dict(source.named_buffers())
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type == "meta" and name in values:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = values[name].detach().clone()


def from_vision_and_llm(vision_path: str, llm_path: str, **mole_settings):
    """Assemble a MoVE-KD model from a pretrained CLIP/SigLIP vision model (or the vision half of a CLIP/SigLIP
    model) and a causal LM.

    Their weights are moved in unchanged; the `<image>` (and, if missing, `<pad>`) token is added to the
    tokenizer as llava-hf does. Projector and MoLE weights are new. The feature strategy follows the tower
    (`feature_select_strategy`: "default" for CLIP, "full" for SigLIP), so `<image>` becomes one token per patch.
    The image processor is the vision folder's own, or `build_image_processor` for the tower when it has none.
    Raises `ValueError` when `vision_path` holds no CLIP/SigLIP vision encoder.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    vision = AutoModel.from_pretrained(vision_path)
    vision = getattr(vision, "vision_model", vision) if not hasattr(vision, "encoder") else vision
    if not hasattr(vision.config, "patch_size"):
        raise ValueError(f"`--vision {vision_path}` is not a vision encoder (its config has no `patch_size`).")
    strategy = feature_select_strategy(vision.config)  # before the LLM loads: an unknown tower fails at once
    llm = AutoModelForCausalLM.from_pretrained(llm_path)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    size_before = len(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():  # first, so <image> then <pad> as in llava-hf (32000, 32001)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if len(tokenizer) != size_before:
        llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = MoVEKDConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_token_count(vision.config, strategy),
        vision_feature_select_strategy=strategy,
        **mole_settings,
    )
    with torch.device("meta"):
        model = MoVEKDForConditionalGeneration(config)
    _load_parts(model.model.vision_tower, vision.state_dict(), vision_path, allow_missing=("lora_", "router."))
    _load_parts(model.model.language_model, llm.get_decoder().state_dict(), llm_path)
    _load_parts(model.lm_head, llm.get_output_embeddings().state_dict(), llm_path)
    _mark_loaded(model.model.vision_tower)
    _mark_loaded(model.model.language_model)
    _mark_loaded(model.lm_head)
    _copy_buffers(model.model.vision_tower, vision)
    _copy_buffers(model.model.language_model, llm.get_decoder())
    _materialize(model)
    model.initialize_weights()
    model.tie_weights()
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision_path)
    except OSError:  # a vision folder with weights only: the tower's standard preprocessing
        model_type = config.vision_config.model_type
        logger.warning("%s has no image processor config: using the standard %s one", vision_path, model_type)
        image_processor = build_image_processor(config.vision_config.image_size, config.vision_config)
    processor = build_processor(config, tokenizer, image_processor)
    return model.eval(), processor


def _load_parts(module: nn.Module, state_dict: dict, source: str, allow_missing: tuple = ()) -> None:
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not any(marker in key for marker in allow_missing)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Weights from {source!r} do not fit the MoVE-KD model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )


def from_llava(llava_path: str, **mole_settings):
    """Add MoLE to an existing LLaVA checkpoint (llava-hf layout); every LLaVA weight arrives unchanged.

    The LLaVA's `vision_feature_select_strategy` is kept where it is valid for its tower: a CLIP tower under
    "full" keeps feeding CLS to the projector (the student tokens for distillation drop it all the same). A tower
    without CLS under "default" would lose a real patch and leave no full grid to distil on: it is switched to
    "full" (logged), which changes the image tokens from h*w - 1 to h*w.
    """
    from transformers import AutoConfig, AutoProcessor

    llava_config = AutoConfig.from_pretrained(llava_path)
    if llava_config.model_type not in ("llava", "movekd_llava"):
        raise ValueError(f"`--llava {llava_path}` has model_type {llava_config.model_type!r}; expected 'llava'.")
    settings = llava_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    vision = llava_config.vision_config
    if settings.get("vision_feature_select_strategy") == "default" and not tower_cls_tokens(vision):
        logger.warning(
            "%s: vision_feature_select_strategy 'default' drops the first token, a real patch of its %s tower "
            "(it has no CLS); using 'full' so every patch is an image token",
            llava_path,
            vision.model_type,
        )
        settings.update(vision_feature_select_strategy="full", image_seq_length=image_token_count(vision, "full"))
    config = MoVEKDConfig(**{**settings, **mole_settings})
    model = MoVEKDForConditionalGeneration.from_pretrained(llava_path, config=config)
    source = AutoProcessor.from_pretrained(llava_path)
    processor = build_processor(
        config, source.tokenizer, source.image_processor, chat_template=getattr(source, "chat_template", None)
    )
    return model.eval(), processor
