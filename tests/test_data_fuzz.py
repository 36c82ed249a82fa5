"""Property tests (hypothesis): whatever a LLaVA JSON/JSONL file, a `messages` dataset or a batch holds, the data
pipeline either yields well-formed batches or raises the package's own error naming the file or the sample.

Well-formed: labels are -100 everywhere except the answer tokens (checked by decoding the trained tokens back to the
answers), and every sample carries exactly `NUM_IMAGE_TOKENS` image tokens per image, what the tiny CLIP student
(40 px crop, patch 8, CLS dropped) produces as image features.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import datasets
import pytest
from _data_fixtures import NUM_IMAGE_TOKENS, PATCH_SIZE, STUDENT_SIZE, build_processor, write_corrupt_png, write_png
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from movekd_hf.errors import DataFileError, InputError
from movekd_hf.modeling.llava_conventions import IMAGE_TOKEN
from movekd_hf.training.collator import MoVEKDDataCollator
from movekd_hf.training.data import (
    BAD_SAMPLE_REASONS,
    BadSampleError,
    NoSamplesError,
    TokenizeSettings,
    load_source,
    read_messages_dataset,
    tokenize_dataset,
)
from movekd_hf.training.data_args import num_image_tokens
from movekd_hf.training.templates import IGNORE_INDEX

IMAGE_ID = 3
PROCESSOR = build_processor()
TOKENIZER = PROCESSOR.tokenizer
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_png(str(root / "images" / "good.png"))
    write_png(str(root / "images" / "wide.png"), size=(50, 20))
    write_corrupt_png(str(root / "images" / "corrupt.png"))
    write_png(str(root / "outside.png"))
    return root


def test_image_tokens_per_image_equal_the_students_image_features():
    patches = (STUDENT_SIZE // PATCH_SIZE) ** 2  # CLIP patches; the CLS token is dropped ("default" strategy)
    assert num_image_tokens(PROCESSOR) == NUM_IMAGE_TOKENS == patches


# --------------------------------------------------------------------------------------------------- strategies

# No '<' in free text: `<s>`/`</s>` typed by a user would become special tokens (as in LLaVA's own tokenising).
FREE = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=6)
TEXT = st.lists(st.sampled_from(["What", " is", " it?", "\n", " red", "é", "猫"]) | FREE, max_size=4).map("".join)
ROLES = st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | FREE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FREE, inner, max_size=3),
    max_leaves=5,
)
IMAGE_NAMES = st.sampled_from(["good.png", "wide.png"])
BAD_IMAGE_NAMES = st.sampled_from(["corrupt.png", "missing.png", "../outside.png"])


@st.composite
def questions_and_answers(draw, num_images, template):
    """[(question, answer)] with `num_images` `<image>` placeholders in the first question (LLaVA's layout)."""
    pairs = [[draw(TEXT), draw(TEXT)] for _ in range(1 if template == "plain" else draw(st.integers(1, 3)))]
    placeholders = IMAGE_TOKEN * num_images
    pairs[0][0] = placeholders + "\n" + pairs[0][0] if draw(st.booleans()) else pairs[0][0] + placeholders
    return pairs


def mixed(good, broken):
    """1-3 well-formed items and 0-2 broken ones, shuffled: skipping always leaves samples to check."""
    return st.tuples(st.lists(good, min_size=1, max_size=3), st.lists(broken, max_size=2)).flatmap(
        lambda parts: st.permutations(parts[0] + parts[1])
    )


@st.composite
def llava_samples(draw, template, broken):
    """A well-formed LLaVA sample for `template`, or (`broken`) one with a bad image, a placeholder too many, a
    wrong role, a missing last turn, or one part replaced by any JSON value or removed."""
    images = draw(st.lists(IMAGE_NAMES, min_size=1, max_size=1 if template == "plain" else 2))
    images = images if template == "plain" or draw(st.booleans()) else []
    turns = []
    for question, answer in draw(questions_and_answers(len(images), template)):
        turns.append({"from": draw(st.sampled_from(["human", "user"])), "value": question})
        turns.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": answer})
    sample = {"id": draw(st.text(max_size=4) | st.integers()), "conversations": turns}
    if images:
        sample["image"] = images[0] if len(images) == 1 and draw(st.booleans()) else images
    if not broken:
        return sample
    kinds = ["sample", "field", "turn", "turn_field", "drop", "role", "cut", "image", "placeholder"]
    mutation = draw(st.sampled_from(kinds))
    if mutation == "image":
        sample["image"] = images + [draw(BAD_IMAGE_NAMES)]
        turns[0]["value"] += IMAGE_TOKEN
    elif mutation == "placeholder":
        draw(st.sampled_from(turns))["value"] += IMAGE_TOKEN
    elif mutation == "sample":
        return draw(JSON)
    if mutation == "field":
        sample[draw(st.sampled_from(["id", "image", "conversations", "system"]))] = draw(JSON)
    elif mutation == "drop":
        sample.pop(draw(st.sampled_from(sorted(sample))))
    elif mutation == "cut":
        turns.pop()
    elif mutation in ("turn", "turn_field", "role"):
        index = draw(st.integers(0, len(turns) - 1))
        if mutation == "turn":
            turns[index] = draw(JSON)
        elif mutation == "role":
            turns[index]["from"] = draw(ROLES)
        else:
            turns[index][draw(st.sampled_from(["from", "value"]))] = draw(JSON)
    return sample


# ------------------------------------------------------------------------------------------------------ oracles


def trained_text(labels):
    return TOKENIZER.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


def expected_answers(record, template):
    """What a template trains, written from its definition (templates.py docstring), not from its code."""
    answers = [turn["value"].replace(IMAGE_TOKEN, "") for turn in record["conversations"][1::2]]
    if template == "plain":
        return answers[0] + "\n"
    return "".join(f" {answer}{TOKENIZER.eos_token}" for answer in answers)


def check_tokenised(dataset, template):
    for record in dataset:
        input_ids, labels = record["input_ids"], record["labels"]
        assert len(input_ids) == len(labels) == abs(record["modality_length"])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
        assert trained_text(labels) == expected_answers(record, template)
        assert (
            input_ids.count(IMAGE_ID)
            == NUM_IMAGE_TOKENS * len(record["images"])
            == NUM_IMAGE_TOKENS * (record["num_images"])
        )


def check_error_names_its_place(error, path, names):
    assert isinstance(error, InputError)
    if isinstance(error, BadSampleError):
        assert error.reason in BAD_SAMPLE_REASONS and error.sample_id in names and error.sample_id in str(error)
    else:  # a whole-file problem, or a sample's image path leaving the folder
        assert str(error).startswith(str(path)), str(error)


def read_and_tokenise(read, template, path, names):
    """Read once, then tokenise raising and skipping. Returns the normalised dataset (None if reading failed).

    A reader raises only `DataFileError`; tokenising raises `BadSampleError` (raise mode) or `NoSamplesError`;
    a success holds well-formed samples and counts every one it dropped."""
    try:
        dataset = read()
    except DataFileError as error:
        event(f"read: {error.problem.split(':')[0]}")
        check_error_names_its_place(error, path, names)
        return None
    for on_bad_sample in ("raise", "skip"):
        try:
            kept, report = tokenise(dataset, template, on_bad_sample, path)
        except (BadSampleError, NoSamplesError) as error:
            event(f"{on_bad_sample}: {type(error).__name__} {error.reason or ''}")
            assert on_bad_sample == "raise" or isinstance(error, NoSamplesError)
            check_error_names_its_place(error, path, names)
            continue
        event(f"{on_bad_sample}: kept {len(kept)} of {len(dataset)}")
        check_tokenised(kept, template)
        assert len(kept) + report.total == len(dataset)  # nothing dropped without being counted
    return dataset


def tokenise(dataset, template, on_bad_sample, path):
    settings_ = TokenizeSettings(template, 400, NUM_IMAGE_TOKENS, IMAGE_ID)
    return tokenize_dataset(dataset, TOKENIZER, settings_, on_bad_sample, source=path)


# ------------------------------------------------------------------------------------------------------- readers


@FUZZ
@given(
    data=st.data(),
    jsonl=st.booleans(),
    cut=st.sampled_from([None] * 9 + [0.5, 0.97]),
    template=st.sampled_from(["v1", "v1", "plain"]),
)
def test_llava_files_yield_good_samples_or_errors_naming_them(folder, data, jsonl, cut, template):
    samples = data.draw(mixed(llava_samples(template, False), llava_samples(template, True)))
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        path = os.path.join(scratch, "data.jsonl" if jsonl else "data.json")
        text = "\n".join(json.dumps(s) for s in samples) if jsonl else json.dumps(samples, indent=1)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text if cut is None else text[: int(len(text) * cut)])  # sometimes a truncated file
        names = {f"{s.get('id')!r} (row {row})" for row, s in enumerate(samples) if isinstance(s, dict)}
        names |= {f"'data.json{'l' * jsonl}:{row}' (row {row})" for row in range(len(samples))}
        names |= {f"'{s['id']}' (row {row})" for row, s in enumerate(samples) if isinstance(s, dict) and "id" in s}
        read_and_tokenise(lambda: load_source(path, os.path.join(folder, "images")), template, path, names)


