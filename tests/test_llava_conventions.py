"""LLaVA's conventions, defined once (`movekd_hf/modeling/llava_conventions.py`): what every part reads agrees with
LLaVA-1.5 and with each other (training prompt = inference prompt = chat template; teacher view = cache view)."""

from __future__ import annotations

import pickle

import pytest
import torch
from _model_fixtures import TINY_VISION
from PIL import Image

from movekd_hf.evaluation.prompts import chat_template_messages, short_answer_prompt, v1_conversation
from movekd_hf.modeling.llava_conventions import (
    CLIP_MEAN,
    CLIP_MEAN_COLOUR,
    IMAGE_TOKEN,
    VICUNA_SYSTEM,
    ImageLoadError,
    load_image,
    mean_colour,
    move_image_to_front,
    resample_tokens,
    square_view,
    student_grid,
    teacher_images,
    vicuna_v1_generation_prompt,
    vicuna_v1_prompt,
)

# llava/conversation.py, `conv_vicuna_v1.system` (haotian-liu/LLaVA), character for character.
LLAVA_CONV_VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def llava_get_prompt(system: str, messages: list[tuple[str, str | None]], sep2: str = "</s>") -> str:
    """`Conversation.get_prompt` for `SeparatorStyle.TWO` (sep=" ", sep2="</s>") as llava/conversation.py writes it:
    system + sep, then `role: message` + seps[i % 2] per message, and `role:` for the empty generation slot."""
    seps = [" ", sep2]
    prompt = system + seps[0]
    for index, (role, message) in enumerate(messages):
        prompt += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
    return prompt


@pytest.fixture(scope="module")
def processor():
    """The tiny preset's processor (its tokenizer's EOS is "</s>", as Vicuna's)."""
    from movekd_hf.models import build_tiny_model

    return build_tiny_model(seed=0)[1]


def user(*parts):
    return {
        "role": "user",
        "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_the_vicuna_v1_system_text_is_llavas_conv_vicuna_v1():
    assert VICUNA_SYSTEM == LLAVA_CONV_VICUNA_V1_SYSTEM
    assert vicuna_v1_prompt("Q?") == f"{VICUNA_SYSTEM} USER: Q? ASSISTANT:"
    assert vicuna_v1_prompt("Q?", system="S") == "S USER: Q? ASSISTANT:"
    assert move_image_to_front("What is it?\n<image>") == "<image>\nWhat is it?"
    assert move_image_to_front("<image>") == "<image>"  # LLaVA's preprocess_multimodal strips the lone "\n"
    assert (
        vicuna_v1_generation_prompt("What is it? <image>") == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    )


def test_chat_template_renders_the_generation_prompt(tiny):
    _, processor = tiny
    messages = [user(None, "What is it?")]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == vicuna_v1_generation_prompt(f"{IMAGE_TOKEN}\nWhat is it?")
    assert processor.image_token == IMAGE_TOKEN


@pytest.mark.parametrize(
    ("messages", "system", "llava_messages"),
    [
        ([user(None, "What is it?")], None, [("USER", "<image>\nWhat is it?"), ("ASSISTANT", None)]),
        (
            [user(None, "What is it?"), assistant("A cat."), user("Its colour?"), assistant("Black."), user("Why?")],
            None,
            [
                ("USER", "<image>\nWhat is it?"),
                ("ASSISTANT", "A cat."),
                ("USER", "Its colour?"),
                ("ASSISTANT", "Black."),
                ("USER", "Why?"),
                ("ASSISTANT", None),
            ],
        ),
        (
            [{"role": "system", "content": "Answer briefly."}, user(None, "What is it?")],
            "Answer briefly.",
            [("USER", "<image>\nWhat is it?"), ("ASSISTANT", None)],
        ),
        (
            [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]}, user("Hi"), assistant("Hello.")],
            "Be terse.",
            [("USER", "Hi"), ("ASSISTANT", "Hello."), ("ASSISTANT", None)],
        ),
        (
            [user(None, None, "Which is brighter?")],
            None,
            [("USER", "<image>\n<image>\nWhich is brighter?"), ("ASSISTANT", None)],
        ),
        ([user("What is it?", None)], None, [("USER", "What is it?\n<image>"), ("ASSISTANT", None)]),
        ([user("Hi there.")], None, [("USER", "Hi there."), ("ASSISTANT", None)]),
        (
            [{"role": "user", "content": "Hi <image> there."}],
            None,
            [("USER", "Hi <image> there."), ("ASSISTANT", None)],
        ),
        ([user(None)], None, [("USER", "<image>"), ("ASSISTANT", None)]),
    ],
    ids=[
        "single",
        "multi-turn",
        "system",
        "system-parts",
        "two-images",
        "text-then-image",
        "text-only",
        "string",
        "image-only",
    ],
)
def test_chat_template_renders_what_llavas_conversation_renders(processor, messages, system, llava_messages):
    """Single turn, multi-turn, a system message (it replaces the system text), two images and text only, against
    LLaVA's own `get_prompt`. Content parts keep their order, an image is `<image>` joined by "\\n" to its neighbours."""
    expected = llava_get_prompt(system or LLAVA_CONV_VICUNA_V1_SYSTEM, llava_messages)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_chat_template_ends_answers_with_the_tokenizers_eos_text(processor):
    messages = [user("Hi"), assistant("Hello.")]
    rendered = processor.apply_chat_template(messages)
    assert rendered == llava_get_prompt(VICUNA_SYSTEM, [("USER", "Hi"), ("ASSISTANT", "Hello.")])
    assert rendered.endswith("Hello." + processor.tokenizer.eos_token)
    other_eos = processor.apply_chat_template(messages, eos_token="<|eot_id|>")
    assert other_eos == llava_get_prompt(VICUNA_SYSTEM, [("USER", "Hi"), ("ASSISTANT", "Hello.")], sep2="<|eot_id|>")


