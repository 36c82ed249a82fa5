"""A tiny stock LLaVA-OneVision checkpoint, built offline the way llava-hf builds the real ones.

- Vision: a SigLIP tower without its attention-pooling head (`vision_use_head=False`, as every llava-hf OneVision
  checkpoint), 32 px tiles of 8 px patches (a 4x4 grid, 16 tokens per tile), 3 layers.
- LLM: Qwen2 (40 wide, 56 MLP, grouped-query attention 4/2), vocabulary = the tokenizer's.
- Tokenizer: Qwen2's layout without the merges: byte-level BPE with NFC and Qwen2's split regex, no BOS, EOS
  `<|im_end|>`, pad `<|endoftext|>`, and `<image>`, `<video>` added after the vocabulary as llava-hf's conversion does.
- AnyRes: tile 32 px, pinpoints 32x32, 32x64, 64x32, 64x64, so an image becomes the base view plus up to 4 tiles.
- Chat template: the qwen_1_5 conversation llava-hf ships (images first, then the text, `<|im_start|>assistant\\n` to
  generate), written here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

TILE = 32
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
TINY_SIGLIP = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=TILE,
    patch_size=8,
    vision_use_head=False,
)
TINY_QWEN2 = dict(
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def qwen2_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer pipeline on the 256 bytes (no merges), plus its special tokens and `<image>`/`<video>`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
        model_input_names=["input_ids", "attention_mask"],  # Qwen2's: no token_type_ids
    )


def build_stock_onevision(seed: int = 0, strategy: str = "full"):
    """A random tiny `LlavaOnevisionForConditionalGeneration` (eval mode) and its `LlavaOnevisionProcessor`;
    `strategy` is `vision_feature_select_strategy` ("full" as in every llava-hf OneVision checkpoint)."""
    tokenizer = qwen2_byte_tokenizer()
    ids = dict(zip(("pad", "eos", "image", "video"), tokenizer.convert_tokens_to_ids(SPECIALS[:1] + SPECIALS[2:])))
    text = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=ids["eos"], pad_token_id=ids["pad"], **TINY_QWEN2)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_SIGLIP),
        text_config=text,
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    siglip_norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS, **siglip_norm
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}, **siglip_norm),
        num_image_tokens=(TILE // TINY_SIGLIP["patch_size"]) ** 2,
        vision_feature_select_strategy=strategy,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


def save_stock_onevision(folder: Path, seed: int = 0, strategy: str = "full") -> Path:
    model, processor = build_stock_onevision(seed, strategy)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def onevision_photo():
    """skimage's astronaut at 96 x 60 px (wider than high): the 64x64 pinpoint, so the base view plus 4 tiles."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((96, 60), Image.Resampling.BICUBIC)


# The key names of the llava-hf OneVision checkpoints on the Hub (converted before transformers 4.52 moved the parts
# under `model.`): what transformers' loading maps back for stock and MoVE-KD classes alike.
HUB_LAYOUT = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline", "image_newline"),
)


def rewrite_in_hub_layout(folder: Path) -> None:
    """Rename the weights of a saved OneVision checkpoint (`model.safetensors`) to the Hub layout, in place."""
    import re

    from safetensors.torch import load_file, save_file

    def hub_name(key: str) -> str:
        for pattern, replacement in HUB_LAYOUT:
            key = re.sub(pattern, replacement, key)
        return key

    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({hub_name(key): value for key, value in state.items()}, path, metadata={"format": "pt"})
