"""Training data: LLaVA-format JSON or `messages`/`images` datasets -> normalised Arrow -> tokenised Arrow.

Pipeline (each arrow is a `datasets.Dataset`):

    read_llava_json / read_messages_dataset   normalised records {id, row, images, conversations, system}
    -> save_to_disk (prepare_dataset)          reusable Arrow files; images stay on disk (paths) or as bytes
    -> tokenize_dataset                        + input_ids, labels, modality_length, num_images
    -> MoVEKDDataCollator (collator.py)        images decoded lazily, per batch

Two kinds of bad input:

- A file that cannot be read as its format (invalid JSON, a bad JSONL line, not a list, not UTF-8) or that points
  at images outside the image folder (unless `allow_images_outside_folder`) is fatal: `DataFileError` naming the
  file, line and sample.
- A bad sample (a row that is not an object, a missing/non-list/empty `conversations`, turns that are not objects,
  null or non-string text, an `image` that is not a path string, a missing, corrupt, oversized or unusable image,
  `<image>` count != image count, longer than `max_length`) raises `BadSampleError` naming the sample and field,
  or with `on_bad_sample="skip"` is removed, counted per reason in a `BadSampleReport` and logged. The readers
  never drop a row: they record its problem (the `problem` column), and tokenisation raises or counts it.

Nothing is dropped without being counted, and a run whose every sample was skipped stops with `NoSamplesError`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from ..errors import DataFileError, InputError
from ..modeling.llava_conventions import IMAGE_TOKEN, ImageLoadError, load_image, sample_name
from .templates import ConversationError, render_conversation, tokenize_segments

logger = logging.getLogger(__name__)

BAD_SAMPLE_REASONS = (
    "missing_image",
    "corrupt_image",
    "too_large_image",
    "unsupported_image",
    "image_count_mismatch",
    "too_long",
    "malformed_conversation",
    "malformed_sample",
)
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
        # None for a good row; what the reader found wrong otherwise (raised or counted at tokenisation).
        "problem": {
            "reason": datasets.Value("string"),
            "file": datasets.Value("string"),
            "line": datasets.Value("int64"),
            "field": datasets.Value("string"),
            "detail": datasets.Value("string"),
            "expected": datasets.Value("string"),
        },
    }
)
# What a saved normalised dataset must hold (`problem` arrived later; older saves lack it).
_NORMALISED_CORE = ("id", "row", "images", "conversations", "system")


class BadSampleError(InputError):
    """A sample that cannot be trained on: `reason` is one of `BAD_SAMPLE_REASONS` (what the skip report counts),
    `sample_id` how the sample is named (`sample_name`), `detail` what is wrong with it."""

    def __init__(
        self,
        reason: str,
        sample_id: str,
        detail: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        expected: str | None = None,
    ):
        self.sample_id, self.detail = sample_id, detail
        super().__init__(detail, file=file, line=line, sample=sample_id, field=field, expected=expected, reason=reason)

    def _message(self) -> str:
        return f"{super()._message()} (bad sample: {self.reason})"

    def __reduce__(self):
        extras = dict(file=self.file, line=self.line, field=self.field, expected=self.expected)
        return _rebuild_bad_sample, (type(self), self.reason, self.sample_id, self.detail, extras)


def _rebuild_bad_sample(cls: type[BadSampleError], reason: str, sample_id: str, detail: str, extras: dict):
    return cls(reason, sample_id, detail, **extras)


class NoSamplesError(InputError):
    """Nothing is left to train on: the data holds no sample, or every sample was skipped as bad."""


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


def _kind(value: Any) -> str:
    """How an error message describes a value read from a data file: `null`, `a list`, `the number 3`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return f"a {type(value).__name__}"


def _problem(reason: str, field: str | None, detail: str, expected: str, source: Any = None, line: Any = None):
    file = os.fspath(source) if source is not None else None
    return {"reason": reason, "file": file, "line": line, "field": field, "detail": detail, "expected": expected}


def _record(row: int, name: str) -> dict[str, Any]:
    return {"id": name, "row": row, "images": [], "conversations": [], "system": "", "problem": None}


def _image_path(path: str, folder: str, allow_outside: bool, where: dict[str, Any]) -> str:
    """`path` joined to `folder`, made absolute; refused (fatal) if it leaves `folder` and that is not allowed.

    Lexical check (`..` and absolute paths), not `realpath`: symlinked image folders, common for LLaVA's COCO/GQA
    folders, stay allowed."""
    full = os.path.abspath(os.path.join(folder, path))
    root = os.path.abspath(folder)
    if not allow_outside and os.path.commonpath([full, root]) != root:
        raise DataFileError(
            f"image path {path!r} leaves the image folder {root}",
            expected="a path inside the image folder (or set allow_images_outside_folder)",
            **where,
        )
    return full


