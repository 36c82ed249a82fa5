"""LLaVA-OneVision students distilled tile by tile (issue 17.2, training/anyres.py).

On real photos of several aspect ratios (skimage's astronaut, chelsea, coffee and a wide crop of coffee) and the tiny
OneVision checkpoint of `_onevision_fixtures.py` (32 px tiles, pinpoints up to 64 x 64: the base view plus up to 4
tiles): training ids are the processor's ids; the student gets the processor's pixels; each teacher sees the
student's tiles, in the tower's order, cut from the raw image; the KD and balance terms average over tiles;
`movekd-hf train` trains a folder made by `movekd-hf init --onevision` with the `tiny` teachers; and
`movekd-hf cache-teachers --model` caches a row per tile, from which training computes the online loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from _onevision_fixtures import PINPOINTS, TILE, save_stock_onevision
from PIL import Image

from movekd_hf.distill.anyres_tiles import anyres_layout, tile_views
from movekd_hf.distill.teacher_views import ViewSettings
from movekd_hf.errors import InputError
from movekd_hf.training.anyres import AnyResImageTokens, MoVEKDAnyResCollator, collator_for, image_token_counter
from movekd_hf.training.data import (
    BadSampleError,
    BadSampleReport,
    TokenizeSettings,
    read_llava_json,
    tokenize_dataset,
)
from movekd_hf.training.templates import IGNORE_INDEX, Segment, tokenize_segments

ANSWERS = {"astronaut": "An astronaut.", "chelsea": "A cat.", "coffee": "A cup of coffee.", "wide": "A saucer."}
PAIR_ANSWER = "No, a cat and a saucer."
TEXT_ANSWER = "Hello there."


def user(*parts):
    content = [{"type": "image"} if part is None else {"type": "text", "text": part} for part in parts]
    return {"role": "user", "content": content}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    coffee = Image.fromarray(data.coffee())  # 600 x 400
    return {
        "astronaut": Image.fromarray(data.astronaut()),  # 512 x 512: the 64 x 64 pinpoint, 5 tiles
        "chelsea": Image.fromarray(data.chelsea()),  # 451 x 300
        "coffee": coffee,
        "wide": coffee.crop((0, 150, 600, 300)),  # 600 x 150: the 32 x 64 pinpoint, 3 tiles
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory, photos):
    """(stock checkpoint, `init --onevision` output, data folder with `data.json` and the photos as PNG files)."""
    from movekd_hf.cli import main

    root = tmp_path_factory.mktemp("anyres")
    stock = save_stock_onevision(root / "stock")
    assert main(["init", "--onevision", str(stock), "--out", str(root / "init")]) == 0
    images = root / "data"
    images.mkdir()
    for name, photo in photos.items():
        photo.save(images / f"{name}.png")
    samples = [
        {"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": answer}]}
        for name, answer in ANSWERS.items()
    ]  # fmt: skip
    samples.append(
        {
            "id": "pair",
            "image": ["chelsea.png", "wide.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nIs it the same thing?"},
                {"from": "gpt", "value": PAIR_ANSWER},
            ],
        }
    )
    samples.append({"id": "text", "conversations": [
        {"from": "human", "value": "Hi!"}, {"from": "gpt", "value": TEXT_ANSWER}]})  # fmt: skip
    (images / "data.json").write_text(json.dumps(samples), encoding="utf-8")
    plain = [
        {"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": answer}]}
        for name, answer in ANSWERS.items()
    ]  # fmt: skip
    (images / "plain.json").write_text(json.dumps(plain), encoding="utf-8")
    return stock, root / "init", images


@pytest.fixture(scope="module")
def onevision(folders):
    """The MoVE-KD OneVision model and processor that `init --onevision` wrote (LoRA dropout 0: deterministic)."""
    from movekd_hf.modeling import MoVEKDOnevisionForConditionalGeneration, MoVEKDOnevisionProcessor

    model = MoVEKDOnevisionForConditionalGeneration.from_pretrained(folders[1], lora_dropout=0.0)
    return model, MoVEKDOnevisionProcessor.from_pretrained(folders[1])


def tokenise(folder, processor, template="chat_template", verify_images=True, data="data.json"):
    settings = TokenizeSettings(
        template=template,
        max_length=4096,
        num_image_tokens=processor.num_image_tokens,
        image_token_id=processor.image_token_id,
        verify_images=verify_images,
        image_tokens=image_token_counter(processor),
    )
    source = read_llava_json(folder / data)
    return tokenize_dataset(source, processor.tokenizer, settings, chat_renderer=processor)[0]


def by_id(dataset):
    return {record["id"]: record for record in dataset}


def unit(tensor_or_image):
    """A PIL image -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(tensor_or_image, dtype=np.float32)).permute(2, 0, 1) / 255.0


