"""Compressed teacher caches: a PCA basis fitted on a calibration pass, int8 / float8 tokens with per-token scales,
the basis's hash in the key, and the cache as a `datasets` repository read back map-style and streamed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _distill_fixtures import cache_settings as settings
from _distill_fixtures import tiny_spec

from movekd_hf.distill import build_teacher
from movekd_hf.distill.cache import (
    CachedTeachers,
    StoredShape,
    TeacherCache,
    cache_key,
    find_cache_dir,
)
from movekd_hf.distill.cache_codec import PROJECTION_FILE, TokenCodec, pca_basis, random_orthogonal
from movekd_hf.distill.cache_sources import stream_cached_teachers
from movekd_hf.distill.cache_writer import TeacherInputs, cache_teacher_features, dataset_items, export_cache_repo
from movekd_hf.training.data import load_source
from movekd_hf.training.toy_data import make_toy_llava_dataset


def low_rank_tokens(rank: int, channels: int = 40, count: int = 600, noise: float = 1e-3) -> torch.Tensor:
    """[1, count, channels]: an offset plus `rank` directions with decaying weights plus a little isotropic noise."""
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(channels, rank, generator=g, dtype=torch.float64))[0]  # [C, r]
    weights = torch.linspace(3.0, 0.5, rank, dtype=torch.float64)
    coords = torch.randn(count, rank, generator=g, dtype=torch.float64) * weights
    offset = torch.randn(channels, generator=g, dtype=torch.float64)
    return (offset + coords @ directions.t() + noise * torch.randn(count, channels, generator=g)).unsqueeze(0)


def fit(tokens: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    flat = tokens.flatten(0, 1).double()
    return pca_basis(flat.sum(0), flat.t() @ flat, flat.shape[0], rank)


def relative_mse(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).square().sum() / want.double().square().sum())


def test_pca_basis_is_the_principal_subspace_and_keeps_a_low_rank_signal():
    tokens = low_rank_tokens(rank=6)
    basis = fit(tokens, 6)
    # Independent re-computation: the top right singular vectors of the centred data span the same subspace.
    centred = tokens[0] - tokens[0].mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:6].t()  # [C, 6]
    torch.testing.assert_close(basis["projection"].double() @ basis["projection"].double().t(), top @ top.t(),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(basis["scale"].double(), (centred @ top).std(0), rtol=1e-4, atol=0)
    pca = TokenCodec("float16", **basis)
    random = TokenCodec("float16", random_orthogonal(40, 6, seed=0))
    decode = lambda codec, rows: codec.decode(  # noqa: E731
        torch.from_numpy(rows["tokens"]).view(1, 600, 6), None
    )
    assert relative_mse(decode(pca, pca.encode(tokens.float())), tokens) < 1e-5  # the signal is rank 6 + offset
    assert relative_mse(decode(random, random.encode(tokens.float())), tokens) > 0.3  # a random 6 of 40 is not
    # Same statistics, same bytes (the sign of every direction is fixed).
    assert all(torch.equal(basis[name], fit(tokens, 6)[name]) for name in basis)


@pytest.mark.parametrize(("dtype", "bound"), [("int8", 1e-4), ("float8_e4m3fn", 2e-3)])
def test_quantised_tokens_round_trip_within_their_format(dtype, bound):
    tokens = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 5, 24)
    codec = TokenCodec(dtype)
    rows = codec.encode(tokens)
    assert rows["tokens"].dtype.itemsize == 1 and rows["token_scales"].shape == (3, 50)
    got = codec.decode(torch.from_numpy(rows["tokens"]).view(3, 50, 24), torch.from_numpy(rows["token_scales"]))
    if dtype == "int8":  # absmax scaling: every value within half a step of its token's scale
        steps = torch.from_numpy(rows["token_scales"]).unsqueeze(-1)
        assert bool(((got - tokens).abs() <= 0.5 * steps + 1e-7).all())
    assert relative_mse(got, tokens) < bound
    # Bytes per image: one byte per value plus a float32 scale per token.
    shape = StoredShape(50, 24, (5, 10), 50, 24, 0, 0, token_dtype=dtype)
    assert shape.bytes_per_image == 50 * 24 + 4 * 50 + 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    paths = make_toy_llava_dataset(tmp_path_factory.mktemp("toy"), num_samples=6, seed=3)
    return dataset_items(load_source(paths.pretrain_json, paths.image_folder))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return [build_teacher(tiny_spec(slug)) for slug in ("clip", "sam")]


PCA_INT8 = dict(grid="native", compress={"sam": 6}, compression="pca", calibration_images=4, token_dtype="int8")


def test_pca_int8_cache_reads_back_the_reconstruction_and_keys_its_basis(tmp_path, toy, teachers):
    cache_settings = settings(**PCA_INT8)
    report = cache_teacher_features(tmp_path, teachers, cache_settings, toy, batch_size=4, shard_size=4,
                                    progress=False)  # fmt: skip
    sam, clip = teachers[1], teachers[0]
    assert report["sam"]["bytes_per_image"] == 64 * 6 + 4 * 64 + 32  # int8 [64 tokens x 6] + scales + row
    assert report["clip"]["bytes_per_image"] == 16 * 32 + 4 * 16 + 4 * (32 + 16) + 32
    assert (
        0 < report["sam"]["reconstruction_relative_mse"] < 1 and report["clip"]["reconstruction_relative_mse"] < 1e-3
    )
    directory = find_cache_dir(tmp_path, sam.spec, cache_settings)
    meta = json.loads((directory / "cache.json").read_text())
    assert meta["key"]["compression_kind"] == "pca" and len(meta["key"]["basis_sha256"]) == 64

    chosen = [toy[4], toy[1]]
    source = CachedTeachers(tmp_path, [t.spec for t in teachers], cache_settings)
    cached = source({"sample_ids": [item.sample_id for item in chosen]})
    online = TeacherInputs(chosen, [sam], cache_settings).run(sam).tokens  # [2, 64, 20]
    # Independent re-computation from the stored basis: mu + V V^T (t - mu), up to int8 rounding.
    from safetensors.torch import load_file

    basis = load_file(str(directory / PROJECTION_FILE))
    mean, v = basis["mean"], basis["projection"]
    expected = mean + (online - mean) @ v @ v.t()
    assert cached["sam"].tokens.shape == online.shape
    assert relative_mse(cached["sam"].tokens, expected) < 1e-3
    assert relative_mse(cached["clip"].tokens, TeacherInputs(chosen, [clip], cache_settings).run(clip).tokens) < 1e-4

    # Resuming reuses the basis (no second calibration, same hash); a replaced basis never reads the old rows.
    again = cache_teacher_features(tmp_path, teachers, cache_settings, toy, progress=False)
    assert again["sam"]["computed"] == 0
    assert json.loads((directory / "cache.json").read_text())["key"]["basis_sha256"] == meta["key"]["basis_sha256"]
    from safetensors.torch import save_file

    save_file({**basis, "mean": basis["mean"] + 1}, str(directory / PROJECTION_FILE))
    with pytest.raises(ValueError, match="not the basis its rows were written with"):
        TeacherCache(directory)


def test_key_holds_compression_kind_rank_and_dtype_and_old_keys_are_unchanged():
    spec = tiny_spec("sam")
    base = settings(compress={"sam": 8})
    keys = [cache_key(spec, s) for s in (base, replace(base, compression="pca"), replace(base, token_dtype="int8"),
            replace(base, compress={"sam": 4}), replace(base, compression="pca", calibration_images=9))]  # fmt: skip
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)
    # The defaults add no new fields, so caches written before compression kinds existed keep their hash.
    assert "compression_kind" not in cache_key(spec, base) and cache_key(spec, settings())["dtype"] == "float16"
    with pytest.raises(ValueError, match="token_dtype"):
        settings(token_dtype="int4")


def test_cache_as_a_datasets_repository_reads_back_and_streams(tmp_path, toy, teachers):
    cache_settings = settings(**PCA_INT8)
    cache_teacher_features(tmp_path / "cache", teachers, cache_settings, toy, shard_size=4, progress=False)
    specs = [t.spec for t in teachers]
    summary = export_cache_repo(tmp_path / "cache", specs, cache_settings, tmp_path / "repo", rows_per_shard=4)
    assert summary["rows"] == len(toy) and summary["shards"] == 2
    assert sorted(p.name for p in (tmp_path / "repo" / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    local = CachedTeachers(tmp_path / "cache", specs, cache_settings)
    ids = [item.sample_id for item in toy]
    want = local({"sample_ids": ids})

    repo = CachedTeachers.from_repo(tmp_path / "repo", specs, cache_settings, cache_dir=str(tmp_path / "hf"))
    got = repo({"sample_ids": ids[::-1]})
    for slug in ("clip", "sam"):
        assert torch.equal(got[slug].tokens, want[slug].tokens.flip(0))
    assert torch.equal(got["clip"].cls_attention, want["clip"].cls_attention.flip(0))

    streamed = list(stream_cached_teachers(tmp_path / "repo", specs, cache_settings, batch_size=4))
    assert [len(keys) for keys, _ in streamed] == [4, 2]
    for keys, outputs in streamed:
        expected = local({"sample_ids": [k[0] for k in keys]})
        assert all(torch.equal(outputs[s].tokens, expected[s].tokens) for s in ("clip", "sam"))
    with pytest.raises(ValueError, match=r"teacher 'clip'.*dtype: cache has 'int8', expected 'float16'"):
        CachedTeachers.from_repo(tmp_path / "repo", specs, replace(cache_settings, token_dtype="float16"))
