"""Training data: LLaVA-format JSON or `messages`/`images` datasets -> normalised Arrow -> tokenised Arrow.

Pipeline (each arrow is a `datasets.Dataset`):

    read_llava_json / read_messages_dataset   normalised records {id, row, images, conversations, system}
    -> save_to_disk (prepare_dataset)          reusable Arrow files; images stay on disk (paths) or as bytes
    -> tokenize_dataset                        + input_ids, labels, modality_length, num_images
    -> MoVEKDDataCollator (collator.py)        images decoded lazily, per batch

Bad samples (missing or corrupt image, `<image>` count != image count, longer than `max_length`, malformed turns)
raise `BadSampleError` naming the sample, or with `on_bad_sample="skip"` are removed, counted per reason in a
`BadSampleReport` and logged. Nothing is dropped without being counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from ..modeling.llava_conventions import IMAGE_TOKEN, ImageLoadError, load_image, sample_name
from .templates import ConversationError, render_conversation, tokenize_segments

logger = logging.getLogger(__name__)

BAD_SAMPLE_REASONS = ("missing_image", "corrupt_image", "image_count_mismatch", "too_long", "malformed_conversation")
ON_BAD_SAMPLE_CHOICES = ("raise", "skip")

# Images are a plain struct, not `datasets.Image`: `save_to_disk` would otherwise copy every referenced file into
# the Arrow shards (hundreds of GB for LLaVA's image folders). Paths stay paths; embedded images keep their bytes.
IMAGE_REF = {"path": datasets.Value("string"), "bytes": datasets.Value("binary")}
NORMALISED_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "images": datasets.List(IMAGE_REF),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "system": datasets.Value("string"),
    }
)


class BadSampleError(ValueError):
    """A sample that cannot be trained on. `reason` is one of `BAD_SAMPLE_REASONS`."""

    def __init__(self, reason: str, sample_id: str, detail: str):
        self.reason, self.sample_id, self.detail = reason, sample_id, detail
        super().__init__(f"bad sample {sample_id} ({reason}): {detail}")


@dataclass
class BadSampleReport:
    """Counts of skipped samples per reason, plus the first few sample names per reason."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_SAMPLE_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, error: BadSampleError, stage: str) -> None:
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        names = self.examples.setdefault(error.reason, [])
        if len(names) < self.max_examples:
            names.append(error.sample_id)
        logger.warning("skipping %s during %s", error, stage)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log_summary(self, stage: str) -> None:
        if self.total:
            nonzero = {reason: count for reason, count in self.counts.items() if count}
            logger.warning("%s skipped %d bad samples: %s (examples: %s)", stage, self.total, nonzero, self.examples)


def check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE_CHOICES}, got {on_bad_sample!r}")


# ---------------------------------------------------------------------------------------------- reading sources


def _normalise_turns(turns: Any) -> list[dict[str, str]]:
    # Malformed shapes become an empty conversation here and a counted `malformed_conversation` at tokenisation,
    # so reading never drops or rejects a row by itself.
    if not isinstance(turns, list) or not all(isinstance(turn, Mapping) for turn in turns):
        return []
    return [{"from": str(turn.get("from", "")), "value": str(turn.get("value", ""))} for turn in turns]


