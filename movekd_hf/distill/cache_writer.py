"""Writing the teacher-feature cache (layout and keys in cache.py): run the teachers once over a dataset's
images, batched and resumable, and append their outputs to Arrow shards."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..modeling.llava_conventions import ImageLoadError, load_image, resample_tokens, sample_name, teacher_images
from ..modeling.mole import upcast
from .cache import (
    META_FILE,
    PROJECTION_FILE,
    CacheSettings,
    StoredShape,
    arrow_features,
    cache_dir_for,
    cache_key,
    key_hash,
    random_orthogonal,
    shard_paths,
    stored_grid,
    stored_shape,
)
from .teachers import Teacher, TeacherOutput


def stored_rows(output: TeacherOutput, settings: CacheSettings, projection: torch.Tensor | None) -> dict:
    """TeacherOutput of a batch -> the arrays the cache stores.

    tokens [B, N_t, C] -> on `stored_grid` (resampled to the student grid or kept), projected by
    `projection` [C, k] if given, float16 -> [B, N * C']; cls [B, C] and cls_attention [B, N_t] in at least
    float32 (their Arrow columns store float32).
    """
    # Resampled and projected in at least float32 (float64 teachers stay float64); rounded once, on storing.
    tokens = resample_tokens(upcast(output.tokens), tuple(output.grid), stored_grid(output, settings))
    if projection is not None:
        tokens = tokens @ projection.to(tokens)  # [B, N, k]
    rows = {"tokens": tokens.to(torch.float16).flatten(1).cpu().numpy()}
    if output.cls is not None:
        rows["cls"] = upcast(output.cls).cpu().numpy()
    if output.cls_attention is not None:
        rows["cls_attention"] = upcast(output.cls_attention).cpu().numpy()
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
        self.meta, self.shape, self.projection = None, None, None
        if (self.directory / META_FILE).exists():
            self._open(json.loads((self.directory / META_FILE).read_text()))

    def _open(self, meta: dict) -> None:
        self.meta = meta
        self.shape = StoredShape(**{**meta["shape"], "grid": tuple(meta["shape"]["grid"])})
        self.energy = [meta.get("energy_kept_sum", 0.0), meta.get("energy_total_sum", 0.0)]
        self.projection = self._projection()

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
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        self._open(meta)

    def _projection(self) -> torch.Tensor | None:
        rank = self.settings.compress.get(self.spec.slug)
        if rank is None:
            return None
        from safetensors.torch import load_file, save_file

        path = self.directory / PROJECTION_FILE
        if path.exists():
            return load_file(str(path))["projection"]
        projection = random_orthogonal(self.shape.teacher_channels, int(rank), self.settings.compression_seed)
        save_file({"projection": projection.contiguous()}, str(path))
        return projection

    def add(self, keys: Sequence[tuple[str, int]], output: TeacherOutput) -> None:
        if self.meta is None:
            self._create(output)
        rows = stored_rows(output, self.settings, self.projection)
        if self.projection is not None:  # how much of the features the subspace keeps
            flat = upcast(output.tokens)
            self.energy[0] += float((flat @ self.projection.to(flat)).square().sum())
            self.energy[1] += float(flat.square().sum())
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
        if self.projection is not None:
            self.meta.update(energy_kept_sum=self.energy[0], energy_total_sum=self.energy[1])
            self.meta["energy_kept_fraction"] = self.energy[0] / max(self.energy[1], 1e-30)
            (self.directory / META_FILE).write_text(json.dumps(self.meta, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------ running teachers


@dataclass(frozen=True)
class CacheItem:
    sample_id: str
    image_index: int
    image: Mapping  # the dataset's image reference {"path", "bytes"}
    name: str  # for error messages


def dataset_items(records: Iterable[Mapping]) -> list[CacheItem]:
    """Every image of a normalised dataset (`id`, `row`, `images` columns), once per (sample id, image index).

    Two samples with the same id and the same image reference are one image; with different images the sample id
    cannot key the cache, which raises."""
    items: dict[tuple[str, int], CacheItem] = {}
    for record in records:
        for index, reference in enumerate(record["images"] or []):
            key = (str(record["id"]), index)
            item = CacheItem(key[0], index, dict(reference), sample_name(record))
            seen = items.get(key)
            if seen is not None and seen.image != item.image:
                raise ValueError(
                    f"sample id {key[0]!r} names different images in {seen.name} and {item.name}; the cache is keyed "
                    "by sample id, so ids must be unique per image"
                )
            items.setdefault(key, item)
    return list(items.values())


def teacher_view(items: Sequence[CacheItem], settings: CacheSettings) -> torch.Tensor:
    """The collator's `teacher_images` for these images (`llava_conventions.teacher_images` with the cache's
    view settings): [N, 3, S, S] in [0, 1]."""
    images = []
    for item in items:
        try:
            images.append(load_image(item.image))
        except ImageLoadError as error:
            raise ValueError(f"cannot cache the teachers' features of sample {item.name}: {error}") from error
    return teacher_images(images, settings.image_aspect, settings.background, settings.teacher_image_size)


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
    nothing. Each image is decoded once per batch and shared by all teachers that still need it.
    """
    from tqdm.auto import tqdm

    writers = {t.slug: TeacherCacheWriter(root, t, settings, shard_size) for t in teachers}
    computed = dict.fromkeys(writers, 0)
    pending = [it for it in items if any((it.sample_id, it.image_index) not in w.done for w in writers.values())]
    bar = tqdm(total=len(pending), desc="caching teacher features", unit="img", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        pixels = teacher_view(batch, settings)  # [B, 3, S, S]
        for teacher in teachers:
            writer = writers[teacher.slug]
            need = [i for i, it in enumerate(batch) if (it.sample_id, it.image_index) not in writer.done]
            if need:
                output = teacher(pixels[need])
                writer.add([(batch[i].sample_id, batch[i].image_index) for i in need], output)
                computed[teacher.slug] += len(need)
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
        }
    return report
