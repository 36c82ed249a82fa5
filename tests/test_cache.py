"""Teacher-feature cache: written once over toy LLaVA data with tiny real teachers, resumed, read back by sample id,
and giving the distiller the loss the online teachers give (up to float16 rounding); stale caches are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _distill_fixtures import NUM_STUDENT_TOKENS, STUDENT_DIM, STUDENT_GRID, TEACHER_SIZE, tiny_spec
from _distill_fixtures import cache_settings as settings

from movekd_hf.distill import KDLossConfig, MoVEKDDistiller, TeacherShape, build_teacher
from movekd_hf.distill.cache import CachedTeachers, cache_key, find_cache_dir
from movekd_hf.distill.cache_codec import random_orthogonal
from movekd_hf.distill.cache_writer import TeacherInputs, cache_teacher_features, dataset_items, teacher_view
from movekd_hf.training.data import load_source
from movekd_hf.training.toy_data import make_toy_llava_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    paths = make_toy_llava_dataset(folder, num_samples=6, seed=3)
    return dataset_items(load_source(paths.pretrain_json, paths.image_folder))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return [build_teacher(tiny_spec(slug)) for slug in ("clip", "sam", "eva")]


def distiller(online: dict, adapter: str) -> MoVEKDDistiller:
    shapes = {slug: TeacherShape(out.tokens.shape[-1], out.tokens.shape[1]) for slug, out in online.items()}
    torch.manual_seed(1)
    return MoVEKDDistiller(shapes, STUDENT_DIM, NUM_STUDENT_TOKENS, KDLossConfig(adapter=adapter)).eval()


@pytest.mark.parametrize(("grid", "adapter"), [("student", "resample"), ("native", "token_mix")])
def test_write_resume_and_same_loss_as_online(tmp_path, toy, teachers, grid, adapter):
    cache_settings = settings(grid=grid)
    first = cache_teacher_features(
        tmp_path, teachers, cache_settings, toy[:4], batch_size=3, shard_size=2, progress=False
    )
    assert {r["computed"] for r in first.values()} == {4}
    # An interrupted shard (never renamed) is ignored; the rest of the data is computed once, then nothing.
    (find_cache_dir(tmp_path, teachers[1].spec, cache_settings) / "shard-00009.arrow.partial").write_bytes(b"cut")
    second = cache_teacher_features(
        tmp_path, teachers, cache_settings, toy, batch_size=3, shard_size=2, progress=False
    )
    assert {r["computed"] for r in second.values()} == {len(toy) - 4}
    third = cache_teacher_features(tmp_path, teachers, cache_settings, toy, batch_size=3, shard_size=2, progress=False)
    assert {r["computed"] for r in third.values()} == {0} and {r["cached"] for r in third.values()} == {len(toy)}

    chosen = [toy[5], toy[0], toy[2]]  # out of storage order, across shards
    online = {t.slug: TeacherInputs(chosen, [t], cache_settings).run(t) for t in teachers}
    kd = distiller(online, adapter)
    source = CachedTeachers(tmp_path, [t.spec for t in teachers], cache_settings, distiller=kd)
    cached = source({"sample_ids": [item.sample_id for item in chosen], "images_per_sample": torch.tensor([1, 1, 1])})
    assert cached["clip"].tokens.dtype == torch.float32 and cached["clip"].cls_attention.shape == (3, 16)
    expected_tokens = NUM_STUDENT_TOKENS if grid == "student" else 64
    assert cached["sam"].tokens.shape == (3, expected_tokens, 20)
    student = torch.randn(3, NUM_STUDENT_TOKENS, STUDENT_DIM, generator=torch.Generator().manual_seed(2))
    want, got = kd(student, STUDENT_GRID, online), kd(student, STUDENT_GRID, cached)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got["per_teacher_loss"], want["per_teacher_loss"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got["teacher_weights"], want["teacher_weights"], rtol=1e-3, atol=1e-5)


def test_teacher_view_matches_the_collator(toy):
    from movekd_hf.modeling.llava_conventions import mean_colour
    from movekd_hf.models import build_image_processor
    from movekd_hf.training.collator import MoVEKDDataCollator

    processor = build_image_processor(32)
    for aspect in ("pad", "resize"):
        collator = MoVEKDDataCollator(processor, pad_token_id=0, image_aspect=aspect, teacher_image_size=TEACHER_SIZE)
        features = [
            {"id": it.sample_id, "row": i, "input_ids": [1], "labels": [1], "images": [it.image]}
            for i, it in enumerate(toy[:3])
        ]
        view = teacher_view(toy[:3], settings(image_aspect=aspect, background=mean_colour(processor)))
        assert torch.equal(view, collator(features)["teacher_images"])


def test_a_changed_teacher_setting_is_refused_by_name(tmp_path, toy, teachers):
    cache_settings = settings()
    cache_teacher_features(tmp_path, teachers, cache_settings, toy[:2], progress=False)
    specs = [t.spec for t in teachers]
    changed = [replace(s, image_size=48) if s.slug == "eva" else s for s in specs]
    with pytest.raises(ValueError, match=r"teacher 'eva'.*image_size: cache has 64, expected 48"):
        CachedTeachers(tmp_path, changed, cache_settings)
    with pytest.raises(ValueError, match=r"teacher 'clip'.*teacher_image_size"):
        CachedTeachers(tmp_path, specs, settings(teacher_image_size=40))
    source = CachedTeachers(tmp_path, specs, cache_settings)
    with pytest.raises(ValueError, match=r"teacher 'clip'.*no features.*'not-a-sample'"):
        source({"sample_ids": ["not-a-sample"]})


def test_student_grid_cache_is_refused_for_adapters_that_need_teacher_tokens(tmp_path, toy, teachers):
    cache_settings = settings(grid="student")
    cache_teacher_features(tmp_path, teachers, cache_settings, toy[:2], progress=False)
    online = {t.slug: TeacherInputs(toy[:1], [t], cache_settings).run(t) for t in teachers}
    with pytest.raises(ValueError, match=r"teacher 'sam'.*'token_mix' adapter needs the teacher's own 64 tokens"):
        CachedTeachers(tmp_path, [t.spec for t in teachers], cache_settings, distiller=distiller(online, "token_mix"))


def test_key_hashes_what_changes_the_stored_values():
    spec = tiny_spec("sam")
    base = cache_key(spec, settings())
    assert cache_key(spec, settings()) == base
    assert cache_key(replace(spec, image_size=48), settings())["image_size"] == 48
    for changed in (settings(grid="native"), settings(compress={"sam": 8}), settings(student_grid=(5, 5))):
        assert cache_key(spec, changed) != base
    # A native-grid cache does not depend on the student.
    assert cache_key(spec, settings(grid="native", student_grid=(5, 5))) == cache_key(spec, settings(grid="native"))


def test_compressed_cache_reads_back_the_projected_features(tmp_path, toy, teachers):
    sam = teachers[1]
    cache_settings = settings(grid="native", compress={"sam": 8})
    report = cache_teacher_features(tmp_path, [sam], cache_settings, toy[:3], progress=False)
    assert report["sam"]["bytes_per_image"] == 64 * 8 * 2 + 32 and 0 < report["sam"]["energy_kept_fraction"] < 1
    projection = random_orthogonal(20, 8, seed=0)
    torch.testing.assert_close(projection.t() @ projection, torch.eye(8), atol=1e-6, rtol=0)
    cached = CachedTeachers(tmp_path, [sam.spec], cache_settings)({"sample_ids": [toy[1].sample_id]})["sam"]
    tokens = TeacherInputs(toy[1:2], [sam], cache_settings).run(sam).tokens
    assert cached.tokens.shape == tokens.shape  # decompressed back to the teacher's 20 channels
    torch.testing.assert_close(cached.tokens, tokens @ projection @ projection.t(), rtol=2e-3, atol=2e-3)


def test_cli_estimates_the_paper_scale_and_runs_resumably(tmp_path, capsys):
    import json
    from dataclasses import asdict

    from movekd_hf.cli import main

    assert main(["cache-teachers", "--estimate", "--teacher-set", "v1.1", "--num-images", "558000"]) == 0
    table = capsys.readouterr().out
    # CLIP-L/336 anchor: 576 x 1024 float16 tokens + 1024 + 576 float32 + row overhead, on its own 24 x 24 grid.
    assert "| clip | 576 x 1024 (24x24) | 576 x 1024 | 1,186,080" in table
    assert (
        "| eva | 576 x 1024 (24x24) | 4096 x 1024 |" in table and "| sam | 576 x 256 (24x24) | 4096 x 256 |" in table
    )
    assert "total for 558,000 images: 3,459,421,440,000 bytes (3.5 TB)" in table

    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=3, seed=1)
    specs = tmp_path / "teachers.json"
    specs.write_text(json.dumps([asdict(tiny_spec("clip")), asdict(tiny_spec("sam"))]))
    argv = ["cache-teachers", "--data-path", paths.pretrain_json, "--image-folder", paths.image_folder]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--teachers-json", str(specs), "--student-grid", "4"]
    argv += ["--no-progress", "--batch-size", "2"]
    for expected in (3, 0):
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert {slug: r["computed"] for slug, r in report.items()} == {"clip": expected, "sam": expected}


def test_cli_pca_int8_estimate_fits_under_a_terabyte_and_exports_a_repository(tmp_path, capsys):
    import json
    from dataclasses import asdict

    from movekd_hf.cli import main

    compress = ["--compress", "eva=256", "--compress", "convnext=256", "--compression", "pca", "--token-dtype", "int8"]
    assert main(["cache-teachers", "--estimate", "--teacher-set", "v1.1", "--num-images", "558128", *compress]) == 0
    table = capsys.readouterr().out
    # int8 [576 x 256] + a float32 scale per token + row overhead; the anchor keeps 1024 channels in int8.
    assert (
        "| eva | 576 x 256 (24x24) | 4096 x 1024 | 149,792" in table
        and "| clip | 576 x 1024 (24x24) | 576 x 1024 | 598,560" in table
    )
    assert "total for 558,128 images: 584,882,423,808 bytes (584.9 GB)" in table

    paths = make_toy_llava_dataset(tmp_path / "toy", num_samples=3, seed=1)
    specs = tmp_path / "teachers.json"
    specs.write_text(json.dumps([asdict(tiny_spec("clip")), asdict(tiny_spec("sam"))]))
    argv = ["cache-teachers", "--data-path", paths.pretrain_json, "--image-folder", paths.image_folder,
            "--cache-dir", str(tmp_path / "cache"), "--teachers-json", str(specs), "--student-grid", "4",
            "--no-progress", "--compress", "sam=5", "--compression", "pca", "--calibration-images", "2",
            "--token-dtype", "float8_e4m3fn", "--export-repo", str(tmp_path / "repo")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sam"]["bytes_per_image"] == 16 * 5 + 4 * 16 + 32 and report["export_repo"]["rows"] == 3
    assert (tmp_path / "repo" / "teachers" / "sam" / "projection.safetensors").exists()


def test_a_sample_id_keys_one_image_list():
    """A repeated id with the same images is one item; with other images, or its image among others (an AnyRes
    student sees tiles of an image alone in its sample, one square otherwise), it cannot key the cache."""
    a, b = {"path": "a.png", "bytes": None}, {"path": "b.png", "bytes": None}
    items = dataset_items([{"id": "x", "row": 0, "images": [a]}, {"id": "x", "row": 3, "images": [a]}])
    assert [(item.sample_id, item.image_index, item.alone) for item in items] == [("x", 0, True)]
    pair = dataset_items([{"id": "y", "row": 0, "images": [a, b]}])
    assert [(item.image_index, item.alone) for item in pair] == [(0, False), (1, False)]
    for other in ([b], [a, b]):
        with pytest.raises(
            ValueError, match=r"sample id 'x' names different images \(or image counts\) in 'x' \(row 0\)"
        ):
            dataset_items([{"id": "x", "row": 0, "images": [a]}, {"id": "x", "row": 5, "images": other}])
