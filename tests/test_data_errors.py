"""Bad training input ends in one error naming the file, line or sample, the field and what was expected
(`movekd_hf.errors`), or, for a bad sample with `on_bad_sample="skip"`, in a counted skip; real files throughout."""

from __future__ import annotations

import json
import logging
import os
import pickle

import datasets
import numpy as np
import pytest
from _data_fixtures import NUM_IMAGE_TOKENS, build_processor, write_array_image, write_png
from PIL import Image

from movekd_hf.errors import DataFileError, InputError
from movekd_hf.modeling.llava_conventions import ImageLoadError, load_image
from movekd_hf.training.collator import MoVEKDDataCollator
from movekd_hf.training.data import (
    BadSampleError,
    NoSamplesError,
    TokenizeSettings,
    load_source,
    read_messages_dataset,
    tokenize_dataset,
)
from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data

IMAGE_ID = 3
SETTINGS = TokenizeSettings("v1", 512, NUM_IMAGE_TOKENS, IMAGE_ID)


def qa(question="<image>\nWhat is it?", answer="A shape."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def tokenise(dataset, **kwargs):
    return tokenize_dataset(dataset, build_processor().tokenizer, SETTINGS, **kwargs)


# ------------------------------------------------------------------------------------- unreadable files: fatal


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.json", '[\n  {"id": "a",\n   "conversations": [}\n]', r"d\.json:3: invalid JSON: Expecting value"),
        ("d.jsonl", '{"id": "a"}\n\n{"id": "b", \n', r"d\.jsonl:3: invalid JSON: Expecting property name"),
        ("d.json", '{"id": "a"}\n{"id": "b"}\n', r"d\.json:2: invalid JSON: Extra data .*must end in \.jsonl"),
        ("d.json", '{"samples": []}', r"d\.json: holds an object, not a list; expected a JSON list of samples"),
    ],
)
def test_an_unreadable_data_file_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataFileError, match=f"^{tmp_path}/{message}"):
        load_source(write_text(tmp_path / name, text), tmp_path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "d.json").write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataFileError, match=r"d\.json: is not UTF-8 text \(byte 12\)"):
        load_source(tmp_path / "d.json")


# ------------------------------------------------------------------------------ bad samples: raised or counted

GOOD = {"id": "good", "image": "good.png", "conversations": qa()}
# (sample, reason, field, problem): each was a crash, a wrong `image_count_mismatch`, or trained text before.
BAD_SAMPLES = [
    ("just text", "malformed_sample", None, "is the string 'just text'; expected an object with `conversations`"),
    ({"id": "x", "image": "good.png"}, "malformed_conversation", "conversations", "is missing"),
    ({"id": "x", "conversations": "hi"}, "malformed_conversation", "conversations", "is the string 'hi'"),
    ({"id": "x", "image": "good.png", "conversations": []}, "malformed_conversation", "conversations", "is an empty"),
    ({"id": "x", "conversations": ["hi", "ho"]}, "malformed_conversation", r"conversations\[0\]", "is the string"),
    ({"id": "x", "conversations": qa("Hi", None)}, "malformed_conversation", r"conversations\[1\]\.value", "is null"),
    (
        {"id": "x", "conversations": [{"value": "Hi"}]},
        "malformed_conversation",
        r"conversations\[0\]\.from",
        "is miss",
    ),
    ({"id": "x", "image": 7, "conversations": qa()}, "malformed_sample", "image", "is the number 7"),
    ({"id": "x", "image": ["good.png", None], "conversations": qa()}, "malformed_sample", r"image\[1\]", "is null"),
    ({"id": "x", "system": ["s"], "conversations": qa("Hi")}, "malformed_sample", "system", "is a list"),
]


