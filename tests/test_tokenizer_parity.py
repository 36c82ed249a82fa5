"""Training ids are inference ids for every tokenizer family (METHOD.md section 5).

For each family of `_tokenizer_fixtures.py` and each template, the ids the data pipeline builds for a conversation
(`render_conversation` + `tokenize_segments`, with the arguments `training/data.py` passes) must equal the ids the
processor gives at inference (`apply_chat_template`, then `processor(text=..., images=...)`), and only the answers
with their EOS (LLaVA's `sep2`) are labelled. The labels are checked independently of how they are computed: each
trained run decodes to exactly one answer plus EOS, and what precedes it decodes to a prompt ending in `ASSISTANT:`.
For a legacy LLaMA tokenizer the labels also equal LLaVA's own `preprocess_v1` arithmetic (re-implemented here).
"""

from __future__ import annotations

import pytest
from _tokenizer_fixtures import build_families
from PIL import Image

from movekd_hf.training.data_args import image_token_id, num_image_tokens
from movekd_hf.training.templates import IGNORE_INDEX, render_conversation, tokenize_segments, tokenizer_adds_bos

FAMILIES = [
    "sp-slow-legacy",
    "sp-slow",
    "llama-fast-legacy",
    "llama-fast",
    "llama-json-legacy",
    "mistral",
    "llama3",
    "qwen2",
    "tiny-bpe",
    "tiny-model",
]
SYSTEM = "You answer in one short sentence."


