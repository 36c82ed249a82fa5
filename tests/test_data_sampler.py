"""`group_by_modality_length`: single-modality batches, a permutation, reproducible per epoch."""

from __future__ import annotations

import random

import pytest
import torch

from movekd_hf.training.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices


def signed_lengths(num_image: int, num_text: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = [rng.randint(30, 400) for _ in range(num_image)] + [-rng.randint(5, 300) for _ in range(num_text)]
    rng.shuffle(lengths)
    return lengths


@pytest.mark.parametrize(("batch_size", "world_size", "per_device"), [(4, 1, 4), (6, 2, 3), (8, 3, 2)])
def test_every_batch_is_single_modality_except_in_the_last_megabatch(batch_size, world_size, per_device):
    lengths = signed_lengths(num_image=53, num_text=31)
    order = modality_length_grouped_indices(lengths, batch_size, world_size, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))  # a permutation: nothing dropped or repeated
    megabatch = batch_size * world_size
    leftover = 53 % megabatch + 31 % megabatch  # the one merged, possibly mixed, final mega-batch
    body = order[: len(order) - leftover]
    for start in range(0, len(body), per_device):
        signs = {lengths[i] > 0 for i in body[start : start + per_device]}
        assert len(signs) == 1, f"mixed batch at {start}: {[lengths[i] for i in body[start : start + per_device]]}"
    assert {lengths[i] > 0 for i in order[len(body) :]} == {True, False}


def test_each_rank_chunk_is_sorted_by_length_within_a_megabatch():
    lengths = signed_lengths(num_image=40, num_text=0)
    order = modality_length_grouped_indices(lengths, 4, 2, torch.Generator().manual_seed(1))
    first_megabatch = [lengths[i] for i in order[:8]]
    assert sorted(first_megabatch, reverse=True)[0] in first_megabatch[:4]  # the longest sample goes first
    totals = [sum(first_megabatch[:4]), sum(first_megabatch[4:])]
    assert abs(totals[0] - totals[1]) <= max(first_megabatch)  # greedy dealing balances the ranks' token counts


def test_single_modality_datasets_and_invalid_lengths():
    only_text = signed_lengths(0, 10)
    order = modality_length_grouped_indices(only_text, 3, 1, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(10))
    with pytest.raises(ValueError, match="modality lengths must be non-zero"):
        modality_length_grouped_indices([3, 0, -2], 2)
    with pytest.raises(ValueError, match="batch_size and world_size must be positive"):
        modality_length_grouped_indices([3, -2], 0)


def test_sampler_is_reproducible_per_epoch_and_reshuffles_between_epochs():
    lengths = signed_lengths(30, 20)
    first, second = ModalityLengthGroupedSampler(lengths, 4, seed=7), ModalityLengthGroupedSampler(lengths, 4, seed=7)
    assert list(first) == list(second) and len(first) == 50
    epoch_zero = list(first)
    first.set_epoch(1)
    assert list(first) != epoch_zero and sorted(first) == list(range(50))