def unnormalised(pixels, image_processor):
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return pixels * std + mean


# ------------------------------------------------------------------------------------------------------ tokens


def test_training_ids_are_the_processors_ids_for_photos_of_every_shape(folders, onevision, photos):
    _, processor = onevision
    expected_messages = {
        name: [user(None, "What is in the picture?"), assistant(answer)] for name, answer in ANSWERS.items()
    }
    expected_messages["pair"] = [user(None, None, "Is it the same thing?"), assistant(PAIR_ANSWER)]
    expected_messages["text"] = [user("Hi!"), assistant(TEXT_ANSWER)]
    sample_images = {**{name: [photo] for name, photo in photos.items()}, "pair": [photos["chelsea"], photos["wide"]]}
    verified, from_headers = (by_id(tokenise(folders[2], processor, verify_images=v)) for v in (True, False))
    counts = set()
    for name, messages in expected_messages.items():
        prompt = processor.apply_chat_template(messages, tokenize=False)
        images = [sample_images[name]] if name in sample_images else None
        ids = processor(text=[prompt], images=images)["input_ids"][0]
        record = verified[name]
        assert record["input_ids"] == list(ids), name
        assert from_headers[name]["input_ids"] == record["input_ids"], name  # sizes from the header, not decoded
        image_positions = [i for i, token in enumerate(ids) if token == processor.image_token_id]
        assert all(record["labels"][i] == IGNORE_INDEX for i in image_positions)
        trained = [token for token in record["labels"] if token != IGNORE_INDEX]
        assert processor.tokenizer.decode(trained) == messages[-1]["content"][0]["text"] + "<|im_end|>\n"
        counts.add(len(image_positions))
    assert len(counts) >= 4  # the counts really depend on the images (0, 2 x 17 and several AnyRes counts)

    # `plain` (stage 1): the image, the caption, a newline, as the processor tokenises that text.
    plain = by_id(tokenise(folders[2], processor, template="plain", data="plain.json"))
    for name, photo in photos.items():
        ids = processor(text=["<image>" + ANSWERS[name] + "\n"], images=[[photo]])["input_ids"][0]
        assert plain[name]["input_ids"] == list(ids), name


def test_tokenize_segments_takes_one_count_per_image_in_text_order(onevision):
    _, processor = onevision
    tokenizer, image = processor.tokenizer, processor.image_token_id
    segments = [Segment("<image>a<image>b", trained=False), Segment("c", trained=True)]
    ids = tokenize_segments(segments, tokenizer, image, [3, 1])["input_ids"]
    image_text = processor.image_token
    assert ids == tokenizer(image_text * 3 + "a" + image_text + "bc")["input_ids"]
    with pytest.raises(ValueError, match="2 image-token counts for 1"):
        tokenize_segments([Segment("<image>", trained=False)], tokenizer, image, [3, 1])