MESSAGE_FEATURES = {
    "parts": datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
        }
    ),
    "text": datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
        }
    ),
}


def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (23, 31), colour).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_REFS = st.sampled_from([{"bytes": png_bytes((0, 0, 255)), "path": None}, {"bytes": None, "path": "good.png"}])
BAD_REFS = st.fixed_dictionaries({"bytes": st.none() | st.just(b"not an image"), "path": st.none() | BAD_IMAGE_NAMES})


@st.composite
def message_rows(draw, schema, template, broken):
    """A well-formed `messages`/`images` row for `template`, or (`broken`) one with a message, a part or an image
    made wrong."""
    images = draw(st.lists(GOOD_REFS, min_size=1, max_size=1 if template == "plain" else 2))
    images = images if template == "plain" or draw(st.booleans()) else []
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for question, answer in draw(questions_and_answers(len(images), template)):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if schema == "parts":  # typed parts: `<image>` placeholders become image parts
        for message in messages:
            pieces = message["content"].split(IMAGE_TOKEN)
            parts = [{"type": "text", "text": pieces[0]}]
            for piece in pieces[1:]:
                parts += [{"type": "image", "text": None}, {"type": "text", "text": piece}]
            message["content"] = parts
    row = {"messages": messages, "images": images}
    if not broken:
        return row
    mutation = draw(st.sampled_from(["role", "content", "part", "messages", "images", "image"]))
    target = draw(st.sampled_from(messages))
    if mutation == "role":
        target["role"] = draw(ROLES | st.none())
    elif mutation == "content" or (mutation == "part" and schema == "text"):
        target["content"] = None
    elif mutation == "part":
        part = draw(st.sampled_from(target["content"]))
        part[draw(st.sampled_from(["type", "text"]))] = draw(st.none() | st.sampled_from(["video", "image"]))
    elif mutation in ("messages", "images"):
        row[mutation] = draw(st.none() | st.just([]))
    else:
        row["images"] = images + [draw(BAD_REFS)]
    return row