@pytest.mark.parametrize(("sample", "reason", "field", "problem"), BAD_SAMPLES)
def test_a_malformed_sample_is_named_with_its_line_field_and_reason(tmp_path, sample, reason, field, problem):
    write_png(str(tmp_path / "good.png"))
    lines = [json.dumps(GOOD), "", json.dumps(sample)]  # the blank line makes the line (3) differ from the row (1)
    dataset = load_source(write_text(tmp_path / "d.jsonl", "\n".join(lines) + "\n"), tmp_path)
    name = "'x'" if isinstance(sample, dict) else "'d.jsonl:1'"
    where = f"{tmp_path}/d.jsonl:3: sample {name} \\(row 1\\): " + (f"field '{field}': " if field else "")
    with pytest.raises(BadSampleError, match=f"^{where}{problem}.*\\(bad sample: {reason}\\)$") as raised:
        tokenise(dataset)
    assert raised.value.reason == reason and raised.value.line == 3 and isinstance(raised.value, InputError)
    copy = pickle.loads(pickle.dumps(raised.value))  # crosses data-loader and `num_proc` worker boundaries
    fields = ("reason", "sample_id", "field", "line", "expected", "args")
    assert [getattr(copy, name) for name in fields] == [getattr(raised.value, name) for name in fields]


def test_malformed_samples_are_skipped_and_counted_like_other_bad_samples(tmp_path, caplog):
    write_png(str(tmp_path / "good.png"))
    records = [GOOD] + [sample for sample, *_ in BAD_SAMPLES]
    dataset = load_source(write_text(tmp_path / "d.json", json.dumps(records)), tmp_path)
    with caplog.at_level(logging.WARNING, logger="movekd_hf.training.data"):
        kept, report = tokenise(dataset, on_bad_sample="skip", num_proc=2)
    assert kept["id"] == ["good"] and "problem" not in kept.column_names
    assert {reason: count for reason, count in report.counts.items() if count} == {
        "malformed_conversation": 6,
        "malformed_sample": 4,
    }
    assert "field 'conversations[1].value': is null; expected a string" in caplog.text


def test_raise_mode_with_worker_processes_raises_the_same_error(tmp_path):
    records = [{"id": "fine", "conversations": qa("Hi", "Ho")}, {"id": "x", "conversations": qa("Hi", None)}]
    dataset = load_source(write_text(tmp_path / "d.json", json.dumps(records)), tmp_path)
    with pytest.raises(BadSampleError, match="field 'conversations\\[1\\]\\.value': is null") as raised:
        tokenise(dataset, num_proc=2)
    assert raised.value.reason == "malformed_conversation"


def messages_dataset(rows):
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
            "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


ANSWER = {"role": "assistant", "content": [text("Blue.")]}


@pytest.mark.parametrize(
    ("messages", "reason", "message"),
    [
        ([user(text(None)), ANSWER], "malformed_conversation", r"field 'messages\[0\]\.content\[0\]\.text': is null"),
        ([user({"type": "video", "text": None}), ANSWER], "malformed_conversation", r"\.type': is the string 'video'"),
        ([{"role": "system", "content": [text("Be brief.")]}], "malformed_conversation", "has no user or assistant"),
        ([user({"type": "image", "text": None}), ANSWER], "malformed_sample", r"field 'images\[0\]': is an object"),
    ],
)
def test_a_malformed_messages_row_is_named(tmp_path, messages, reason, message):
    images = [{"bytes": None, "path": None}] if reason == "malformed_sample" else []
    rows = [{"messages": [user(text("Hi")), ANSWER], "images": []}, {"messages": messages, "images": images}]
    normalised = read_messages_dataset(messages_dataset(rows), source="chats")
    with pytest.raises(BadSampleError, match=f"^chats: sample 'row-1' \\(row 1\\): .*{message}.*{reason}"):
        tokenise(normalised)


# ------------------------------------------------------------------------------------------ images, both paths


