"""LLaVA's `group_by_modality_length`: batches of one modality, grouped by length.

Lengths are signed (`modality_length` from `tokenize_dataset`): positive for samples with images, negative for
text-only ones. Each modality is shuffled and cut into mega-batches of `world_size * batch_size`; inside a
mega-batch, indices are sorted by length and dealt to `world_size` chunks of balanced length. Mega-batches are then
shuffled together; the two leftover (short) mega-batches are merged into one final, possibly mixed, mega-batch.
So every batch of `batch_size` consecutive indices is single-modality except in the last mega-batch.

`batch_size` is what one optimizer step sees per process (per-device batch x gradient accumulation), as in LLaVA;
any per-device batch dividing it stays single-modality.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _balanced_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal indices (longest first) to the chunk with the smallest total length, each chunk up to an equal size."""
    if len(indices) % num_chunks != 0:
        return [indices[start::num_chunks] for start in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        target = min(open_chunks, key=lambda c: totals[c])
        chunks[target].append(index)
        totals[target] += lengths[index]
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """Shuffle, cut into mega-batches of `world_size * batch_size`, sort each by length, balance across ranks."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    result: list[int] = []
    for start in range(0, len(order), megabatch_size):
        megabatch = sorted(order[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in _balanced_chunks(megabatch, lengths, world_size):
            result.extend(chunk)
    return result


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int = 1, generator: torch.Generator | None = None
) -> list[int]:
    """Indices in an order where each `batch_size` slice holds one modality (see module docstring).

    `lengths`: one signed, non-zero length per sample (+ image, - text-only).
    """
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (+ for image samples, - for text-only samples)")
    image_ids = [i for i, length in enumerate(lengths) if length > 0]
    text_ids = [i for i, length in enumerate(lengths) if length < 0]
    megabatch_size = world_size * batch_size
    megabatches: list[list[int]] = []
    leftovers: list[int] = []
    for ids in (image_ids, text_ids):
        if not ids:
            continue
        sizes = [abs(lengths[i]) for i in ids]
        shuffled = [ids[i] for i in length_grouped_indices(sizes, batch_size, world_size, generator)]
        groups = [shuffled[start : start + megabatch_size] for start in range(0, len(shuffled), megabatch_size)]
        if len(groups[-1]) < megabatch_size:  # a short group would leave a mixed or ragged batch mid-epoch
            leftovers.extend(groups.pop())
        megabatches.extend(groups)
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    result = [index for position in order for index in megabatches[position]]
    return result + sorted(leftovers)


class ModalityLengthGroupedSampler(Sampler[int]):
    """A `Sampler` over `modality_length_grouped_indices`; re-shuffles every epoch via `set_epoch`."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (+ for image samples, - for text-only samples)")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
