"""Small offline copies of the tokenizer families a MoVE-KD user meets, built the way the real ones are built.

Each is trained here on a few sentences (no downloads) but keeps its family's pipeline, which is what decides how a
conversation text splits into tokens: normaliser, pre-tokenizer, decoder, special tokens, BOS/EOS settings.

- Vicuna / LLaMA-2 (sentencepiece BPE, byte fallback, digits split, dummy prefix, no whitespace clean-up, unk/bos/eos
  = 0/1/2, as in their `tokenizer.model`):
  `sp-slow-legacy`, `sp-slow`: transformers' sentencepiece backend (`legacy` True/False; 5.x has no slow
  `LlamaTokenizer` class, this is the slow path it keeps); `llama-fast-legacy`, `llama-fast`: `LlamaTokenizer`
  (`LlamaTokenizerFast`) converted from the model (Metaspace, prepend "always" / "first"; lmsys/vicuna-7b-v1.5 sets
  `legacy: false`); `llama-json-legacy`: the `tokenizer.json` that meta-llama/Llama-2 and transformers 4.x's
  converter write (normaliser Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, `<s> $A`), read as it is.
- `mistral`: Mistral-7B-v0.3's layout: sentencepiece with control tokens `[INST]`, `[/INST]` at ids 3, 4, Metaspace
  prepend "first" (legacy false), BOS added.
- `llama3`: byte-level BPE, Llama-3's split regex (digits by threes), ByteLevel without its own regex,
  `<|begin_of_text|> $A`, EOS `<|eot_id|>`, special tokens after the vocabulary (meta-llama/Meta-Llama-3-8B-Instruct).
- `qwen2`: byte-level BPE with NFC, Qwen2's split regex (one digit at a time), no BOS, EOS `<|im_end|>`, pad
  `<|endoftext|>` (Qwen/Qwen2-7B-Instruct).
- `tiny-bpe`: the byte-level BPE the data tests use (`_data_fixtures.build_tokenizer`, BOS added);
  `tiny-model`: the byte tokenizer the tiny MoVE-KD preset ships.

Every tokenizer gets `<image>` as a special token and a pad token, as `movekd_hf.models.build_from_pretrained` adds
them, and a `MoVEKDProcessor` around it (a 40 px crop, patch 8: 25 image tokens per image).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import sentencepiece as spm
from _data_fixtures import PATCH_SIZE, build_image_processor
from _data_fixtures import build_tokenizer as build_tiny_bpe
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from movekd_hf.modeling.llava_conventions import IMAGE_TOKEN, VICUNA_SYSTEM
from movekd_hf.modeling.processing_movekd import MoVEKDProcessor
from movekd_hf.models import build_tiny_model

CORPUS = [
    VICUNA_SYSTEM,
    "USER: What shape is in the image? ASSISTANT: A red circle on a white background.",
    "USER: What colour is the background? ASSISTANT: It is white. There are 12 red circles and 345 squares.",
    "Describe the image briefly.\nGive a short caption. Answer the question using a single word or phrase.",
    "Compare the two images. Which one is brighter? The first one, it's sunny; the second isn't.",
    "Naïve café: déjà vu, 日本語, emoji 🙂 and tabs\tand  double  spaces.",
]
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_sentencepiece(folder: str, vocab_size: int, control_symbols: tuple[str, ...] = ()) -> str:
    """A LLaMA-style sentencepiece BPE model (the trainer settings of LLaMA's `tokenizer.model`) at
    `folder/tokenizer.model`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=list(control_symbols),
        hard_vocab_limit=False,
        minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as handle:
        handle.write(model.getvalue())
    return path


def _sentencepiece_slow(model_path: str, legacy: bool):
    return SentencePieceBackend(
        vocab_file=model_path,
        legacy=legacy,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        special_tokens_pattern="bos",
    )


def _llama_fast(folder: str, legacy: bool, **kwargs) -> LlamaTokenizer:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True}, handle)
    return LlamaTokenizer.from_pretrained(
        folder, legacy=legacy, add_bos_token=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )


def _llama_tokenizer_json(fast: LlamaTokenizer) -> PreTrainedTokenizerFast:
    """The same vocabulary and merges in Llama-2's shipped `tokenizer.json` layout, read by the generic class."""
    spec = json.loads(fast.backend_tokenizer.to_str())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _byte_level_bpe(split: str, special_tokens: list[str], vocab_size: int, nfc: bool, bos: str | None) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    backend.add_special_tokens(special_tokens)  # after the vocabulary, as in the real files
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        bos_id = backend.token_to_id(bos)
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        )
    backend.post_processor = processors.Sequence(steps)
    return backend


def _llama3() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = _byte_level_bpe(LLAMA3_SPLIT, specials, 600, nfc=False, bos="<|begin_of_text|>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _qwen2() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = _byte_level_bpe(QWEN2_SPLIT, specials, 560, nfc=True, bos=None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _add_image_and_pad(tokenizer):
    """What `build_from_pretrained` does to an LLM's tokenizer: `<image>` (then a pad token when missing)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def processor_for(tokenizer) -> MoVEKDProcessor:
    return MoVEKDProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_families(folder: str) -> dict[str, MoVEKDProcessor]:
    """Every family's processor, by name (see the module docstring). Takes a few seconds: cache it per session."""
    vicuna_folder, mistral_folder = os.path.join(folder, "vicuna"), os.path.join(folder, "mistral")
    vicuna = train_sentencepiece(vicuna_folder, 420)
    train_sentencepiece(mistral_folder, 460, control_symbols=("[INST]", "[/INST]"))
    builders: dict[str, Callable[[], object]] = {
        "sp-slow-legacy": lambda: _sentencepiece_slow(vicuna, legacy=True),
        "sp-slow": lambda: _sentencepiece_slow(vicuna, legacy=False),
        "llama-fast-legacy": lambda: _llama_fast(vicuna_folder, legacy=True),
        "llama-fast": lambda: _llama_fast(vicuna_folder, legacy=False),
        "llama-json-legacy": lambda: _llama_tokenizer_json(_llama_fast(vicuna_folder, legacy=True)),
        "mistral": lambda: _llama_fast(mistral_folder, legacy=False, extra_special_tokens=["[INST]", "[/INST]"]),
        "llama3": _llama3,
        "qwen2": _qwen2,
        "tiny-bpe": lambda: build_tiny_bpe(add_bos=True),
    }
    families = {name: processor_for(_add_image_and_pad(build())) for name, build in builders.items()}
    families["tiny-model"] = build_tiny_model(seed=0)[1]
    return families
