"""Writing the teacher-feature cache (layout and keys in cache.py): run the teachers once over a dataset's
images, batched and resumable, and append their outputs to Arrow shards; fit PCA bases on a calibration pass
first when asked; export a finished cache as a `datasets` repository (parquet shards) that reads back the same."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..modeling.llava_conventions import (
    ImageLoadError,
    load_image,
    resample_tokens,
    sample_name,
    square_view,
    teacher_images,
)
from ..modeling.mole import upcast
from .anyres_tiles import image_tiles
from .cache import (
    META_FILE,
    REPO_SEPARATOR,
    REPO_TEACHERS,
    CacheSettings,
    StoredShape,
    TeacherCache,
    arrow_features,
    cache_dir_for,
    cache_key,
    find_cache_dir,
    key_hash,
    shard_paths,
    stored_grid,
    stored_shape,
)
from .cache_codec import PROJECTION_FILE, TokenCodec, pca_basis, random_orthogonal, tensors_sha256
from .teacher_views import make_views, view_settings
from .teachers import Teacher, TeacherOutput, TeacherSpec


def grid_tokens(output: TeacherOutput, settings: CacheSettings) -> torch.Tensor:
    """The tokens as stored before encoding: on `stored_grid`, in at least float32 [B, N, C]."""
    return resample_tokens(upcast(output.tokens), tuple(output.grid), stored_grid(output, settings))


def stored_rows(output: TeacherOutput, settings: CacheSettings, codec: TokenCodec | torch.Tensor | None) -> dict:
    """TeacherOutput of a batch -> the arrays the cache stores.

    tokens [B, N_t, C] -> on `stored_grid` (resampled to the student grid or kept), encoded by `codec` (a
    projection [C, k] alone means random compression to float16) -> "tokens" [B, N * k] and for quantised formats
    "token_scales" [B, N]; cls [B, C], cls_attention [B, N_t], pooled [B, C] and pool_attention [B, N_t] where the
    output has them, as they are (never compressed) in at least float32 (their Arrow columns).
    """
    if not isinstance(codec, TokenCodec):
        codec = TokenCodec(projection=codec)
    # Resampled and projected in at least float32 (float64 teachers stay float64); rounded once, on storing.
    rows = codec.encode(grid_tokens(output, settings))
    for name in ("cls", "cls_attention", "pooled", "pool_attention"):  # per-image vectors: small, kept exact
        vector = getattr(output, name)
        if vector is not None:
            rows[name] = upcast(vector).cpu().numpy()
    return rows


def _read_ids(path: Path) -> list[tuple[str, int]]:
    import datasets

    table = datasets.Dataset.from_file(str(path)).with_format("arrow")[:]
    return list(zip(table["sample_id"].to_pylist(), table["image_index"].to_pylist()))


class TeacherCacheWriter:
    """Appends one teacher's rows to its cache directory, one Arrow shard per `shard_size` rows.

    A shard is written under a temporary name and renamed when complete, so an interrupted run leaves only whole
    shards; the next run skips every (sample id, image index) they hold.
    """

    def __init__(self, root: str | os.PathLike, teacher: Teacher, settings: CacheSettings, shard_size: int = 1024):
        self.spec, self.settings, self.shard_size = teacher.spec, settings, shard_size
        self.directory = cache_dir_for(root, self.spec, settings)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.done = {key for path in shard_paths(self.directory) for key in _read_ids(path)}
        self.buffer: dict[str, list] = {}
        self.meta, self.shape, self.codec = None, None, None
        self.pca = settings.compression == "pca" and self.spec.slug in settings.compress
        if (self.directory / META_FILE).exists():
            self._open(json.loads((self.directory / META_FILE).read_text()))

    def _open(self, meta: dict) -> None:
        self.meta = meta
        self.shape = StoredShape(**{**meta["shape"], "grid": tuple(meta["shape"]["grid"])})
        self.energy = [meta.get("energy_kept_sum", 0.0), meta.get("energy_total_sum", 0.0)]
        self.error = [meta.get("error_sum", 0.0), meta.get("energy_sum", 0.0)]
        self.codec = self._codec()

    def _create(self, output: TeacherOutput) -> None:
        """First batch of a new cache: its shapes come from the real output (no extra teacher forward)."""
        key = cache_key(self.spec, self.settings)
        shape = stored_shape(self.spec, self.settings, output)
        meta = {
            "key": key,
            "key_hash": key_hash(key),
            "shape": asdict(shape),
            "bytes_per_image": shape.bytes_per_image,
        }
        self.meta = meta
        self._write_meta()
        self._open(meta)

    @property
    def projection(self) -> torch.Tensor | None:
        return None if self.codec is None else self.codec.projection

    @property
    def needs_basis(self) -> bool:
        """A PCA cache whose basis is not fitted yet (fit it with `fit_basis` before `add`)."""
        return self.pca and not (self.directory / PROJECTION_FILE).exists()

    def _codec(self) -> TokenCodec | None:
        """The stored basis, or a new random one; None while a PCA basis awaits its calibration pass."""
        from safetensors.torch import load_file, save_file

        rank, path = self.settings.compress.get(self.spec.slug), self.directory / PROJECTION_FILE
        if rank is None:
            return TokenCodec(self.settings.token_dtype)
        if path.exists():
            return TokenCodec(self.settings.token_dtype, **load_file(str(path)))
        if self.pca:
            if shard_paths(self.directory):  # rows encoded with a basis that is gone: never mix two bases
                raise ValueError(f"cache {self.directory} has shards but lost its PCA basis; delete it and rebuild")
            return None
        projection = random_orthogonal(self.shape.teacher_channels, int(rank), self.settings.compression_seed)
        save_file({"projection": projection.contiguous()}, str(path))
        return TokenCodec(self.settings.token_dtype, projection)

    def fit_basis(self, outputs: Iterable[TeacherOutput]) -> None:
        """PCA on the stored-grid tokens of `outputs` (the calibration pass); saves the basis and puts its sha256
        into the key in cache.json."""
        from safetensors.torch import save_file

        total, outer, count = None, None, 0
        for output in outputs:
            if self.meta is None:
                self._create(output)
            flat = grid_tokens(output, self.settings).flatten(0, 1).double()  # [B * N, C]
            total = flat.sum(0) if total is None else total + flat.sum(0)
            outer = flat.t() @ flat if outer is None else outer + flat.t() @ flat
            count += flat.shape[0]
        basis = pca_basis(total, outer, count, int(self.settings.compress[self.spec.slug]))
        save_file(basis, str(self.directory / PROJECTION_FILE))
        self.meta["key"]["basis_sha256"] = tensors_sha256(basis)
        self.meta.update(key_hash=key_hash(self.meta["key"]), calibration_tokens=count)
        self._write_meta()
        self.codec = TokenCodec(self.settings.token_dtype, **basis)

    def _write_meta(self) -> None:
        (self.directory / META_FILE).write_text(json.dumps(self.meta, indent=1, sort_keys=True))

    def add(self, keys: Sequence[tuple[str, int]], output: TeacherOutput) -> None:
        if self.meta is None:
            self._create(output)
        if self.codec is None:
            raise ValueError(f"teacher {self.spec.slug!r}: fit the PCA basis (`fit_basis`) before adding rows")
        rows = stored_rows(output, self.settings, self.codec)
        if self.projection is not None and not self.pca:  # how much of the features the random subspace keeps
            flat = upcast(output.tokens)
            self.energy[0] += float((flat @ self.projection.to(flat)).square().sum())
            self.energy[1] += float(flat.square().sum())
        if self.codec.tensors() or self.shape.token_scales:  # what encoding loses, on the stored grid
            tokens = grid_tokens(output, self.settings)
            scales = torch.from_numpy(rows["token_scales"]) if "token_scales" in rows else None
            stored = torch.from_numpy(rows["tokens"]).view(*tokens.shape[:2], -1)
            self.error[0] += float((self.codec.decode(stored, scales).to(tokens) - tokens).square().sum())
            self.error[1] += float(tokens.square().sum())
        self.buffer.setdefault("sample_id", []).extend(k[0] for k in keys)
        self.buffer.setdefault("image_index", []).extend(int(k[1]) for k in keys)
        for name, values in rows.items():
            self.buffer.setdefault(name, []).extend(values)
        self.done.update(keys)
        if len(self.buffer["sample_id"]) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer.get("sample_id"):
            return
        from datasets.arrow_writer import ArrowWriter

        index = len(shard_paths(self.directory))
        final = self.directory / f"shard-{index:05d}.arrow"
        partial = final.with_suffix(".arrow.partial")
        writer = ArrowWriter(features=arrow_features(self.shape), path=str(partial))
        writer.write_batch(self.buffer)
        writer.finalize()
        writer.close()
        os.replace(partial, final)
        self.buffer = {}
        if self.projection is not None and not self.pca:
            self.meta.update(energy_kept_sum=self.energy[0], energy_total_sum=self.energy[1])
            self.meta["energy_kept_fraction"] = self.energy[0] / max(self.energy[1], 1e-30)
        if self.error[1]:  # relative MSE of what training reads against the stored-grid tokens
            self.meta.update(error_sum=self.error[0], energy_sum=self.error[1])
            self.meta["reconstruction_relative_mse"] = self.error[0] / max(self.error[1], 1e-30)
        self._write_meta()


# ------------------------------------------------------------------------------------------ running teachers


@dataclass(frozen=True)
class CacheItem:
    sample_id: str
    image_index: int
    image: Mapping  # the dataset's image reference {"path", "bytes"}
    name: str  # for error messages
    alone: bool = True  # the only image of its sample (an AnyRes tower then sees its tiles, not one square)


def dataset_items(records: Iterable[Mapping]) -> list[CacheItem]:
    """Every image of a normalised dataset (`id`, `row`, `images` columns), once per (sample id, image index).

    Two samples with the same id and the same image reference are one image; with different images (or image
    counts) the sample id cannot key the cache, which raises."""
    items: dict[tuple[str, int], CacheItem] = {}
    for record in records:
        references = record["images"] or []
        for index, reference in enumerate(references):
            key = (str(record["id"]), index)
            item = CacheItem(key[0], index, dict(reference), sample_name(record), alone=len(references) == 1)
            seen = items.get(key)
            if seen is not None and (seen.image, seen.alone) != (item.image, item.alone):
                raise ValueError(
                    f"sample id {key[0]!r} names different images (or image counts) in {seen.name} and {item.name}; "
                    "the cache is keyed by sample id, so ids must be unique per image"
                )
            items.setdefault(key, item)
    return list(items.values())


def _load_images(items: Sequence[CacheItem]) -> list:
    images = []
    for item in items:
        try:
            images.append(load_image(item.image))
        except ImageLoadError as error:
            raise ValueError(f"cannot cache the teachers' features of sample {item.name}: {error}") from error
    return images


def teacher_view(items: Sequence[CacheItem], settings: CacheSettings) -> torch.Tensor:
    """The collator's `teacher_images` for these images (`llava_conventions.teacher_images` with the cache's
    view settings): [N, 3, S, S] in [0, 1]."""
    images = _load_images(items)
    return teacher_images(images, settings.image_aspect, settings.background, settings.teacher_image_size)


class TeacherInputs:
    """One batch of images as the cache's teachers see them (`CacheSettings.teacher_inputs`): each teacher's own
    uint8 view made from the square the collator makes ("views", what online training gives its teachers), or the
    one float square of `teacher_image_size` ("square"). For an AnyRes student (`CacheSettings.anyres`) the squares
    are the tower's rows: an image alone in its sample gives its tiles (`anyres_tiles.image_tiles`).

    `keys` holds the cache key of every row, `item_rows` each item's rows; `run(teacher, rows)` is the teacher's
    output for those rows."""

    def __init__(self, items: Sequence[CacheItem], teachers: Sequence[Teacher], settings: CacheSettings):
        self.keys = [(item.sample_id, item.image_index) for item in items]
        self.item_rows = [[row] for row in range(len(items))]
        if settings.teacher_inputs == "square":
            self.pixels, self.views, self.sizes = teacher_view(items, settings), None, {}
            return
        images = _load_images(items)
        if settings.anyres:
            squares = self._tiles(items, images, settings)
        else:
            squares = [square_view(image, settings.image_aspect, settings.background) for image in images]
        self.pixels = None
        self.views, self.sizes = make_views(squares, view_settings(teacher.spec for teacher in teachers))

    def _tiles(self, items: Sequence[CacheItem], images: Sequence, settings: CacheSettings) -> list:
        """Every item's tower rows (tiles, or one square), with their keys: (sample id, tile) for an image alone in
        its sample, as `images_per_sample` then counts its tiles; else (sample id, image index)."""
        squares, self.keys, self.item_rows = [], [], []
        for item, image in zip(items, images):
            tiles = image_tiles(image, item.alone, settings.image_grid_pinpoints, settings.tile_size,
                                settings.teacher_image_size, settings.background)  # fmt: skip
            self.item_rows.append(list(range(len(squares), len(squares) + len(tiles))))
            # An image alone in its sample is its image 0, so its tiles key as (sample id, 0), (sample id, 1), ...
            self.keys += [(item.sample_id, item.image_index + tile) for tile in range(len(tiles))]
            squares += tiles
        return squares

    def rows(self, items: Sequence[int]) -> list[int]:
        """The rows of these items (indices into the batch's items)."""
        return [row for item in items for row in self.item_rows[item]]

    def run(self, teacher: Teacher, rows: Sequence[int] | slice = slice(None)) -> TeacherOutput:
        if self.views is None:
            return teacher(self.pixels[rows])
        sizes = self.sizes.get(teacher.slug)
        return teacher(view=self.views[teacher.slug][rows], valid_size=None if sizes is None else sizes[rows])


def calibration_items(items: Sequence[CacheItem], settings: CacheSettings) -> list[CacheItem]:
    """The images a PCA basis is fitted on: the first `calibration_images` of a permutation of `items` seeded by
    `compression_seed` (a spread over the dataset, not its first files)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(settings.compression_seed))
    return [items[i] for i in order[: settings.calibration_images].tolist()]


def _calibration_outputs(teacher: Teacher, items: Sequence[CacheItem], settings: CacheSettings, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield TeacherInputs(items[start : start + batch_size], [teacher], settings).run(teacher)


def cache_teacher_features(
    root: str | os.PathLike,
    teachers: Sequence[Teacher],
    settings: CacheSettings,
    items: Sequence[CacheItem],
    batch_size: int = 8,
    shard_size: int = 1024,
    progress: bool = True,
) -> dict:
    """Run every teacher over every image not yet cached and store the results; returns per-teacher counts.

    Resumable: images already in a finished shard are skipped, so a second run over the same data computes
    nothing. Each image is decoded once per batch and shared by all teachers that still need it. A teacher
    compressed with PCA first runs over `calibration_items` to fit its basis (once: later runs reuse it).
    """
    from tqdm.auto import tqdm

    writers = {t.slug: TeacherCacheWriter(root, t, settings, shard_size) for t in teachers}
    for teacher in teachers:
        if writers[teacher.slug].needs_basis:
            if not items:
                raise ValueError(
                    f"teacher {teacher.slug!r}: a PCA basis needs calibration images; the dataset is empty"
                )
            calibration = calibration_items(items, settings)
            writers[teacher.slug].fit_basis(_calibration_outputs(teacher, calibration, settings, batch_size))
    computed = dict.fromkeys(writers, 0)
    pending = [it for it in items if any((it.sample_id, it.image_index) not in w.done for w in writers.values())]
    bar = tqdm(total=len(pending), desc="caching teacher features", unit="img", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        inputs = TeacherInputs(batch, teachers, settings)  # decoded once, shared by every teacher
        for teacher in teachers:
            writer = writers[teacher.slug]
            # An item's rows are added in one call, so its first row stands for all of them (whole shards only).
            need = [i for i, it in enumerate(batch) if (it.sample_id, it.image_index) not in writer.done]
            if need:
                rows = inputs.rows(need)
                writer.add([inputs.keys[row] for row in rows], inputs.run(teacher, rows))
                computed[teacher.slug] += len(rows)
        bar.update(len(batch))
    bar.close()
    report = {}
    for slug, writer in writers.items():
        writer.flush()
        report[slug] = {
            "directory": str(writer.directory),
            "computed": computed[slug],
            "cached": len(writer.done),
            "bytes_per_image": writer.shape.bytes_per_image if writer.shape else None,
            "energy_kept_fraction": (writer.meta or {}).get("energy_kept_fraction"),
            "reconstruction_relative_mse": (writer.meta or {}).get("reconstruction_relative_mse"),
        }
    return report


# --------------------------------------------------------------------------------------- datasets repository

REPO_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# MoVE-KD teacher-feature cache

Written by `movekd-hf cache-teachers --export-repo`. One row per image: `sample_id`, `image_index`, and per
teacher `<slug>__tokens` (and `<slug>__token_scales`, `<slug>__cls`, `<slug>__cls_attention`, `<slug>__pooled`,
`<slug>__pool_attention` where stored).
`teachers/<slug>/cache.json` holds each teacher's key and stored shapes, `projection.safetensors` its basis.
Read it with `movekd_hf.distill.CachedTeachers.from_repo` or `movekd_hf.distill.cache_sources.stream_cached_teachers`,
or train from it: `teacher_cache_dir` takes its folder or its Hub id.
"""


def export_cache_repo(
    root: str | os.PathLike,
    specs: Sequence[TeacherSpec],
    settings: CacheSettings,
    out: str | os.PathLike,
    rows_per_shard: int = 1024,
) -> dict:
    """Write the caches of `specs` under `root` as one `datasets` repository in `out` (layout in cache.py): rows
    in the first teacher's storage order, every teacher's columns side by side, `rows_per_shard` rows per parquet
    file. Raises ValueError if a teacher lacks an image the first one has. Returns {"rows", "shards", "bytes"}."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    caches = {spec.slug: TeacherCache(find_cache_dir(root, spec, settings)) for spec in specs}
    keys = list(next(iter(caches.values())).index)
    if not keys:
        raise ValueError(f"the cache under {root} holds no rows to export")
    rows = {slug: cache.rows_for(keys) for slug, cache in caches.items()}  # raises on a missing image
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for slug, cache in caches.items():
        (out / REPO_TEACHERS / slug).mkdir(parents=True, exist_ok=True)
        for name in (META_FILE, PROJECTION_FILE):
            if (cache.directory / name).exists():
                shutil.copyfile(cache.directory / name, out / REPO_TEACHERS / slug / name)
    shards = -(-len(keys) // rows_per_shard)
    for shard in range(shards):
        part = slice(shard * rows_per_shard, (shard + 1) * rows_per_shard)
        columns = {
            "sample_id": pa.array([k[0] for k in keys[part]], pa.string()),
            "image_index": pa.array([k[1] for k in keys[part]], pa.int32()),
        }
        for slug, cache in caches.items():
            table = cache.table[rows[slug][part]]
            for name in table.column_names:
                if name not in ("sample_id", "image_index"):
                    columns[slug + REPO_SEPARATOR + name] = table[name]
        pq.write_table(pa.table(columns), out / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet")
    (out / "README.md").write_text(REPO_README)
    size = sum(path.stat().st_size for path in (out / "data").glob("*.parquet"))
    return {"rows": len(keys), "shards": shards, "bytes": size}
