"""The teacher-feature cache stores an attention-pooling head's outputs (`pooled` [B, C], `pool_attention` [B, N]),
the anchor of a SigLIP student, as it stores a CLIP anchor's CLS and CLS row: exactly (float32, never compressed),
on the anchor's own grid, in the repository export too; caches written before these columns keep their key and
still read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _distill_fixtures import NUM_STUDENT_TOKENS, STUDENT_DIM, tiny_spec
from _distill_fixtures import cache_settings as settings

from movekd_hf.distill import KDLossConfig, MoVEKDDistiller, TeacherShape, build_teacher
from movekd_hf.distill.cache import (
    META_FILE,
    CachedTeachers,
    CacheSettings,
    cache_key,
    estimate_cache_size,
    find_cache_dir,
    key_hash,
)
from movekd_hf.distill.cache_sources import stream_cached_teachers
from movekd_hf.distill.cache_writer import TeacherInputs, cache_teacher_features, dataset_items, export_cache_repo
from movekd_hf.distill.teachers import TeacherSpec
from movekd_hf.training.data import load_source
from movekd_hf.training.toy_data import make_toy_llava_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    paths = make_toy_llava_dataset(tmp_path_factory.mktemp("toy"), num_samples=5, seed=4)
    return dataset_items(load_source(paths.pretrain_json, paths.image_folder))


@pytest.fixture(scope="module")
def siglip():
    """A tiny SigLIP tower with its MAP head (36 wide, 4 x 4 grid at 32 px), read as an anchor reads it."""
    torch.manual_seed(0)
    return build_teacher(tiny_spec("siglip", pool_attention=True))


# ---------------------------------------------------------------------------------------------------- the key

# The paper's CLIP-L/336 anchor as a run builds it (the student's own tower), and SAM, written field by field.
CLIP_ANCHOR = TeacherSpec(slug="clip", backend="transformers", model_id="student-initial-vision-tower",
                          model_class="CLIPVisionModel", image_size=336, num_prefix_tokens=1, has_cls=True,
                          cls_attention=True, pretrained=False, config={})  # fmt: skip
SAM = TeacherSpec(slug="sam", backend="transformers", model_id="facebook/sam-vit-large", model_class="SamVisionModel",
                  image_size=1024, resize_mode="pad", output="feature_map")  # fmt: skip
# Caches written before per-teacher views ran every teacher on one float square: `teacher_inputs="square"`.
OLD = CacheSettings(teacher_inputs="square")
PCA_INT8 = CacheSettings(grid="native", compress={"clip": 256}, compression="pca", token_dtype="int8",
                         teacher_inputs="square")  # fmt: skip
# sha256 of these keys, computed with the code of git HEAD b56cae3 (before the pooled columns and views existed).
HASHES_BEFORE_POOLED = {
    ("clip", "default"): "cf198b695501339ab0b0f4cf8b7bc7ec7fcea5df141c3ab724abb114fa233f70",
    ("clip", "pca_int8"): "cbea366ea96d7d1fc4ed0f1f625a77be4510943c89944a52639da5416a102cd6",
    ("sam", "default"): "db1ed684c551a9c601e26edb1510958d6194a4b2314b4ad3840a94afcafcf5c1",
}


def test_existing_caches_keep_their_key_and_a_pooling_head_or_views_change_it():
    for (slug, name), expected in HASHES_BEFORE_POOLED.items():
        spec = {"clip": CLIP_ANCHOR, "sam": SAM}[slug]
        key = cache_key(spec, {"default": OLD, "pca_int8": PCA_INT8}[name])
        assert "pool_attention" not in key and key_hash(key) == expected, (slug, name)
        # Per-teacher views (the default now, as online training) are other pixels: another key.
        assert key_hash(cache_key(spec, replace(OLD, teacher_inputs="views"))) != expected
    head = tiny_spec("siglip", pool_attention=True)
    assert cache_key(head, CacheSettings())["pool_attention"] is True
    assert cache_key(head, CacheSettings()) != cache_key(replace(head, pool_attention=False), CacheSettings())


# ----------------------------------------------------------------------------------------------- round trip


def test_pooled_and_pool_attention_round_trip_exactly_beside_compressed_tokens(tmp_path, toy, siglip):
    """A student-grid, PCA + int8 cache of the anchor: its tokens stay on the anchor's own 4 x 4 grid (the probe row
    weights them position by position) and are compressed; pooled and pool_attention read back as float32, from
    the shards and from the exported repository. Tolerance 1e-5 relative: the teacher batched differently when
    writing (float32 jitter ~1e-7); float16 storage would be off by ~5e-4."""
    cache_settings = settings(student_grid=(3, 3), compress={"siglip": 8}, compression="pca", token_dtype="int8",
                              calibration_images=4)  # fmt: skip
    report = cache_teacher_features(
        tmp_path, [siglip], cache_settings, toy, batch_size=2, shard_size=2, progress=False
    )
    meta = json.loads((find_cache_dir(tmp_path, siglip.spec, cache_settings) / META_FILE).read_text())
    shape = meta["shape"]
    assert (shape["tokens"], shape["channels"], shape["pooled"], shape["pool_attention"]) == (16, 8, 36, 16)
    assert (shape["cls"], shape["cls_attention"]) == (0, 0)
    # int8 tokens + a float32 scale per token + the two float32 vectors + row overhead.
    assert report["siglip"]["bytes_per_image"] == 16 * 8 + 4 * (16 + 36 + 16) + 32
    estimate = estimate_cache_size([siglip.spec], cache_settings, 1)  # the meta-device pass sees the head too
    assert estimate["bytes_per_image"] == report["siglip"]["bytes_per_image"]

    chosen = [toy[4], toy[0], toy[2]]  # out of storage order, across shards
    online = TeacherInputs(chosen, [siglip], cache_settings).run(siglip)
    ids = {"sample_ids": [item.sample_id for item in chosen]}
    repo = tmp_path / "repo"
    export_cache_repo(tmp_path, [siglip.spec], cache_settings, repo, rows_per_shard=2)
    sources = {
        "shards": CachedTeachers(tmp_path, [siglip.spec], cache_settings),
        "repository": CachedTeachers.from_repo(repo, [siglip.spec], cache_settings, cache_dir=str(tmp_path / "hf")),
    }
    exact = {"rtol": 1e-5, "atol": 1e-6}
    assert not torch.allclose(online.pooled.half().float(), online.pooled, **exact)  # the tolerance tells float16
    for name, source in sources.items():
        cached = source(ids)["siglip"]
        assert cached.tokens.shape == (3, 16, 36) and cached.grid == (4, 4), name
        assert not torch.allclose(cached.tokens, online.tokens, rtol=1e-2, atol=1e-2), name  # PCA + int8 tokens
        torch.testing.assert_close(cached.pooled, online.pooled, **exact)
        torch.testing.assert_close(cached.pool_attention, online.pool_attention, **exact)
        assert cached.cls is None and cached.cls_attention is None, name


def test_two_cache_repositories_in_folders_of_one_name_read_their_own_rows(tmp_path, toy, siglip):
    """`datasets` keys a folder it loads by the folder's name and README: two exports both called `repo`, read
    through one datasets cache, would share rows (and a stream the first one's column types)."""
    cache_settings = settings()
    hf_cache = str(tmp_path / "hf")
    for name, items in (("first", toy[:2]), ("second", toy[2:])):
        cache_teacher_features(tmp_path / name, [siglip], cache_settings, items, progress=False)
        export_cache_repo(tmp_path / name, [siglip.spec], cache_settings, tmp_path / name / "repo")
        source = CachedTeachers.from_repo(tmp_path / name / "repo", [siglip.spec], cache_settings, cache_dir=hf_cache)
        expected = {(item.sample_id, 0) for item in items}
        assert set(source.caches["siglip"].index) == expected, name
        streamed = stream_cached_teachers(tmp_path / name / "repo", [siglip.spec], cache_settings, cache_dir=hf_cache)
        assert {key for keys, _ in streamed for key in keys} == expected, name


def test_a_cache_written_before_the_pooled_columns_still_reads(tmp_path, toy):
    """cache.json shapes of older caches have no `pooled` / `pool_attention` entries: they read as absent."""
    torch.manual_seed(0)
    clip = build_teacher(tiny_spec("clip"))
    cache_settings = settings()
    cache_teacher_features(tmp_path, [clip], cache_settings, toy[:2], progress=False)
    path = find_cache_dir(tmp_path, clip.spec, cache_settings) / META_FILE
    meta = json.loads(path.read_text())
    assert meta["shape"].pop("pooled") == 0 and meta["shape"].pop("pool_attention") == 0
    path.write_text(json.dumps(meta))
    cached = CachedTeachers(tmp_path, [clip.spec], cache_settings)({"sample_ids": [toy[1].sample_id]})["clip"]
    online = TeacherInputs(toy[1:2], [clip], cache_settings).run(clip)
    assert cached.pooled is None and cached.pool_attention is None
    torch.testing.assert_close(cached.cls, online.cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.cls_attention, online.cls_attention, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- feature standardisation


@pytest.mark.parametrize("standardization", ["running", "phi_s"])
def test_a_student_grid_cache_is_refused_for_feature_standardisation(tmp_path, toy, standardization):
    """Running statistics and PHI-S are both fitted on the teacher's own tokens; the message names the option."""
    torch.manual_seed(0)
    sam = build_teacher(tiny_spec("sam"))
    cache_settings = settings(grid="student")
    cache_teacher_features(tmp_path, [sam], cache_settings, toy[:1], progress=False)
    config = KDLossConfig(adapter="resample", feature_standardization=standardization)
    kd = MoVEKDDistiller({"sam": TeacherShape(20, 64)}, STUDENT_DIM, NUM_STUDENT_TOKENS, config)
    with pytest.raises(ValueError, match=rf"teacher 'sam': feature standardisation \(feature_standardization="
                       rf"'{standardization}'\) fits its statistics.*--grid native"):  # fmt: skip
        CachedTeachers(tmp_path, [sam.spec], cache_settings, distiller=kd)
