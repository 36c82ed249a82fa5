"""LLaVA-1.5's conventions, defined once for every part of MoVE-KD: the `<image>` token and the Vicuna `v1`
conversation (system text, prompt builders, chat template); how an image is loaded and which square view the
student and the teachers see (padded with the normalisation mean, or centre-cropped; as unit tensors for the
teachers); CLIP's normalisation; the student's patch grid and resampling tokens from one grid to another; how
many image tokens each vision tower gives (its CLS token, and the feature strategy that keeps every patch).

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

# LLaVA's `conv_vicuna_v1` (llava/conversation.py), the conversation that both the authors' `--version v1`
# training and their `--conv-mode vicuna_v1` evaluation select. (`conv_llava_v1` says "curious human"; neither uses it.)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# `conv_vicuna_v1` as a chat template, rendering what `Conversation.get_prompt` (SeparatorStyle.TWO, sep=" ",
# sep2="</s>") renders: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." and "ASSISTANT:" to generate.
# - A `system` message replaces the default system text.
# - Content parts keep their order, joined by "\n": "<image>\n{q}" when the image comes first, as LLaVA writes it.
# - An answer ends with the tokenizer's EOS text (`eos_token`, "</s>" for Vicuna): the token generation stops on.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for part in content if part['type'] in ['image', 'text'] -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '" + IMAGE_TOKEN + "' if part['type'] == 'image' else part['text'] -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set turn_end = eos_token if eos_token is defined and eos_token else '</s>' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- render(messages[0]['content']) + ' ' -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' -}}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + render(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + render(message['content']) + turn_end -}}"
    "{%- else -%}{{- raise_exception('the Vicuna v1 conversation has user and assistant turns after an optional "
    "first system message, got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def move_image_to_front(text: str) -> str:
    """LLaVA's `preprocess_multimodal`: a turn with the image becomes `<image>\\n{text}`, stripped (an image-only
    turn is `<image>`), wherever the placeholder was."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


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
    """An image that cannot be read. `reason`: "missing" (no such file), "corrupt" (undecodable), "too_large"
    (over PIL's decompression-bomb limit `Image.MAX_IMAGE_PIXELS`) or "unsupported" (pixels with no faithful 8-bit
    RGB view: NaN/inf or out-of-range values). `path`: the file, or None for embedded bytes and PIL images."""

    def __init__(self, reason: str, message: str, path: str | None = None):
        self.reason, self.path = reason, path
        super().__init__(message)

    def __reduce__(self):  # every field survives pickling (errors cross process boundaries in data loaders)
        return type(self), (self.reason, str(self), self.path)