def _check_turns(turns: Any) -> tuple[str, str, str] | None:
    """(field, problem, expected) if LLaVA `conversations` is not a non-empty list of {from, value} strings."""
    if not isinstance(turns, list) or not turns:
        return "conversations", f"is {_kind(turns)}", "a non-empty list of {from, value} turns"
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return f"conversations[{index}]", f"is {_kind(turn)}", "an object with string `from` and `value`"
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                found = "is missing" if key not in turn else f"is {_kind(turn[key])}"
                return f"conversations[{index}].{key}", found, "a string"
    return None


def _llava_problem(sample: Any) -> tuple[str, str | None, str, str] | None:
    """(reason, field, problem, expected) for a LLaVA sample of the wrong shape, or None."""
    if not isinstance(sample, Mapping):
        return "malformed_sample", None, f"is {_kind(sample)}", "an object with `conversations`"
    image = sample.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list):
        return "malformed_sample", "image", f"is {_kind(image)}", "a path string or a list of them"
    for index, path in enumerate(paths):
        if not isinstance(path, str):
            return "malformed_sample", f"image[{index}]", f"is {_kind(path)}", "a path string"
    system = sample.get("system")
    if system is not None and not isinstance(system, str):
        return "malformed_sample", "system", f"is {_kind(system)}", "a string"
    if "conversations" not in sample:
        return "malformed_conversation", "conversations", "is missing", "a non-empty list of {from, value} turns"
    found = _check_turns(sample["conversations"])
    return None if found is None else ("malformed_conversation", *found)


def _llava_record(
    sample: Any, row: int, name: str, folder: str, allow_outside: bool, source: str, line: int | None
) -> dict[str, Any]:
    """One LLaVA sample -> a normalised record; what is wrong with it goes to `problem`, never raised here."""
    record = _record(row, name)
    if isinstance(sample, Mapping) and sample.get("id") is not None:
        record["id"] = str(sample["id"])
    problem = _llava_problem(sample)
    if problem is not None:
        record["problem"] = _problem(*problem, source, line)
        return record
    image = sample.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    where = {"file": source, "line": line, "sample": sample_name(record), "field": "image"}
    record["images"] = [{"path": _image_path(p, folder, allow_outside, where), "bytes": None} for p in paths]
    record["conversations"] = [{"from": turn["from"], "value": turn["value"]} for turn in sample["conversations"]]
    record["system"] = sample.get("system") or ""
    return record


def _parse_json_file(json_path: str) -> tuple[list[Any], list[int | None]]:
    """The samples of a JSON list or JSONL file and their line numbers (None for a JSON list); `DataFileError` with
    the line for invalid JSON, a file that is not UTF-8 or not a list."""
    expected = "one JSON object per line" if json_path.endswith(".jsonl") else "a JSON list of samples"
    try:
        with open(json_path, encoding="utf-8-sig") as handle:
            if not json_path.endswith(".jsonl"):
                raw = json.load(handle)
                if not isinstance(raw, list):
                    raise DataFileError(f"holds {_kind(raw)}, not a list", file=json_path, expected=expected)
                return raw, [None] * len(raw)
            samples, lines = [], []
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    try:
                        samples.append(json.loads(text))
                    except json.JSONDecodeError as error:
                        problem = f"invalid JSON: {error.msg} (column {error.colno})"
                        raise DataFileError(problem, file=json_path, line=number, expected=expected) from None
                    lines.append(number)
            return samples, lines
    except json.JSONDecodeError as error:
        hint = " (JSON Lines files must end in .jsonl)" if error.msg == "Extra data" else ""
        problem = f"invalid JSON: {error.msg} (column {error.colno}){hint}"
        raise DataFileError(problem, file=json_path, line=error.lineno, expected=expected) from None
    except UnicodeDecodeError as error:
        raise DataFileError(f"is not UTF-8 text (byte {error.start})", file=json_path, expected=expected) from None