def test_image_tokens_are_what_the_processor_writes_for_the_photo_and_for_a_blank_of_its_size(onevision, photos):
    """The counting hook (the fast path) agrees with running the processor on the photo itself and on a blank image
    of the same size (the fallback where a release lacks the hook)."""
    _, processor = onevision
    counter = AnyResImageTokens(processor)
    for photo in photos.values():
        on_photo = counter._measure("<image>", [[photo]])
        on_blank = counter._measure("<image>", [[Image.new("RGB", photo.size)]])
        assert counter([(photo.height, photo.width)]) == [on_photo] == [on_blank]
    assert counter([(10, 10), (500, 20)]) == [(TILE // 8) ** 2 + 1] * 2  # one tile plus the newline each


def test_without_verifying_images_a_missing_or_unreadable_header_is_a_counted_bad_sample(folders, onevision, tmp_path):
    _, processor = onevision
    (tmp_path / "broken.png").write_bytes(b"not a png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]
    samples = [{"id": name, "image": f"{name}.png", "conversations": turns} for name in ("broken", "absent")]
    samples.append({"id": "fine", "image": str(folders[2] / "wide.png"), "conversations": turns})
    (tmp_path / "bad.json").write_text(json.dumps(samples), encoding="utf-8")
    settings = TokenizeSettings("chat_template", 4096, 0, processor.image_token_id, verify_images=False,
                                image_tokens=image_token_counter(processor))  # fmt: skip
    report = BadSampleReport()
    source = read_llava_json(tmp_path / "bad.json", allow_images_outside_folder=True)
    kept, _ = tokenize_dataset(source, processor.tokenizer, settings, "skip", report, chat_renderer=processor)
    assert kept["id"] == ["fine"]
    assert report.counts["corrupt_image"] == 1 and report.counts["missing_image"] == 1


def test_data_tokenised_for_other_pinpoints_is_refused_or_skipped(folders, onevision):
    _, processor = onevision
    dataset = tokenise(folders[2], processor)
    other = type(processor).from_pretrained(folders[1])
    other.image_processor.image_grid_pinpoints = [[32, 32], [32, 96], [96, 32]]
    with pytest.raises(BadSampleError, match="image tokens for 1 images"):
        MoVEKDAnyResCollator(other, other.tokenizer.pad_token_id)([by_id(dataset)["astronaut"]])
    report = BadSampleReport()
    lenient = MoVEKDAnyResCollator(other, other.tokenizer.pad_token_id, on_bad_sample="skip", report=report)
    batch = lenient([by_id(dataset)[name] for name in ("astronaut", "text")])
    assert batch["sample_ids"] == ["text"] and report.counts["image_count_mismatch"] == 1


# ------------------------------------------------------------------------------------------------------ pixels


def test_the_student_gets_the_processors_pixels_and_counts_are_per_tile(folders, onevision, photos):
    _, processor = onevision
    records = by_id(tokenise(folders[2], processor))
    names = ["astronaut", "pair", "text", "wide"]
    collator = collator_for(processor, processor.tokenizer.pad_token_id)
    assert isinstance(collator, MoVEKDAnyResCollator)
    batch = collator([records[name] for name in names])  # runs the processor, checks its image-token counts
    again = collator([records[name] for name in names])  # sizes checked before: the image processor alone
    for key in ("pixel_values", "image_sizes", "batch_num_images", "images_per_sample"):
        torch.testing.assert_close(again[key], batch[key], rtol=0, atol=0)
    with pytest.raises(InputError, match=r"writes \[3\] image tokens .* tokenised with \[88\]"):
        collator._check_processor_counts(torch.full((1, 3), processor.image_token_id), [[photos["astronaut"]]])
    nested = [[photos["astronaut"]], [photos["chelsea"], photos["wide"]], [photos["wide"]]]
    reference = processor.image_processor(images=nested, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    assert batch["image_sizes"].tolist() == [[512, 512], [300, 451], [150, 600], [150, 600]]
    assert batch["batch_num_images"].tolist() == [1, 2, 1]
    # Tower rows: base view + 2 x 2 tiles; one tile per image of a pair; none; base view + 1 x 2 tiles.
    assert batch["images_per_sample"].tolist() == [5, 2, 0, 3]


# ------------------------------------------------------------------------------------------------ teacher tiles


def test_teachers_see_the_students_tiles_in_the_towers_order(folders, onevision, photos):
    model, processor = onevision
    records = by_id(tokenise(folders[2], processor))
    names = ["astronaut", "chelsea", "pair", "coffee", "wide"]
    features = [records[name] for name in names]
    image_processor = processor.image_processor
    at_tile = MoVEKDAnyResCollator(processor, processor.tokenizer.pad_token_id, teacher_image_size=TILE)(features)
    students = [  # the real tiles of every image, in batch order
        tile
        for pixels, rows in zip(at_tile["pixel_values"], [5, 5, 1, 1, 5, 3])
        for tile in unnormalised(pixels[:rows], image_processor)
    ]
    teachers = at_tile["teacher_images"]  # [total tiles, 3, S, S] in [0, 1]
    assert len(teachers) == len(students) == int(at_tile["images_per_sample"].sum()) == 20
    # At the student's tile size the teacher's tile is the processor's tile within one 8-bit level (PIL's and
    # torchvision's antialiased bicubic kernels round differently).
    for teacher, student in zip(teachers, students):
        torch.testing.assert_close(teacher, student, rtol=0, atol=1 / 255 + 1e-6)

    # At a teacher's larger size the tile is rendered from the raw photo (more detail), the same region: resized
    # back to the tile size it is the student's tile up to resampling (mean error under 1 %).
    large = MoVEKDAnyResCollator(processor, processor.tokenizer.pad_token_id, teacher_image_size=4 * TILE)
    big = large(features)["teacher_images"]
    assert big.shape == (20, 3, 4 * TILE, 4 * TILE)
    for teacher, student in zip(big, students):
        down = torch.nn.functional.interpolate(teacher[None], size=(TILE, TILE), mode="bicubic", antialias=True)[0]
        assert (down - student).abs().mean() < 0.01

    # Online teachers' own uint8 views (distill.teacher_views) are made from the same tiles: one row per tile.
    views = MoVEKDAnyResCollator(
        processor, processor.tokenizer.pad_token_id, teacher_views={"t": ViewSettings(48, resize_mode="squash")}
    )(features)["teacher_views"]["t"]
    assert views.shape == (20, 3, 48, 48) and views.dtype == torch.uint8

    # One teacher row per row of the student's `vision_hidden_states`, the row the model distils it against.
    inputs = {key: at_tile[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    with torch.no_grad():
        out = model(**inputs, batch_num_images=at_tile["batch_num_images"])
    assert out.vision_hidden_states.shape == (20, (TILE // 8) ** 2, model.config.vision_config.hidden_size)


def test_tile_views_cut_the_processors_canvas_for_partial_tiles_too(onevision, photos):
    """A canvas side that is not a multiple of the tile (48 x 80 here) ends in narrower tiles, which the processor
    stretches to S; the teacher's views do the same."""
    _, processor = onevision
    image_processor = type(processor.image_processor)(**processor.image_processor.to_dict())
    image_processor.image_grid_pinpoints = [[32, 32], [48, 80]]
    for photo in (photos["coffee"], photos["chelsea"]):
        layout = anyres_layout((photo.height, photo.width), image_processor.image_grid_pinpoints, TILE)
        assert layout.canvas == (48, 80) and len(layout.tile_boxes()) == 6
        pixels = image_processor(images=[photo], return_tensors="pt")["pixel_values"][0]
        views = tile_views(photo, layout, TILE)
        assert len(views) == pixels.shape[0] == 7
        for view, tile in zip(views, unnormalised(pixels, image_processor)):
            torch.testing.assert_close(unit(view), tile, rtol=0, atol=1 / 255 + 1e-6)


# ----------------------------------------------------------------------------------------------- loss scaling


def test_kd_and_balance_terms_average_over_tiles_under_gradient_accumulation(folders, onevision, tmp_path):
    """Two single-image samples of 5 and 3 tiles, accumulated over two micro-batches: each term's share is its
    tiles over the window's 8, so the accumulated balance term is the mean over the 8 tiles of one batch of both."""
    from movekd_hf.training.arguments import MoVEKDTrainingArguments
    from movekd_hf.training.trainer import NON_MODEL_KEYS, MoVEKDTrainer

    model, processor = onevision
    records = by_id(tokenise(folders[2], processor))
    collator = MoVEKDAnyResCollator(processor, processor.tokenizer.pad_token_id, teacher_image_size=64)
    args = MoVEKDTrainingArguments(
        output_dir=str(tmp_path), stage="stage1", gradient_accumulation_steps=2, report_to=[], use_cpu=True
    )
    trainer = MoVEKDTrainer(
        model=model, args=args, teachers="tiny", data_collator=collator, processing_class=processor
    )
    trainer.model.train()
    micro = [collator([records["astronaut"]]), collator([records["wide"]])]
    _, num_items = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    shares, balances, kd_rows = [], [], []
    with torch.no_grad():
        for batch in micro:
            _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True, num_items_in_batch=num_items)
            assert out["num_images"] == int(batch["images_per_sample"].sum())
            shares.append(float(trainer._aux_scale(out["num_images"], num_items)))
            balances.append(out["balance"]["loss"])
            kd_rows.append(out["kd"]["per_teacher_loss"].shape[0])
        joint = collator([records["astronaut"], records["wide"]])
        inputs = {key: value for key, value in joint.items() if key not in NON_MODEL_KEYS}
        whole = trainer.model(**inputs)["balance"]["loss"]
    assert kd_rows == [5, 3]  # the KD term's rows are tiles
    assert shares == pytest.approx([5 / 8, 3 / 8])
    accumulated = sum(share * balance for share, balance in zip(shares, balances))
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------- end to end


def test_movekd_hf_train_trains_an_init_onevision_folder_with_the_tiny_teachers(folders, tmp_path):
    from movekd_hf.cli import main

    _, init, data = folders
    config = {
        "model_name_or_path": str(init),
        "teacher_set": "tiny",
        "kd_preset": "default",
        "stage": "stage1",
        "data_path": str(data / "data.json"),
        "image_folder": str(data),
        "template": "chat_template",
        "max_length": 1024,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }
    path = tmp_path / "onevision.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))
    logs = [entry for entry in state["log_history"] if "kd_loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        kd = [value for key, value in entry.items() if key.startswith("kd/") and key.endswith("_loss")]
        assert len(kd) == 3 and all(math.isfinite(value) for value in [entry["kd_loss"], *kd])
        assert math.isfinite(entry["balance_loss"]) and math.isfinite(entry["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["model_type"] == "movekd_llava_onevision"


def onevision_config(init, data, tmp_path) -> str:
    """A `movekd-hf train` YAML for the `init --onevision` folder on `data.json` (all six samples in the first batch)."""
    config = {
        "model_name_or_path": str(init), "teacher_set": "tiny", "kd_preset": "default", "stage": "stage1",
        "data_path": str(data / "data.json"), "image_folder": str(data), "template": "chat_template",
        "max_length": 1024, "per_device_train_batch_size": 6, "max_steps": 1, "report_to": "none",
        "dataloader_num_workers": 0, "seed": 0, "data_seed": 0,
    }  # fmt: skip
    path = tmp_path / "onevision.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def anyres_cache(folders, tmp_path_factory):
    """`movekd-hf cache-teachers --model` over the photos for the `init --onevision` folder, as training builds its
    teachers (`tiny` set, random weights, the run's seed)."""
    from movekd_hf.cli import main

    _, init, data = folders
    cache = tmp_path_factory.mktemp("anyres_cache") / "cache"
    argv = ["cache-teachers", "--model", str(init), "--teacher-set", "tiny", "--random-weights", "--data-path",
            str(data / "data.json"), "--image-folder", str(data), "--cache-dir", str(cache), "--seed", "0",
            "--grid", "native", "--batch-size", "3", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return cache, argv


def test_the_cache_holds_a_row_per_tower_row_keyed_as_training_reads_them(folders, onevision, anyres_cache, capsys):
    """Each teacher's cache has one row per tile of an image alone in its sample ((id, 0), (id, 1), ...) and one per
    image of the pair, exactly the rows `images_per_sample` counts for each sample; a second run computes nothing."""
    from movekd_hf.cli import main
    from movekd_hf.distill.cache import TeacherCache

    anyres_cache, argv = anyres_cache
    _, processor = onevision
    records = by_id(tokenise(folders[2], processor))
    collator = MoVEKDAnyResCollator(processor, processor.tokenizer.pad_token_id)
    rows = {sid: int(collator([record])["images_per_sample"][0]) for sid, record in records.items()}
    assert rows == {"astronaut": 5, "chelsea": 5, "coffee": 5, "wide": 3, "pair": 2, "text": 0}
    expected = {(sid, row) for sid, count in rows.items() for row in range(count)}
    caches = [TeacherCache(directory) for directory in sorted(anyres_cache.iterdir())]
    assert sorted(cache.slug for cache in caches) == ["convnext", "sam", "siglip"]
    for cache in caches:
        assert set(cache.index) == expected, cache.slug
        assert cache.meta["key"]["anyres"] == {"image_grid_pinpoints": PINPOINTS, "tile_size": TILE}
    capsys.readouterr()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert {slug: (entry["computed"], entry["cached"]) for slug, entry in report.items()} == dict.fromkeys(
        ["siglip", "convnext", "sam"], (0, len(expected))
    )


def test_training_from_the_tile_cache_gives_the_online_loss(folders, anyres_cache, tmp_path):
    """The same first batch (all six samples: 20 tower rows) through a run with online teachers and one reading the
    cache: KD loss, per-tile per-teacher losses and teacher weights agree up to the cache's float16 tokens."""
    from _train_fixtures import build

    _, init, data = folders
    anyres_cache, _ = anyres_cache
    config = onevision_config(init, data, tmp_path)
    online = build(config, tmp_path / "online")
    cached = build(config, tmp_path / "cached", "--teacher_source", "cached", "--teacher_cache_dir", str(anyres_cache))
    assert type(cached.teacher_source).__name__ == "CachedTeachers"
    losses = []
    for trainer in (online, cached):
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()  # no dropout: both runs see identical student tokens
        with torch.no_grad():
            loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        losses.append({"loss": loss, "kd": out["kd"]["loss"], "per_teacher": out["kd"]["per_teacher_loss"],
                       "weights": out["kd"]["teacher_weights"]})  # fmt: skip
    expected, got = losses
    assert expected["per_teacher"].shape == (20, 3) and expected["kd"] > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_a_tile_cache_for_other_pinpoints_or_a_float_square_is_refused_in_one_line(folders, onevision, anyres_cache,
                                                                                    tmp_path, capsys):  # fmt: skip
    """Another pinpoint set is another key (the error names `anyres`); `teacher_image_size` (one float square per
    image) cannot key tiles, and `cache-teachers --model` says so in one line, naming the field."""
    from dataclasses import replace

    from movekd_hf.cli import main
    from movekd_hf.distill.cache import find_cache_dir
    from movekd_hf.training.teacher_source import run_teacher_specs, teacher_cache_settings

    model, processor = onevision
    anyres_cache, _ = anyres_cache
    specs = run_teacher_specs("tiny", False, {})
    settings = teacher_cache_settings(model.config, processor.image_processor, specs, "native", "pad")
    spec = next(spec for spec in specs if spec.slug == "sam")
    cache = next(anyres_cache.glob("sam-*"))
    assert settings.tile_size == TILE and settings.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    assert find_cache_dir(anyres_cache, spec, settings) == cache
    with pytest.raises(ValueError, match="anyres"):
        find_cache_dir(anyres_cache, spec, replace(settings, image_grid_pinpoints=((32, 32), (32, 64))))

    _, init, data = folders
    argv = ["cache-teachers", "--model", str(init), "--teacher-set", "tiny", "--random-weights", "--data-path",
            str(data / "data.json"), "--image-folder", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--teacher-image-size", "64"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("movekd-hf ")]
    assert line.startswith("movekd-hf cache-teachers: error: ")
    assert "field 'teacher_image_size'" in line and "AnyRes tile" in line
    assert not (tmp_path / "cache").exists()


def test_the_size_estimate_counts_tiles_for_a_onevision_student(folders, anyres_cache, capsys):
    """`cache-teachers --estimate --model` shapes the teachers on the meta device (no weights loaded): its bytes per
    tile are what the written cache stores per row, and the total counts the most tiles an image gives (5 here)."""
    from movekd_hf.cli import main
    from movekd_hf.distill.cache import TeacherCache

    _, init, _ = folders
    anyres_cache, _ = anyres_cache
    capsys.readouterr()
    argv = ["cache-teachers", "--estimate", "--model", str(init), "--teacher-set", "tiny", "--random-weights",
            "--grid", "native", "--num-images", "1000"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    written = sum(TeacherCache(directory).meta["bytes_per_image"] for directory in anyres_cache.iterdir())
    assert f"| all | | | {written:,} " in out and "bytes per tile" in out
    assert f"total for 1,000 images: {written * 5 * 1000:,} bytes" in out
