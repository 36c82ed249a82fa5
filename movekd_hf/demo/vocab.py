"""A word-level tokenizer over the demo world's closed vocabulary.

Every answer of the world is one word, so with one token per word the tiny LLM predicts an answer in one step
instead of spelling it byte by byte; it learns in a fraction of the steps. The tokenizer is a stock `tokenizers`
WordLevel model wrapped in `PreTrainedTokenizerFast`, so it saves as `tokenizer.json` with the checkpoint and
loads back through `AutoProcessor` without `movekd_hf`.
"""

from __future__ import annotations

import random

from ..modeling.llava_conventions import IMAGE_TOKEN, VICUNA_SYSTEM
from ..models import SPECIAL_TOKENS
from . import world

ROLE_WORDS = "USER: ASSISTANT:"


def world_corpus() -> list[str]:
    """Texts that use every word the world, its templates and the conversation format can produce."""
    texts = [VICUNA_SYSTEM, ROLE_WORDS, world.SHORT_ANSWER, world.DESCRIBE, "yes no", " ".join(world.COUNT_WORDS)]
    texts += [str(n) for n in range(world.MAX_OBJECTS + 1)]
    texts += [" ".join(names) for names in (world.COLOURS, world.SHAPES, world.SIZES, world.COLUMNS)]
    texts += [" ".join(world.BACKGROUND_TONES), " ".join(world.TEXTURES)]
    obj = world.WorldObject("circle", "red", "small", (0, 0))
    scene = world.Scene((obj,), "white", "plain", 0)
    texts += [world.caption(scene), world.existence_question("red", "circle")]
    texts += [question for question, _ in world.open_questions(scene, random.Random(0)).values()]
    texts += ["What shape is the red object?", "Where is the red circle?", "What colour is the circle?"]
    texts += ["on the left, in the middle, on the right", " ".join(world.STRIPES), world.stripes_question("circle")]
    return texts


def build_word_tokenizer(extra_texts: tuple[str, ...] = ()):
    """WordLevel tokenizer: `<unk> <s> </s> <pad> <image>` first (ids 0-4), then the corpus words in sorted order.

    Input is split on whitespace and punctuation; `<s>` is prepended like LLaMA's tokenizer; left padding for
    batched generation.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in (*world_corpus(), *extra_texts):
        words.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(vocab)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