def test_a_decompression_bomb_is_refused_naming_file_and_sample(tmp_path, monkeypatch):
    path = write_png(str(tmp_path / "huge.png"), size=(100, 100))  # 10,000 pixels, with the limit lowered below
    for limit in (4_000, 9_000):  # over twice the limit PIL raises; between once and twice it only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageLoadError, match=f"refusing image file {path}: .*decompression bomb") as raised:
            load_image(path)
        assert raised.value.reason == "too_large" and raised.value.path == path
    records = [{"id": "big", "image": "huge.png", "conversations": qa()}, {"id": "t", "conversations": qa("a", "b")}]
    dataset = load_source(write_text(tmp_path / "d.json", json.dumps(records)), tmp_path)
    with pytest.raises(BadSampleError, match=r"sample 'big' \(row 0\): refusing .*huge\.png.*too_large_image"):
        tokenise(dataset)
    _, report = tokenise(dataset, on_bad_sample="skip")
    assert report.counts["too_large_image"] == 1


def test_16_bit_and_float_greyscale_keep_their_brightness(tmp_path):
    grey16 = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    expected = [0, 128, 255]
    files = {
        "grey16.png": grey16,  # opens as "I;16"
        "grey16.tif": grey16,
        "int32.tif": grey16.astype(np.int32),  # "I": how Pillow < 10 opened 16-bit PNGs
        "float.tif": np.array([[0.0, 128 / 255, 1.0]], dtype=np.float32),  # "F"
    }
    for name, pixels in files.items():
        path = write_array_image(str(tmp_path / name), pixels)
        with Image.open(path) as raw:
            assert raw.mode in ("I;16", "I;16B", "I", "F")
            clipped = [raw.convert("RGB").getpixel((x, 0))[0] for x in range(3)]
        assert clipped != expected  # PIL's own conversion clips or truncates: the bug this guards against
        for source in (path, open(path, "rb").read()):  # training reads paths, inference often bytes
            image = load_image(source)
            assert [image.getpixel((x, 0)) for x in range(3)] == [(v, v, v) for v in expected], name


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.array([[0.5, np.nan]], dtype=np.float32), "holds NaN or infinite values"),
        (np.array([[0.5, np.inf]], dtype=np.float32), "holds NaN or infinite values"),
        (np.array([[0.0, 200.0]], dtype=np.float32), r"has values in \[0, 200\]; expected \[0, 1\]"),
        (np.array([[0, 70_000]], dtype=np.int32), r"values in \[0, 70000\]; expected 16-bit \[0, 65535\]"),
    ],
)
def test_high_depth_images_without_a_faithful_8_bit_view_are_refused(tmp_path, pixels, message):
    path = write_array_image(str(tmp_path / "odd.tif"), pixels)
    with pytest.raises(ImageLoadError, match=f"cannot use image file {path} \\([IF]\\): .*{message}") as raised:
        load_image(path)
    assert raised.value.reason == "unsupported" and pickle.loads(pickle.dumps(raised.value)).path == path
    with pytest.raises(ImageLoadError, match=message):
        load_image(Image.open(path))


def test_the_collator_sees_a_16_bit_image_at_its_true_brightness(tmp_path):
    write_array_image(str(tmp_path / "grey.png"), np.full((20, 20), 100 * 257, dtype=np.uint16))
    records = [{"id": "grey", "image": "grey.png", "conversations": qa()}]
    tokenised, _ = tokenise(load_source(write_text(tmp_path / "d.json", json.dumps(records)), tmp_path))
    processor = build_processor()
    batch = MoVEKDDataCollator(processor.image_processor, 0, teacher_image_size=8)(list(tokenised))
    assert batch["teacher_images"].sub(100 / 255).abs().max() < 1e-6


# -------------------------------------------------------------------------------- images outside their folder


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_image_paths_leaving_the_image_folder_are_refused_unless_allowed(tmp_path, path):
    outside = write_png(str(tmp_path / "outside.png"))
    folder = tmp_path / "images"
    write_png(str(folder / "inside.png"))
    path = outside if path == "ABSOLUTE" else path
    records = [
        {"id": "in", "image": str(folder / "inside.png"), "conversations": qa()},  # absolute but inside: fine
        {"id": "out", "image": path, "conversations": qa()},
    ]
    data = write_text(tmp_path / "d.json", json.dumps(records))
    refused = f"d\\.json: sample 'out' \\(row 1\\): field 'image': image path '{path}' leaves the image folder"
    with pytest.raises(DataFileError, match=f"{refused} {folder}; .*allow_images_outside_folder"):
        build_train_data(MoVEKDDataArguments(data, str(folder)), build_processor())
    args = MoVEKDDataArguments(data, str(folder), allow_images_outside_folder=True)
    assert build_train_data(args, build_processor()).dataset["id"] == ["in", "out"]


