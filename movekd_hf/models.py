"""Model presets and the ways to start a MoVE-KD model.

Presets: `tiny`, a random model (< 2M parameters) with a byte-level tokenizer built offline, for tests and the CPU
demo; the paper's LLaVA-1.5 sizes (`llava-1.5-7b`, `llava-1.5-13b`, `mobilellama-1.4b`) and llava-hf's
LLaVA-OneVision ones (`onevision-qwen2-0.5b`, `onevision-qwen2-7b`), built on the meta device for planning. Builders:
from a preset, from a vision encoder plus a causal LM (as LLaVA training starts), or from an existing Hugging Face
LLaVA or LLaVA-OneVision checkpoint (MoLE added, every weight kept).

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
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

from .distill.anchor import check_student_tower
from .distill.presets import CLIP_L_336, TINY_CLIP
from .modeling import (
    MoVEKDConfig,
    MoVEKDForConditionalGeneration,
    MoVEKDOnevisionConfig,
    MoVEKDOnevisionForConditionalGeneration,
    MoVEKDOnevisionProcessor,
    MoVEKDProcessor,
)
from .modeling.llava_conventions import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    feature_select_strategy,
    image_token_count,
    student_grid,
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

# LLaVA-OneVision as llava-hf converts it (transformers' convert_llava_onevision_weights_to_hf.py): SigLIP so400m/14 at
# 384 px with its last layer dropped (26 of 27) and no pooling head, on AnyRes tiles; Qwen2-Instruct with `<image>`
# and `<video>` added after its vocabulary (151646, 151647), padded to a multiple of 64. Key: the Hub checkpoint
# `init --onevision` starts from.
ONEVISION_SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    vision_use_head=False,
)
_ONEVISION_LLMS = {
    "onevision-qwen2-0.5b": dict(  # Qwen/Qwen2-0.5B-Instruct, vocab 151936 + 2 -> 152000
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=152000, tie_word_embeddings=True,
    ),
    "onevision-qwen2-7b": dict(  # Qwen/Qwen2-7B-Instruct, vocab 152064 + 2 -> 152128
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152128, tie_word_embeddings=False,
    ),
}  # fmt: skip
ONEVISION_PRESETS = {
    "onevision-qwen2-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "onevision-qwen2-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}

PRESETS = ("tiny", *_LLMS, *_ONEVISION_LLMS)


def build_config(name: str, **overrides) -> MoVEKDConfig | MoVEKDOnevisionConfig:
    """The `MoVEKDConfig` of a preset (a `MoVEKDOnevisionConfig` for the `onevision-*` ones); keyword arguments
    override top-level fields (e.g. `faithful=True`)."""
    if name in _ONEVISION_LLMS:
        return _onevision_config(name, **overrides)
    if name == "tiny":
        vocab_size = 256 + len(SPECIAL_TOKENS)
        # The byte tokenizer's own ids for <s>, </s> and <pad> (after the 256 bytes), as its processor encodes them.
        bos, eos, pad = (256 + SPECIAL_TOKENS.index(token) for token in ("<s>", "</s>", "<pad>"))
        text = LlamaConfig(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **TINY_TEXT)
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


def _onevision_config(name: str, **overrides) -> MoVEKDOnevisionConfig:
    """A llava-hf LLaVA-OneVision preset (`ONEVISION_PRESETS`) with MoLE, for planning on the meta device."""
    llm = dict(_ONEVISION_LLMS[name])
    tie = llm.pop("tie_word_embeddings")
    text = Qwen2Config(
        max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
        tie_word_embeddings=tie, **llm,
    )  # fmt: skip
    kwargs = dict(
        vision_config=SiglipVisionConfig(**ONEVISION_SIGLIP),
        text_config=text,
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie,
    )
    return MoVEKDOnevisionConfig(**{**kwargs, **overrides})


def model_class(config) -> type:
    """The MoVE-KD generation class of a config: LLaVA-OneVision's for a `MoVEKDOnevisionConfig`, else LLaVA's."""
    if isinstance(config, MoVEKDOnevisionConfig):
        return MoVEKDOnevisionForConditionalGeneration
    return MoVEKDForConditionalGeneration


def checkpoint_classes(path: str) -> tuple[type, type]:
    """(model class, processor class) a MoVE-KD checkpoint folder or Hub id loads with: LLaVA-OneVision's for its
    model type (`init --onevision`), else LLaVA-1.5's. Reads only its config.json."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(path).model_type == MoVEKDOnevisionConfig.model_type:
        return MoVEKDOnevisionForConditionalGeneration, MoVEKDOnevisionProcessor
    return MoVEKDForConditionalGeneration, MoVEKDProcessor


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
    if name in ONEVISION_PRESETS:
        raise ValueError(
            f"Preset {name!r} starts from a pretrained LLaVA-OneVision: `--onevision {ONEVISION_PRESETS[name]}`."
        )
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
    Raises `ValueError` when `vision_path` holds no CLIP/SigLIP vision encoder, or SigLIP 2's NaFlex tower (LLaVA
    cannot run it; the fixed-resolution SigLIP 2 checkpoints are model_type "siglip" and work).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tower_config = AutoConfig.from_pretrained(vision_path)
    check_student_tower(getattr(tower_config, "vision_config", tower_config), field="--vision", file=vision_path)
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


