"""The demo's synthetic visual world: scenes of coloured shapes on textured backgrounds, drawn on the fly, with
captions (stage 1), question/answer conversations (stage 2) and a held-out evaluation set by question type.

A scene is 1-3 objects, each in its own cell of a 3 x 3 grid (so positions are unambiguous), each with a shape,
a colour, a size and a stripe orientation (each object is filled with stripes of its colour alternating with the
colour darkened to `STRIPE_DARKNESS`, horizontal or vertical, period `STRIPE_PERIODS` px, random phase), over one
of several backgrounds (plain, striped, checked, noisy). The stripe orientation is the demo's gap attribute: the
student's initial tokens do not carry it and the `convnext` teacher does (teachers.py). Everything comes from one
`random.Random(seed)`, so the same seed gives the same images and questions on every machine.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..modeling.llava_conventions import IMAGE_TOKEN

IMAGE_SIZE = 64
GRID = 3  # objects sit in the cells of a GRID x GRID layout
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 175),
}
SHAPES = ("circle", "square", "triangle")
STRIPES = ("horizontal", "vertical")  # the gap attribute
STRIPE_PERIODS = (4, 5)  # stripe period in pixels, drawn per object
STRIPE_DARKNESS = 0.45  # the dark stripes are the object's colour times this
SIZES = {"small": 0.19, "large": 0.3}  # object extent as a fraction of the canvas; large fits in a cell
BACKGROUND_TONES = {"white": (238, 238, 232), "grey": (128, 128, 128), "black": (22, 22, 26)}
TEXTURES = ("plain", "stripes", "checks", "noise")
COLUMNS = ("left", "middle", "right")
COUNT_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3

QUESTION_TYPES = ("colour", "shape", "stripes", "count", "position", "existence")
POPE_SPLITS = ("random", "popular", "adversarial")
SHORT_ANSWER = "Answer the question using a single word or phrase."
DESCRIBE = "Describe the image."  # the long-answer turn: its caption supervises every object in the scene


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, column) in the GRID x GRID layout
    stripes: str = "horizontal"  # one of STRIPES


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    tone: str
    texture: str
    seed: int  # drives the pixel-level jitter and noise of `render_scene`


@dataclass(frozen=True)
class Question:
    key: str
    scene: int  # index into the scene list it belongs to
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str
    split: str = ""  # POPE split for existence questions


@dataclass
class WorldSplit:
    scenes: list[Scene]
    questions: list[Question] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- scenes and pixels


def sample_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    objects = tuple(
        WorldObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell, rng.choice(STRIPES))
        for cell in cells
    )
    return Scene(objects, rng.choice(list(BACKGROUND_TONES)), rng.choice(TEXTURES), rng.randrange(2**31))


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUND_TONES[scene.tone], dtype=np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()  # [H, W, 3]
    shade = 40.0 if scene.tone != "white" else -40.0  # the pattern is lighter on dark tones and vice versa
    ys, xs = np.mgrid[0:size, 0:size]
    if scene.texture == "stripes":
        period = int(rng.integers(4, 9))
        canvas[((xs + ys) // period) % 2 == 0] += shade
    elif scene.texture == "checks":
        period = int(rng.integers(4, 9))
        canvas[((xs // period) + (ys // period)) % 2 == 0] += shade
    elif scene.texture == "noise":
        canvas += rng.normal(0.0, 18.0, size=(size, size, 1))
    return canvas.clip(0, 255).astype(np.uint8)


def _layout(scene: Scene, size: int) -> list[tuple[WorldObject, tuple[float, float, float, float]]]:
    """Each object's bounding box in pixels (jittered inside its cell, deterministic in `scene.seed`)."""
    rng = np.random.default_rng(scene.seed + 1)
    cell = size / GRID
    boxes = []
    for obj in scene.objects:
        extent = SIZES[obj.size] * size * (0.9 + 0.2 * float(rng.random()))
        slack = max(cell - extent, 0.0)  # objects stay inside their cell, so they never overlap
        left = obj.cell[1] * cell + float(rng.random()) * slack
        top = obj.cell[0] * cell + float(rng.random()) * slack
        boxes.append((obj, (left, top, left + extent, top + extent)))
    return boxes


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)


