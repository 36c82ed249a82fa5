"""Data pipeline: toy data, LLaVA JSON and `messages` datasets through real Arrow files, bad samples, collator."""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest
import torch
from _data_fixtures import (
    NUM_IMAGE_TOKENS,
    STUDENT_SIZE,
    TEACHER_SIZE,
    build_processor,
    write_corrupt_png,
    write_png,
)
from PIL import Image

from movekd_hf.training.collator import MoVEKDDataCollator
from movekd_hf.training.data import (
    BadSampleError,
    TokenizeSettings,
    load_source,
    prepare_dataset,
    tokenize_dataset,
)
from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data
from movekd_hf.training.templates import IGNORE_INDEX
from movekd_hf.training.toy_data import make_toy_llava_dataset

IMAGE_ID = 3


def settings(template="v1", max_length=512, verify_images=True):
    return TokenizeSettings(template, max_length, NUM_IMAGE_TOKENS, IMAGE_ID, verify_images=verify_images)


def qa(question="<image>\nWhat is it?", answer="A shape."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_json(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_llava_dataset(tmp_path_factory.mktemp("toy"), num_samples=16, seed=3, image_size=48)


def test_toy_dataset_is_real_llava_format_and_deterministic(toy, tmp_path):
    pretrain = json.load(open(toy.pretrain_json))
    finetune = json.load(open(toy.finetune_json))
    assert len(pretrain) == 16 and len(finetune) == 16 + 2  # 16 // 8 text-only samples
    text_only = [sample for sample in finetune if "image" not in sample]
    assert len(text_only) == 2 and all(
        "<image>" not in turn["value"] for s in text_only for turn in s["conversations"]
    )
    sizes = set()
    for sample in pretrain:
        with Image.open(os.path.join(toy.image_folder, sample["image"])) as image:
            image.load()
            sizes.add(image.size)
        assert sample["conversations"][1]["value"].startswith("a ")
    assert {(48, 48), (48, 36), (36, 48)} & sizes and len(sizes) > 1  # mixed aspect ratios exercise `pad`
    again = make_toy_llava_dataset(tmp_path, num_samples=16, seed=3, image_size=48)
    assert json.load(open(again.finetune_json)) == finetune


def test_llava_json_round_trips_through_arrow_and_tokenises(toy, tmp_path):
    normalised = prepare_dataset(toy.finetune_json, tmp_path / "arrow", toy.image_folder)
    assert os.path.isfile(tmp_path / "arrow" / "dataset_info.json")
    reloaded = datasets.load_from_disk(str(tmp_path / "arrow"))
    assert reloaded.column_names == ["id", "row", "images", "conversations", "system", "problem"]
    assert set(reloaded["problem"]) == {None}
    text_only = [record for record in reloaded if record["id"].startswith("toy-text")]
    assert len(text_only) == 2 and all(record["images"] == [] for record in text_only)
    first_image = next(record for record in reloaded if record["images"])["images"][0]
    assert os.path.isabs(first_image["path"]) and first_image["bytes"] is None  # paths stay paths, not bytes
    tokenised, report = tokenize_dataset(normalised, build_processor().tokenizer, settings())
    assert report.total == 0 and len(tokenised) == len(reloaded)
    for record in tokenised:
        assert len(record["input_ids"]) == len(record["labels"]) == abs(record["modality_length"])
        assert (record["modality_length"] > 0) == (record["num_images"] > 0)
        assert record["input_ids"].count(IMAGE_ID) == NUM_IMAGE_TOKENS * record["num_images"]


def test_messages_dataset_with_embedded_images_through_arrow(tmp_path):
    features = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    user = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}]}
    rows = [
        {
            "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
            "images": [Image.new("RGB", (30, 20), (0, 0, 255))],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            ],
            "images": [],
        },
    ]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "messages"))
    normalised = load_source(tmp_path / "messages")
    assert normalised[0]["conversations"][0]["value"] == "<image>What colour?"
    assert normalised[0]["images"][0]["bytes"] is not None and normalised[1]["images"] == []
    processor = build_processor()
    tokenised, _ = tokenize_dataset(normalised, processor.tokenizer, settings())
    batch = MoVEKDDataCollator(processor.image_processor, processor.tokenizer.pad_token_id)(list(tokenised))
    assert batch["pixel_values"].shape == (1, 3, STUDENT_SIZE, STUDENT_SIZE)
    # The blue image, padded with the CLIP mean colour: the centre pixel is pure blue after normalisation.
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(processor.image_processor.image_mean)) / torch.tensor(
        processor.image_processor.image_std
    )
    assert torch.allclose(batch["pixel_values"][0, :, STUDENT_SIZE // 2, STUDENT_SIZE // 2], blue, atol=0.02)


def bad_records(folder):
    write_png(str(folder / "good.png"))
    write_corrupt_png(str(folder / "corrupt.png"))
    return [
        {"id": "good-image", "image": "good.png", "conversations": qa()},
        {"id": "good-text", "conversations": qa("Hi", "Hello.")},
        {"id": "missing", "image": "nowhere.png", "conversations": qa()},
        {"id": "corrupt", "image": "corrupt.png", "conversations": qa()},
        {"id": "two-placeholders", "image": "good.png", "conversations": qa("<image> and <image>?")},
        {"id": "too-long", "image": "good.png", "conversations": qa(answer="word " * 400)},
        {"id": "leading-gpt", "conversations": [{"from": "gpt", "value": "x"}] + qa("Hi", "Hello.")},
    ]


@pytest.mark.parametrize(
    ("sample_id", "reason", "message"),
    [
        ("missing", "missing_image", "image file not found: .*nowhere.png"),
        ("corrupt", "corrupt_image", "cannot decode image file .*corrupt.png: image file is truncated"),
        ("two-placeholders", "image_count_mismatch", "2 '<image>' placeholders but 1 images"),
        ("too-long", "too_long", r"\d+ tokens \(images expanded\) > max_length 512"),
        ("leading-gpt", "malformed_conversation", "turn 0 is from 'gpt', expected .*"),
    ],
)
def test_each_bad_sample_raises_an_error_naming_it(tmp_path, sample_id, reason, message):
    records = [r for r in bad_records(tmp_path) if r["id"] in ("good-image", sample_id)]
    dataset = load_source(write_json(tmp_path / "data.json", records), tmp_path)
    with pytest.raises(
        BadSampleError, match=f"^sample '{sample_id}' \\(row 1\\): {message} \\(bad sample: {reason}\\)$"
    ):
        tokenize_dataset(dataset, build_processor().tokenizer, settings())


@pytest.mark.parametrize("num_proc", [None, 2])
def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog, num_proc):
    dataset = load_source(write_json(tmp_path / "data.json", bad_records(tmp_path)), tmp_path)
    tokenizer = build_processor().tokenizer
    with caplog.at_level(logging.WARNING, logger="movekd_hf.training.data"):
        kept, report = tokenize_dataset(dataset, tokenizer, settings(), on_bad_sample="skip", num_proc=num_proc)
    assert kept["id"] == ["good-image", "good-text"]
    assert {reason: count for reason, count in report.counts.items() if count} == {
        "missing_image": 1,
        "corrupt_image": 1,
        "image_count_mismatch": 1,
        "too_long": 1,
        "malformed_conversation": 1,
    }
    assert report.examples["corrupt_image"] == ["'corrupt' (row 3)"]
    assert "skipped 5 bad samples" in caplog.text and "'missing' (row 2): image file not found" in caplog.text


def test_collator_raises_or_skips_images_that_break_after_tokenising(tmp_path, caplog):
    records = [r for r in bad_records(tmp_path) if r["id"] in ("good-image", "good-text", "corrupt")]
    dataset = load_source(write_json(tmp_path / "data.json", records), tmp_path)
    processor = build_processor()
    tokenised, _ = tokenize_dataset(dataset, processor.tokenizer, settings(verify_images=False))
    strict = MoVEKDDataCollator(processor.image_processor, processor.tokenizer.pad_token_id)
    with pytest.raises(BadSampleError, match="'corrupt' \\(row 2\\): .*corrupt.png.*\\(bad sample: corrupt_image\\)"):
        strict(list(tokenised))
    lenient = MoVEKDDataCollator(processor.image_processor, processor.tokenizer.pad_token_id, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="movekd_hf.training.data"):
        batch = lenient(list(tokenised))
    assert batch["input_ids"].shape[0] == 2 and batch["images_per_sample"].tolist() == [1, 0]
    assert lenient.report.counts["corrupt_image"] == 1 and "during collation" in caplog.text
    with pytest.raises(ValueError, match="every sample of this batch was skipped"):
        lenient([tokenised[2]])


def test_collator_mixed_batch_shapes_padding_and_teacher_images(toy, tmp_path):
    processor = build_processor()
    args = MoVEKDDataArguments(
        toy.finetune_json, toy.image_folder, "v1", teacher_image_size=TEACHER_SIZE, processed_dir=str(tmp_path / "a")
    )
    data = build_train_data(args, processor)
    assert datasets.load_from_disk(str(tmp_path / "a")).num_rows == len(data.dataset)
    text_row = next(i for i, length in enumerate(data.modality_lengths) if length < 0)
    features = [data.dataset[0], data.dataset[text_row], data.dataset[1]]
    batch = data.collator(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["images_per_sample"].tolist() == [1, 0, 1]
    assert batch["pixel_values"].shape == (2, 3, STUDENT_SIZE, STUDENT_SIZE)
    assert batch["teacher_images"].shape == (2, 3, TEACHER_SIZE, TEACHER_SIZE)
    assert batch["teacher_images"].min() >= 0 and batch["teacher_images"].max() <= 1
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short] :] == processor.tokenizer.pad_token_id).all()
    assert (batch["input_ids"] == IMAGE_ID).sum() == 2 * NUM_IMAGE_TOKENS
    text_only = data.collator([data.dataset[text_row]])
    assert text_only["pixel_values"] is None and text_only["teacher_images"] is None


