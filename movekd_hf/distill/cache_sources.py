"""Where training finds a teacher-feature cache (`open_cached_teachers`: a cache folder, an exported cache
repository, or a Hub dataset repository holding one) and how a cache repository streams (`stream_cached_teachers`).
The layout and the reading side are in cache.py."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .cache import (
    REPO_DATA_FILES,
    REPO_SEPARATOR,
    REPO_TEACHERS,
    CachedTeachers,
    CacheSettings,
    TeacherCache,
    repo_data_files,
    repo_teacher_dirs,
)
from .teachers import TeacherOutput, TeacherSpec


def is_cache_repo(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a cache repository (`export_cache_repo`'s layout: `teachers/`, `data/train-*.parquet`)."""
    return (Path(folder) / REPO_TEACHERS).is_dir() and any(Path(folder).glob(REPO_DATA_FILES))


def open_cached_teachers(
    location: str | os.PathLike,
    specs: Sequence[TeacherSpec],
    settings: CacheSettings,
    dtype: torch.dtype = torch.float32,
    distiller=None,
) -> CachedTeachers:
    """The `CachedTeachers` training reads, wherever the cache is: a cache folder (`cache-teachers --cache-dir`), a
    cache repository folder (`--export-repo`), or the id of a Hub dataset repository holding one, downloaded (or
    found in the Hub cache) with `huggingface_hub.snapshot_download(id, repo_type="dataset")`.
    Raises ValueError when `location` is neither an existing folder nor a repository the Hub gives."""
    folder = Path(location)
    if not folder.exists() and str(location).count("/") == 1:  # "owner/name": a Hub dataset repository
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(str(location), repo_type="dataset"))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
            raise ValueError(
                f"teacher cache {str(location)!r} is no local folder and the Hub gave no dataset repository of that "
                f"id ({type(error).__name__}: {str(error).splitlines()[0]})"
            ) from error
    if is_cache_repo(folder):
        return CachedTeachers.from_repo(folder, specs, settings, dtype, distiller)
    return CachedTeachers(folder, specs, settings, dtype, distiller)


def stream_cached_teachers(
    folder: str | os.PathLike,
    specs: Sequence[TeacherSpec],
    settings: CacheSettings,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    **load_kwargs,
) -> Iterator[tuple[list[tuple[str, int]], dict[str, TeacherOutput]]]:
    """Stream a cache repository in its row order without downloading it first: yields ((sample id, image index)
    per image, {slug: TeacherOutput}) per `batch_size` rows, decoded as `CachedTeachers` decodes them.
    Uses `datasets.load_dataset("parquet", data_files=repo_data_files(folder), split="train", streaming=True,
    **load_kwargs)`."""
    import datasets

    readers = {
        slug: TeacherCache(directory, prefix=slug + REPO_SEPARATOR)  # no local shards: decoding only
        for slug, directory in repo_teacher_dirs(folder, specs, settings).items()
    }
    files = repo_data_files(folder)
    stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True, **load_kwargs)
    for batch in stream.with_format("arrow").iter(batch_size=batch_size):
        keys = list(zip(batch["sample_id"].to_pylist(), batch["image_index"].to_pylist()))
        yield keys, {slug: reader.decode(batch, dtype=dtype) for slug, reader in readers.items()}
