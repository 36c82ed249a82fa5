"""The demo's linear probes (movekd_hf/demo/probes.py) and its statistics (report.py) on constructed cases with
known answers: a feature that carries the label is probed near 100 %, noise at chance, a planted difference
between arms is found and equal arms give intervals that cover zero."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from movekd_hf.demo import probes, report, world


def _scenes(count: int, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(count)]


def _maps(scenes: list[world.Scene], carry: str | None, seed: int, grid: int = 4, dim: int = 16) -> torch.Tensor:
    """Noise token maps [N, dim, grid, grid]; with `carry`, each object's cell also holds its class one-hot x 3."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(len(scenes), dim, grid, grid, generator=generator)
    if carry is not None:
        items = probes.object_items(scenes)
        rows = np.minimum((items.centre[:, 1] * grid).astype(int), grid - 1)
        columns = np.minimum((items.centre[:, 0] * grid).astype(int), grid - 1)
        for scene, row, column, label in zip(items.scene, rows, columns, items.labels[carry]):
            maps[scene, label, row, column] += 3.0
    return maps


def test_items_follow_the_drawing():
    scene = world.Scene((world.WorldObject("square", "blue", "large", (2, 0), "vertical"),), "white", "plain", 5)
    items = probes.object_items([scene, scene])
    assert items.scene.tolist() == [0, 1] and items.num_scenes == 2
    assert items.labels["stripes"].tolist() == [world.STRIPES.index("vertical")] * 2
    assert items.labels["colour"].tolist() == [list(world.COLOURS).index("blue")] * 2
    x, y = items.centre[0]
    assert 0 <= x < 1 / 3 and 2 / 3 <= y < 1  # cell (row 2, column 0)
    token_map = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    picked = probes.tokens_at(token_map, items)  # the token of the cell holding the centre
    row, column = int(y * 4), int(x * 4)
    assert picked[:, 0].tolist() == [token_map[0, 0, row, column].item(), token_map[1, 0, row, column].item()]


def test_a_feature_carrying_the_label_is_probed_near_perfectly_and_noise_at_chance():
    train, test = _scenes(300, 1), _scenes(200, 2)
    train_items, test_items = probes.object_items(train), probes.object_items(test)
    carried = probes.probe_scenes(_maps(train, "stripes", 3), train_items, _maps(test, "stripes", 4), test_items)
    assert carried["stripes"].mean() > 0.97
    assert carried["colour"].mean() < 0.40  # colour is not in these maps: chance is 20 %
    noise = probes.probe_scenes(_maps(train, None, 5), train_items, _maps(test, None, 6), test_items)
    assert 0.40 < noise["stripes"].mean() < 0.60  # two classes, ~400 held-out objects
    assert len(noise["stripes"]) == len(test)


def test_per_scene_is_the_share_of_each_scene_right():
    correct = np.array([1, 0, 1, 1, 0, 0])
    scene = np.array([0, 0, 1, 2, 2, 2])
    assert probes.per_scene(correct, scene, 3).tolist() == [0.5, 1.0, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="without objects"):
        probes.per_scene(correct, scene, 4)


def test_student_token_map_is_what_the_projector_reads():
    from movekd_hf.models import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    size = model.config.vision_config.image_size
    pixels = torch.rand(2, 3, size, size)
    maps = probes.student_token_map(model, pixels)  # [2, D, h, w]
    prompt = processor.tokenizer.decode(processor.tokenizer("x")["input_ids"])
    inputs = processor(text=["<image>\n" + prompt] * 2, images=[np.zeros((size, size, 3), np.uint8)] * 2,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        records = model(**{**inputs, "pixel_values": pixels}).vision_hidden_states  # [2, h*w, D]
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), records)


def test_planted_probe_difference_is_found_and_equal_arms_are_not_resolved():
    rng = np.random.default_rng(0)
    base = [{a: (rng.random(300) < 0.5).astype(float) for a in probes.PROBE_ATTRIBUTES} for _ in range(3)]
    lifted = [{**seed, "stripes": np.maximum(seed["stripes"], rng.random(300) < 0.4)} for seed in base]  # ~+20
    same = [{a: v.copy() for a, v in seed.items()} for seed in base]
    stats = report.probe_statistics({"llava": base, "kd": lifted, "same": same}, "llava")
    planted = stats["kd"]["stripes"]
    assert planted["mean"].resolved and 12 < planted["mean"].estimate < 28
    assert all(p.resolved and p.estimate > 0 for p in planted["paired"])
    assert stats["kd"]["colour"]["mean"].estimate == 0.0
    for attr in probes.PROBE_ATTRIBUTES:
        assert not stats["same"][attr]["paired"][0].resolved
    lines = report.probe_lines(stats, {"llava": "none", "kd": "KD", "same": "same"})
    assert "3/0 of 3" in lines[3]  # every seed's bootstrap interval above zero


def test_gap_check_says_so_when_there_is_no_gap():
    rng = np.random.default_rng(1)
    chance = {a: (rng.random(400) < 0.5).astype(float) for a in probes.PROBE_ATTRIBUTES}
    knows = {**chance, "stripes": (rng.random(400) < 0.9).astype(float)}
    present = report.gap_check({"student": chance, "teacher": knows}, "student", "teacher")
    assert present["present"] and present["gap"].estimate > 30
    absent = report.gap_check({"student": knows, "teacher": knows}, "student", "teacher")
    assert not absent["present"]
    assert any("NO GAP" in line for line in report.gap_lines(absent, "student", "teacher"))
    stats = report.probe_statistics({"llava": [chance, chance], "kd": [knows, knows]}, "llava")
    verdict = report.verdict(absent, stats, {}, {"llava": "none", "kd": "KD"}, "llava")
    assert verdict[-1].startswith("Verdict: the gap check failed")
    moved = report.verdict(present, stats, {}, {"llava": "none", "kd": "KD"}, "llava")
    assert "moved the stripes attribute" in moved[-1]  # two equal seeds: a zero-width interval above zero


def test_loss_accounting_splits_the_decrease():
    account = report.loss_accounting(start=1.0, initial_student=0.5, final=0.4)
    assert account["decrease"] == pytest.approx(0.6) and account["student_part"] == pytest.approx(0.1)
    assert account["student_share"] == pytest.approx(0.1 / 0.6)
    assert report.loss_accounting(0.3, 0.5, 0.4)["student_share"] is None
