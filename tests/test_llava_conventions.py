"""LLaVA's conventions, defined once (`movekd_hf/modeling/llava_conventions.py`): what every part reads agrees with
LLaVA-1.5 and with each other (training prompt = inference prompt = chat template; teacher view = cache view)."""

from __future__ import annotations

import pickle

import pytest
import torch
from _model_fixtures import TINY_VISION
from PIL import Image

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


def test_the_vicuna_v1_prompt_is_llava_15s():
    assert VICUNA_SYSTEM.startswith("A chat between a curious human and an artificial intelligence assistant.")
    assert vicuna_v1_prompt("Q?") == f"{VICUNA_SYSTEM} USER: Q? ASSISTANT:"
    assert vicuna_v1_prompt("Q?", system="S") == "S USER: Q? ASSISTANT:"
    assert move_image_to_front("What is it?\n<image>") == "<image>\nWhat is it?"
    assert (
        vicuna_v1_generation_prompt("What is it? <image>") == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    )


def test_chat_template_renders_the_generation_prompt(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == vicuna_v1_generation_prompt(f"{IMAGE_TOKEN}\nWhat is it?")
    assert processor.image_token == IMAGE_TOKEN


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
