"""LLaVA-1.5's conventions, defined once for every part of MoVE-KD: the `<image>` token and the Vicuna `v1`
conversation (system text, prompt builders, chat template); how an image is loaded and which square view the
student and the teachers see (padded with the normalisation mean, or centre-cropped; as unit tensors for the
teachers); CLIP's normalisation; the student's patch grid and resampling tokens from one grid to another.

The training data, the teacher-feature cache, evaluation and the processor all read these definitions, so a
cached teacher feature is computed from the same pixels as an online one, and a training prompt is the same text
as the inference prompt.

Shipped inside every checkpoint as remote code (the processor imports it): torch and transformers at module
level only (PIL and numpy are imported where they are used), and no sibling file: transformers copies a local
checkpoint's remote code one import deep, so a file imported by a sibling must import none itself.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IMAGE_TOKEN = "<image>"

# openai/clip-vit-large-patch14-336's normalisation, as LLaVA-1.5's image processor uses it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# `pad`: LLaVA-1.5's expand2square; `resize`: the raw image (the processor's resize and centre crop).
IMAGE_ASPECTS = ("pad", "resize")

# ------------------------------------------------------------------------------------ the Vicuna v1 conversation

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-1.5 `v1`: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..." and "ASSISTANT:" to generate.
# Images come first in a user turn, as LLaVA-1.5 placed them.
VICUNA_V1_CHAT_TEMPLATE = (
    "{{- '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'USER' if message['role'] == 'user' else 'ASSISTANT' -%}"
    "{{- role + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def move_image_to_front(text: str) -> str:
    """LLaVA-1.5 normalises a single-image turn to `<image>\\n{question}` wherever the placeholder was."""
    if IMAGE_TOKEN not in text:
        return text
    return IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()


def vicuna_v1_turn(question: str) -> str:
    """One user turn up to the answer: `USER: {question} ASSISTANT:` (the answer follows after a space)."""
    return f"USER: {question} ASSISTANT:"


def vicuna_v1_prompt(question: str, system: str | None = None) -> str:
    """`{system} USER: {question} ASSISTANT:`, the question as given; `system` defaults to `VICUNA_SYSTEM`."""
    return f"{system or VICUNA_SYSTEM} {vicuna_v1_turn(question)}"


def vicuna_v1_generation_prompt(question: str, system: str | None = None) -> str:
    """The inference prompt matching `v1` training: the same text up to and including `ASSISTANT:`, with the
    image placeholder moved to the front as training does."""
    return vicuna_v1_prompt(move_image_to_front(question), system)


# -------------------------------------------------------------------------------------------- images and views


def sample_name(record: Mapping[str, Any]) -> str:
    """How an error message names a LLaVA data sample: its `id` and its row in the data file."""
    return f"{record['id']!r} (row {record['row']})"


class ImageLoadError(ValueError):
    """An image that cannot be read. `reason` is "missing" (no such file) or "corrupt" (undecodable)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):  # both arguments survive pickling (errors cross process boundaries in data loaders)
        return type(self), (self.reason, str(self))


def load_image(source: Any) -> Any:
    """A fully decoded RGB `PIL.Image` from a path, raw bytes, a dataset image reference `{"path", "bytes"}`
    (bytes win over the path) or a PIL image.

    Decoding happens here, so a truncated file fails now, not mid-batch. Raises `ImageLoadError` naming the file.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, Mapping):
        path, data = source.get("path"), source.get("bytes")
    elif isinstance(source, (bytes, bytearray)):
        path, data = None, bytes(source)
    else:
        path, data = (os.fspath(source) if source is not None else None), None
    if data is not None:
        opened: Any = io.BytesIO(data)
        where = f"embedded image{f' {path}' if path else ''}"
    else:
        if path is None or not os.path.isfile(path):
            raise ImageLoadError("missing", f"image file not found: {path}")
        opened, where = path, f"image file {path}"
    try:
        with Image.open(opened) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError("corrupt", f"cannot decode {where}: {error}") from error


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as an RGB byte colour: padding that normalises to zero.

    (122, 116, 104) for CLIP's mean (`CLIP_MEAN`); (127, 127, 127) for a processor without `image_mean`.
    """
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(channel * 255) for channel in mean)  # type: ignore[return-value]


# LLaVA-1.5's padding colour: CLIP's mean as bytes.
CLIP_MEAN_COLOUR: tuple[int, int, int] = tuple(int(channel * 255) for channel in CLIP_MEAN)  # type: ignore[assignment]


def expand_to_square(image: Any, background: Sequence[int]) -> Any:
    """LLaVA's `expand2square`: centre the PIL image on a square canvas of the `background` RGB colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def centre_crop_square(image: Any) -> Any:
    """The largest centred square of a PIL image (the view of CLIP's resize-and-crop)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def square_view(image: Any, image_aspect: str, background: Sequence[int]) -> Any:
    """The square view the teachers see: padded with `background` (`pad`) or centre-cropped (`resize`)."""
    if image_aspect == "pad":
        return expand_to_square(image, background)
    if image_aspect == "resize":
        return centre_crop_square(image)
    raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")


def images_to_unit_tensor(images: Sequence[Any], size: int) -> torch.Tensor:
    """Square RGB PIL images -> float tensor [N, 3, size, size] in [0, 1] (bicubic resize, clamped)."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(255.0).clamp(0.0, 1.0)  # [N, 3, S, S]


def teacher_images(images: Sequence[Any], image_aspect: str, background: Sequence[int], size: int) -> torch.Tensor:
    """What every teacher gets for these RGB PIL images, online or when caching: their `square_view` resized to
    `size`, [N, 3, size, size] in [0, 1] (each teacher then resizes and normalises on its own)."""
    return images_to_unit_tensor([square_view(image, image_aspect, background) for image in images], size)


# ------------------------------------------------------------------------------------------------ token grids


def student_grid(vision_config: Any) -> tuple[int, int]:
    """The student's patch grid (h, w): `image_size // patch_size` per side, e.g. (24, 24) for CLIP ViT-L/14 at
    336 px. `vision_config`: a CLIP/SigLIP vision config, or its dict."""
    if isinstance(vision_config, Mapping):
        image_size, patch_size = vision_config["image_size"], vision_config["patch_size"]
    else:
        image_size, patch_size = vision_config.image_size, vision_config.patch_size
    side = image_size // patch_size
    return side, side


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample tokens on a grid to another grid (antialiased, so shrinking averages neighbours).

    tokens [B, h*w, C] in row-major grid order -> [B, th*tw, C], in `tokens`' dtype. Interpolated in at least
    float32: the CPU has no half-precision antialiased kernel.
    """
    h, w = grid
    if tokens.shape[1] != h * w:
        raise ValueError(f"tokens have {tokens.shape[1]} positions but grid {grid} has {h * w}")
    if tuple(grid) == tuple(target_grid):
        return tokens
    # mole.upcast's rule (half precision raised, float64 kept), written out: this file imports no sibling.
    wide = tokens if tokens.dtype in (torch.float32, torch.float64) else tokens.float()
    fmap = wide.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)  # [B, C, h, w]
    fmap = F.interpolate(fmap, size=tuple(target_grid), mode="bilinear", align_corners=False, antialias=True)
    return fmap.flatten(2).transpose(1, 2).to(tokens.dtype)
