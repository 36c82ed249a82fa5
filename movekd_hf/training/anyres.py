"""LLaVA-OneVision's AnyRes images in training: their image tokens, the student's tiles, the teachers' tiles.

LLaVA-OneVision's image processor shows its tower several square tiles of one image (the base view and the grid
tiles of the best `image_grid_pinpoints` resolution; distill/anyres_tiles.py has the geometry), and writes, per
image, the packed feature count (base view, the unpadded and, above `anyres_max_9`, downsampled grid, one newline per
grid row).

MoVE-KD distils tile by tile (METHOD.md section 4 applied to each tile as to an image): the student's
`vision_hidden_states` have one row per tile the tower saw, [total tiles, h*w, D], and each teacher sees the same
tiles, cropped from the raw image with the processor's geometry at the teacher's own resolution, in the same order.

- Tokens: at tokenisation, `AnyResImageTokens` gives each image the count the processor writes for its size (read
  from the image header, so no pixel is decoded), and the ids are the processor's (`tokenize_segments`). The
  collator checks every batch against the processor itself: it runs `processor(text=..., images=...)` to get the
  student's pixels, and the image tokens it writes must be the ones the sample was tokenised with.
- Loss scaling: `images_per_sample` counts tower rows (tiles), what the KD and balance terms average over, so the
  trainer's accumulation scaling weighs every tile alike (a 2 x 2-grid image weighs 5 tiles, a 1 x 3 one 4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import LlavaOnevisionProcessor

from ..distill.anyres_tiles import teacher_tiles, tile_count, tile_view_side
from ..errors import InputError
from ..modeling.llava_conventions import IMAGE_TOKEN
from .collator import MoVEKDDataCollator
from .data import BadSampleError, sample_name
from .templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


def is_anyres_processor(processor: Any) -> bool:
    """Whether `processor` is LLaVA-OneVision's (AnyRes tiles, image-dependent token counts)."""
    return isinstance(processor, LlavaOnevisionProcessor)


def image_token_counter(processor: Any) -> AnyResImageTokens | None:
    """`TokenizeSettings.image_tokens` for `processor`: `AnyResImageTokens` for LLaVA-OneVision, else None (a fixed
    count per image)."""
    return AnyResImageTokens(processor) if is_anyres_processor(processor) else None


def collator_for(processor: Any, pad_token_id: int, **kwargs: Any) -> MoVEKDDataCollator:
    """The data collator of `processor`: `MoVEKDAnyResCollator` for LLaVA-OneVision, else `MoVEKDDataCollator` of
    its image processor; `kwargs` are `MoVEKDDataCollator`'s other arguments."""
    if is_anyres_processor(processor):
        return MoVEKDAnyResCollator(processor, pad_token_id, **kwargs)
    return MoVEKDDataCollator(processor.image_processor, pad_token_id, **kwargs)