def test_chat_template_refuses_other_roles(processor):
    with pytest.raises(Exception, match="got role tool"):
        processor.apply_chat_template([user("Hi"), {"role": "tool", "content": "x"}])


def test_evaluation_prompts_are_the_chat_templates(processor):
    """The `v1` evaluation prompt and the chat-template one are the same text: one system text for both."""
    prompt = short_answer_prompt("Is it red?")
    rendered = processor.apply_chat_template(chat_template_messages(prompt), add_generation_prompt=True)
    assert (
        v1_conversation(prompt)
        == rendered
        == llava_get_prompt(LLAVA_CONV_VICUNA_V1_SYSTEM, [("USER", f"<image>\n{prompt}"), ("ASSISTANT", None)])
    )


def test_load_image_decodes_every_source_to_rgb(tmp_path):
    image = Image.new("L", (5, 3), 200)
    path = tmp_path / "grey.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), {"path": str(path), "bytes": None}, image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (5, 3) and loaded.getpixel((0, 0)) == (200, 200, 200)


def test_load_image_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ImageLoadError, match="image file not found: .*nowhere.png") as missing:
        load_image(tmp_path / "nowhere.png")
    assert missing.value.reason == "missing"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="cannot decode image file .*broken.png") as corrupt:
        load_image(broken)
    assert corrupt.value.reason == "corrupt" and isinstance(corrupt.value, ValueError)
    copy = pickle.loads(pickle.dumps(corrupt.value))  # data-loader workers send errors across processes
    assert copy.reason == "corrupt" and str(copy) == str(corrupt.value)


def test_padding_colour_is_the_clip_mean_and_normalises_to_zero():
    class Processor:
        image_mean = list(CLIP_MEAN)

    assert mean_colour(Processor()) == CLIP_MEAN_COLOUR == (122, 116, 104)
    assert mean_colour(object()) == (127, 127, 127)  # no image_mean: the 0.5 mean of SigLIP-style processors


def test_square_views_pad_or_crop_around_the_centre():
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    padded = square_view(image, "pad", (1, 2, 3))
    assert padded.size == (6, 6) and padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((3, 3)) == (255, 0, 0)
    cropped = square_view(image, "resize", (1, 2, 3))
    assert cropped.size == (2, 2) and cropped.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="image_aspect must be one of \\('pad', 'resize'\\), got 'crop'"):
        square_view(image, "crop", (0, 0, 0))


def test_teacher_images_are_unit_tensors_of_the_square_view():
    images = [Image.new("RGB", (6, 2), (255, 0, 0)), Image.new("RGB", (3, 3), (0, 0, 255))]
    pixels = teacher_images(images, "pad", (0, 0, 0), size=12)
    assert pixels.shape == (2, 3, 12, 12) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    assert pixels[0, 0, 6, 6] == 1.0 and pixels[0, 0, 0, 0] == 0.0  # red centre, black padding rows
    assert torch.equal(pixels[1, 2], torch.ones(12, 12))


def test_student_grid_from_a_config_or_its_dict():
    from transformers import CLIPVisionConfig

    assert student_grid(CLIPVisionConfig(**TINY_VISION)) == student_grid(TINY_VISION) == (4, 4)
    assert student_grid({"image_size": 336, "patch_size": 14}) == (24, 24)


def test_resample_tokens_keeps_half_precision_and_checks_the_grid():
    tokens = torch.randn(2, 16, 5).half()
    out = resample_tokens(tokens, (4, 4), (2, 2))
    assert out.shape == (2, 4, 5) and out.dtype == torch.float16
    assert resample_tokens(tokens, (4, 4), (4, 4)) is tokens
    with pytest.raises(ValueError, match="tokens have 16 positions but grid \\(3, 3\\) has 9"):
        resample_tokens(tokens, (3, 3), (2, 2))