def read_llava_json(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    allow_images_outside_folder: bool = False,
) -> datasets.Dataset:
    """Read a LLaVA JSON (list of records) or JSONL file into normalised records.

    `image` may be a string or a list; paths are joined to `image_folder` (default: the JSON file's folder) and
    made absolute. Records without an `image` key are text-only (the ShareGPT part of `llava_v1_5_mix665k`).
    Raises `DataFileError` (file, line) for a file that is not valid JSON/JSONL or not a list, and for an image
    path outside `image_folder` unless `allow_images_outside_folder`; malformed samples go to `problem`.
    """
    json_path = os.fspath(json_path)
    raw, lines = _parse_json_file(json_path)
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(json_path)
    stem = os.path.basename(json_path)
    records = [
        _llava_record(sample, row, f"{stem}:{row}", folder, allow_images_outside_folder, json_path, line)
        for row, (sample, line) in enumerate(zip(raw, lines))
    ]
    columns = {name: [record[name] for record in records] for name in NORMALISED_FEATURES}  # also for no rows
    return datasets.Dataset.from_dict(columns, features=NORMALISED_FEATURES)


def _message_text(message: Any, field: str) -> tuple[str, tuple[str, str, str] | None]:
    """A chat message's content (string or typed parts) -> text with `<image>` where image parts were, or the
    (field, problem, expected) that makes it unusable."""
    if not isinstance(message, Mapping):
        return "", (field, f"is {_kind(message)}", "an object with `role` and `content`")
    if not isinstance(message.get("role"), str):
        return "", (f"{field}.role", f"is {_kind(message.get('role'))}", "a string")
    content = message.get("content")
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return "", (f"{field}.content", f"is {_kind(content)}", "a string or a list of {type, text} parts")
    pieces = []
    for index, part in enumerate(content):
        where = f"{field}.content[{index}]"
        if not isinstance(part, Mapping):
            return "", (where, f"is {_kind(part)}", "a {type, text} part")
        kind = part.get("type")
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
        elif kind != "text":
            return "", (f"{where}.type", f"is {_kind(kind)}", "'text' or 'image'")
        elif not isinstance(part.get("text"), str):
            return "", (f"{where}.text", f"is {_kind(part.get('text'))}", "a string")
        else:
            pieces.append(part["text"])
    return "".join(pieces), None


def _image_ref(image: Any, folder: str | None, allow_outside: bool, where: dict[str, Any]) -> dict[str, Any] | None:
    """A `messages` dataset image (PIL image, path, or `datasets.Image(decode=False)` dict) -> `{"path", "bytes"}`;
    None for an entry of another type. Paths join `folder` and must stay inside it when a folder is given."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"path": None, "bytes": buffer.getvalue()}
    path, data = (image, None) if isinstance(image, str) else (None, None)
    if isinstance(image, Mapping):
        path, data = image.get("path"), image.get("bytes")
        if not isinstance(path, (str, type(None))) or not isinstance(data, (bytes, type(None))):
            return None
    if data is not None:
        return {"path": path, "bytes": data}
    if path is None:
        return None
    full = _image_path(path, folder, allow_outside, where) if folder is not None else os.path.abspath(path)
    return {"path": full, "bytes": None}


def _messages_record(
    sample: Mapping[str, Any], row: int, folder: str | None, allow_outside: bool, source: Any
) -> dict[str, Any]:
    """One `messages`/`images` row -> a normalised record; what is wrong with it goes to `problem`."""
    record = _record(row, str(sample.get("id") or f"row-{row}"))
    messages = sample.get("messages")
    found = None if isinstance(messages, list) else ("messages", f"is {_kind(messages)}", "a list of messages")
    system, turns = [], []
    for index, message in enumerate(messages if found is None else []):
        text, found = _message_text(message, f"messages[{index}]")
        if found is not None:
            break
        role = message["role"]
        (system if role == "system" else turns).append({"from": role, "value": text})
    if found is None and not turns:
        found = ("messages", "has no user or assistant message", "a conversation of user/assistant messages")
    if found is not None:
        record["problem"] = _problem("malformed_conversation", *found, source)
        return record
    images = sample.get("images") if sample.get("images") is not None else []
    if not isinstance(images, list):
        record["problem"] = _problem("malformed_sample", "images", f"is {_kind(images)}", "a list of images", source)
        return record
    refs = []
    for index, image in enumerate(images):
        where = {"file": source, "sample": sample_name(record), "field": f"images[{index}]"}
        refs.append(_image_ref(image, folder, allow_outside, where))
        if refs[-1] is None:
            expected = "a PIL image, a path or a {bytes, path} dict"
            record["problem"] = _problem("malformed_sample", where["field"], f"is {_kind(image)}", expected, source)
            return record
    record.update(images=refs, conversations=turns, system=" ".join(turn["value"] for turn in system))
    return record


def read_messages_dataset(
    dataset: datasets.Dataset,
    image_folder: str | os.PathLike | None = None,
    allow_images_outside_folder: bool = False,
    source: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Normalise a dataset with `messages` (role/content chat) and optional `images` columns.

    Image parts (`{"type": "image"}`) become `<image>` placeholders matched in order to `images`; `system`
    messages become the record's system text. With `image_folder`, path images join it and must stay inside it
    unless `allow_images_outside_folder` (`DataFileError` otherwise); `source` names the data in messages.
    """
    if "messages" not in dataset.column_names:
        raise DataFileError(
            f"has no `messages` column (columns: {dataset.column_names})",
            file=source,
            expected="a LLaVA .json/.jsonl file, or a dataset with `messages` and `images`",
        )
    if "images" in dataset.column_names:  # keep the stored bytes; decoding happens lazily in the collator
        feature = dataset.features["images"]
        if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    folder = os.fspath(image_folder) if image_folder is not None else None

    def normalise(sample: dict[str, Any], row: int) -> dict[str, Any]:
        return _messages_record(sample, row, folder, allow_images_outside_folder, source)

    return dataset.map(normalise, with_indices=True, remove_columns=dataset.column_names, features=NORMALISED_FEATURES)