def tile_size(image_processor: Any) -> int:
    """S, the side of every tile: the image processor's patch size (`crop_size`, else `size`), as it cuts tiles."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        if size:
            read = size.get if isinstance(size, Mapping) else (lambda key, size=size: getattr(size, key, None))
            side = read("height") or read("shortest_edge")
            if side:
                return int(side)
    raise ValueError(f"{type(image_processor).__name__} has no `size` or `crop_size` to cut tiles with")


class AnyResImageTokens:
    """(height, width) of a sample's images -> the image tokens `processor` writes for each, in order.

    One image: the processor's AnyRes count for its size (the processor's own counting, `_get_num_multimodal_tokens`,
    the hook serving frameworks use; when a release lacks it, measured by running the processor on a blank image of
    that size). Several: LLaVA-OneVision shows each as one tile, a count measured once by running the processor.
    The collator checks every batch against the processor's output (`MoVEKDAnyResCollator`).
    """

    def __init__(self, processor: Any):
        self.processor = processor
        blank = Image.new("RGB", (tile_size(processor.image_processor),) * 2)
        self.per_image_of_several = self._measure(IMAGE_TOKEN * 2, [[blank, blank]]) // 2
        self._single: dict[tuple[int, int], int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Without the memo: what `datasets` hashes for its cache fingerprint must not depend on what was counted.
        return {**self.__dict__, "_single": {}}

    def _measure(self, text: str, images: list) -> int:
        ids = self.processor(text=[text], images=images)["input_ids"][0]
        return sum(1 for token in ids if token == self.processor.image_token_id)

    def single(self, height: int, width: int) -> int:
        """Image tokens of the only image of a sample, (height, width) in pixels."""
        key = (int(height), int(width))
        if key not in self._single:
            count = getattr(self.processor, "_get_num_multimodal_tokens", None)
            if count is not None:
                self._single[key] = int(count(image_sizes=[key])["num_image_tokens"][0])
            else:
                self._single[key] = self._measure(IMAGE_TOKEN, [[Image.new("RGB", (key[1], key[0]))]])
        return self._single[key]

    def __call__(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        if len(sizes) == 1:
            return [self.single(*sizes[0])]
        return [self.per_image_of_several] * len(sizes)


class MoVEKDAnyResCollator(MoVEKDDataCollator):
    """`MoVEKDDataCollator` for LLaVA-OneVision: the student gets the processor's AnyRes tiles, the teachers the
    same tiles, and every count is per tile.

    Takes the whole `processor` (a `LlavaOnevisionProcessor`) where the base class takes its image processor; the
    other arguments are the base class's, by keyword. `image_aspect` has no effect: the processor decides the views
    (AnyRes tiles, multi-image samples padded to squares with the mean colour, as `pad` does); `num_image_tokens`
    is unused, counts depend on the image.
    Returns the base class's keys, with `pixel_values` [N_img, max tiles, 3, S, S] (zero tiles pad an image with
    fewer), `image_sizes` [N_img, 2] (height, width) and `batch_num_images` [samples with images] (what
    `LlavaOnevisionForConditionalGeneration.forward` takes), `images_per_sample` [B] counting tower rows (tiles),
    and the teachers' views [total tiles, ...] in the student's tile order (`tile_views`). Raises `InputError` when
    the processor writes other image-token counts than the data was tokenised with.
    """

    def __init__(self, processor: Any, pad_token_id: int, **kwargs):
        if kwargs.get("image_aspect", "pad") != "pad":
            logger.warning(
                "image_aspect=%r has no effect on LLaVA-OneVision: its processor decides the views (AnyRes tiles, "
                "multi-image samples padded to squares)",
                kwargs["image_aspect"],
            )
        kwargs.update(image_aspect="pad", num_image_tokens=None)
        super().__init__(processor.image_processor, pad_token_id, **kwargs)
        self.processor = processor
        self.image_token_id = processor.image_token_id
        self.image_tokens = AnyResImageTokens(processor)
        self.tile = tile_size(processor.image_processor)
        self.grid_pinpoints = processor.image_processor.image_grid_pinpoints
        self._checked_sizes: set[tuple[int, int, bool]] = set()  # (height, width, alone) the processor agreed on

    def _check_tokens(self, feature: Mapping[str, Any], name: str) -> None:
        """Equal lengths (base class) and no trained image token; the count is checked once images are decoded."""
        super()._check_tokens(feature, name)
        if any(
            token == self.image_token_id and label != IGNORE_INDEX
            for token, label in zip(feature["input_ids"], feature["labels"])
        ):
            expected = f"{IGNORE_INDEX} at every image token"
            raise BadSampleError(
                "malformed_sample", name, "an image token is trained", field="labels", expected=expected
            )

    def _load_images(self, features):
        """The base class's, then each sample's image tokens checked against its decoded images' sizes."""
        kept, images = super()._load_images(features)
        good = [], []
        for feature, decoded in zip(kept, images):
            found = sum(1 for token in feature["input_ids"] if token == self.image_token_id)
            needed = sum(self.image_tokens([(image.height, image.width) for image in decoded])) if decoded else 0
            if found != needed:
                error = BadSampleError(
                    "image_count_mismatch",
                    sample_name(feature),
                    f"{found} image tokens for {len(decoded)} images",
                    field="input_ids",
                    expected=f"{needed}, what the processor writes for these images (tokenised with another one?)",
                )
                if self.on_bad_sample == "raise":
                    raise error
                self.report.add(error, stage="collation")
                continue
            good[0].append(feature)
            good[1].append(decoded)
        if not good[0]:
            raise InputError(
                f"every sample of this batch was skipped as bad ({', '.join(sample_name(f) for f in kept)})",
                expected="data tokenised for this processor (its image-token counts)",
            )
        return good

    def _check_processor_counts(self, input_ids: torch.Tensor, samples: list[list[Image.Image]]) -> None:
        """The processor's image tokens per sample ([samples, L] ids) are `AnyResImageTokens`' counts."""
        written = (input_ids == self.image_token_id).sum(dim=1).tolist()
        expected = [sum(self.image_tokens([(image.height, image.width) for image in sample])) for sample in samples]
        if written != expected:
            raise InputError(
                f"the processor writes {written} image tokens for this batch's samples, the data was tokenised with "
                f"{expected}",
                expected="the processor the data was tokenised with (AnyResImageTokens)",
            )

    def _rows(self, image: Image.Image, alone: bool) -> int:
        """Tower rows (tiles) one image gives: base view plus grid tiles when alone in its sample, else one."""
        return tile_count((image.height, image.width), self.grid_pinpoints, self.tile, alone)

    def _teacher_squares(self, flat: list[Image.Image], counts: Sequence[int]) -> list[Image.Image]:
        """Per image, in the tower's row order: the AnyRes tiles of an image alone in its sample (`tile_views`),
        or the padded square the processor makes of an image of a multi-image sample (`teacher_tiles`), rendered
        at the largest input any teacher reads."""
        views = (self.teacher_views or {}).values()  # each online teacher's own view (distill.teacher_views)
        side = tile_view_side(views, self.teacher_image_size)
        if side is None or not flat:
            return []
        samples, index = [], 0
        for count in counts:
            samples.append(flat[index : index + count])
            index += count
        return teacher_tiles(samples, self.grid_pinpoints, self.tile, side, self.background)

    def _student_pixels(
        self, flat: list[Image.Image], squares: list[Image.Image], counts: Sequence[int]
    ) -> dict[str, Any]:
        """The processor's own image inputs for the batch's images, grouped by sample, and the tile count per sample
        (`images_per_sample`). The first time an image size (alone or not) comes by, the whole processor runs and
        the image tokens it writes are checked against `AnyResImageTokens`; later only its image processor (the
        same pixels, without tokenising thousands of image tokens: ~5 ms per image)."""
        if not flat:
            return {"pixel_values": None}
        grouped, index = [], 0
        for count in counts:
            grouped.append(flat[index : index + count])
            index += count
        with_images = [sample for sample in grouped if sample]
        keys = {(image.height, image.width, len(sample) == 1) for sample in with_images for image in sample}
        if keys <= self._checked_sizes:
            out = self.processor.image_processor(images=with_images, return_tensors="pt")
        else:
            texts = [IMAGE_TOKEN * len(sample) for sample in with_images]
            out = self.processor(text=texts, images=with_images, return_tensors="pt", padding=True)
            self._check_processor_counts(out["input_ids"], with_images)
            self._checked_sizes |= keys
        rows = [sum(self._rows(image, len(sample) == 1) for image in sample) for sample in grouped]
        return {
            "pixel_values": out["pixel_values"],  # [N_img, max tiles, 3, S, S]
            "image_sizes": out["image_sizes"],  # [N_img, 2]
            "batch_num_images": out["batch_num_images"],  # [samples with images]
            "images_per_sample": torch.tensor(rows, dtype=torch.long),  # [B], tower rows
        }