def _object_mask(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(mask), shape, box, 1)
    return np.asarray(mask) > 0  # [size, size] bool


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene as an RGB image of `size` x `size` pixels (deterministic in `scene.seed`): each object in its
    colour, every other band of `period` px (horizontal stripes: bands of rows; vertical: of columns) darkened to
    `STRIPE_DARKNESS` of it."""
    canvas = _background(scene, size, np.random.default_rng(scene.seed)).astype(np.float32)  # [H, W, 3]
    rng = np.random.default_rng(scene.seed + 7)
    ys, xs = np.mgrid[0:size, 0:size]
    for obj, box in _layout(scene, size):
        period = int(rng.integers(STRIPE_PERIODS[0], STRIPE_PERIODS[-1] + 1))
        phase = int(rng.integers(0, 2 * period))
        coordinate = ys if obj.stripes == "horizontal" else xs
        dark = ((coordinate + phase) // period) % 2 == 0
        mask = _object_mask(obj.shape, box, size)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        canvas[mask] = colour
        canvas[mask & dark] = colour * STRIPE_DARKNESS
    return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))


def render_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Segmentation of the same drawing: 0 background, 1 + SHAPES.index(shape) per object pixel. [size, size]."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for obj, box in _layout(scene, size):
        _draw(draw, obj.shape, box, 1 + SHAPES.index(obj.shape))
    return np.asarray(mask, dtype=np.int64)


def render_stripe_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Stripe orientation per pixel: 0 background, 1 + STRIPES.index(stripes) per object pixel. [size, size]."""
    mask = np.zeros((size, size), dtype=np.int64)
    for obj, box in _layout(scene, size):
        mask[_object_mask(obj.shape, box, size)] = 1 + STRIPES.index(obj.stripes)
    return mask


def object_centres(scene: Scene, size: int = IMAGE_SIZE) -> list[tuple[WorldObject, float, float]]:
    """(object, x, y) of each object's bounding-box centre, as fractions of the canvas side (in [0, 1))."""
    return [(obj, (left + right) / 2 / size, (top + bottom) / 2 / size) for obj, (left, top, right, bottom)
            in _layout(scene, size)]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ language


def describe_object(obj: WorldObject) -> str:
    where = ("on the left", "in the middle", "on the right")[obj.cell[1]]
    return f"a {obj.size} {obj.colour} {obj.shape} with {obj.stripes} stripes {where}"


def caption(scene: Scene) -> str:
    """Stage-1 caption: every object, then the background."""
    parts = ", ".join(describe_object(obj) for obj in sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0])))
    return f"{COUNT_WORDS[len(scene.objects)]} objects : {parts} . the background is {scene.tone} {scene.texture} ."


def _unique(scene: Scene, attribute: str) -> list[WorldObject]:
    counts = Counter(getattr(obj, attribute) for obj in scene.objects)
    return [obj for obj in scene.objects if counts[getattr(obj, attribute)] == 1]


def _unique_pair(scene: Scene) -> list[WorldObject]:
    counts = Counter((obj.colour, obj.shape) for obj in scene.objects)
    return [obj for obj in scene.objects if counts[(obj.colour, obj.shape)] == 1]


def open_questions(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """One (question, answer) per open question type the scene can answer unambiguously."""
    out = {"count": ("How many objects are there?", str(len(scene.objects)))}
    by_shape = _unique(scene, "shape")
    if by_shape:
        obj = rng.choice(by_shape)
        out["colour"] = (f"What colour is the {obj.shape}?", obj.colour)
        obj = rng.choice(by_shape)
        out["stripes"] = (stripes_question(obj.shape), obj.stripes)
    by_colour = _unique(scene, "colour")
    if by_colour:
        obj = rng.choice(by_colour)
        out["shape"] = (f"What shape is the {obj.colour} object?", obj.shape)
    pairs = _unique_pair(scene)
    if pairs:
        obj = rng.choice(pairs)
        out["position"] = (f"Where is the {obj.colour} {obj.shape}?", COLUMNS[obj.cell[1]])
    return out


def stripes_question(shape: str) -> str:
    return f"Which way do the stripes on the {shape} run?"


def existence_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape} in the image?"


