"""Data options and the one call the train entry makes: `build_train_data(data_args, processor, seed)`.

Held-out data for `eval_strategy` comes from `eval_data_path` (a second file, tokenised as the training data) or
from `validation_split_percentage` (a split of the tokenised training samples, the same for the same seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..errors import SettingsError
from ..modeling.llava_conventions import IMAGE_ASPECTS, IMAGE_TOKEN
from .anyres import collator_for, image_token_counter
from .collator import MoVEKDDataCollator
from .data import (
    ON_BAD_SAMPLE_CHOICES,
    BadSampleReport,
    TokenizeSettings,
    load_source,
    prepare_dataset,
    tokenize_dataset,
)
from .sampler import ModalityLengthGroupedSampler
from .templates import TEMPLATE_NAMES, tokenizer_adds_bos


@dataclass
class MoVEKDDataArguments:
    """Where the data is and how it becomes batches. Paper values: stage 1 `plain`, stage 2 `v1` with `pad`."""

    data_path: str = field(metadata={"help": "LLaVA .json/.jsonl, a save_to_disk folder, or a local dataset folder."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the JSON `image` paths are relative to."})
    allow_images_outside_folder: bool = field(
        default=False,
        metadata={"help": "Accept image paths that leave `image_folder` (`../x.png`, absolute paths elsewhere)."},
    )
    template: str = field(default="v1", metadata={"help": f"One of {TEMPLATE_NAMES}."})
    image_aspect: str = field(
        default="pad", metadata={"help": f"One of {IMAGE_ASPECTS}; `pad` = LLaVA expand2square."}
    )
    max_length: int = field(default=2048, metadata={"help": "Longer samples (image tokens included) are bad samples."})
    on_bad_sample: str = field(default="raise", metadata={"help": f"One of {ON_BAD_SAMPLE_CHOICES}."})
    verify_images: bool = field(default=True, metadata={"help": "Decode every image once while tokenising."})
    teacher_image_size: int | None = field(
        default=None, metadata={"help": "Also return raw square `teacher_images` [N, 3, S, S] in [0, 1] at this size."}
    )
    group_by_modality_length: bool = field(default=False, metadata={"help": "LLaVA's single-modality batches."})
    processed_dir: str | None = field(default=None, metadata={"help": "Save the normalised Arrow dataset here."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for the tokenising map."})
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out LLaVA data (as `data_path`) for `eval_strategy`: eval_lm_loss, eval_kd/* ..."},
    )
    eval_image_folder: str | None = field(
        default=None, metadata={"help": "Folder of `eval_data_path`'s images (default: `image_folder`)."}
    )
    validation_split_percentage: float | None = field(
        default=None,
        metadata={"help": "Instead of `eval_data_path`: hold out this percentage (0-100, exclusive) of the training "
                  "samples for evaluation, picked by the run's `data_seed` (else `seed`)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("template", self.template, TEMPLATE_NAMES),
            ("image_aspect", self.image_aspect, IMAGE_ASPECTS),
            ("on_bad_sample", self.on_bad_sample, ON_BAD_SAMPLE_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.eval_data_path and self.validation_split_percentage is not None:
            raise SettingsError(
                "both are set", field="eval_data_path/validation_split_percentage", expected="one held-out set"
            )
        percentage = self.validation_split_percentage
        if percentage is not None and not 0 < percentage < 100:
            raise SettingsError(f"got {percentage!r}", field="validation_split_percentage", expected="0 < p < 100")


@dataclass
class MoVEKDTrainData:
    """What `build_train_data` hands the trainer. `report` collects skipped samples from every stage;
    `eval_dataset` is the held-out set (None without `eval_data_path` / `validation_split_percentage`)."""

    dataset: datasets.Dataset
    collator: MoVEKDDataCollator
    report: BadSampleReport
    modality_lengths: list[int]
    eval_dataset: datasets.Dataset | None = None

    def sampler(self, batch_size: int, world_size: int = 1, seed: int = 0) -> ModalityLengthGroupedSampler:
        """`batch_size`: per-device batch x gradient accumulation steps (LLaVA's grouping unit)."""
        return ModalityLengthGroupedSampler(self.modality_lengths, batch_size, world_size, seed)


def num_image_tokens(processor: Any) -> int:
    """Image tokens one `<image>` expands to, counted as `LlavaProcessor` counts them: the patch grid of the image
    the image processor outputs (its crop, or its square `size` when it does not crop, as SigLIP's), plus
    `num_additional_image_tokens` (1 for CLIP's CLS, 0 for SigLIP), minus 1 under the `"default"` strategy (it
    drops the first token before the projector). With the strategy the builders pick for each tower
    (movekd_hf.models) that is one token per patch: 576 for CLIP-L/336, 729 for siglip-so400m-patch14-384.

    Raises `ValueError` when the processor has no `patch_size` or its image processor no fixed output size.
    """
    if getattr(processor, "num_image_tokens", None):
        return int(processor.num_image_tokens)
    patch_size = getattr(processor, "patch_size", None)
    side = _output_size(processor.image_processor)
    if patch_size is None or side is None:
        raise ValueError(
            "the processor needs `patch_size` and an image processor with a fixed output size (`crop_size`, or "
            "`size` with height and width) to count image tokens"
        )
    height, width = side
    count = (height // patch_size) * (width // patch_size) + int(getattr(processor, "num_additional_image_tokens", 0))
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1  # "default" drops the first token (CLS on CLIP) before the projector
    return count


def _output_size(image_processor: Any) -> tuple[int, int] | None:
    """(height, width) of the images `image_processor` outputs: `crop_size` when it centre-crops (CLIP), else a
    `size` with height and width (SigLIP resizes to that square); None when neither fixes it."""
    crop = getattr(image_processor, "crop_size", None)
    size = crop if crop is not None and getattr(image_processor, "do_center_crop", True) else None
    size = size if size is not None else getattr(image_processor, "size", None)
    if size is None:
        return None
    read = (lambda key: size.get(key)) if isinstance(size, Mapping) else (lambda key: getattr(size, key, None))
    height, width = read("height"), read("width")
    return (int(height), int(width)) if height and width else None


def image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == processor.tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token")
    return int(token_id)


def build_train_data(
    data_args: MoVEKDDataArguments, processor: Any, seed: int = 0, teacher_views: Mapping | None = None
) -> MoVEKDTrainData:
    """Source -> normalised Arrow (saved if `processed_dir`) -> tokenised dataset, collator and lengths, plus the
    held-out set: `eval_data_path` tokenised the same way, or `validation_split_percentage` of the tokenised
    samples (chosen with `seed`; the training set keeps the rest).

    `processor`: a LlavaProcessor-like object with `.tokenizer`, `.image_processor` and the image-token fields.
    Raises `DataFileError` for an unreadable data file, `BadSampleError` for a bad sample (`on_bad_sample="raise"`),
    `NoSamplesError` when no sample is left, and `SettingsError` when a split would leave a side empty, all before
    training starts.
    """
    allow_outside = data_args.allow_images_outside_folder
    if data_args.processed_dir:
        normalised = prepare_dataset(
            data_args.data_path, data_args.processed_dir, data_args.image_folder, allow_outside
        )
    else:
        normalised = load_source(data_args.data_path, data_args.image_folder, allow_outside)
    tokenizer = processor.tokenizer
    settings = TokenizeSettings(
        template=data_args.template,
        max_length=data_args.max_length,
        num_image_tokens=num_image_tokens(processor),
        image_token_id=image_token_id(processor),
        add_bos=tokenizer_adds_bos(tokenizer),
        verify_images=data_args.verify_images,
        image_tokens=image_token_counter(processor),  # LLaVA-OneVision: counts depend on the image (anyres.py)
    )
    dataset, report = _tokenise(normalised, data_args.data_path, data_args, processor, settings)
    eval_dataset = None
    if data_args.eval_data_path:
        folder = data_args.eval_image_folder or data_args.image_folder
        source = load_source(data_args.eval_data_path, folder, allow_outside)
        eval_dataset, _ = _tokenise(source, data_args.eval_data_path, data_args, processor, settings, report)
    elif data_args.validation_split_percentage is not None:
        dataset, eval_dataset = _split(dataset, data_args.validation_split_percentage, seed)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` before building the data")
    collator = collator_for(
        processor,
        pad_token_id=tokenizer.pad_token_id,
        image_aspect=data_args.image_aspect,
        teacher_image_size=data_args.teacher_image_size,
        teacher_views=teacher_views,
        on_bad_sample=data_args.on_bad_sample,
        report=report,
        image_token_id=settings.image_token_id,
        num_image_tokens=settings.num_image_tokens,
    )
    return MoVEKDTrainData(dataset, collator, report, list(dataset["modality_length"]), eval_dataset)


def _tokenise(normalised, path, data_args, processor, settings, report=None):
    """Tokenise one normalised source (the training or the eval file) with the run's settings."""
    # The processor's chat template wins over the tokenizer's (LLaVA processors carry it), as at inference.
    renderer = processor if getattr(processor, "chat_template", None) is not None else processor.tokenizer
    return tokenize_dataset(
        normalised,
        processor.tokenizer,
        settings,
        data_args.on_bad_sample,
        report=report,
        num_proc=data_args.num_proc,
        chat_renderer=renderer,
        source=path,
    )


def _split(dataset: datasets.Dataset, percentage: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out): `percentage` of the samples (rounded up) held out, picked by `seed` alone."""
    held_out = math.ceil(len(dataset) * percentage / 100)
    if held_out >= len(dataset):
        raise SettingsError(
            f"{percentage}% of {len(dataset)} samples leaves none to train on",
            field="validation_split_percentage",
            expected="a smaller percentage, or `eval_data_path`",
        )
    split = dataset.train_test_split(test_size=held_out, shuffle=True, seed=seed)
    return split["train"], split["test"]