def load_source(
    data_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    allow_images_outside_folder: bool = False,
) -> datasets.Dataset:
    """A `.json`/`.jsonl` LLaVA file, a `save_to_disk` folder (normalised or `messages`), or a local dataset."""
    data_path = os.fspath(data_path)
    if data_path.endswith((".json", ".jsonl")):
        return read_llava_json(data_path, image_folder, allow_images_outside_folder)
    if os.path.isfile(os.path.join(data_path, "dataset_info.json")) or os.path.isfile(
        os.path.join(data_path, "state.json")
    ):
        loaded = datasets.load_from_disk(data_path)
    else:
        loaded = datasets.load_dataset(data_path, split="train")
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"]
    if set(_NORMALISED_CORE) <= set(loaded.column_names):
        return loaded
    return read_messages_dataset(loaded, image_folder, allow_images_outside_folder, source=data_path)


def prepare_dataset(
    data_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    allow_images_outside_folder: bool = False,
) -> datasets.Dataset:
    """Normalise a source and save it as Arrow files; returns the dataset re-loaded from `output_dir`."""
    load_source(data_path, image_folder, allow_images_outside_folder).save_to_disk(os.fspath(output_dir))
    return datasets.load_from_disk(os.fspath(output_dir))


# -------------------------------------------------------------------------------------------------- validation


def open_image(reference: Mapping[str, Any], sample: str) -> Image.Image:
    """Decode one image reference `{"path", "bytes"}` to RGB (`load_image`); a missing, undecodable, oversized or
    unusable image (`ImageLoadError.reason`) raises `BadSampleError` naming the sample and the file."""
    try:
        return load_image(reference)
    except ImageLoadError as error:
        raise BadSampleError(f"{error.reason}_image", sample, str(error)) from error


def image_header_size(reference: Mapping[str, Any], sample: str) -> tuple[int, int]:
    """(height, width) of an image reference `{"path", "bytes"}` read from its header only (no pixel decoding), the
    size `open_image` gives; an unreadable image raises `BadSampleError` as `open_image` does."""
    data, path = reference.get("bytes"), reference.get("path")
    if data is None and (path is None or not os.path.isfile(path)):
        raise BadSampleError("missing_image", sample, f"image file not found: {path}")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.height, image.width
    except Image.DecompressionBombError as error:
        raise BadSampleError("too_large_image", sample, f"refusing image {path or 'bytes'}: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSampleError(
            "corrupt_image", sample, f"cannot read the size of image {path or 'bytes'}: {error}"
        ) from error


def count_placeholders(conversations: Iterable[Mapping[str, str]]) -> int:
    return sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)


@dataclass(frozen=True)
class TokenizeSettings:
    """What the tokenising map needs; `num_image_tokens` and `image_token_id` must match the processor.

    `image_tokens`: for a processor whose image-token count depends on the image (LLaVA-OneVision's AnyRes), a
    callable `(sizes) -> counts` from the (height, width) of a sample's images to the tokens the processor writes for
    each (`training.anyres.AnyResImageTokens`); `num_image_tokens` is then unused. None: `num_image_tokens` each.
    """

    template: str
    max_length: int
    num_image_tokens: int
    image_token_id: int
    add_bos: bool = False
    verify_images: bool = True
    image_tokens: Callable[[list[tuple[int, int]]], list[int]] | None = None


