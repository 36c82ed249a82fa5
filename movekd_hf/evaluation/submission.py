"""Submission files for the columns a server scores (METHOD.md section 7): VQAv2 test-dev and VizWiz test (EvalAI
JSON) and MMBench dev (the MMBench server's upload sheet). Formats as LLaVA-1.5 writes them:
scripts/convert_vqav2_for_submission.py, convert_vizwiz_for_submission.py and convert_mmbench_for_submission.py.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AnswersFileError, DataFileError
from .answers import read_answers
from .benchmarks import EvalSample, mmbench_rounds
from .normalize import normalize_vqa_answer

SUBMISSION_BENCHMARKS = ("vqav2", "vizwiz", "mmbench")
# convert_mmbench_for_submission.py drops these columns of the TSV and inserts `prediction` as the 7th column.
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
MMBENCH_PREDICTION_COLUMN = 6


def evalai_answer(text: str) -> str:
    """An answer as EvalAI's processor leaves it (LLaVA's `EvalAIAnswerProcessor`, from MMF): lower case, commas
    and question marks dropped, "'s" split off, then the VQA normalisation (`normalize_vqa_answer`)."""
    return normalize_vqa_answer(text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())


def question_samples(questions: Sequence[Mapping[str, Any]]) -> list[EvalSample]:
    """LLaVA question-file lines (`question_id`, `image`, `text`) -> samples keyed by their question id."""
    return [
        EvalSample(str(q["question_id"]), q["question_id"], q.get("image"), str(q.get("text", ""))) for q in questions
    ]


def vqav2_submission(
    answers: str | Path, questions: Sequence[Mapping[str, Any]], allow_partial: bool = True
) -> tuple[list[dict], dict[str, int]]:
    """EvalAI's VQAv2 file: `[{"question_id": int, "answer": str}]` for every question of `questions` (LLaVA's
    llava_vqav2_mscoco_test2015.jsonl: the test-dev phase takes all test2015 ids), "" where unanswered, as LLaVA
    does. Returns (entries, answers-file counts)."""
    texts, report = read_answers(answers, question_samples(questions), allow_partial=allow_partial)
    entries = [{"question_id": int(q["question_id"]), "answer": evalai_answer(texts.get(str(q["question_id"]), ""))}
               for q in questions]  # fmt: skip
    return entries, report.counts()


def vizwiz_submission(
    answers: str | Path, questions: Sequence[Mapping[str, Any]], allow_partial: bool = False
) -> tuple[list[dict], dict[str, int]]:
    """EvalAI's VizWiz file: `[{"image": "VizWiz_test_xxxxxxxx.jpg", "answer": str}]`, one per question of LLaVA's
    llava_test.jsonl. Every question must be answered (LLaVA asserts it) unless `allow_partial` ("" then)."""
    texts, report = read_answers(answers, question_samples(questions), allow_partial=allow_partial)
    if report.missing and not allow_partial:
        first = next(q for q in questions if str(q["question_id"]) not in texts)
        raise AnswersFileError(f"{report.missing} of {report.questions} VizWiz test questions are unanswered, "
                               f"the first question_id {first['question_id']!r}", file=answers,
                               expected="an answer for every question the server scores (or --allow-partial)")  # fmt: skip
    entries = [{"image": q["image"], "answer": evalai_answer(texts.get(str(q["question_id"]), ""))}
               for q in questions]  # fmt: skip
    return entries, report.counts()


def mmbench_sheet(
    answers: str | Path, tsv: str | Path, allow_partial: bool = False
) -> tuple[list[str], list[list[str]], dict[str, int]]:
    """MMBench's upload sheet: every row of the dev TSV with `hint, category, source, image, comment, l2-category`
    dropped and `prediction` (the model's text) inserted as the 7th column. The TSV's circular copies (index
    >= 1e6) get the prediction of our round whose options are theirs. Returns (columns, rows, counts)."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"MMBench TSV {tsv} does not exist")
    csv.field_size_limit(1 << 30)  # base64 images exceed the default field limit
    with tsv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "index" not in rows[0]:
        raise DataFileError("has no 'index' column", file=tsv, expected="MMBench's TSV layout")
    originals = {int(row["index"]): row for row in rows if int(row["index"]) < 1_000_000}
    samples, round_options = [], {}
    for index, row in originals.items():
        options = {
            letter: row[letter] for letter in "ABCDEFGHI" if str(row.get(letter, "")).strip() not in ("", "nan")
        }
        for item in mmbench_rounds({"options": options, "answer": row.get("answer")}):
            key = f"{index}/{item['round']}"
            samples.append(EvalSample(key, index, None, ""))
            round_options[(index, tuple(item["options"].values()))] = key
    texts, report = read_answers(answers, samples, name="mmbench", allow_partial=allow_partial)
    columns = [c for c in rows[0] if c not in MMBENCH_DROPPED]
    columns.insert(MMBENCH_PREDICTION_COLUMN, "prediction")
    table = []
    for row in rows:
        index = int(row["index"])
        options = tuple(row[l] for l in "ABCDEFGHI" if str(row.get(l, "")).strip() not in ("", "nan"))  # noqa: E741
        key = round_options.get((index % 1_000_000, options), f"{index}/0")
        table.append([texts.get(key, "") if c == "prediction" else row.get(c, "") for c in columns])
    return columns, table, report.counts()


def write_submission(name: str, entries: Any, out: str | Path) -> Path:
    """Write a submission: JSON for VQAv2 / VizWiz; for MMBench `(columns, rows)` as a tab-separated sheet with
    the columns of LLaVA's .xlsx (xlsx needs openpyxl, not a dependency: open the TSV and save it as .xlsx)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "mmbench":
        columns, rows = entries
        with out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(columns)
            writer.writerows(rows)
    else:
        out.write_text(json.dumps(entries))
    return out