def test_messages_image_paths_are_held_to_the_image_folder_too(tmp_path):
    write_png(str(tmp_path / "outside.png"))
    rows = [{"messages": [user({"type": "image", "text": None}), ANSWER], "images": [{"path": "../outside.png"}]}]
    dataset = messages_dataset(rows)
    with pytest.raises(DataFileError, match=r"sample 'row-0' \(row 0\): field 'images\[0\]': image path"):
        read_messages_dataset(dataset, tmp_path / "images")
    normalised = read_messages_dataset(dataset, tmp_path / "images", allow_images_outside_folder=True)
    assert normalised[0]["images"][0]["path"] == str(tmp_path / "outside.png")


# ---------------------------------------------------------------------------------------- nothing left to train


def test_a_run_with_every_sample_skipped_stops_before_training_saying_why(tmp_path):
    write_png(str(tmp_path / "a.png"))
    records = [
        {"id": "long", "image": "a.png", "conversations": qa(answer="word " * 50)},
        {"id": "longer", "conversations": qa("Hi", "word " * 60)},
        {"id": "lost", "image": "lost.png", "conversations": qa()},
    ]
    data = write_text(tmp_path / "d.json", json.dumps(records))
    args = MoVEKDDataArguments(data, str(tmp_path), max_length=40, on_bad_sample="skip")
    message = "no samples left to train on: all 3 were skipped as bad \\(too_long: 2, e.g. 'long' \\(row 0\\); "
    with pytest.raises(NoSamplesError, match=f"^{data}: {message}missing_image: 1, e.g. 'lost' \\(row 2\\)\\)"):
        build_train_data(args, build_processor())
    with pytest.raises(NoSamplesError, match=r"d0\.json: holds no samples"):
        build_train_data(MoVEKDDataArguments(write_text(tmp_path / "d0.json", "[]")), build_processor())


# ------------------------------------------------------------------------------------- collator input checks


def test_the_collator_checks_image_tokens_against_images_and_names_the_sample(tmp_path):
    write_png(str(tmp_path / "a.png"))
    records = [{"id": "a", "image": "a.png", "conversations": qa()}, {"id": "t", "conversations": qa("Hi", "Ho")}]
    tokenised, _ = tokenise(load_source(write_text(tmp_path / "d.json", json.dumps(records)), tmp_path))
    good, text_only = tokenised[0], tokenised[1]
    processor = build_processor()
    checks = dict(image_token_id=IMAGE_ID, num_image_tokens=NUM_IMAGE_TOKENS)
    strict = MoVEKDDataCollator(processor.image_processor, 0, **checks)
    assert strict([good, text_only])["input_ids"].eq(IMAGE_ID).sum() == NUM_IMAGE_TOKENS
    wrong_count = {**text_only, "images": good["images"]}  # an image but no image tokens
    with pytest.raises(BadSampleError, match="'t' \\(row 1\\): field 'input_ids': 0 image tokens for 1 images"):
        strict([good, wrong_count])
    trained = {**good, "labels": [IMAGE_ID if token == IMAGE_ID else -100 for token in good["input_ids"]]}
    with pytest.raises(BadSampleError, match="field 'labels': an image token is trained; expected -100"):
        strict([trained])
    lenient = MoVEKDDataCollator(processor.image_processor, 0, on_bad_sample="skip", **checks)
    assert lenient([good, wrong_count])["sample_ids"] == ["a"]
    assert lenient.report.counts["image_count_mismatch"] == 1
    stripped = {key: value for key, value in good.items() if key != "images"}  # remove_unused_columns=True
    with pytest.raises(InputError, match=r"a batch feature lacks \['images'\].*remove_unused_columns=False"):
        strict([stripped])
    assert os.path.isfile(good["images"][0]["path"])
