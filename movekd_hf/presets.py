"""Model presets: the paper's LLaVA-1.5 sizes (built on the meta device for planning) and a tiny random model
for tests and the CPU demo, with a byte-level tokenizer built offline."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig

from .modeling import MoVEKDConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# openai/clip-vit-large-patch14-336, as LLaVA-1.5 uses it.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)

# LLaMA-architecture LLMs of the paper; vocab 32064 = 32000 + <image> + <pad>, padded as llava-hf does.
_LLMS = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "mobilellama-1.4b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
}

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
    hidden_act="quick_gelu",
)
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
        kwargs = dict(vision_config=CLIPVisionConfig(**TINY_VISION), text_config=text, **TINY_MOLE)
        kwargs.update(image_token_index=256 + SPECIAL_TOKENS.index(IMAGE_TOKEN), image_seq_length=16)
    elif name in _LLMS:
        text = LlamaConfig(
            vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001, **_LLMS[name]
        )
        kwargs = dict(vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=text)
        kwargs.update(image_token_index=32000, image_seq_length=576)
    else:
        raise ValueError(f"Unknown preset {name!r}; expected one of {PRESETS}.")
    kwargs.update(overrides)
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


def build_image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_processor(config: MoVEKDConfig, tokenizer=None):
    """A `MoVEKDProcessor` matching the config's vision tower (image size, patch size, feature strategy)."""
    from .modeling import MoVEKDProcessor

    vision = config.vision_config
    return MoVEKDProcessor(
        image_processor=build_image_processor(vision.image_size),
        tokenizer=tokenizer if tokenizer is not None else build_byte_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )


def build_tiny_model(seed: int = 0, **overrides):
    """A random tiny MoVE-KD model (< 2M parameters) and its processor, deterministic in `seed`."""
    import torch

    from .modeling import MoVEKDForConditionalGeneration

    config = build_config("tiny", **overrides)
    torch.manual_seed(seed)
    model = MoVEKDForConditionalGeneration(config).eval()
    processor = build_processor(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor
