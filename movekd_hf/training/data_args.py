"""Data options and the one call the train entry makes: `build_train_data(data_args, processor)`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..modeling.llava_conventions import IMAGE_ASPECTS, IMAGE_TOKEN
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


@dataclass
class MoVEKDTrainData:
    """What `build_train_data` hands the trainer. `report` collects skipped samples from every stage."""

    dataset: datasets.Dataset
    collator: MoVEKDDataCollator
    report: BadSampleReport
    modality_lengths: list[int]

    def sampler(self, batch_size: int, world_size: int = 1, seed: int = 0) -> ModalityLengthGroupedSampler:
        """`batch_size`: per-device batch x gradient accumulation steps (LLaVA's grouping unit)."""
        return ModalityLengthGroupedSampler(self.modality_lengths, batch_size, world_size, seed)


def num_image_tokens(processor: Any) -> int:
    """Image tokens one `<image>` expands to, computed as `LlavaProcessor` does (patch grid + extra - CLS)."""
    if getattr(processor, "num_image_tokens", None):
        return int(processor.num_image_tokens)
    patch_size = getattr(processor, "patch_size", None)
    crop = getattr(processor.image_processor, "crop_size", None)
    if patch_size is None or crop is None:
        raise ValueError("the processor needs `patch_size` and an image processor `crop_size` to count image tokens")
    height, width = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop.height, crop.width)
    count = (height // patch_size) * (width // patch_size) + int(getattr(processor, "num_additional_image_tokens", 0))
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1  # the CLS token is dropped before the projector
    return count


def image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == processor.tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token")
    return int(token_id)


def build_train_data(
    data_args: MoVEKDDataArguments,
    processor: Any,
) -> MoVEKDTrainData:
    """Source -> normalised Arrow (saved if `processed_dir`) -> tokenised dataset, collator and lengths.

    `processor`: a LlavaProcessor-like object with `.tokenizer`, `.image_processor` and the image-token fields.
    Raises `DataFileError` for an unreadable data file, `BadSampleError` for a bad sample (`on_bad_sample="raise"`)
    and `NoSamplesError` when no sample is left, all before training starts.
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
    )
    # The processor's chat template wins over the tokenizer's (LLaVA processors carry it), as at inference.
    renderer = processor if getattr(processor, "chat_template", None) is not None else tokenizer
    dataset, report = tokenize_dataset(
        normalised,
        tokenizer,
        settings,
        data_args.on_bad_sample,
        num_proc=data_args.num_proc,
        chat_renderer=renderer,
        source=data_args.data_path,
    )
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` before building the data")
    collator = MoVEKDDataCollator(
        processor.image_processor,
        pad_token_id=tokenizer.pad_token_id,
        image_aspect=data_args.image_aspect,
        teacher_image_size=data_args.teacher_image_size,
        on_bad_sample=data_args.on_bad_sample,
        report=report,
        image_token_id=settings.image_token_id,
        num_image_tokens=settings.num_image_tokens,
    )
    return MoVEKDTrainData(dataset, collator, report, list(dataset["modality_length"]))