def read_llava_json(json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> datasets.Dataset:
    """Read a LLaVA JSON (list of records) or JSONL file into normalised records.

    `image` may be a string or a list; paths are joined to `image_folder` (default: the JSON file's folder) and
    made absolute. Records without an `image` key are text-only (the ShareGPT part of `llava_v1_5_mix665k`).
    """
    json_path = os.fspath(json_path)
    with open(json_path, encoding="utf-8") as handle:
        if json_path.endswith(".jsonl"):
            raw = [json.loads(line) for line in handle if line.strip()]
        else:
            raw = json.load(handle)
    if not isinstance(raw, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(raw).__name__}")
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(json_path)
    stem = os.path.basename(json_path)
    records = []
    for row, sample in enumerate(raw):
        image = sample.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else list(image)
        records.append(
            {
                "id": str(sample.get("id", f"{stem}:{row}")),
                "row": row,
                "images": [{"path": os.path.abspath(os.path.join(folder, p)), "bytes": None} for p in paths],
                "conversations": _normalise_turns(sample.get("conversations")),
                "system": str(sample.get("system", "")),
            }
        )
    return datasets.Dataset.from_list(records, features=NORMALISED_FEATURES)


def _message_to_turn(message: Mapping[str, Any]) -> dict[str, str]:
    """A chat message (string content or typed parts) -> a LLaVA turn with `<image>` where image parts were."""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    else:
        pieces = []
        for part in content or []:
            kind = part.get("type")
            pieces.append(IMAGE_TOKEN if kind == "image" else part.get("text") or "")
        text = "".join(pieces)
    return {"from": str(message.get("role", "")), "value": text}


def _image_ref(image: Any, image_folder: str | None) -> dict[str, Any]:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"path": None, "bytes": buffer.getvalue()}
    if isinstance(image, str):
        return {"path": os.path.abspath(os.path.join(image_folder or "", image)), "bytes": None}
    if isinstance(image, Mapping):  # datasets.Image(decode=False): {"bytes", "path"}
        path = image.get("path")
        if image.get("bytes") is None and path is not None:
            path = os.path.abspath(os.path.join(image_folder or "", path))
        return {"path": path, "bytes": image.get("bytes")}
    raise TypeError(f"unsupported image entry of type {type(image).__name__}; expected PIL image, path or dict")


def read_messages_dataset(
    dataset: datasets.Dataset, image_folder: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Normalise a dataset with `messages` (role/content chat) and optional `images` columns.

    Image parts (`{"type": "image"}`) become `<image>` placeholders matched in order to `images`; `system`
    messages become the record's system text.
    """
    if "messages" not in dataset.column_names:
        raise ValueError(f"expected a `messages` column, found {dataset.column_names}")
    if "images" in dataset.column_names:  # keep the stored bytes; decoding happens lazily in the collator
        feature = dataset.features["images"]
        if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    folder = os.fspath(image_folder) if image_folder is not None else None

    def normalise(sample: dict[str, Any], row: int) -> dict[str, Any]:
        messages = sample["messages"] or []
        system = " ".join(_message_to_turn(m)["value"] for m in messages if m.get("role") == "system")
        turns = [_message_to_turn(m) for m in messages if m.get("role") != "system"]
        return {
            "id": str(sample.get("id") or f"row-{row}"),
            "row": row,
            "images": [_image_ref(image, folder) for image in sample.get("images") or []],
            "conversations": turns,
            "system": system,
        }

    return dataset.map(normalise, with_indices=True, remove_columns=dataset.column_names, features=NORMALISED_FEATURES)


def load_source(data_path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> datasets.Dataset:
    """A `.json`/`.jsonl` LLaVA file, a `save_to_disk` folder (normalised or `messages`), or a local dataset."""
    data_path = os.fspath(data_path)
    if data_path.endswith((".json", ".jsonl")):
        return read_llava_json(data_path, image_folder)
    if os.path.isfile(os.path.join(data_path, "dataset_info.json")) or os.path.isfile(
        os.path.join(data_path, "state.json")
    ):
        loaded = datasets.load_from_disk(data_path)
    else:
        loaded = datasets.load_dataset(data_path, split="train")
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"]
    if set(NORMALISED_FEATURES) <= set(loaded.column_names):
        return loaded
    return read_messages_dataset(loaded, image_folder)


def prepare_dataset(
    data_path: str | os.PathLike, output_dir: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Normalise a source and save it as Arrow files; returns the dataset re-loaded from `output_dir`."""
    load_source(data_path, image_folder).save_to_disk(os.fspath(output_dir))
    return datasets.load_from_disk(os.fspath(output_dir))


# -------------------------------------------------------------------------------------------------- validation


def open_image(reference: Mapping[str, Any], sample: str) -> Image.Image:
    """Decode one image reference `{"path", "bytes"}` to RGB (`load_image`); a missing or undecodable file raises
    `BadSampleError` naming the sample."""
    try:
        return load_image(reference)
    except ImageLoadError as error:
        raise BadSampleError(f"{error.reason}_image", sample, str(error)) from error


def count_placeholders(conversations: Iterable[Mapping[str, str]]) -> int:
    return sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)


