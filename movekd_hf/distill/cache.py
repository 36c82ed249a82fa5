"""A teacher-feature cache: run the frozen teachers once over a dataset, then train from the stored features.

This module holds the key, the shapes and the reading side (`CachedTeachers`, the teacher source training uses);
cache_writer.py runs the teachers and writes the shards; cache_codec.py stores the tokens (compression, number
format); `movekd-hf cache-teachers` drives it.

Layout: `CACHE_DIR/<slug>-<hash12>/` per teacher, holding `cache.json` (the key and the stored shapes), Arrow
shards `shard-00000.arrow`, ... written by `datasets`' `ArrowWriter` (columns `sample_id`, `image_index`, `tokens`
float16 flattened, and float32 per image where the teacher gives them: `cls` [C] for a teacher with a CLS token,
`cls_attention` [N_t] for a CLIP anchor, `pooled` [C] and `pool_attention` [N_t] for a SigLIP anchor's
attention-pooling head), and `projection.safetensors` when the channels are compressed. The hash is the sha256 of
the key: every field that changes the stored values (teacher id, revision, input size, normalisation, resize,
output layer, SAM layout, the pooling head's outputs, the teacher view of the image, the stored grid, dtype,
compression). Training opens the directory of the key it computes; if only a directory with
another key exists, the error names the teacher and the fields that differ.

A finished cache exports (`cache_writer.export_cache_repo`) as a `datasets` repository, ready for
`huggingface_hub.upload_folder(..., repo_type="dataset")`: `data/train-*.parquet` with one row per image
(`sample_id`, `image_index`, and every teacher's columns as `<slug>__tokens`, ...), each teacher's cache.json and
basis under `teachers/<slug>/`, and a README whose `configs` names the parquet files. `CachedTeachers.from_repo`
reads it map-style (`datasets.load_dataset` on its parquet files, named one by one: `repo_data_files`),
`cache_sources.stream_cached_teachers` streams it (`streaming=True`); both decode through the same `TeacherCache.decode` and
check the same keys.

Grids: `grid="student"` stores non-anchor tokens already resampled to the student grid (what the resolution-free
`resample` adapter does first; 5-7x smaller at paper scale); `grid="native"` keeps the teacher's own grid, which
the faithful `token_mix` adapter (a linear map over the N_t teacher tokens) and the student-to-teacher head need.

Rows: one per image, keyed (sample id, image index); for a LLaVA-OneVision student one per tile its tower sees
(`CacheSettings.image_grid_pinpoints`), keyed (sample id, tower row), as `images_per_sample` counts them.
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
from .anyres_tiles import max_tile_count
from .cache_codec import COMPRESSION_KINDS, TOKEN_DTYPE, TOKEN_DTYPES, load_codec
from .teachers import BACKENDS, TeacherOutput, TeacherSpec

CACHE_FORMAT_VERSION = 1
GRID_MODES = ("student", "native")
META_FILE = "cache.json"
# Key fields a writer adds once it has fitted something (not derivable from the settings; checked on read).
FITTED_KEY_FIELDS = ("basis_sha256",)
# Arrow overhead per row beyond the arrays: the sample id (~20 bytes in LLaVA data), its offset, image_index.
ROW_OVERHEAD_BYTES = 32
REPO_TEACHERS = "teachers"  # a cache repository's folder of per-teacher cache.json + basis
REPO_SEPARATOR = "__"  # a cache repository's column names: <slug>__<column>
REPO_DATA_FILES = "data/train-*.parquet"  # a cache repository's rows, as its README's `configs` names them


# What the teachers of a cache run on (CacheSettings.teacher_inputs).
TEACHER_INPUTS = ("views", "square")


@dataclass(frozen=True)
class CacheSettings:
    """What, besides the teacher's spec, decides the stored values.

    student_grid: the student's patch grid (24 x 24 for CLIP-L/336); used when `grid="student"`.
    grid: "student" (tokens resampled to the student grid) or "native" (the teacher's own grid).
    teacher_image_size / image_aspect / background: the square view the collator gives the teachers
        (`MoVEKDDataCollator(teacher_image_size=..., image_aspect=...)`, padded with `background`).
    teacher_inputs: what each teacher runs on, as online training gives it: "views" (each teacher's own uint8
        view of that square, made at its input size: distill/teacher_views.py, what the collator gives online
        teachers by default) or "square" (the one float square of `teacher_image_size`, resized by each teacher:
        what caches were written from before views existed, and what training with `teacher_image_size` set uses).
    compress: teacher slug -> channels k kept by the projection (absent: uncompressed).
    compression: the projection's kind, "random" (seeded orthogonal) or "pca" (fitted on a calibration pass).
    compression_seed: seeds the random projection, or the pick of PCA calibration images.
    calibration_images: images the PCA basis is fitted on (the first of a seeded permutation of the dataset).
    token_dtype: number format of the stored tokens: "float16", "int8" or "float8_e4m3fn" (per-token scales).
    image_grid_pinpoints / tile_size: a LLaVA-OneVision student's AnyRes geometry (its image processor's pinpoints
        and tile side S). Set, the cache holds one row per tower row, as `images_per_sample` counts them: the base
        view and grid tiles of an image alone in its sample (row keys (sample id, 0), (sample id, 1), ...), else
        one padded square per image; every tile rendered at `teacher_image_size` (distill/anyres_tiles.py).
    """

    student_grid: tuple[int, int] = (24, 24)
    grid: str = "student"
    teacher_image_size: int = 1024
    image_aspect: str = "pad"
    background: tuple[int, int, int] = CLIP_MEAN_COLOUR  # LLaVA's expand2square colour
    compress: Mapping[str, int] = field(default_factory=dict)
    compression_seed: int = 0
    compression: str = "random"
    calibration_images: int = 256
    token_dtype: str = TOKEN_DTYPE
    teacher_inputs: str = "views"
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    tile_size: int | None = None

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION_KINDS:
            raise ValueError(f"CacheSettings.compression is {self.compression!r}; expected one of {COMPRESSION_KINDS}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(
                f"CacheSettings.token_dtype is {self.token_dtype!r}; expected one of {tuple(TOKEN_DTYPES)}"
            )
        if self.calibration_images < 1:
            raise ValueError(f"CacheSettings.calibration_images must be positive, got {self.calibration_images}")
        if self.teacher_inputs not in TEACHER_INPUTS:
            raise ValueError(
                f"CacheSettings.teacher_inputs is {self.teacher_inputs!r}; expected one of {TEACHER_INPUTS}"
            )
        if self.grid not in GRID_MODES:
            raise ValueError(f"CacheSettings.grid is {self.grid!r}; expected one of {GRID_MODES}")
        if self.teacher_image_size <= 0:
            raise ValueError(f"CacheSettings.teacher_image_size must be positive, got {self.teacher_image_size}")
        for slug, channels in self.compress.items():
            if int(channels) <= 0:
                raise ValueError(f"CacheSettings.compress[{slug!r}] must be a positive channel count, got {channels}")
        if (self.image_grid_pinpoints is None) != (self.tile_size is None):
            raise ValueError(
                f"CacheSettings.image_grid_pinpoints is {self.image_grid_pinpoints!r} and tile_size {self.tile_size!r}; "
                "expected both (an AnyRes student) or neither"
            )
        if self.tile_size is not None and (self.tile_size <= 0 or not self.image_grid_pinpoints):
            raise ValueError(
                f"CacheSettings.tile_size is {self.tile_size!r} with pinpoints {self.image_grid_pinpoints!r}; expected "
                "a positive tile side and at least one (height, width) pinpoint"
            )
        if self.anyres and self.teacher_inputs != "views":
            raise ValueError(
                f"CacheSettings.teacher_inputs is {self.teacher_inputs!r} for AnyRes tiles; expected 'views' (each "
                "teacher's own view of every tile)"
            )

    @property
    def anyres(self) -> bool:
        """Whether rows are a LLaVA-OneVision tower's AnyRes tiles (see the class docstring)."""
        return self.image_grid_pinpoints is not None


