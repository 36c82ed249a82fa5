"""Batch collation: pads token columns, decodes images lazily and prepares student and teacher pixels.

Text-only samples carry no image: `pixel_values` holds one entry per image in sample order
([sum(images_per_sample), 3, H, W]). Hugging Face LLaVA scatters image features into the positions of the image
token, so a mixed batch needs no dummy image per text-only row (LLaVA's original code needed one per row). A batch
with no image at all gets `pixel_values=None` (and `None` teacher inputs): CLIP cannot run on an empty batch
(its attention reshape fails on 0 elements, checked with transformers 5.23). Under DDP the vision tower then has
no gradient on that step, so the trainer must either use `ddp_find_unused_parameters=True` or, as LLaVA does,
run a dummy image and add its output times zero to the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ..distill.teacher_views import ViewSettings, make_views
from ..errors import InputError
from ..modeling.llava_conventions import IMAGE_ASPECTS, images_to_unit_tensor, mean_colour, square_view
from .data import BadSampleError, BadSampleReport, check_on_bad_sample, open_image, sample_name
from .templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    longest = max((len(sequence) for sequence in sequences), default=0)
    batch = torch.full((len(sequences), longest), value, dtype=torch.long)  # [B, L]
    for row, sequence in enumerate(sequences):
        if len(sequence):
            tensor = torch.as_tensor(sequence, dtype=torch.long)
            if side == "right":
                batch[row, : len(sequence)] = tensor
            else:
                batch[row, longest - len(sequence) :] = tensor
    return batch


class MoVEKDDataCollator:
    """Collate tokenised records (from `tokenize_dataset`) into model and distillation inputs.

    Returns `input_ids`, `attention_mask`, `labels` [B, L]; `pixel_values` [N_img, 3, H, W] (None if N_img = 0);
    `images_per_sample` [B]; `sample_ids` (list[str]); and, when asked, `teacher_images` [N_img, 3, S, S] in
    [0, 1] (teachers resize and normalise on device) and/or, given `teacher_views` ({slug: ViewSettings}, e.g.
    `OnlineTeachers.view_settings()`), each teacher's own view at its size: `teacher_views` {slug: uint8
    [N_img, 3, S_t, S_t]} and `teacher_view_sizes` {slug: int64 [N_img, 2]} for `pad` views with padding
    (`distill.teacher_views.make_views`; teachers only cast and normalise on device).
    Teachers see the same square view as the student: padded (`pad`) or centre-cropped (`resize`, as CLIP's
    resize-and-crop does). Keys other than the model's own must be popped by the trainer before `model(**batch)`.

    Given `image_token_id` and `num_image_tokens` (what one `<image>` expands to, `data_args.num_image_tokens`),
    each sample is checked before collation: as many image tokens as its images need, all of them masked in
    `labels`, and as many labels as tokens; a sample that fails is a `BadSampleError` (raised or skipped), instead of
    LLaVA's "image features and image tokens do not match" in the forward pass. Raises `InputError` for
    features without the tokenised columns (e.g. `remove_unused_columns=True` dropped `images`).
    """

    def __init__(
        self,
        image_processor: Any,
        pad_token_id: int,
        image_aspect: str = "pad",
        teacher_image_size: int | None = None,
        on_bad_sample: str = "raise",
        report: BadSampleReport | None = None,
        padding_side: str = "right",
        image_token_id: int | None = None,
        num_image_tokens: int | None = None,
        teacher_views: Mapping[str, ViewSettings] | None = None,
    ):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if teacher_image_size is not None and teacher_image_size <= 0:
            raise ValueError(f"teacher_image_size must be a positive int, got {teacher_image_size}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        check_on_bad_sample(on_bad_sample)
        self.image_processor = image_processor
        self.pad_token_id = pad_token_id
        self.image_aspect = image_aspect
        self.teacher_image_size = teacher_image_size
        self.teacher_views = dict(teacher_views) if teacher_views else None
        self.on_bad_sample = on_bad_sample
        self.report = report if report is not None else BadSampleReport()
        self.padding_side = padding_side
        self.background = mean_colour(image_processor)
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens

    def _check_tokens(self, feature: Mapping[str, Any], name: str) -> None:
        """The token columns agree with the sample's images (see the class docstring)."""
        input_ids, labels = feature["input_ids"], feature["labels"]
        if len(input_ids) != len(labels):
            raise BadSampleError(
                "malformed_sample", name, f"{len(input_ids)} input_ids but {len(labels)} labels", field="labels"
            )
        if self.image_token_id is None or self.num_image_tokens is None:
            return
        positions = [i for i, token in enumerate(input_ids) if token == self.image_token_id]
        needed = self.num_image_tokens * len(feature["images"])
        if len(positions) != needed:
            detail = f"{len(positions)} image tokens for {len(feature['images'])} images"
            expected = f"{self.num_image_tokens} per image ({needed})"
            raise BadSampleError("image_count_mismatch", name, detail, field="input_ids", expected=expected)
        if any(labels[i] != IGNORE_INDEX for i in positions):
            expected = f"{IGNORE_INDEX} at every image token"
            raise BadSampleError(
                "malformed_sample", name, "an image token is trained", field="labels", expected=expected
            )

    def _load_images(self, features: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[list]]:
        """Decode every sample's images; bad samples raise or are dropped and counted (skip mode)."""
        kept, images = [], []
        for feature in features:
            missing = [key for key in ("id", "row", "input_ids", "labels", "images") if key not in feature]
            if missing:
                raise InputError(
                    f"a batch feature lacks {missing}",
                    expected="records from tokenize_dataset (and remove_unused_columns=False in the trainer)",
                )
            try:
                self._check_tokens(feature, sample_name(feature))
                decoded = [open_image(reference, sample_name(feature)) for reference in feature["images"]]
            except BadSampleError as error:
                if self.on_bad_sample == "raise":
                    raise
                self.report.add(error, stage="collation")
                continue
            kept.append(feature)
            images.append(decoded)
        if not kept:
            raise InputError(
                f"every sample of this batch was skipped as bad ({', '.join(sample_name(f) for f in features)})",
                expected="run tokenize_dataset with verify_images=True to remove bad images before training",
            )
        return kept, images

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        kept, images = self._load_images(features)
        batch: dict[str, Any] = {
            "input_ids": pad_sequences([f["input_ids"] for f in kept], self.pad_token_id, self.padding_side),
            "labels": pad_sequences([f["labels"] for f in kept], IGNORE_INDEX, self.padding_side),
            "attention_mask": pad_sequences([[1] * len(f["input_ids"]) for f in kept], 0, self.padding_side),
            "images_per_sample": torch.tensor([len(sample) for sample in images], dtype=torch.long),  # [B]
            # The dataset's sample ids (what a teacher-feature cache is keyed by), in batch order.
            "sample_ids": [str(f.get("id", f.get("row", ""))) for f in kept],
        }
        flat = [image for sample in images for image in sample]
        counts = [len(sample) for sample in images]
        # One square per row the vision tower sees, and the VLM's image inputs: a subclass changes both together
        # (training/anyres.py: LLaVA-OneVision's AnyRes tiles, its `images_per_sample` then counting tiles).
        squares = self._teacher_squares(flat, counts)
        batch.update(self._student_pixels(flat, squares, counts))
        if self.teacher_image_size is not None:  # None when no image, like pixel_values (module docstring)
            batch["teacher_images"] = images_to_unit_tensor(squares, self.teacher_image_size) if flat else None
        if self.teacher_views is not None:  # each teacher's own uint8 view, made here in the loader workers
            views, sizes = make_views(squares, self.teacher_views) if flat else (None, None)
            batch["teacher_views"], batch["teacher_view_sizes"] = views, sizes
        return batch

    def _teacher_squares(self, flat: list[Image.Image], counts: Sequence[int]) -> list[Image.Image]:
        """The teachers' square views, one per image (`counts`: images per sample, unused here): the padded image
        (`pad`) or the student processor's centre crop (`resize`), what llava_conventions.teacher_images makes."""
        return [square_view(image, self.image_aspect, self.background) for image in flat]

    def _student_pixels(
        self, flat: list[Image.Image], squares: list[Image.Image], counts: Sequence[int]
    ) -> dict[str, Any]:
        """The VLM's image inputs: `pixel_values` [N_img, 3, H, W] (None without images), from the padded squares
        (`pad`: the student gets LLaVA's expand2square too, so they are made once) or the raw images (`resize`)."""
        images = squares if self.image_aspect == "pad" else flat
        if not images:
            return {"pixel_values": None}
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