def user(*parts):
    return {
        "role": "user",
        "content": [{"type": "image"} if part is None else {"type": "text", "text": part} for part in parts],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# name: (LLaVA data turns, system, the same conversation as chat messages); `None` in user() is an image part.
CONVERSATIONS = {
    "single": (
        [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"},
            {"from": "gpt", "value": "A red circle."},
        ],
        None,
        [user(None, "What shape is in the image?"), assistant("A red circle.")],
    ),
    "image-last-moved-to-front": (
        [{"from": "human", "value": "What colour is the background?\n<image>"}, {"from": "gpt", "value": "White."}],
        None,
        [user(None, "What colour is the background?"), assistant("White.")],
    ),
    "multi-turn": (
        [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": "A red circle on a white background."},
            {"from": "human", "value": "How many circles are there?"},
            {"from": "gpt", "value": "There are 12 red circles."},
            {"from": "human", "value": "And squares?"},
            {"from": "gpt", "value": "345 squares."},
        ],
        None,
        [
            user(None, "Describe the image briefly."),
            assistant("A red circle on a white background."),
            user("How many circles are there?"),
            assistant("There are 12 red circles."),
            user("And squares?"),
            assistant("345 squares."),
        ],
    ),
    "system": (
        [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."}],
        SYSTEM,
        [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            user(None, "What shape?"),
            assistant("A circle."),
        ],
    ),
    "two-images": (
        [
            {"from": "human", "value": "<image>\n<image>\nCompare the two images. Which one is brighter?"},
            {"from": "gpt", "value": "The first one, it's sunny."},
        ],
        None,
        [user(None, None, "Compare the two images. Which one is brighter?"), assistant("The first one, it's sunny.")],
    ),
    "text-only": (
        [
            {"from": "human", "value": "Naïve café: déjà vu?"},
            {"from": "gpt", "value": "Yes 🙂 déjà vu."},
            {"from": "human", "value": "Again\twith  double  spaces?"},
            {"from": "gpt", "value": " Sure,  twice."},
        ],
        None,
        [
            user("Naïve café: déjà vu?"),
            assistant("Yes 🙂 déjà vu."),
            user("Again\twith  double  spaces?"),
            assistant(" Sure,  twice."),
        ],
    ),
}


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    return build_families(str(tmp_path_factory.mktemp("tokenizers")))


def training_tokens(processor, template, turns, system=None):
    """What `training/data.py: process_record` builds (the arguments `build_train_data` gives it)."""
    num_images = sum(turn["value"].count("<image>") for turn in turns)
    segments = render_conversation(template, turns, num_images, system, processor)
    tokenizer = processor.tokenizer
    return tokenize_segments(
        segments,
        tokenizer,
        image_token_id(processor),
        num_image_tokens(processor),
        add_bos=tokenizer_adds_bos(tokenizer),
    )


def inference_ids(processor, text, num_images):
    images = [Image.new("RGB", (37, 29), (10, 200, 10 + 40 * index)) for index in range(num_images)]
    return list(processor(text=text, images=images or None)["input_ids"][0])


def trained_runs(labels):
    """(start, end) of each maximal run of trained positions."""
    runs, start = [], None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


def decoded(tokenizer, ids):
    if tokenizer.is_fast:
        return tokenizer.decode(ids, skip_special_tokens=False)
    # transformers' sentencepiece backend leaves byte-fallback pieces as `<0x59>`: let sentencepiece decode them
    text, pieces = "", []
    for token in [*ids, None]:
        if token is None or token in tokenizer.added_tokens_decoder:
            text += tokenizer.sp_model.decode(pieces) + (
                tokenizer.added_tokens_decoder[token].content if token else ""
            )
            pieces = []
        else:
            pieces.append(token)
    return text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["v1", "chat_template"])
def test_training_ids_equal_inference_ids_and_only_answers_are_trained(families, family, template):
    processor = families[family]
    tokenizer = processor.tokenizer
    for name, (turns, system, messages) in CONVERSATIONS.items():
        out = training_tokens(processor, template, turns, system)
        num_images = sum(turn["value"].count("<image>") for turn in turns)
        text = processor.apply_chat_template(messages, tokenize=False)
        assert out["input_ids"] == inference_ids(processor, text, num_images), (family, name)

        answers = [turn["value"] for turn in turns if turn["from"] == "gpt"]
        runs = trained_runs(out["labels"])
        assert len(runs) == len(answers), (family, name)
        for (start, end), answer in zip(runs, answers):
            assert out["labels"][start:end] == out["input_ids"][start:end]
            assert out["input_ids"][end - 1] == tokenizer.eos_token_id, (family, name)
            assert decoded(tokenizer, out["input_ids"][start:end]).strip() == answer.strip() + tokenizer.eos_token
            assert decoded(tokenizer, out["input_ids"][:start]).endswith("ASSISTANT:"), (family, name)
        assert out["input_ids"].count(processor.image_token_id) == num_images * num_image_tokens(processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_training_ids_equal_the_processors_and_train_the_caption(families, family):
    processor = families[family]
    tokenizer = processor.tokenizer
    caption = "A red circle on a white background."
    turns = [{"from": "human", "value": "Give a short caption.\n<image>"}, {"from": "gpt", "value": caption}]
    out = training_tokens(processor, "plain", turns)
    assert out["input_ids"] == inference_ids(processor, f"<image>{caption}\n", 1)
    last_image = max(i for i, token in enumerate(out["input_ids"]) if token == processor.image_token_id)
    assert all(label == IGNORE_INDEX for label in out["labels"][: last_image + 1])
    assert out["labels"][last_image + 1 :] == out["input_ids"][last_image + 1 :]  # the caption and its "\n"
    assert decoded(tokenizer, out["input_ids"][last_image + 1 :]).strip() == caption


def llava_preprocess_v1_labels(tokenizer, conversation: str) -> tuple[list[int], list[int]]:
    """LLaVA's `preprocess_v1` for a text-only sample (llava/train/train.py), as read: tokenise the whole prompt,
    then per `</s>`-separated round mask `len(tokenizer(instruction)) - 2` tokens after the running count (BOS and
    the `▁` of the trailing space), both counts one less after the first round for non-legacy tokenizers."""
    ids = list(tokenizer(conversation)["input_ids"])
    labels = list(ids)
    separator = " ASSISTANT: "
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    for index, round_text in enumerate(conversation.split("</s>")):
        if round_text == "":
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        instruction = parts[0] + separator
        round_len = len(tokenizer(round_text)["input_ids"])
        instruction_len = len(tokenizer(instruction)["input_ids"]) - 2
        if index != 0 and not getattr(tokenizer, "legacy", True):  # LLaVA reads `tokenizer.legacy`
            round_len -= 1
            instruction_len -= 1
        labels[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * (len(labels) - cur_len)
    assert cur_len == len(ids), "LLaVA's tokenization mismatch: it would drop this sample"
    return ids, labels


# LLaVA's arithmetic holds for these; for the non-legacy LLaMA ones (5.x tokenisation), Mistral, Llama-3 and Qwen2 its
# counts miss by one or more tokens and it would drop the sample ("tokenization mismatch").
@pytest.mark.parametrize(
    "family", ["sp-slow-legacy", "llama-fast-legacy", "llama-json-legacy", "tiny-bpe", "tiny-model"]
)
def test_labels_equal_llavas_own_masking_where_its_arithmetic_holds(families, family):
    processor = families[family]
    tokenizer = processor.tokenizer
    turns, _, messages = CONVERSATIONS["text-only"]
    conversation = processor.apply_chat_template(messages, tokenize=False)
    ids, labels = llava_preprocess_v1_labels(tokenizer, conversation)
    out = training_tokens(processor, "v1", turns)
    assert (out["input_ids"], out["labels"]) == (ids, labels)


def test_segment_by_segment_tokenising_would_differ_for_sentencepiece(families):
    """Why the whole text is tokenised once: for a LLaMA tokenizer the pieces alone give other ids."""
    tokenizer = families["llama-fast"].tokenizer
    whole = tokenizer("A red circle.</s>USER: Hi", add_special_tokens=False)["input_ids"]
    pieces = tokenizer("A red circle.</s>", add_special_tokens=False)["input_ids"]
    pieces += tokenizer("USER: Hi", add_special_tokens=False)["input_ids"]
    assert whole != pieces
    assert tokenizer.convert_ids_to_tokens(pieces).count("▁USER") == 1
    assert "▁USER" not in tokenizer.convert_ids_to_tokens(whole)
