"""Processors for MoVE-KD checkpoints: LLaVA's processor with the Vicuna `v1` conversation as chat template, and
LLaVA-OneVision's processor as it is (its own chat template and AnyRes image processor).

`<image>` in the text expands to one image token per student patch (LlavaProcessor does the counting; for OneVision,
LlavaOnevisionProcessor counts the packed AnyRes features).
The conversation and the `<image>` token are LLaVA's conventions (llava_conventions.py). Shipped as remote code:
imports only transformers and its sibling files.
"""

import json
import os

from transformers import LlavaOnevisionProcessor, LlavaProcessor

from .llava_conventions import IMAGE_TOKEN, VICUNA_V1_CHAT_TEMPLATE


class _PortableSaveMixin:
    """`save_pretrained`, then the tokenizer config rewritten so transformers 4.x reads what 5.x wrote
    (`portable_tokenizer_config`)."""

    def save_pretrained(self, save_directory, **kwargs):
        result = super().save_pretrained(save_directory, **kwargs)
        portable_tokenizer_config(os.path.join(save_directory, "tokenizer_config.json"))
        return result


class MoVEKDProcessor(_PortableSaveMixin, LlavaProcessor):
    """`LlavaProcessor` whose default chat template is LLaVA-1.5's Vicuna `v1` conversation."""

    # Arguments are spelled out: transformers saves a processor's settings by reading its signature.
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template or VICUNA_V1_CHAT_TEMPLATE,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )


class MoVEKDOnevisionProcessor(_PortableSaveMixin, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` unchanged (the checkpoint's own chat template, image and video processors, AnyRes
    token counting; its own signature, which transformers reads to save the settings), saved so that
    transformers 4.x reads the tokenizer a 5.x release wrote: the one reason it is a class of its own."""


def portable_tokenizer_config(path: str) -> None:
    """Rewrite a tokenizer config saved by transformers 5 so transformers 4.x reads it too.

    5.x names a plain `tokenizers` tokenizer `TokenizersBackend` and lists extra special tokens under
    `extra_special_tokens`; 4.x knows the former as `PreTrainedTokenizerFast` and expects a dict under that
    key, reading the list from `additional_special_tokens`. Both versions read the rewritten file.
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, ensure_ascii=False)
