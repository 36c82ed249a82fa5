"""A small LLaVA-format dataset the package generates, so tiny training runs and tests work offline.

Each image is a coloured shape (circle, square, triangle) drawn with PIL on a plain background, at a random place
and in a random aspect ratio (so `pad` and `resize` differ). Stage 1 gets one caption per image in LLaVA-Pretrain
form; stage 2 gets one- or two-turn question/answer conversations plus a few text-only samples, mimicking the
ShareGPT part of `llava_v1_5_mix665k`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..modeling.llava_conventions import IMAGE_TOKEN

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
PRETRAIN_PROMPTS = (f"{IMAGE_TOKEN}\nDescribe the image briefly.", f"Give a short caption.\n{IMAGE_TOKEN}")
TEXT_ONLY = (
    ("What is two plus three?", "Five."),
    ("Name a colour of the sky.", "Blue."),
    ("How many sides does a triangle have?", "Three."),
)


@dataclass(frozen=True)
class ToyLLaVADataset:
    image_folder: str
    pretrain_json: str  # stage 1, template `plain`
    finetune_json: str  # stage 2, template `v1`, includes text-only samples


def _draw(shape: str, colour: str, background: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    extent = rng.randint(min(size) // 3, min(size) // 2)
    left, top = rng.randint(0, width - extent), rng.randint(0, height - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon(
            [(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=COLOURS[colour]
        )
    return image


def _finetune_turns(shape: str, colour: str, background: str, rng: random.Random) -> list[dict[str, str]]:
    pairs = [
        ("What shape is in the image?", f"A {shape}."),
        ("What colour is the shape?", f"It is {colour}."),
        ("What colour is the background?", f"The background is {background}."),
    ]
    chosen = rng.sample(pairs, rng.choice((1, 2)))
    turns: list[dict[str, str]] = []
    for position, (question, answer) in enumerate(chosen):
        if position == 0:  # LLaVA data puts the placeholder before or after the first question
            question = f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_TOKEN}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def make_toy_llava_dataset(
    out_dir: str | os.PathLike, num_samples: int = 32, seed: int = 0, image_size: int = 64
) -> ToyLLaVADataset:
    """Write `images/*.png`, `pretrain.json` (captions) and `finetune.json` (Q/A + ~1/8 text-only) to `out_dir`.

    `num_samples` images are drawn; `image_size` is the longer side (aspect ratios 1, 4:3 and 3:4 are mixed).
    """
    if num_samples <= 0 or image_size < 8:
        raise ValueError(f"need num_samples > 0 and image_size >= 8, got {num_samples} and {image_size}")
    rng = random.Random(seed)
    out_dir = os.fspath(out_dir)
    image_folder = os.path.join(out_dir, "images")
    os.makedirs(image_folder, exist_ok=True)
    pretrain, finetune = [], []
    for index in range(num_samples):
        shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        short = image_size * 3 // 4
        size = rng.choice(((image_size, image_size), (image_size, short), (short, image_size)))
        file_name = f"{index:05d}.png"
        _draw(shape, colour, background, size, rng).save(os.path.join(image_folder, file_name))
        caption = f"a {colour} {shape} on a {background} background"
        prompt = rng.choice(PRETRAIN_PROMPTS)
        pretrain.append(
            {
                "id": f"toy-{index:05d}",
                "image": file_name,
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}],
            }
        )
        finetune.append(
            {
                "id": f"toy-qa-{index:05d}",
                "image": file_name,
                "conversations": _finetune_turns(shape, colour, background, rng),
            }
        )
    for index in range(max(1, num_samples // 8)):
        question, answer = TEXT_ONLY[index % len(TEXT_ONLY)]
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        finetune.insert(rng.randint(0, len(finetune)), {"id": f"toy-text-{index:05d}", "conversations": turns})
    paths = ToyLLaVADataset(
        image_folder, os.path.join(out_dir, "pretrain.json"), os.path.join(out_dir, "finetune.json")
    )
    for path, records in ((paths.pretrain_json, pretrain), (paths.finetune_json, finetune)):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
    return paths