def expected_turns(row):
    """The reader's conversation for a well-formed row, from the `messages` format's definition."""
    turns = []
    for message in row["messages"]:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_TOKEN if part["type"] == "image" else part["text"] for part in content)
        if message["role"] != "system":
            turns.append({"from": message["role"], "value": content})
    return turns


@FUZZ
@given(
    data=st.data(), schema=st.sampled_from(sorted(MESSAGE_FEATURES)), template=st.sampled_from(["v1", "v1", "plain"])
)
def test_messages_datasets_yield_good_samples_or_errors_naming_them(folder, data, schema, template):
    rows = data.draw(mixed(message_rows(schema, template, False), message_rows(schema, template, True)))
    dataset = datasets.Dataset.from_list(rows, features=MESSAGE_FEATURES[schema])
    names = {f"'row-{row}' (row {row})" for row in range(len(rows))}
    normalised = read_and_tokenise(
        lambda: read_messages_dataset(dataset, os.path.join(folder, "images"), source="chats"),
        template,
        "chats",
        names,
    )
    for row, record in zip(rows, normalised or []):
        if record["problem"] is None:
            assert record["conversations"] == expected_turns(row)


# ------------------------------------------------------------------------------------------------------ collator


@pytest.fixture(scope="module")
def tokenised(folder):
    """Good tokenised samples with 0, 1 or 2 images of different shapes, each with a distinct id."""
    records = []
    for index, images in enumerate([[], ["good.png"], ["wide.png"], ["good.png", "wide.png"], [], ["wide.png"]]):
        question = IMAGE_TOKEN * len(images) + "What is it?" + " more" * index
        answer = "A shape" + "." * index
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": f"s{index}", "image": images, "conversations": turns})
    path = os.path.join(folder, "collate.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    kept, _ = tokenise(load_source(path, os.path.join(folder, "images")), "v1", "raise", path)
    return list(kept)


def corrupt(feature, how):
    """One way a tokenised sample can disagree with its images (a stale or hand-edited dataset)."""
    ids, labels = list(feature["input_ids"]), list(feature["labels"])
    if how == "drop_image_token" and IMAGE_ID in ids:
        position = ids.index(IMAGE_ID)
        ids, labels = ids[:position] + ids[position + 1 :], labels[:position] + labels[position + 1 :]
    elif how == "extra_image":
        return {**feature, "images": feature["images"] + feature["images"][:1] or [{"path": "x.png", "bytes": None}]}
    elif how == "short_labels":
        labels = labels[:-1]
    elif how == "train_image_token" and IMAGE_ID in ids:
        labels[ids.index(IMAGE_ID)] = IMAGE_ID
    else:
        return None
    return {**feature, "input_ids": ids, "labels": labels}


@FUZZ
@given(
    picks=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    how=st.sampled_from(["none"] * 4 + ["drop_image_token", "extra_image", "short_labels", "train_image_token"]),
    victim=st.integers(0, 3),
    aspect=st.sampled_from(["pad", "resize"]),
    side=st.sampled_from(["right", "left"]),
)
def test_collated_batches_are_well_formed_or_the_bad_sample_is_named(tokenised, picks, how, victim, aspect, side):
    features = [tokenised[i] for i in picks]
    victim %= len(features)
    broken = corrupt(features[victim], how)
    if broken is not None:
        features[victim] = broken
    checks = {"image_token_id": IMAGE_ID, "num_image_tokens": NUM_IMAGE_TOKENS}
    collator = MoVEKDDataCollator(
        PROCESSOR.image_processor, TOKENIZER.pad_token_id, aspect, teacher_image_size=16, padding_side=side, **checks
    )
    try:
        batch = collator(features)
    except BadSampleError as error:
        event(f"collate: {error.reason}")
        assert broken is not None and error.sample_id == f"'{broken['id']}' (row {broken['row']})"
        assert error.sample_id in str(error)
        return
    event("collate: batch")
    assert broken is None
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    per_sample = batch["images_per_sample"]
    assert input_ids.shape == labels.shape == mask.shape == (len(features), max(len(f["input_ids"]) for f in features))
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (input_ids[mask == 0] == TOKENIZER.pad_token_id).all()
    assert ((labels == IGNORE_INDEX) | (labels == input_ids)).all()
    assert (labels[input_ids == IMAGE_ID] == IGNORE_INDEX).all()
    assert (input_ids == IMAGE_ID).sum(1).tolist() == (per_sample * NUM_IMAGE_TOKENS).tolist()
    for row, feature in enumerate(features):
        assert trained_text(labels[row].tolist()) == expected_answers(feature, "v1")
    if per_sample.sum() == 0:
        assert batch["pixel_values"] is None and batch["teacher_images"] is None
    else:
        assert batch["pixel_values"].shape == (per_sample.sum(), 3, STUDENT_SIZE, STUDENT_SIZE)
        assert batch["teacher_images"].shape == (per_sample.sum(), 3, 16, 16)
