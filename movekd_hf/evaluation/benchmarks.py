"""Benchmarks: turn records (one dict per question, see `readers.py`) into prompts to generate and ground truth to
score, with one scorer per benchmark. Keys tie the two together and are unique within a benchmark."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataFileError, SettingsError
from . import prompts, scorers
from .answers import read_answers

BENCHMARKS: tuple[str, ...] = ("vqav2", "gqa", "textvqa", "vizwiz", "pope", "scienceqa", "mme", "mmbench")
# The number each benchmark contributes to the paper's table (METHOD.md section 7).
HEADLINE_METRIC: dict[str, str] = {"vqav2": "accuracy", "gqa": "accuracy", "textvqa": "accuracy",
                                   "vizwiz": "accuracy", "pope": "f1", "scienceqa": "accuracy",
                                   "mme": "perception", "mmbench": "accuracy"}  # fmt: skip
PAPER_COLUMNS: dict[str, str] = {"vqav2": "VQAv2", "gqa": "GQA", "textvqa": "TextVQA", "vizwiz": "VizWiz",
                                 "pope": "POPE", "scienceqa": "SQA", "mme": "MME", "mmbench": "MMB"}  # fmt: skip
# Columns a server scores (METHOD.md section 7): the split the paper reports and the server; a local score of
# these benchmarks (on validation, or MMBench dev without the server's matching) is another number.
SERVER_SCORED: dict[str, str] = {
    "vqav2": "VQAv2 test-dev2015, scored by the EvalAI server (write the file with `movekd-hf submission`)",
    "vizwiz": "VizWiz test, scored by the EvalAI server (write the file with `movekd-hf submission`)",
    "mmbench": "MMBench dev 2023-07-12, scored by the MMBench server, circular (upload the sheet `movekd-hf "
    "submission` writes)",
}
TEXTVQA_OCR_MARK = "Reference OCR token"  # LLaVA's llava_textvqa_val_v051_ocr.jsonl prompts carry it
# Other spellings of the benchmarks, keyed by the name in lowercase letters and digits only (see `benchmark_key`).
ALIASES = {
    "sqa": "scienceqa",
    "sqaimg": "scienceqa",
    "scienceqaimg": "scienceqa",
    "mmb": "mmbench",
    "mmbenchen": "mmbench",
}


def benchmark_key(name: str) -> str:
    """A benchmark name as a key of `BENCHMARKS` ("VQA-v2" -> "vqav2", "SQA-IMG" -> "scienceqa"): lowercase,
    letters and digits only, aliases resolved. Names of other benchmarks come back normalised, unchecked."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return ALIASES.get(key, key)


def canonical_name(name: str) -> str:
    """Benchmark name in its canonical spelling. Raises `SettingsError` (a ValueError) listing the known ones."""
    key = benchmark_key(name)
    if key not in BENCHMARKS:
        raise SettingsError(
            f"unknown benchmark {name!r}", field="--benchmark", expected=f"one of {', '.join(BENCHMARKS)}"
        )
    return key


@dataclass
class EvalSample:
    """One generation request. `image` is a path or a PIL image; `prompt` carries LLaVA's instruction."""

    key: str
    question_id: Any
    image: Any
    prompt: str
    category: str | None = None


@dataclass
class Benchmark:
    """Samples to generate, ground truth to score, and `info` about the files used (e.g. `prompt_set`)."""

    name: str
    samples: list[EvalSample]
    truth: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, predictions: Mapping[str, str]) -> dict[str, float]:
        """Score `{key: text}` predictions with this benchmark's official metric."""
        return SCORERS[self.name](predictions, **self.truth)


SCORERS: dict[str, Callable[..., dict[str, float]]] = {
    "vqav2": scorers.vqa_accuracy, "textvqa": scorers.vqa_accuracy, "vizwiz": scorers.vqa_accuracy,
    "gqa": scorers.gqa_accuracy, "pope": scorers.pope_scores, "scienceqa": scorers.scienceqa_accuracy,
    "mme": scorers.mme_scores, "mmbench": scorers.mmbench_circular_accuracy,
}  # fmt: skip


def _require(record: Mapping, fields: Sequence[str], where: str) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise DataFileError(
            f"lacks field(s) {missing}; has {sorted(record)}",
            sample=str(record.get("key", "?")),
            expected=f"the fields of the {where} layout",
        )


def _vqa_like(name: str, records: Sequence[Mapping]) -> Benchmark:
    samples, answers, types = [], {}, {}
    for r in records:
        _require(r, ("key", "question", "image"), name)
        prompt = r.get("prompt") or prompts.short_answer_prompt(r["question"], unanswerable=name == "vizwiz")
        samples.append(EvalSample(r["key"], r.get("question_id", r["key"]), r["image"], prompt))
        if r.get("answers"):
            answers[r["key"]] = list(r["answers"])
            if r.get("answer_type"):
                types[r["key"]] = r["answer_type"]
    return Benchmark(name, samples, {"answers": answers, "answer_types": types or None})


