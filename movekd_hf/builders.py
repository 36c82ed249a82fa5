"""Ways to start a MoVE-KD model: from a preset, from a vision encoder plus a causal LM (as LLaVA training
starts), or from an existing Hugging Face LLaVA checkpoint (MoLE added, every LLaVA weight kept)."""

from __future__ import annotations

import torch
from torch import nn

from .modeling import MoVEKDConfig, MoVEKDForConditionalGeneration, MoVEKDProcessor
from .presets import IMAGE_TOKEN, build_config, build_tiny_model


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


def _processor_from(config: MoVEKDConfig, image_processor, tokenizer, chat_template=None) -> MoVEKDProcessor:
    vision = config.vision_config
    return MoVEKDProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if getattr(vision, "model_type", "") == "clip_vision_model" else 0,
        chat_template=chat_template,
    )


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


def from_vision_and_llm(vision_path: str, llm_path: str, **mole_settings):
    """Assemble a MoVE-KD model from a pretrained CLIP/SigLIP vision model and a causal LM.

    Their weights are moved in unchanged; the `<image>` (and, if missing, `<pad>`) token is added to the
    tokenizer as llava-hf does. Projector and MoLE weights are new.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    vision = AutoModel.from_pretrained(vision_path)
    vision = getattr(vision, "vision_model", vision) if not hasattr(vision, "encoder") else vision
    if not hasattr(vision.config, "patch_size"):
        raise ValueError(f"`--vision {vision_path}` is not a vision encoder (its config has no `patch_size`).")
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
        image_seq_length=(vision.config.image_size // vision.config.patch_size) ** 2,
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
    _materialize(model)
    model.initialize_weights()
    model.tie_weights()
    processor = _processor_from(config, AutoImageProcessor.from_pretrained(vision_path), tokenizer)
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
    """Add MoLE to an existing LLaVA checkpoint (llava-hf layout); every LLaVA weight arrives unchanged."""
    from transformers import AutoConfig, AutoProcessor

    llava_config = AutoConfig.from_pretrained(llava_path)
    if llava_config.model_type not in ("llava", "movekd_llava"):
        raise ValueError(f"`--llava {llava_path}` has model_type {llava_config.model_type!r}; expected 'llava'.")
    settings = llava_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    config = MoVEKDConfig(**{**settings, **mole_settings})
    model = MoVEKDForConditionalGeneration.from_pretrained(llava_path, config=config)
    source = AutoProcessor.from_pretrained(llava_path)
    processor = _processor_from(
        config, source.image_processor, source.tokenizer, chat_template=getattr(source, "chat_template", None)
    )
    return model.eval(), processor
