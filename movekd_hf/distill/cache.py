"""A teacher-feature cache: run the frozen teachers once over a dataset, then train from the stored features.

This module holds the key, the shapes and the reading side (`CachedTeachers`, the teacher source training uses);
cache_writer.py runs the teachers and writes the shards; `movekd-hf cache-teachers` drives it.

Layout: `CACHE_DIR/<slug>-<hash12>/` per teacher, holding `cache.json` (the key and the stored shapes), Arrow
shards `shard-00000.arrow`, ... written by `datasets`' `ArrowWriter` (columns `sample_id`, `image_index`, `tokens`
float16 flattened, and for the anchor teacher `cls` and `cls_attention`), and `projection.safetensors` when the
channels are compressed. The hash is the sha256 of the key: every field that changes the stored values (teacher
id, revision, input size, normalisation, resize, output layer, SAM layout, the teacher view of the image, the
stored grid, dtype, compression). Training opens the directory of the key it computes; if only a directory with
another key exists, the error names the teacher and the fields that differ.

Grids: `grid="student"` stores non-anchor tokens already resampled to the student grid (what the resolution-free
`resample` adapter does first; 5-7x smaller at paper scale); `grid="native"` keeps the teacher's own grid, which
the faithful `token_mix` adapter (a linear map over the N_t teacher tokens) and the student-to-teacher head need.

Compression (optional, per teacher): a fixed random orthogonal projection Q [C, k] (seeded, stored next to the
shards). The cache keeps Q^T t per token and training reads Q Q^T t: the adapter sees the teacher's features
projected onto a random k-dimensional subspace. It cuts storage by C/k; the loss then ignores what lies outside
the subspace (`cache.json` records the fraction of feature energy kept). Random rather than PCA so it needs no
pass over the data and is the same for every shard; leave the anchor teacher uncompressed, since the student is
compared with its raw tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..modeling.llava_conventions import CLIP_MEAN_COLOUR
from .adapters import ResampleAdapter
from .teachers import BACKENDS, TeacherOutput, TeacherSpec

CACHE_FORMAT_VERSION = 1
GRID_MODES = ("student", "native")
META_FILE = "cache.json"
PROJECTION_FILE = "projection.safetensors"
TOKEN_DTYPE = "float16"
# Arrow overhead per row beyond the arrays: the sample id (~20 bytes in LLaVA data), its offset, image_index.
ROW_OVERHEAD_BYTES = 32


@dataclass(frozen=True)
class CacheSettings:
    """What, besides the teacher's spec, decides the stored values.

    student_grid: the student's patch grid (24 x 24 for CLIP-L/336); used when `grid="student"`.
    grid: "student" (tokens resampled to the student grid) or "native" (the teacher's own grid).
    teacher_image_size / image_aspect / background: the square view the collator gives the teachers
        (`MoVEKDDataCollator(teacher_image_size=..., image_aspect=...)`, padded with `background`).
    compress: teacher slug -> channels kept by the random orthogonal projection (absent: uncompressed).
    revisions: teacher slug -> weights revision (Hub commit or tag), part of the key.
    """

    student_grid: tuple[int, int] = (24, 24)
    grid: str = "student"
    teacher_image_size: int = 1024
    image_aspect: str = "pad"
    background: tuple[int, int, int] = CLIP_MEAN_COLOUR  # LLaVA's expand2square colour
    compress: Mapping[str, int] = field(default_factory=dict)
    compression_seed: int = 0
    revisions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grid not in GRID_MODES:
            raise ValueError(f"CacheSettings.grid is {self.grid!r}; expected one of {GRID_MODES}")
        if self.teacher_image_size <= 0:
            raise ValueError(f"CacheSettings.teacher_image_size must be positive, got {self.teacher_image_size}")
        for slug, channels in self.compress.items():
            if int(channels) <= 0:
                raise ValueError(f"CacheSettings.compress[{slug!r}] must be a positive channel count, got {channels}")


def _jsonable(value):
    """Tuples to lists and mappings to dicts, so a key reads back exactly as it was hashed."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_key(spec: TeacherSpec, settings: CacheSettings) -> dict:
    """Every field that changes what the cache stores for one teacher (order irrelevant: hashed sorted)."""
    native = settings.grid == "native"
    return _jsonable(
        {
            "format_version": CACHE_FORMAT_VERSION,
            "slug": spec.slug,
            "backend": spec.backend,
            "model_id": spec.model_id,
            "revision": settings.revisions.get(spec.slug),
            "checkpoint": spec.checkpoint,
            "filename": spec.filename,
            "pretrained": spec.pretrained,
            "model_class": spec.model_class,
            "config": dict(spec.config),
            "image_size": spec.image_size,
            "mean": spec.mean,
            "std": spec.std,
            "resize_mode": spec.resize_mode,
            "interpolation": spec.interpolation,
            "output": spec.output,
            "feature_layer": spec.feature_layer,
            "num_prefix_tokens": spec.num_prefix_tokens,
            "has_cls": spec.has_cls,
            "cls_attention": spec.cls_attention,
            "sam_layout": spec.sam_layout,
            "teacher_image_size": settings.teacher_image_size,
            "image_aspect": settings.image_aspect,
            "background": settings.background,
            "grid": settings.grid,
            # A native-grid cache serves any student; a student-grid one only its grid.
            "student_grid": None if native else settings.student_grid,
            "dtype": TOKEN_DTYPE,
            "compression": settings.compress.get(spec.slug),
            "compression_seed": settings.compression_seed if spec.slug in settings.compress else None,
        }
    )


def key_hash(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_dir_for(root: str | os.PathLike, spec: TeacherSpec, settings: CacheSettings) -> Path:
    return Path(root) / f"{spec.slug}-{key_hash(cache_key(spec, settings))[:12]}"


def random_orthogonal(channels: int, rank: int, seed: int) -> torch.Tensor:
    """[channels, rank] with orthonormal columns (QR of a seeded Gaussian matrix, signs fixed)."""
    if rank > channels:
        raise ValueError(f"compression to {rank} channels needs at least {rank} teacher channels, got {channels}")
    gaussian = torch.randn(channels, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: the factorisation is then unique


# ------------------------------------------------------------------------------------------------ shapes, sizes


@dataclass(frozen=True)
class StoredShape:
    """What one image costs one teacher in the cache."""

    tokens: int
    channels: int
    grid: tuple[int, int]
    teacher_tokens: int
    teacher_channels: int
    cls: int  # channels of the CLS token (0 if none)
    cls_attention: int  # length of the attention row (0 if none)

    @property
    def bytes_per_image(self) -> int:
        return 2 * self.tokens * self.channels + 4 * (self.cls + self.cls_attention) + ROW_OVERHEAD_BYTES


def teacher_output_shape(spec: TeacherSpec) -> TeacherOutput:
    """The teacher's output for one image, computed on the meta device (no weights, no memory, no download:
    the architecture is built from the spec's config)."""
    spec = replace(spec, pretrained=False)
    with torch.device("meta"), torch.no_grad():
        model = BACKENDS[spec.backend].load(spec)
        pixels = torch.empty(1, 3, spec.image_size, spec.image_size)
        return BACKENDS[spec.backend].extract(model, pixels, spec)


def stored_shape(spec: TeacherSpec, settings: CacheSettings, output: TeacherOutput | None = None) -> StoredShape:
    output = output if output is not None else teacher_output_shape(spec)
    n, c = output.tokens.shape[-2:]
    grid = stored_grid(output, settings)
    return StoredShape(
        tokens=math.prod(grid),
        channels=int(settings.compress.get(spec.slug, c)),
        grid=tuple(grid),
        teacher_tokens=int(n),
        teacher_channels=int(c),
        cls=0 if output.cls is None else int(output.cls.shape[-1]),
        cls_attention=0 if output.cls_attention is None else int(output.cls_attention.shape[-1]),
    )


def estimate_cache_size(specs: Sequence[TeacherSpec], settings: CacheSettings, num_images: int) -> dict:
    """Bytes per image per teacher and in total for `num_images` images (shapes from a meta-device forward)."""
    teachers = {}
    for spec in specs:
        shape = stored_shape(spec, settings)
        teachers[spec.slug] = {**asdict(shape), "bytes_per_image": shape.bytes_per_image}
    per_image = sum(t["bytes_per_image"] for t in teachers.values())
    return {
        "teachers": teachers,
        "bytes_per_image": per_image,
        "num_images": num_images,
        "total_bytes": per_image * num_images,
    }


# ---------------------------------------------------------------------------------------------------- writing


def stored_grid(output: TeacherOutput, settings: CacheSettings) -> tuple[int, int]:
    """The grid a teacher's tokens are stored on. A teacher with a CLS attention row (the anchor) keeps its own
    grid in every mode: the row weights its tokens position by position, so both must stay on one grid."""
    if settings.grid == "student" and output.cls_attention is None:
        return tuple(settings.student_grid)
    return tuple(output.grid)


def arrow_features(shape: StoredShape):
    import datasets

    columns = {
        "sample_id": datasets.Value("string"),
        "image_index": datasets.Value("int32"),
        "tokens": datasets.List(datasets.Value("float16"), length=shape.tokens * shape.channels),
    }
    if shape.cls:
        columns["cls"] = datasets.List(datasets.Value("float32"), length=shape.cls)
    if shape.cls_attention:
        columns["cls_attention"] = datasets.List(datasets.Value("float32"), length=shape.cls_attention)
    return datasets.Features(columns)


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.arrow"))


# ---------------------------------------------------------------------------------------------------- reading


def _diff(expected: Mapping, found: Mapping) -> list[str]:
    names = sorted(set(expected) | set(found))
    return [
        f"{n}: cache has {found.get(n)!r}, expected {expected.get(n)!r}"
        for n in names
        if expected.get(n) != found.get(n)
    ]


def find_cache_dir(root: str | os.PathLike, spec: TeacherSpec, settings: CacheSettings) -> Path:
    """The directory of this teacher's cache under `root`; a missing or mismatched cache raises a ValueError
    that names the teacher and, for a cache written with other settings, every field that differs."""
    directory = cache_dir_for(root, spec, settings)
    expected = cache_key(spec, settings)
    if (directory / META_FILE).exists():
        found = json.loads((directory / META_FILE).read_text())["key"]
        if found != expected:  # edited by hand or a hash collision
            raise ValueError(
                f"teacher {spec.slug!r}: cache {directory} is stale: " + "; ".join(_diff(expected, found))
            )
        return directory
    others = sorted(Path(root).glob(f"{spec.slug}-*/{META_FILE}")) if Path(root).is_dir() else []
    if others:
        found = json.loads(others[-1].read_text())["key"]
        raise ValueError(
            f"teacher {spec.slug!r}: the cache in {others[-1].parent} was written with other settings ("
            + "; ".join(_diff(expected, found))
            + "); re-run `movekd-hf cache-teachers` with the training settings"
        )
    raise ValueError(f"teacher {spec.slug!r}: no cache under {root}; run `movekd-hf cache-teachers` first")


class TeacherCache:
    """One teacher's cached outputs, memory-mapped, looked up by (sample id, image index)."""

    def __init__(self, directory: str | os.PathLike):
        import datasets

        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META_FILE).read_text())
        self.shape = StoredShape(**{**self.meta["shape"], "grid": tuple(self.meta["shape"]["grid"])})
        shards = [datasets.Dataset.from_file(str(path)) for path in shard_paths(self.directory)]
        self.table = datasets.concatenate_datasets(shards).with_format("arrow") if shards else None
        self.index: dict[tuple[str, int], int] = {}
        if self.table is not None:  # built once: id -> row
            ids = self.table[:]
            for row, key in enumerate(zip(ids["sample_id"].to_pylist(), ids["image_index"].to_pylist())):
                self.index[key] = row
        projection = self.directory / PROJECTION_FILE
        self.projection = None
        if projection.exists():
            from safetensors.torch import load_file

            self.projection = load_file(str(projection))["projection"]  # [C, k]

    @property
    def slug(self) -> str:
        return self.meta["key"]["slug"]

    def __len__(self) -> int:
        return len(self.index)

    def rows_for(self, keys: Sequence[tuple[str, int]]) -> list[int]:
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise ValueError(
                f"teacher {self.slug!r}: cache {self.directory} has no features for (sample id, image index) "
                f"{missing[:5]}; run `movekd-hf cache-teachers` over this dataset"
            )
        return [self.index[k] for k in keys]

    def fetch(self, keys: Sequence[tuple[str, int]], device=None, dtype: torch.dtype = torch.float32) -> TeacherOutput:
        """TeacherOutput for these images: tokens [B, N, C] (decompressed to C channels), cls [B, C] and
        cls_attention [B, N] when stored, in `dtype` on `device`."""
        table = self.table[self.rows_for(keys)]
        shape = self.shape

        def column(name: str, width: int) -> torch.Tensor:
            values = table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()  # writable
            return torch.from_numpy(values.reshape(len(keys), width)).to(device=device)

        tokens = column("tokens", shape.tokens * shape.channels).view(len(keys), shape.tokens, shape.channels)
        if self.projection is not None:
            tokens = tokens.float() @ self.projection.to(device).t()  # back to the teacher's C channels
        out = TeacherOutput(tokens=tokens.to(dtype), grid=shape.grid)
        if shape.cls:
            out.cls = column("cls", shape.cls).to(dtype)
        if shape.cls_attention:
            out.cls_attention = column("cls_attention", shape.cls_attention).to(dtype)
        return out


# ------------------------------------------------------------------------------------------- teacher source


def image_keys(sample_ids: Sequence[str], images_per_sample=None) -> list[tuple[str, int]]:
    """(sample id, image index) of every image of a batch, in the collator's order (sample by sample)."""
    counts = [1] * len(sample_ids) if images_per_sample is None else [int(n) for n in images_per_sample]
    if len(counts) != len(sample_ids):
        raise ValueError(f"{len(sample_ids)} sample_ids but images_per_sample has {len(counts)} entries")
    return [(str(sid), index) for sid, count in zip(sample_ids, counts) for index in range(count)]


class CachedTeachers:
    """A teacher source reading cached features: `inputs` (a collated batch with `sample_ids` and
    `images_per_sample`) -> {slug: TeacherOutput}, the same call as online teachers on `teacher_images`.

    Every teacher's cache is checked against `specs` + `settings` when opened (a stale or mismatched cache is
    refused); pass the distiller to also check that each cache's grid suits the teacher's adapter. The specs and
    settings must be those `movekd-hf cache-teachers` wrote with, e.g.

        source = CachedTeachers("cache/", teacher_specs("v1.1"), CacheSettings(student_grid=(24, 24),
                                teacher_image_size=1024), distiller=distiller)
        outputs = source(batch)  # {"clip": TeacherOutput, "eva": ..., ...} for batch["sample_ids"]
    """

    def __init__(
        self,
        root: str | os.PathLike,
        specs: Sequence[TeacherSpec],
        settings: CacheSettings,
        dtype: torch.dtype = torch.float32,
        distiller=None,
    ):
        self.settings, self.dtype = settings, dtype
        self.caches = {spec.slug: TeacherCache(find_cache_dir(root, spec, settings)) for spec in specs}
        if distiller is not None:
            check_cache_fits_distiller(self, distiller)

    def __call__(self, inputs: Mapping) -> dict[str, TeacherOutput]:
        if "sample_ids" not in inputs:
            raise ValueError("CachedTeachers needs `sample_ids` in the batch (the collator's sample id list)")
        keys = image_keys(inputs["sample_ids"], inputs.get("images_per_sample"))
        if not keys:
            return {}
        pixels = inputs.get("pixel_values")
        device = pixels.device if isinstance(pixels, torch.Tensor) else None
        return {slug: cache.fetch(keys, device, self.dtype) for slug, cache in self.caches.items()}


def check_cache_fits_distiller(source: CachedTeachers, distiller) -> None:
    """Refuse caches whose stored grid the distiller cannot use with the loss it would compute online.

    token_mix adapters and student-to-teacher heads work on the teacher's own tokens, so they need `native`;
    running feature standardisation is fitted on the teacher's own tokens too.
    """

    for name in distiller.teacher_names:
        if name not in source.caches:
            raise ValueError(f"the distiller distils teacher {name!r} but no cache was opened for it")
        cache = source.caches[name]
        if name not in distiller.adapters or cache.meta["key"]["grid"] == "native":
            continue
        adapter = distiller.adapters[name]
        kind = distiller.config.adapter
        if not isinstance(adapter, ResampleAdapter):
            raise ValueError(
                f"teacher {name!r}: the cache in {cache.directory} stores tokens on the student grid "
                f"{cache.shape.grid}, but the distiller's {kind!r} adapter needs the teacher's own "
                f"{cache.shape.teacher_tokens} tokens; rebuild the cache with `--grid native` or use adapter='resample'"
            )
        if name in distiller.standardizers:
            raise ValueError(
                f"teacher {name!r}: standardize_features fits statistics on the teacher's own tokens; the cache in "
                f"{cache.directory} stores them resampled to the student grid; rebuild it with `--grid native`"
            )
