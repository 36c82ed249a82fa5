"""Hugging Face datasets versions of the benchmarks (the `lmms-lab/*` layouts) -> records.

Give a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (we never download): a dataset
dict is read from its `test`, then `validation`, then first split. Field names follow lmms-lab's cards:
VQAv2 / TextVQA / VizWiz-VQA (question_id, question, answers, image), GQA (id, question, answer, image),
POPE (question_id, question, answer, category, image), ScienceQA (question, choices, answer, hint, image),
MME (question_id, question, answer, category, image), MMBench (index, question, hint, A-D, answer, category,
image).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .records import mmbench_record


def _answers(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [a["answer"] if isinstance(a, Mapping) else str(a) for a in value]


def _vqa_like(i: int, row: Mapping) -> dict:
    qid = row.get("question_id", i)
    return {"key": str(qid), "question_id": qid, "question": row["question"], "image": row["image"],
            "answers": _answers(row.get("answers")), "answer_type": row.get("answer_type") or row.get("category")}  # fmt: skip


def _gqa(i: int, row: Mapping) -> dict:
    qid = row.get("id", row.get("question_id", i))
    return {"key": str(qid), "question_id": qid, "question": row["question"], "image": row["image"],
            "answer": row.get("answer"), "structural": (row.get("types") or {}).get("structural")}  # fmt: skip


def _pope(i: int, row: Mapping) -> dict:
    qid = row.get("question_id", i)
    return {"key": f"{row['category']}/{qid}", "question_id": qid, "question": row["question"],
            "image": row["image"], "label": row.get("answer", row.get("label")), "category": row["category"]}  # fmt: skip


def _scienceqa(i: int, row: Mapping) -> dict:
    return {"key": str(i), "question_id": i, "question": row["question"], "choices": list(row["choices"]),
            "answer": row["answer"], "hint": row.get("hint") or None, "image": row.get("image")}  # fmt: skip


def _mme(i: int, row: Mapping) -> dict:
    image_id = str(row.get("question_id", i))
    return {"key": f"{image_id}::{row['question']}", "question_id": image_id, "image_id": image_id,
            "question": row["question"], "answer": row.get("answer"), "category": row["category"],
            "image": row["image"]}  # fmt: skip


def _mmbench(i: int, row: Mapping) -> dict:
    return mmbench_record(dict(row, index=row.get("index", i)))


HF_ROW_READERS = {"vqav2": _vqa_like, "textvqa": _vqa_like, "vizwiz": _vqa_like, "gqa": _gqa, "pope": _pope,
                  "scienceqa": _scienceqa, "mme": _mme, "mmbench": _mmbench}  # fmt: skip


def read_hf_records(name: str, folder: Path) -> list[dict]:
    """Records of benchmark `name` from a saved `datasets` folder."""
    import datasets

    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        split = next((s for s in ("test", "validation", "val", "dev") if s in data), next(iter(data)))
        data = data[split]
    row_reader = HF_ROW_READERS[name]
    try:
        return [row_reader(i, row) for i, row in enumerate(data)]
    except KeyError as err:
        raise ValueError(f"{folder}: {name} rows need field {err}; columns are {data.column_names}") from err
