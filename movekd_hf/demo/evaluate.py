"""Held-out evaluation of a trained demo checkpoint, by question type, with the package's own scorers.

Open questions (colour, shape, count, position) are scored with `vqa_accuracy` (each gold answer given as the ten
"human" answers, so it is exact match after VQA normalisation) grouped by type; existence questions are POPE:
`pope_scores` over the random / popular / adversarial splits, F1 as the headline like the paper's POPE column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..evaluation.scorers import pope_scores, vqa_accuracy
from ..modeling.llava_conventions import IMAGE_TOKEN, vicuna_v1_generation_prompt
from . import world

OPEN_TYPES = ("colour", "shape", "count", "position")
# Table columns: the four open types, POPE F1, and their mean.
COLUMNS = (*OPEN_TYPES, "pope", "overall")


def prompt(question: world.Question) -> str:
    return vicuna_v1_generation_prompt(f"{IMAGE_TOKEN}\n{question.text} {world.SHORT_ANSWER}")


@torch.no_grad()
def answer_questions(
    model, processor, questions: list[world.Question], scenes: list[world.Scene], batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Greedy answers ({question key: text}) of `model` for `questions` about the rendered `scenes`."""
    model.eval()
    answers: dict[str, str] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = [world.render_scene(scenes[q.scene]) for q in chunk]
        inputs = processor(text=[prompt(q) for q in chunk], images=images, padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for question, text in zip(chunk, processor.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[question.key] = text.strip()
        if progress is not None:
            progress(len(chunk))
    return answers


def score(answers: dict[str, str], questions: list[world.Question]) -> dict[str, dict[str, float]]:
    """{"open": vqa_accuracy by type, "pope": pope_scores} for one model's answers."""
    open_questions = [q for q in questions if q.kind in OPEN_TYPES]
    gold = {q.key: [q.answer] * 10 for q in open_questions}
    kinds = {q.key: q.kind for q in open_questions}
    open_scores = vqa_accuracy({k: answers[k] for k in gold if k in answers}, gold, kinds)
    existence = [q for q in questions if q.kind == "existence"]
    pope = pope_scores(
        {q.key: answers[q.key] for q in existence if q.key in answers},
        {q.key: q.answer for q in existence},
        {q.key: q.split for q in existence},
    )
    return {"open": open_scores, "pope": pope}


def table_row(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """The row of the results table: accuracy per open type, POPE F1, and the mean of those five."""
    row = {kind: scores["open"].get(f"accuracy_{kind}", 0.0) for kind in OPEN_TYPES}
    row["pope"] = scores["pope"]["f1"]
    row["overall"] = sum(row.values()) / len(row)
    return row