def _jsonable(value):
    """Tuples to lists and mappings to dicts, so a key reads back exactly as it was hashed."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_key(spec: TeacherSpec, settings: CacheSettings) -> dict:
    """Every field that changes what the cache stores for one teacher (order irrelevant: hashed sorted)."""
    native = settings.grid == "native"
    compressed = spec.slug in settings.compress
    # Fields new since format 1 enter only when not at their old value, so existing caches keep their hash.
    extra = {}
    if compressed and settings.compression != "random":
        extra = {"compression_kind": settings.compression, "calibration_images": settings.calibration_images}
    if spec.pool_attention:  # the pooling head's `pooled` / `pool_attention` columns
        extra["pool_attention"] = True
    if settings.teacher_inputs != "square":  # caches from before views ran on the one square: their key stays
        extra["teacher_inputs"] = settings.teacher_inputs
    if settings.anyres:  # rows are tiles: which tiles an image gives, and their side (`teacher_image_size`)
        extra["anyres"] = {"image_grid_pinpoints": settings.image_grid_pinpoints, "tile_size": settings.tile_size}
    return _jsonable(
        {
            "format_version": CACHE_FORMAT_VERSION,
            "slug": spec.slug,
            "backend": spec.backend,
            "model_id": spec.model_id,
            "revision": spec.revision,  # the weights' Hub revision (TeacherSpec.revision)
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
            "dtype": settings.token_dtype,
            "compression": settings.compress.get(spec.slug),
            "compression_seed": settings.compression_seed if compressed else None,
            **extra,
        }
    )


def key_hash(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_dir_for(root: str | os.PathLike, spec: TeacherSpec, settings: CacheSettings) -> Path:
    return Path(root) / f"{spec.slug}-{key_hash(cache_key(spec, settings))[:12]}"


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
    token_dtype: str = TOKEN_DTYPE  # number format of the tokens (TOKEN_DTYPES)
    # An attention-pooling head's output and probe row (0 if none; caches written before them have neither).
    pooled: int = 0  # channels of the pooled output
    pool_attention: int = 0  # length of the probe's attention row

    @property
    def token_scales(self) -> bool:
        """Whether each token carries a float32 scale (the quantised formats)."""
        return TOKEN_DTYPES[self.token_dtype][2] is not None

    @property
    def bytes_per_image(self) -> int:
        values = TOKEN_DTYPES[self.token_dtype][1] * self.tokens * self.channels
        vectors = self.cls + self.cls_attention + self.pooled + self.pool_attention  # float32 each
        return values + 4 * (self.tokens * self.token_scales + vectors) + ROW_OVERHEAD_BYTES


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

    def width(vector: torch.Tensor | None) -> int:
        return 0 if vector is None else int(vector.shape[-1])

    return StoredShape(
        tokens=math.prod(grid),
        channels=int(settings.compress.get(spec.slug, c)),
        grid=tuple(grid),
        teacher_tokens=int(n),
        teacher_channels=int(c),
        cls=width(output.cls),
        cls_attention=width(output.cls_attention),
        token_dtype=settings.token_dtype,
        pooled=width(output.pooled),
        pool_attention=width(output.pool_attention),
    )


def estimate_cache_size(specs: Sequence[TeacherSpec], settings: CacheSettings, num_images: int) -> dict:
    """Bytes per row per teacher (`bytes_per_image`: a row is an image, or an AnyRes tile) and in total for
    `num_images` images (shapes from a meta-device forward). `rows_per_image`: 1, or for AnyRes the most rows an
    image gives (`anyres_tiles.max_tile_count`), which the total assumes for every image (an upper bound)."""
    teachers = {}
    for spec in specs:
        shape = stored_shape(spec, settings)
        teachers[spec.slug] = {**asdict(shape), "bytes_per_image": shape.bytes_per_image}
    per_row = sum(t["bytes_per_image"] for t in teachers.values())
    rows = max_tile_count(settings.image_grid_pinpoints, settings.tile_size) if settings.anyres else 1
    return {
        "teachers": teachers,
        "bytes_per_image": per_row,
        "rows_per_image": rows,
        "num_images": num_images,
        "total_bytes": per_row * rows * num_images,
    }


# ---------------------------------------------------------------------------------------------------- writing


def stored_grid(output: TeacherOutput, settings: CacheSettings) -> tuple[int, int]:
    """The grid a teacher's tokens are stored on. A teacher with an attention row over its tokens (the anchor's
    CLS row or pooling-head probe row) keeps its own grid in every mode: the row weights its tokens position by
    position, so both must stay on one grid."""
    if settings.grid == "student" and output.cls_attention is None and output.pool_attention is None:
        return tuple(settings.student_grid)
    return tuple(output.grid)


def arrow_features(shape: StoredShape):
    import datasets

    arrow_type = TOKEN_DTYPES[shape.token_dtype][0]
    columns = {
        "sample_id": datasets.Value("string"),
        "image_index": datasets.Value("int32"),
        "tokens": datasets.List(datasets.Value(arrow_type), length=shape.tokens * shape.channels),
    }
    if shape.token_scales:
        columns["token_scales"] = datasets.List(datasets.Value("float32"), length=shape.tokens)
    if shape.cls:
        columns["cls"] = datasets.List(datasets.Value("float32"), length=shape.cls)
    if shape.cls_attention:
        columns["cls_attention"] = datasets.List(datasets.Value("float32"), length=shape.cls_attention)
    if shape.pooled:
        columns["pooled"] = datasets.List(datasets.Value("float32"), length=shape.pooled)
    if shape.pool_attention:
        columns["pool_attention"] = datasets.List(datasets.Value("float32"), length=shape.pool_attention)
    return datasets.Features(columns)


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.arrow"))


# ---------------------------------------------------------------------------------------------------- reading


# The `cache-teachers` option (and training field) that sets a key field, named in a mismatch's message.
_KEY_OPTIONS = {
    "grid": "--grid / teacher_cache_grid",
    "compression": "--compression / teacher_cache_compression",
    "token_dtype": "--token-dtype / teacher_cache_token_dtype",
    "teacher_image_size": "--teacher-image-size / teacher_image_size",
}


def _diff(expected: Mapping, found: Mapping) -> list[str]:
    names = sorted(set(expected) | set(found))
    return [
        f"{n}: cache has {found.get(n)!r}, expected {expected.get(n)!r}"
        + (f" ({_KEY_OPTIONS[n]})" if n in _KEY_OPTIONS else "")
        for n in names
        if expected.get(n) != found.get(n)
    ]


def settings_key(stored_key: Mapping) -> dict:
    """A stored key without the fields its writer fitted: what settings alone determine."""
    return {name: value for name, value in stored_key.items() if name not in FITTED_KEY_FIELDS}


def check_cache_key(directory: Path, spec: TeacherSpec, settings: CacheSettings) -> None:
    """Raise a ValueError naming the teacher and every differing field unless `directory`'s cache.json holds the
    key of `spec` + `settings`."""
    found = settings_key(json.loads((directory / META_FILE).read_text())["key"])
    expected = cache_key(spec, settings)
    if found != expected:
        raise ValueError(f"teacher {spec.slug!r}: cache {directory} is stale: " + "; ".join(_diff(expected, found)))


def find_cache_dir(root: str | os.PathLike, spec: TeacherSpec, settings: CacheSettings) -> Path:
    """The directory of this teacher's cache under `root`; a missing or mismatched cache raises a ValueError
    that names the teacher and, for a cache written with other settings, every field that differs."""
    directory = cache_dir_for(root, spec, settings)
    expected = cache_key(spec, settings)
    if (directory / META_FILE).exists():
        check_cache_key(directory, spec, settings)  # edited by hand or a hash collision
        return directory
    others = sorted(Path(root).glob(f"{spec.slug}-*/{META_FILE}")) if Path(root).is_dir() else []
    if others:
        found = settings_key(json.loads(others[-1].read_text())["key"])
        raise ValueError(
            f"teacher {spec.slug!r}: the cache in {others[-1].parent} was written with other settings ("
            + "; ".join(_diff(expected, found))
            + "); re-run `movekd-hf cache-teachers` with the training settings"
        )
    raise ValueError(f"teacher {spec.slug!r}: no cache under {root}; run `movekd-hf cache-teachers` first")


class TeacherCache:
    """One teacher's cached outputs, memory-mapped, looked up by (sample id, image index).

    directory: holds cache.json (and the basis); the rows are its Arrow shards, or `table` (an Arrow-formatted
    `datasets.Dataset`, e.g. a cache repository's parquet shards) whose columns carry `prefix` (`"eva__tokens"`).
    """

    def __init__(self, directory: str | os.PathLike, table=None, prefix: str = ""):
        import datasets

        self.directory, self.prefix = Path(directory), prefix
        self.meta = json.loads((self.directory / META_FILE).read_text())
        self.shape = StoredShape(**{**self.meta["shape"], "grid": tuple(self.meta["shape"]["grid"])})
        if table is None:
            shards = [datasets.Dataset.from_file(str(path)) for path in shard_paths(self.directory)]
            table = datasets.concatenate_datasets(shards).with_format("arrow") if shards else None
        self.table = table
        self.index: dict[tuple[str, int], int] = {}
        if self.table is not None:  # built once: id -> row
            ids = self.table.select_columns(["sample_id", "image_index"])[:]
            for row, key in enumerate(zip(ids["sample_id"].to_pylist(), ids["image_index"].to_pylist())):
                self.index[key] = row
        self.codec = load_codec(self.directory, self.meta)

    @property
    def slug(self) -> str:
        return self.meta["key"]["slug"]

    @property
    def projection(self) -> torch.Tensor | None:
        return self.codec.projection

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
        """TeacherOutput for these images: tokens [B, N, C] (decoded to the teacher's C channels), cls [B, C],
        cls_attention [B, N], pooled [B, C] and pool_attention [B, N] when stored, in `dtype` on `device`."""
        return self.decode(self.table[self.rows_for(keys)], device, dtype)

    def decode(self, table, device=None, dtype: torch.dtype = torch.float32) -> TeacherOutput:
        """A pyarrow table of this teacher's rows (its columns under `prefix`) -> TeacherOutput, as `fetch`."""
        shape, rows = self.shape, len(table)

        def column(name: str, width: int) -> torch.Tensor:
            chunks = table[self.prefix + name].combine_chunks().flatten()
            values = chunks.to_numpy(zero_copy_only=False).copy()  # writable
            return torch.from_numpy(values.reshape(rows, width)).to(device=device)

        stored = column("tokens", shape.tokens * shape.channels).view(rows, shape.tokens, shape.channels)
        scales = column("token_scales", shape.tokens) if shape.token_scales else None
        if self.codec.tensors() or scales is not None:
            tokens = self.codec.decode(stored, scales)  # back to the teacher's C channels, float32
        else:
            tokens = stored
        out = TeacherOutput(tokens=tokens.to(dtype), grid=shape.grid)
        if shape.cls:
            out.cls = column("cls", shape.cls).to(dtype)
        if shape.cls_attention:
            out.cls_attention = column("cls_attention", shape.cls_attention).to(dtype)
        if shape.pooled:
            out.pooled = column("pooled", shape.pooled).to(dtype)
        if shape.pool_attention:
            out.pool_attention = column("pool_attention", shape.pool_attention).to(dtype)
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

    @classmethod
    def from_repo(
        cls,
        folder: str | os.PathLike,
        specs: Sequence[TeacherSpec],
        settings: CacheSettings,
        dtype: torch.dtype = torch.float32,
        distiller=None,
        **load_kwargs,
    ) -> CachedTeachers:
        """The same source over a cache repository (`export_cache_repo`'s folder, or a local snapshot of one on the
        Hub): its parquet shards through `datasets.load_dataset("parquet", data_files=repo_data_files(folder),
        split="train", **load_kwargs)`."""
        import datasets

        directories = repo_teacher_dirs(folder, specs, settings)
        files = repo_data_files(folder)
        table = datasets.load_dataset("parquet", data_files=files, split="train", **load_kwargs).with_format("arrow")
        source = cls.__new__(cls)
        source.settings, source.dtype = settings, dtype
        source.caches = {
            slug: TeacherCache(directory, table, prefix=slug + REPO_SEPARATOR)
            for slug, directory in directories.items()
        }
        if distiller is not None:
            check_cache_fits_distiller(source, distiller)
        return source

    def __call__(self, inputs: Mapping) -> dict[str, TeacherOutput]:
        if "sample_ids" not in inputs:
            raise ValueError("CachedTeachers needs `sample_ids` in the batch (the collator's sample id list)")
        keys = image_keys(inputs["sample_ids"], inputs.get("images_per_sample"))
        if not keys:
            return {}
        pixels = inputs.get("pixel_values")
        device = pixels.device if isinstance(pixels, torch.Tensor) else None
        return {slug: cache.fetch(keys, device, self.dtype) for slug, cache in self.caches.items()}


def repo_data_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """{"train": the repository's parquet shards, sorted}. Named file by file, `datasets` keys its cache (and a
    stream's column types) on their paths and modification times; loaded as a folder, it keys them on the folder's
    name and README alone (datasets 5.2), so two cache repositories in folders of one name would read each other's
    rows. Raises ValueError when the folder has no shard."""
    files = sorted(str(path) for path in Path(folder).glob(REPO_DATA_FILES))
    if not files:
        raise ValueError(f"the cache repository {folder} has no {REPO_DATA_FILES}")
    return {"train": files}


def repo_teacher_dirs(
    folder: str | os.PathLike, specs: Sequence[TeacherSpec], settings: CacheSettings
) -> dict[str, Path]:
    """slug -> `folder/teachers/<slug>`, each checked against the key of `specs` + `settings` (ValueError if
    missing or written with other settings)."""
    directories = {}
    for spec in specs:
        directory = Path(folder) / REPO_TEACHERS / spec.slug
        if not (directory / META_FILE).exists():
            raise ValueError(f"teacher {spec.slug!r}: the cache repository {folder} has no {directory / META_FILE}")
        check_cache_key(directory, spec, settings)
        directories[spec.slug] = directory
    return directories


def check_cache_fits_distiller(source: CachedTeachers, distiller) -> None:
    """Refuse caches whose stored grid the distiller cannot use with the loss it would compute online.

    token_mix adapters and student-to-teacher heads work on the teacher's own tokens, so they need `native`;
    feature standardisation (running statistics or PHI-S) is fitted on the teacher's own tokens too.
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
                f"teacher {name!r}: feature standardisation (feature_standardization="
                f"{distiller.config.standardization!r}) fits its statistics on the teacher's own tokens; the cache in "
                f"{cache.directory} stores them resampled to the student grid; rebuild it with `--grid native`"
            )