def _llava_settings(config) -> dict:
    """A LLaVA-family config as keyword arguments for our config class (its identity fields dropped)."""
    settings = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    return settings


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
    settings = _llava_settings(llava_config)
    vision = llava_config.vision_config
    if _every_patch_an_image_token(settings, vision, llava_path):
        settings["image_seq_length"] = image_token_count(vision, "full")
    config = MoVEKDConfig(**{**settings, **mole_settings})
    model = MoVEKDForConditionalGeneration.from_pretrained(llava_path, config=config)
    source = AutoProcessor.from_pretrained(llava_path)
    processor = build_processor(
        config, source.tokenizer, source.image_processor, chat_template=getattr(source, "chat_template", None)
    )
    return model.eval(), processor


def _every_patch_an_image_token(settings: dict, vision, source: str) -> bool:
    """Switch `settings` (a LLaVA config's) from "default" to "full" when its tower has no CLS token: "default" drops
    the first token, a real patch of such a tower. Logged; True when switched."""
    if settings.get("vision_feature_select_strategy") != "default" or tower_cls_tokens(vision):
        return False
    logger.warning(
        "%s: vision_feature_select_strategy 'default' drops the first token, a real patch of its %s tower (it has "
        "no CLS); using 'full' so every patch is an image token",
        source,
        vision.model_type,
    )
    settings["vision_feature_select_strategy"] = "full"
    return True


def from_onevision(path: str, **mole_settings):
    """Add MoLE to an existing LLaVA-OneVision checkpoint (llava-hf layout, e.g.
    `llava-hf/llava-onevision-qwen2-7b-ov-hf`); every weight arrives unchanged, only LoRA/router weights are new
    (zero `lora_B` by default, so the model computes what the checkpoint did).

    The processor is the checkpoint's own `LlavaOnevisionProcessor` (image and video processors, tokenizer, chat
    template, `num_image_tokens`, `vision_aspect_ratio`) as a `MoVEKDOnevisionProcessor`, which only makes the saved
    tokenizer config readable by transformers 4.x. A SigLIP tower under `"default"` (which drops a real patch) is
    switched to `"full"`, in the config and the processor alike, as `from_llava` does.
    Raises `ValueError` when `path` is not a LLaVA-OneVision checkpoint or its processor is not LLaVA-OneVision's.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaOnevisionProcessor

    source_config = AutoConfig.from_pretrained(path)
    if source_config.model_type not in ("llava_onevision", "movekd_llava_onevision"):
        raise ValueError(
            f"`--onevision {path}` has model_type {source_config.model_type!r}; expected 'llava_onevision' "
            "(for 'llava' use `--llava`)."
        )
    settings = _llava_settings(source_config)
    vision = source_config.vision_config
    _every_patch_an_image_token(settings, vision, path)
    config = MoVEKDOnevisionConfig(**{**settings, **mole_settings})
    source = AutoProcessor.from_pretrained(path)
    if not isinstance(source, LlavaOnevisionProcessor):
        raise ValueError(f"`--onevision {path}` holds a {type(source).__name__}; expected a LlavaOnevisionProcessor.")
    model = MoVEKDOnevisionForConditionalGeneration.from_pretrained(path, config=config)
    height, width = student_grid(vision)
    processor = MoVEKDOnevisionProcessor(
        image_processor=source.image_processor,
        tokenizer=source.tokenizer,
        video_processor=getattr(source, "video_processor", None),
        num_image_tokens=source.num_image_tokens or height * width,  # patches per tile (729 for so400m/14 at 384)
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=getattr(source, "chat_template", None),
        image_token=source.image_token,
        video_token=source.video_token,
        vision_aspect_ratio=getattr(source, "vision_aspect_ratio", None) or config.vision_aspect_ratio,
    )
    return model.eval(), processor
