"""Templates and label masking: exact token spans on a small offline BPE tokenizer (METHOD.md section 5)."""

from __future__ import annotations

import pytest
from _data_fixtures import NUM_IMAGE_TOKENS, build_processor, build_tokenizer
from PIL import Image

from movekd_hf.modeling.llava_conventions import VICUNA_SYSTEM, vicuna_v1_generation_prompt
from movekd_hf.training.data_args import num_image_tokens
from movekd_hf.training.templates import (
    IGNORE_INDEX,
    ConversationError,
    render_conversation,
    tokenize_segments,
    tokenizer_adds_bos,
)

IMAGE_ID = 3


def encode(template, turns, tokenizer, num_images=1, renderer=None, add_bos=False):
    segments = render_conversation(template, turns, num_images, None, renderer or tokenizer)
    return tokenize_segments(segments, tokenizer, IMAGE_ID, NUM_IMAGE_TOKENS, add_bos=add_bos)


def expected_from_text(tokenizer, text: str, trained_spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Independent reference: tokenise the whole string once, then train the tokens inside the given char spans."""
    encoded = tokenizer(text.replace("<image>", "<image>" * NUM_IMAGE_TOKENS), return_offsets_mapping=True)
    expanded_shift = len("<image>") * (NUM_IMAGE_TOKENS - 1) * text[: trained_spans[0][0]].count("<image>")
    spans = [(start + expanded_shift, end + expanded_shift) for start, end in trained_spans]
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(span_start <= start and end <= span_end for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return encoded["input_ids"], labels


def test_plain_trains_exactly_caption_and_newline():
    tokenizer = build_tokenizer()
    turns = [
        {"from": "human", "value": "Give a short caption.\n<image>"},
        {"from": "gpt", "value": "a red circle on a white background"},
    ]
    out = encode("plain", turns, tokenizer)
    caption_ids = tokenizer("a red circle on a white background\n", add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == [IMAGE_ID] * NUM_IMAGE_TOKENS + caption_ids  # the human text is gone
    assert out["labels"] == [IGNORE_INDEX] * NUM_IMAGE_TOKENS + caption_ids
    assert tokenizer.eos_token_id not in out["input_ids"]  # plain has no EOS, as in LLaVA


def test_v1_trains_exactly_the_answers_and_their_eos():
    tokenizer = build_tokenizer()
    turns = [
        {"from": "human", "value": "<image>\nWhat shape is in the image?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "What colour is the background?"},
        {"from": "gpt", "value": "It is white."},
    ]
    out = encode("v1", turns, tokenizer)
    text = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat shape is in the image? ASSISTANT: A red circle.</s>"
        "USER: What colour is the background? ASSISTANT: It is white.</s>"
    )
    first = text.index(" A red circle.</s>")
    second = text.index(" It is white.</s>")
    spans = [(first, first + len(" A red circle.</s>")), (second, second + len(" It is white.</s>"))]
    input_ids, labels = expected_from_text(tokenizer, text, spans)
    assert out["input_ids"] == input_ids
    assert out["labels"] == labels
    trained = [token for token in out["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " A red circle.</s> It is white.</s>"
    assert out["input_ids"].count(IMAGE_ID) == NUM_IMAGE_TOKENS
    assert out["labels"].count(tokenizer.eos_token_id) == 2


def test_v1_moves_single_image_placeholder_to_the_front_and_handles_text_only():
    tokenizer = build_tokenizer()
    front = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A square."}]
    back = [{"from": "human", "value": "What shape?\n<image>"}, {"from": "gpt", "value": "A square."}]
    assert encode("v1", front, tokenizer) == encode("v1", back, tokenizer)
    text_only = encode("v1", [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], tokenizer, 0)
    assert IMAGE_ID not in text_only["input_ids"]
    assert tokenizer.decode([t for t in text_only["labels"] if t != IGNORE_INDEX]) == " Hello.</s>"


def test_v1_prompt_tokens_match_llava_processor_at_inference():
    """Training tokens before the answer equal what `LlavaProcessor` produces for the generation prompt."""
    processor = build_processor()
    turns = [{"from": "human", "value": "What shape is in the image?\n<image>"}, {"from": "gpt", "value": "A cat."}]
    out = encode("v1", turns, processor.tokenizer)
    prompt = vicuna_v1_generation_prompt("What shape is in the image?\n<image>")
    image = Image.new("RGB", (37, 29), (10, 200, 10))
    inference_ids = processor(text=prompt, images=image)["input_ids"][0]
    first_trained = next(i for i, label in enumerate(out["labels"]) if label != IGNORE_INDEX)
    assert processor.image_token_id == IMAGE_ID
    assert out["input_ids"][:first_trained] == list(inference_ids)


def test_bos_is_added_and_masked_when_the_tokenizer_adds_it():
    tokenizer = build_tokenizer(add_bos=True)
    assert tokenizer_adds_bos(tokenizer) and not tokenizer_adds_bos(build_tokenizer())
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}]
    out = encode("plain", turns, tokenizer, add_bos=True)
    assert out["input_ids"][0] == tokenizer.bos_token_id and out["labels"][0] == IGNORE_INDEX


def test_chat_template_trains_only_assistant_content():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
        "{% endfor %} {% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    turns = [
        {"from": "human", "value": "<image>\nWhat shape?"},
        {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    out = encode("chat_template", turns, tokenizer)
    trained = tokenizer.decode([token for token in out["labels"] if token != IGNORE_INDEX])
    assert trained == " A circle.</s> Red.</s>"
    assert out["input_ids"].count(IMAGE_ID) == NUM_IMAGE_TOKENS
    assert tokenizer.decode(out["input_ids"]).startswith("USER: " + "<image>" * NUM_IMAGE_TOKENS + "\nWhat shape?")


@pytest.mark.parametrize(
    ("template", "turns", "num_images", "message"),
    [
        ("v1", [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], 0, "turn 0 is from 'gpt'"),
        ("v1", [{"from": "human", "value": "q"}], 0, "ends with a human turn"),
        ("v1", [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], 0, "unknown speaker 'robot'"),
        ("v1", [], 0, "no conversation turns"),
        ("plain", [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}], 2, "one image"),
    ],
)
def test_malformed_conversations_raise_clear_errors(template, turns, num_images, message):
    with pytest.raises(ConversationError, match=message):
        render_conversation(template, turns, num_images)


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match="template must be one of"):
        render_conversation("v2", [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], 0)


def test_v1_equals_the_shipped_processor_chat_template_and_its_inference_prompt():
    """`v1` training tokens = the tiny MoVE-KD processor's chat template (what `pipeline` users get)."""
    from movekd_hf.models import build_tiny_model

    _, processor = build_tiny_model(seed=0)
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    count = num_image_tokens(processor)
    assert tokenizer_adds_bos(tokenizer)
    conversations = [
        [
            {"from": "human", "value": "What shape?\n<image>"},
            {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Red."},
        ],
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}],  # LLaVA strips: "<image>"
    ]
    for turns in conversations:
        num_images = sum(turn["value"].count("<image>") for turn in turns)
        for system in (None, "Answer briefly."):
            by_template = {
                name: tokenize_segments(
                    render_conversation(name, turns, num_images, system, processor), tokenizer, image_id, count, True
                )
                for name in ("v1", "chat_template")
            }
            assert by_template["v1"] == by_template["chat_template"]
    image = Image.new("RGB", (37, 29), (10, 200, 10))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inference_ids = processor(text=prompt, images=image)["input_ids"][0]
    trained = tokenize_segments(render_conversation("v1", conversations[0], 1), tokenizer, image_id, count, True)
    first_trained = next(i for i, label in enumerate(trained["labels"]) if label != IGNORE_INDEX)
    assert trained["input_ids"][:first_trained] == list(inference_ids)