def _high_depth_to_grey(image: Any) -> Any:
    """A 16-bit or float greyscale PIL image -> 8-bit "L", scaled by its bit depth (PIL's own `convert` clips
    16-bit values at 255 and truncates [0, 1] floats to 0 or 1). Raises `ValueError` for values it cannot map."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(pixels).all():
            raise ValueError("a float image holds NaN or infinite values")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"a float image has values in [{low:g}, {high:g}]; expected [0, 1]")
        scaled = pixels * 255.0
    else:  # "I;16*", and "I" (how Pillow < 10 opens 16-bit PNGs): 16-bit data, 65535 -> 255
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ValueError(f"a 32-bit integer image has values in [{low}, {high}]; expected 16-bit [0, 65535]")
        scaled = pixels / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))  # uint8 [H, W] -> "L"


def _to_rgb(image: Any) -> Any:
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        image = _high_depth_to_grey(image)
    return image.convert("RGB")


def load_image(source: Any) -> Any:
    """A fully decoded RGB `PIL.Image` from a path, raw bytes, a dataset image reference `{"path", "bytes"}`
    (bytes win over the path) or a PIL image.

    Decoding happens here, so a truncated file fails now, not mid-batch. 16-bit greyscale is divided by 257 and
    [0, 1] float greyscale multiplied by 255 (rounded), at training and inference alike. Raises `ImageLoadError`
    naming the file: missing, undecodable, over PIL's decompression-bomb limit (its warning included), or with
    NaN/inf or out-of-range values.
    """
    import warnings

    from PIL import Image

    if isinstance(source, Image.Image):
        try:
            return _to_rgb(source)
        except ValueError as error:
            raise ImageLoadError("unsupported", f"cannot use the image: {error}") from error
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
            raise ImageLoadError("missing", f"image file not found: {path}", path)
        opened, where = path, f"image file {path}"
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x the limit PIL only warns; such an image is refused all the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            "too_large",
            f"refusing {where}: {error} (raise PIL.Image.MAX_IMAGE_PIXELS to allow larger images)",
            path,
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError("corrupt", f"cannot decode {where}: {error}", path) from error
    try:
        return _to_rgb(image)
    except ValueError as error:
        raise ImageLoadError("unsupported", f"cannot use {where} ({image.mode}): {error}", path) from error


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


# ----------------------------------------------------------------------------- image tokens per vision tower

# Tokens a vision tower puts before its patch grid, by config `model_type`: CLIP prepends a CLS token, SigLIP has
# none (it pools with an attention head instead). The student's CLIP copy (`movekd_clip_vision`) is CLIP.
TOWER_CLS_TOKENS = {"clip_vision_model": 1, "movekd_clip_vision": 1, "siglip_vision_model": 0}


def tower_cls_tokens(vision_config: Any) -> int:
    """How many tokens the tower puts before its patches (LlavaProcessor's `num_additional_image_tokens`): 1 for
    CLIP's CLS, 0 for SigLIP. `vision_config`: a vision config or its dict. Raises `ValueError` for a tower
    type LLaVA has no rule for (see `TOWER_CLS_TOKENS`)."""
    model_type = vision_config.get("model_type") if isinstance(vision_config, Mapping) else None
    model_type = model_type or getattr(vision_config, "model_type", None)
    if model_type not in TOWER_CLS_TOKENS:
        raise ValueError(
            f"vision tower {model_type!r} is not one MoVE-KD knows the token layout of; expected a CLIP or SigLIP "
            f"vision model ({', '.join(sorted(TOWER_CLS_TOKENS))})"
        )
    return TOWER_CLS_TOKENS[model_type]


def feature_select_strategy(vision_config: Any) -> str:
    """LLaVA's `vision_feature_select_strategy` for a tower: the one that hands the projector its patch tokens.

    `"default"` drops the first token, which is a CLS token only where the tower has one: CLIP keeps `"default"`
    (the paper's CLIP-L/336: 577 tokens, 576 image tokens), a tower without CLS (SigLIP) gets `"full"` so no real
    patch is lost (siglip-so400m-patch14-384: 729 image tokens, not 728). Raises `ValueError` as
    `tower_cls_tokens` does."""
    return "default" if tower_cls_tokens(vision_config) else "full"


def image_token_count(vision_config: Any, strategy: str) -> int:
    """Image tokens one `<image>` becomes (what LlavaProcessor expands it to and LLaVA's projector gets): the
    patch grid, plus the tower's CLS token (`tower_cls_tokens`), minus one for the `"default"` strategy."""
    height, width = student_grid(vision_config)
    return height * width + tower_cls_tokens(vision_config) - (1 if strategy == "default" else 0)


def patch_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The patch tokens among the tokens LLaVA hands its projector, whatever the strategy: [I, P, D] -> [I, h*w, D].

    P = h*w + 1 (a CLS-token tower under `"full"`): the CLS token, first, is dropped. P = h*w (`"default"` with
    CLS, or `"full"` without): the tokens as given. Any other P raises `ValueError` (e.g. `"default"` on a tower
    without CLS, which already dropped a real patch)."""
    count = grid[0] * grid[1]
    if tokens.shape[1] == count + 1:
        return tokens[:, 1:]
    if tokens.shape[1] == count:
        return tokens
    raise ValueError(
        f"the projector got {tokens.shape[1]} tokens per image, neither the {grid[0]}x{grid[1]} patch grid nor "
        "the grid plus CLS; a tower without CLS needs vision_feature_select_strategy='full'"
    )
