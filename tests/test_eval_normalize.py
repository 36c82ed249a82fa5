"""VQA answer normalisation and per-question accuracy, against values derived by hand from the official rules."""

import itertools

import pytest

from movekd_hf.evaluation.normalize import normalize_vqa_answer
from movekd_hf.evaluation.scorers import vqa_answer_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
        ("none", "0"),
        ("The cat", "cat"),  # articles removed
        ("a red shirt", "red shirt"),
        ("an apple", "apple"),
        ("yes, sir", "yes sir"),  # comma touching a space: removed
        ("3,000", "3000"),  # digit-comma-digit: every punctuation mark removed
        ("black-and-white", "black and white"),  # hyphen not touching a space: becomes a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("1.", "1"),
        ("dont", "don't"),  # missing apostrophes restored
        ("couldntve", "couldn't've"),
        ("youre right", "you're right"),
        ("its", "its"),  # ordinary words that look like contractions are left alone
        ("im", "im"),  # the official keys for "I" forms are capitalised and never match
        ("What's up?", "what's up"),
        ("  Unanswerable.\n", "unanswerable"),
        ("(left)", "left"),
    ],
)
def test_normalize_vqa_answer_official_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_closed_form(matches, expected):
    # k of 10 humans agree: k subsets lose a match (min((k-1)/3, 1)), 10-k keep all (min(k/3, 1)).
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_answer_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_matches_explicit_subsets():
    humans = ["2", "two", "Two.", "3", "three", "3", "4", "2", "five", "3"]
    for prediction in ("2", "three", "4", "five", "6"):
        normalised = [normalize_vqa_answer(h) for h in humans]
        subsets = itertools.combinations(range(10), 9)
        expected = sum(min(sum(normalised[i] == normalize_vqa_answer(prediction) for i in s) / 3, 1) for s in subsets)
        assert vqa_answer_accuracy(prediction, humans) == pytest.approx(expected / 10)


def test_vqa_accuracy_needs_several_answers():
    with pytest.raises(ValueError, match="at least 2 human answers"):
        vqa_answer_accuracy("cat", ["cat"])