def _gqa(records: Sequence[Mapping]) -> Benchmark:
    samples, answers, structural = [], {}, {}
    for r in records:
        _require(r, ("key", "question", "image"), "gqa")
        prompt = r.get("prompt") or prompts.short_answer_prompt(r["question"])
        samples.append(EvalSample(r["key"], r.get("question_id", r["key"]), r["image"], prompt))
        if r.get("answer") is not None:
            answers[r["key"]] = r["answer"]
            if r.get("structural"):
                structural[r["key"]] = r["structural"]
    return Benchmark("gqa", samples, {"answers": answers, "structural_types": structural or None})


def _pope(records: Sequence[Mapping]) -> Benchmark:
    samples, labels, splits = [], {}, {}
    for r in records:
        _require(r, ("key", "question", "image", "category"), "pope")
        prompt = r.get("prompt") or prompts.short_answer_prompt(r["question"])
        samples.append(EvalSample(r["key"], r.get("question_id", r["key"]), r["image"], prompt, r["category"]))
        if r.get("label") is not None:
            labels[r["key"]] = str(r["label"]).strip().lower()
            splits[r["key"]] = r["category"]
    return Benchmark("pope", samples, {"labels": labels, "splits": splits})


def _scienceqa(records: Sequence[Mapping]) -> Benchmark:
    samples, problems, text_only = [], {}, set()
    for r in records:
        _require(r, ("key", "question", "choices", "answer"), "scienceqa")
        if r.get("image") is None:
            text_only.add(str(r.get("question_id", r["key"])))
            continue  # ScienceQA-IMG: the paper scores the questions that come with an image
        hint = f"Context: {r['hint']}" if r.get("hint") else None
        prompt = r.get("prompt") or prompts.multiple_choice_prompt(r["question"], r["choices"], hint)
        samples.append(EvalSample(r["key"], r.get("question_id", r["key"]), r["image"], prompt))
        problems[r["key"]] = {"choices": list(r["choices"]), "answer": int(r["answer"])}
    return Benchmark("scienceqa", samples, {"problems": problems}, info={"ignored_ids": text_only})


def _mme(records: Sequence[Mapping]) -> Benchmark:
    samples, questions = [], {}
    for r in records:
        _require(r, ("key", "question", "image", "category", "image_id"), "mme")
        prompt = r.get("prompt") or prompts.short_answer_prompt(r["question"])
        samples.append(EvalSample(r["key"], r.get("question_id", r["image_id"]), r["image"], prompt, r["category"]))
        if r.get("answer") is not None:
            questions[r["key"]] = {"category": r["category"], "image": r["image_id"], "answer": r["answer"]}
    return Benchmark("mme", samples, {"questions": questions})


def mmbench_rounds(record: Mapping) -> list[dict[str, Any]]:
    """The circular rounds of one MMBench question: round i shifts the options left by i (A,B,C -> B,C,A)."""
    letters = [letter for letter in "ABCDEFGHI" if record["options"].get(letter) not in (None, "")]
    texts = [record["options"][letter] for letter in letters]
    answer_pos = letters.index(record["answer"]) if record.get("answer") in letters else None
    rounds = []
    for shift in range(len(letters)):
        order = texts[shift:] + texts[:shift]
        answer = None if answer_pos is None else letters[(answer_pos - shift) % len(letters)]
        rounds.append({"round": shift, "options": dict(zip(letters, order)), "answer": answer})
    return rounds


def _mmbench(records: Sequence[Mapping]) -> Benchmark:
    samples, rounds = [], {}
    for r in records:
        _require(r, ("index", "question", "image", "options"), "mmbench")
        for item in mmbench_rounds(r):
            key = f"{r['index']}/{item['round']}"
            options = list(item["options"].values())
            prompt = prompts.multiple_choice_prompt(r["question"], options, r.get("hint"))
            samples.append(EvalSample(key, r["index"], r["image"], prompt, r.get("category")))
            if item["answer"] is not None:
                rounds[key] = {"group": r["index"], "answer": item["answer"], "options": item["options"],
                               "category": r.get("category")}  # fmt: skip
    return Benchmark("mmbench", samples, {"rounds": rounds})


def build_benchmark(name: str, records: Sequence[Mapping]) -> Benchmark:
    """Records of benchmark `name` (see `readers.py` for their fields) -> samples and ground truth."""
    name = canonical_name(name)
    if name in ("vqav2", "textvqa", "vizwiz"):
        return _vqa_like(name, records)
    builders = {"gqa": _gqa, "pope": _pope, "scienceqa": _scienceqa, "mme": _mme, "mmbench": _mmbench}
    return builders[name](records)


