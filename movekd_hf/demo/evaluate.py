"""Held-out evaluation of a trained demo VLM by question type, as per-question units for paired comparisons.

Every answer of the world is one word of the demo's word-level vocabulary, so the model's answer is its greedy
first token: one forward pass per batch, `argmax` of the next-token logits after the prompt (what greedy decoding
emits first; `answer_questions` is the same with `generate`, used by the final check's kind of path). A question
scores 1 when that word is the gold answer. Existence questions (POPE-style yes/no) are scored as accuracy.

`unit_scores` turns one model's answers into `movekd_hf.evaluation.compare.UnitScores` (unit = question, type =
question kind, value = correct), so the demo's intervals come from the same `paired_bootstrap` as
`movekd-hf compare`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..evaluation.compare import UnitScores, mean_percent, weighted_mean
from ..modeling.llava_conventions import IMAGE_TOKEN, vicuna_v1_generation_prompt
from . import world

OPEN_TYPES = ("colour", "shape", "stripes", "count", "position")
COLUMNS = (*OPEN_TYPES, "existence")


def prompt(question: world.Question) -> str:
    return vicuna_v1_generation_prompt(f"{IMAGE_TOKEN}\n{question.text} {world.SHORT_ANSWER}")


@torch.no_grad()
def first_word_answers(
    model, processor, questions: list[world.Question], images: dict[int, object], batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:  # fmt: skip
    """{question key: the greedy first token, decoded} of `model` for `questions`; images: scene index -> PIL image."""
    model.eval()
    answers: dict[str, str] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        inputs = processor(text=[prompt(q) for q in chunk], images=[images[q.scene] for q in chunk], padding=True,
                           return_tensors="pt")  # fmt: skip
        logits = model(**inputs).logits[:, -1]  # left padding: the last position is every prompt's end
        for question, token in zip(chunk, logits.argmax(dim=-1).tolist()):
            answers[question.key] = processor.tokenizer.decode([token], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(chunk))
    return answers


@torch.no_grad()
def answer_questions(
    model, processor, questions: list[world.Question], scenes: list[world.Scene], batch_size: int = 64,
    max_new_tokens: int = 3,
) -> dict[str, str]:  # fmt: skip
    """Greedy answers ({question key: text}) of `model` through `generate`, for `questions` about `scenes`."""
    model.eval()
    answers: dict[str, str] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = [world.render_scene(scenes[q.scene]) for q in chunk]
        inputs = processor(text=[prompt(q) for q in chunk], images=images, padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for question, text in zip(chunk, processor.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[question.key] = text.strip()
    return answers


def unit_scores(answers: dict[str, str], questions: list[world.Question]) -> UnitScores:
    """Per-question correctness by question kind (COLUMNS), for `compare.paired_bootstrap`; headline: the mean
    over all questions. A missing answer counts as wrong."""
    units: dict[str, list[str]] = {kind: [] for kind in COLUMNS}
    values: dict[str, list[list[float]]] = {kind: [] for kind in COLUMNS}
    for question in sorted(questions, key=lambda q: q.key):
        given = answers.get(question.key, "").strip().lower().rstrip(".")
        units[question.kind].append(question.key)
        values[question.kind].append([float(given == question.answer)])
    kinds = [kind for kind in COLUMNS if units[kind]]
    return UnitScores(
        "demo-world",
        {kind: units[kind] for kind in kinds},
        {kind: np.asarray(values[kind], dtype=np.float64) for kind in kinds},
        mean_percent,
        weighted_mean,
    )


def accuracy_row(scores: UnitScores) -> dict[str, float]:
    """Accuracy (%) per question kind and over all questions ("overall")."""
    row = {kind: float(values.mean() * 100.0) for kind, values in scores.values.items()}
    row["overall"] = float(np.concatenate(list(scores.values.values())).mean() * 100.0)
    return row
