"""Answer normalisation of the official VQA evaluation (VQAv2, TextVQA, VizWiz), written from its definition.

Steps, in the official order: lower-case and flatten whitespace; punctuation (removed when it touches a space or
the text holds a digit-comma-digit group such as "3,000", otherwise replaced by a space); periods dropped unless
a digit follows ("3.5" keeps its point); then per word: number words to digits, articles removed, missing
apostrophes of contractions restored ("dont" -> "don't").
"""

from __future__ import annotations

import itertools
import re

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                                "`", ",", "?", "!")  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official evaluation restores apostrophes in contractions typed without them. Its table lists, for every
# contraction below, each spelling with some apostrophes missing; we generate those spellings instead of listing
# them, which yields the same mapping for these forms.
_CONTRACTIONS: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd", "i'd've",
    "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've",
    "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
    "they're", "they've", "'twas", "wasn't", "we'd", "we'd've", "we'll", "we're", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who're", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _spellings_without_apostrophes(word: str) -> list[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes removed."""
    parts = word.split("'")
    spellings = []
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        if all(keep):
            continue
        text = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:]))
        spellings.append(text)
    return spellings


def _build_contraction_map() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        for spelling in _spellings_without_apostrophes(word):
            if spelling not in _LEFT_ALONE:
                table.setdefault(spelling, word)
    return table


# Spellings that are ordinary words ("its", "well", "shed"...) are not in the official table. Neither are the
# "I" forms: the official keys are capitalised ("Im") and never match the lower-cased text, so "im" stays "im".
_LEFT_ALONE = frozenset({"its", "hell", "wed", "ill", "well", "were", "shed", "id", "im", "ive", "idve", "id've",
                         "i'dve", "lets", "ow'sat", "'owsat", "'ow'sat", "owsat", "ows'at", "ow's'at"})  # fmt: skip
CONTRACTIONS: dict[str, str] = _build_contraction_map()

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern was meant as "a period not preceded by a digit" but, as written, it only checks that no
# digit follows; we keep the behaviour the published numbers were computed with.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """The official `processPunctuation`: `text` -> text with punctuation removed or turned into spaces."""
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def map_digits_articles_contractions(text: str) -> str:
    """The official `processDigitArticle`: number words -> digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise one free-text answer the way the official VQA evaluation does."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return map_digits_articles_contractions(strip_punctuation(text))