def read_predictions(
    path: str | Path,
    name: str,
    samples: Sequence[EvalSample] = (),
    allow_partial: bool = False,
    ignored_ids: Collection[str] = (),
) -> dict[str, str]:
    """A LLaVA answers file (`{"question_id", "prompt", "text", ...}` per line) -> `{key: text}`, checked line by
    line against `samples` (see `answers.read_answers`, which also returns the counts).

    Lines written by our runner carry their key in `metadata.key`. Lines from LLaVA's own scripts do not: their
    key is then taken from the sample with the same question id (MME also by prompt, MMBench by `round_id`, POPE
    files whose ids repeat across splits by line order).
    """
    return read_answers(path, samples, name=name, allow_partial=allow_partial, check_prompts=name == "pope",
                        ignored_ids=ignored_ids)[0]  # fmt: skip


def prompt_set(name: str, prompts_used: Sequence[str]) -> str | None:
    """Which prompts a TextVQA run used: "ocr" (LLaVA's llava_textvqa_val_v051_ocr.jsonl, the paper's) or "plain";
    None for other benchmarks or when no prompt is known."""
    if name != "textvqa" or not prompts_used:
        return None
    return "ocr" if any(TEXTVQA_OCR_MARK in prompt for prompt in prompts_used) else "plain"


def paper_report(
    name: str, metrics: Mapping[str, float], prompts_used: str | None = None, subset: str | None = None
) -> dict[str, Any]:
    """How a result relates to the paper's column (METHOD.md section 7): the column, the metric it reports and its
    value here, whether the number is comparable, and why not. `subset` says why the samples scored are fewer than
    the benchmark's (e.g. `--limit`); such a number is not comparable."""
    metric = HEADLINE_METRIC[name]
    reasons = []  # why the number is not the paper's column
    if name in SERVER_SCORED:
        reasons.append(f"local score, not comparable with the paper's {PAPER_COLUMNS[name]} column: that is "
                       f"{SERVER_SCORED[name]}")  # fmt: skip
    if name == "pope" and metrics.get("num_splits", 3) != 3:
        reasons.append(f"F1 over {int(metrics['num_splits'])} of the 3 splits; the paper averages random, popular "
                       "and adversarial")  # fmt: skip
    if name == "textvqa" and prompts_used != "ocr":
        reasons.append("prompts without OCR tokens; the paper's TextVQA uses llava_textvqa_val_v051_ocr.jsonl "
                       "(the question, then 'Reference OCR token: ...')")  # fmt: skip
    perception_subtasks = len(scorers.MME_PERCEPTION)
    if name == "mme" and metrics.get("num_perception_subtasks", perception_subtasks) != perception_subtasks:
        reasons.append(f"perception over {int(metrics['num_perception_subtasks'])} of the {perception_subtasks} "
                       "perception subtasks; the paper's MME sums all of them")  # fmt: skip
    if subset is not None:
        reasons.append(subset)
    notes = list(reasons)
    if name == "mme":
        notes.append("the paper's MME is the perception score (sum of the 10 perception subtasks, out of 2000)")
    comparable = not reasons
    report = {"paper_column": PAPER_COLUMNS[name], "paper_metric": metric, "paper_value": metrics.get(metric),
              "comparable_with_paper": comparable, "notes": notes}  # fmt: skip
    if prompts_used is not None:
        report["prompt_set"] = prompts_used
    return report


# Per benchmark: the scorer's ground-truth arguments and, for each, the reference field it reads (None = the
# whole reference dict). Lets the scorers run on aligned lists, the form `evaluate` modules receive.
_PAIR_FIELDS: dict[str, dict[str, str | None]] = {
    "vqav2": {"answers": "answers", "answer_types": "answer_type"},
    "textvqa": {"answers": "answers", "answer_types": "answer_type"},
    "vizwiz": {"answers": "answers", "answer_types": "answer_type"},
    "gqa": {"answers": "answer", "structural_types": "structural"},
    "pope": {"labels": "label", "splits": "category"},
    "scienceqa": {"problems": None},
    "mme": {"questions": None},
    "mmbench": {"rounds": None},
}


def score_pairs(name: str, predictions: Sequence[str], references: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Score aligned lists: `references[i]` is the ground truth of `predictions[i]`, with the fields the
    benchmark's truth uses (VQA: answers [, answer_type]; GQA: answer [, structural]; POPE: label, category;
    ScienceQA: choices, answer; MME: category, image, answer; MMBench: group, answer, options [, category])."""
    name = canonical_name(name)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    truth: dict[str, Any] = {}
    for argument, field_name in _PAIR_FIELDS[name].items():
        values = {str(i): ref if field_name is None else ref.get(field_name) for i, ref in enumerate(references)}
        optional = argument in ("answer_types", "structural_types")
        truth[argument] = ({k: v for k, v in values.items() if v is not None} or None) if optional else values
    return SCORERS[name]({str(i): text for i, text in enumerate(predictions)}, **truth)
