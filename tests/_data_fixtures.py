"""Offline tokenizer/processor builders for the data tests (no downloads; distinct sizes so mix-ups fail)."""

from __future__ import annotations

import io
import os

from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from movekd_hf.modeling.llava_conventions import IMAGE_TOKEN

STUDENT_SIZE = 40  # processor crop; patch 8 -> 5 x 5 = 25 image tokens
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = 25
TEACHER_SIZE = 24
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
# Text the BPE merges are learnt from (kept as two lines: joined, its merges and so every token id would change).
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What shape is in the image? ASSISTANT: A red circle on a white background.",
    "What colour is the shape? It is blue. Describe the image briefly. Give a short caption.",
]


def build_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (a few hundred merges learnt offline) with LLaMA-style special tokens and `<image>`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    if add_bos:  # like LLaMA's tokenizer: BOS prepended at inference
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": STUDENT_SIZE}, crop_size={"height": STUDENT_SIZE, "width": STUDENT_SIZE}
    )


def build_processor(add_bos: bool = False) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(add_bos),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def write_png(path: str, size: tuple[int, int] = (37, 29), colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_corrupt_png(path: str) -> str:
    """A real PNG with its second half cut off: the header opens, the pixel data does not decode."""
    image = Image.effect_noise((37, 29), 60).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    return path


def write_array_image(path: str, pixels) -> str:
    """Save a numpy array with PIL as the file type of `path`'s suffix: uint16 -> 16-bit greyscale ("I;16"),
    int32 -> 32-bit integer ("I", TIFF), float32 -> 32-bit float ("F", TIFF)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