def process_record(
    record: Mapping[str, Any], tokenizer: Any, settings: TokenizeSettings, chat_renderer: Any = None
) -> dict[str, Any]:
    """Validate and tokenise one normalised record; raises `BadSampleError` for any bad-sample reason.

    `chat_renderer` (tokenizer or processor with `apply_chat_template`) is only used by `chat_template`.
    """
    name = sample_name(record)
    problem = record.get("problem")  # found by the reader: the record's images and turns are placeholders
    if problem is not None:
        located = {key: problem[key] for key in ("file", "line", "field", "expected")}
        raise BadSampleError(problem["reason"], name, problem["detail"], **located)
    images, turns = record["images"], record["conversations"]
    sizes = []  # (height, width) per image, from the decoded image or, without verifying, its header
    if settings.verify_images:
        for reference in images:
            decoded = open_image(reference, name)
            sizes.append((decoded.height, decoded.width))
    elif settings.image_tokens is not None:
        sizes = [image_header_size(reference, name) for reference in images]
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
    counts = (
        settings.image_tokens(sizes) if settings.image_tokens is not None and images else settings.num_image_tokens
    )
    tokens = tokenize_segments(segments, tokenizer, settings.image_token_id, counts, add_bos=settings.add_bos)
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
    source: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, BadSampleReport]:
    """Add `input_ids`, `labels`, `modality_length`, `num_images`; raise on or skip-and-count bad samples.

    Skipping is decided inside the map (a `bad` column) and counted afterwards, so counts are right with
    `num_proc > 1` and with cached maps. Raises `BadSampleError` (`on_bad_sample="raise"`), or `NoSamplesError`
    (naming `source`) when the dataset is empty or every sample was skipped, before any training starts.
    """
    check_on_bad_sample(on_bad_sample)
    report = report if report is not None else BadSampleReport()
    file = os.fspath(source) if source is not None else None
    if len(dataset) == 0:
        raise NoSamplesError("holds no samples", file=file, expected="at least one sample")
    features = datasets.Features(
        {
            **dataset.features,
            "input_ids": datasets.List(datasets.Value("int64")),
            "labels": datasets.List(datasets.Value("int64")),
            "modality_length": datasets.Value("int64"),
            "num_images": datasets.Value("int64"),
            "bad": {key: datasets.Value("string") for key in ("reason", "name", "detail", "field", "expected")},
        }
    )

    def run(record: dict[str, Any]) -> dict[str, Any]:
        try:
            return {**process_record(record, tokenizer, settings, chat_renderer), "bad": None}
        except BadSampleError as error:
            if on_bad_sample == "raise":
                raise
            empty = {"input_ids": [], "labels": [], "modality_length": 0, "num_images": 0}
            bad = {"reason": error.reason, "name": error.sample_id, "detail": error.detail}
            return {**empty, "bad": {**bad, "field": error.field, "expected": error.expected}}

    mapped = dataset.map(run, num_proc=num_proc, features=features, desc="tokenising conversations")
    skipped = [bad for bad in mapped["bad"] if bad is not None]
    for bad in skipped:
        error = BadSampleError(bad["reason"], bad["name"], bad["detail"], field=bad["field"], expected=bad["expected"])
        report.add(error, stage="tokenisation")
    report.log_summary("tokenisation")
    if len(skipped) == len(mapped):
        raise NoSamplesError(
            f"no samples left to train on: all {len(mapped)} were skipped as bad ({_skip_summary(skipped)})",
            file=file,
            expected="at least one usable sample (each skipped one is logged above)",
        )
    kept = mapped.filter(lambda bad: bad is None, input_columns="bad") if skipped else mapped
    return kept.remove_columns([name for name in ("bad", "problem") if name in kept.column_names]), report


def _skip_summary(skipped: list[dict[str, Any]]) -> str:
    """`too_long: 3, e.g. 'a' (row 0); missing_image: 1, e.g. 'b' (row 2)`, most frequent reason first."""
    by_reason: dict[str, list[str]] = {}
    for bad in skipped:
        by_reason.setdefault(bad["reason"], []).append(bad["name"])
    ranked = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    return "; ".join(f"{reason}: {len(names)}, e.g. {names[0]}" for reason, names in ranked)