def test_data_arguments_are_validated(toy):
    for field, value in (("template", "v2"), ("image_aspect", "crop"), ("on_bad_sample", "ignore")):
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            MoVEKDDataArguments(toy.finetune_json, **{field: value})


def test_pad_and_resize_aspects_differ_as_specified(tmp_path):
    processor = build_processor()
    write_png(str(tmp_path / "wide.png"), size=(60, 20), colour=(255, 255, 255))
    records = [{"id": "wide", "image": "wide.png", "conversations": qa()}]
    tokenised, _ = tokenize_dataset(
        load_source(write_json(tmp_path / "d.json", records), tmp_path), processor.tokenizer, settings()
    )
    pad_token = processor.tokenizer.pad_token_id
    padded = MoVEKDDataCollator(processor.image_processor, pad_token, "pad", TEACHER_SIZE)(list(tokenised))
    resized = MoVEKDDataCollator(processor.image_processor, pad_token, "resize", TEACHER_SIZE)(list(tokenised))
    # pad: rows above and below the 3:1 strip hold the mean colour, which normalises to ~0.
    assert padded["pixel_values"][0, :, 0, :].abs().max() < 0.02
    assert padded["pixel_values"][0, :, STUDENT_SIZE // 2, :].min() > 1.5  # white strip in the middle
    # resize: the processor crops the centre of the white image, so every pixel is white.
    assert resized["pixel_values"].min() > 1.5
    assert padded["teacher_images"][0, :, 0, :].sub(torch.tensor([0.48, 0.458, 0.408])[:, None]).abs().max() < 0.01
    assert resized["teacher_images"].min() > 0.99


def test_build_train_data_feeds_a_tiny_llava_forward_and_backward(toy):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = build_processor()
    data = build_train_data(MoVEKDDataArguments(toy.finetune_json, toy.image_folder, template="v1"), processor)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=40, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    text_row = next(i for i, length in enumerate(data.modality_lengths) if length < 0)
    batch = data.collator([data.dataset[0], data.dataset[text_row], data.dataset[1]])  # mixed: no dummy image
    assert batch.pop("images_per_sample").tolist() == [1, 0, 1]
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