@dataclass(frozen=True)
class TokenizeSettings:
    """What the tokenising map needs; `num_image_tokens` and `image_token_id` must match the processor."""

    template: str
    max_length: int
    num_image_tokens: int
    image_token_id: int
    add_bos: bool = False
    verify_images: bool = True


def process_record(
    record: Mapping[str, Any], tokenizer: Any, settings: TokenizeSettings, chat_renderer: Any = None
) -> dict[str, Any]:
    """Validate and tokenise one normalised record; raises `BadSampleError` for any bad-sample reason.

    `chat_renderer` (tokenizer or processor with `apply_chat_template`) is only used by `chat_template`.
    """
    name = sample_name(record)
    images, turns = record["images"], record["conversations"]
    if settings.verify_images:
        for reference in images:
            open_image(reference, name)
    placeholders = count_placeholders(turns)
    if placeholders != len(images):
        raise BadSampleError(
            "image_count_mismatch", name, f"{placeholders} '{IMAGE_TOKEN}' placeholders but {len(images)} images"
        )
    try:
        segments = render_conversation(
            settings.template, turns, len(images), record["system"] or None, chat_renderer or tokenizer
        )
    except ConversationError as error:
        raise BadSampleError("malformed_conversation", name, str(error)) from error
    tokens = tokenize_segments(
        segments, tokenizer, settings.image_token_id, settings.num_image_tokens, add_bos=settings.add_bos
    )
    length = len(tokens["input_ids"])
    if length > settings.max_length:
        raise BadSampleError("too_long", name, f"{length} tokens (images expanded) > max_length {settings.max_length}")
    # LLaVA's `modality_lengths`: positive for samples with images, negative for text-only ones.
    return {**tokens, "modality_length": length if images else -length, "num_images": len(images)}


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    settings: TokenizeSettings,
    on_bad_sample: str = "raise",
    report: BadSampleReport | None = None,
    num_proc: int | None = None,
    chat_renderer: Any = None,
) -> tuple[datasets.Dataset, BadSampleReport]:
    """Add `input_ids`, `labels`, `modality_length`, `num_images`; raise on or skip-and-count bad samples.

    Skipping is decided inside the map (a `bad_reason` column) and counted afterwards, so counts are right with
    `num_proc > 1` and with cached maps.
    """
    check_on_bad_sample(on_bad_sample)
    report = report if report is not None else BadSampleReport()

    def run(record: dict[str, Any]) -> dict[str, Any]:
        try:
            return {
                **process_record(record, tokenizer, settings, chat_renderer),
                "bad_reason": "",
                "bad_name": "",
                "bad_detail": "",
            }
        except BadSampleError as error:
            if on_bad_sample == "raise":
                raise
            empty = {"input_ids": [], "labels": [], "modality_length": 0, "num_images": 0}
            return {**empty, "bad_reason": error.reason, "bad_name": error.sample_id, "bad_detail": error.detail}

    mapped = dataset.map(run, num_proc=num_proc, desc="tokenising conversations")
    skipped = 0
    for reason, name, detail in zip(mapped["bad_reason"], mapped["bad_name"], mapped["bad_detail"]):
        if reason:
            report.add(BadSampleError(reason, name, detail), stage="tokenisation")
            skipped += 1
    report.log_summary("tokenisation")
    kept = mapped.filter(lambda reason: reason == "", input_columns="bad_reason") if skipped else mapped
    return kept.remove_columns(["bad_reason", "bad_name", "bad_detail"]), report