def pope_negative(scene: Scene, split: str, popular: list[tuple[str, str]], rng: random.Random) -> tuple[str, str]:
    """An absent (colour, shape): random, the most frequent in training (popular), or one sharing a colour or a
    shape with a present object (adversarial), as POPE samples its negatives."""
    present = {(obj.colour, obj.shape) for obj in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if split == "popular":
        return next(pair for pair in popular if pair not in present)
    if split == "adversarial":
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        return rng.choice(near or absent)
    return rng.choice(absent)


def popular_pairs(scenes: list[Scene]) -> list[tuple[str, str]]:
    """(colour, shape) pairs from most to least frequent, ties broken by name so the order is stable."""
    counts = Counter((obj.colour, obj.shape) for scene in scenes for obj in scene.objects)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return sorted(every, key=lambda pair: (-counts[pair], pair))


# ------------------------------------------------------------------------------------------------------ datasets


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for position, (question, answer) in enumerate(pairs):
        prefix = f"{IMAGE_TOKEN}\n" if position == 0 else ""
        suffix = "" if question == DESCRIBE else f" {SHORT_ANSWER}"
        turns += [{"from": "human", "value": f"{prefix}{question}{suffix}"}, {"from": "gpt", "value": answer}]
    return turns


def training_conversation(scene: Scene, rng: random.Random, max_turns: int = 3) -> list[dict[str, str]]:
    """A description of the scene (its caption) and 1-2 short-answer turns, types mixed, in random order; the
    short answers include a yes/no existence question half the time. The description gives the tiny VLM a dense
    signal about every object (like LLaVA's detailed-description data), the short answers the benchmark format."""
    pairs = list(open_questions(scene, rng).values())
    if rng.random() < 0.5:
        obj = rng.choice(scene.objects)
        pairs.append((existence_question(obj.colour, obj.shape), "yes"))
    else:
        colour, shape = pope_negative(scene, "random", [], rng)
        pairs.append((existence_question(colour, shape), "no"))
    rng.shuffle(pairs)
    pairs = [(DESCRIBE, caption(scene))] + pairs[: rng.randint(1, max_turns - 1)]
    rng.shuffle(pairs)
    return _turns(pairs)


def evaluation_questions(scenes: list[Scene], popular: list[tuple[str, str]], seed: int) -> list[Question]:
    """Every open question a scene answers, plus one present and one absent object per scene (POPE-style),
    the absent one sampled by the scene's POPE split (scenes cycle through random / popular / adversarial)."""
    rng = random.Random(seed)
    questions: list[Question] = []
    for index, scene in enumerate(scenes):
        for kind, (text, answer) in open_questions(scene, rng).items():
            questions.append(Question(f"{index}-{kind}", index, kind, text, answer))
        split = POPE_SPLITS[index % len(POPE_SPLITS)]
        obj = rng.choice(scene.objects)
        negative = pope_negative(scene, split, popular, rng)
        for label, (colour, shape) in (("yes", (obj.colour, obj.shape)), ("no", negative)):
            text = existence_question(colour, shape)
            questions.append(Question(f"{index}-existence-{label}", index, "existence", text, label, split))
    return questions


@dataclass(frozen=True)
class DemoData:
    image_folder: str
    pretrain_json: str  # stage 1 captions, template `plain`
    finetune_json: str  # stage 2 short-answer conversations, template `v1`
    train: WorldSplit
    test: WorldSplit


def build_world(out_dir: str, num_train: int, num_test: int, seed: int = 0) -> DemoData:
    """Draw `num_train` training and `num_test` held-out scenes, save their images and the LLaVA-format files."""
    import json
    import os

    rng = random.Random(seed)
    train = WorldSplit([sample_scene(rng) for _ in range(num_train)])
    test = WorldSplit([sample_scene(rng) for _ in range(num_test)])
    test.questions = evaluation_questions(test.scenes, popular_pairs(train.scenes), seed + 1)
    folder = os.path.join(out_dir, "images")
    os.makedirs(folder, exist_ok=True)
    for prefix, split in (("train", train), ("test", test)):
        for index, scene in enumerate(split.scenes):
            render_scene(scene).save(os.path.join(folder, f"{prefix}-{index:05d}.png"))
    pretrain, finetune = [], []
    for index, scene in enumerate(train.scenes):
        image = f"train-{index:05d}.png"
        turns = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption(scene)}]
        # One sample id per image in both stages: the teacher-feature cache is keyed by it, so one cache serves both.
        sample_id = f"scene-{index:05d}"
        pretrain.append({"id": sample_id, "image": image, "conversations": turns})
        finetune.append({"id": sample_id, "image": image, "conversations": training_conversation(scene, rng)})
    paths = DemoData(
        folder, os.path.join(out_dir, "pretrain.json"), os.path.join(out_dir, "finetune.json"), train, test
    )
    for path, records in ((paths.pretrain_json, pretrain), (paths.finetune_json, finetune)):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
    return paths


def scene_tensor(scenes: list[Scene], size: int = IMAGE_SIZE):
    """Rendered scenes as a float tensor [N, 3, size, size] in [0, 1] (what the teachers take)."""
    import torch

    arrays = np.stack([np.asarray(render_scene(scene, size), dtype=np.float32) for scene in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).div(255.0)
