"""Benchmarks: turn records (one dict per question, see `readers.py`) into prompts to generate and ground truth to
score, with one scorer per benchmark. Keys tie the two together and are unique within a benchmark."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import prompts, scorers

BENCHMARKS: tuple[str, ...] = ("vqav2", "gqa", "textvqa", "vizwiz", "pope", "scienceqa", "mme", "mmbench")
# The number each benchmark contributes to the paper's table (METHOD.md section 7).
HEADLINE_METRIC: dict[str, str] = {"vqav2": "accuracy", "gqa": "accuracy", "textvqa": "accuracy",
                                   "vizwiz": "accuracy", "pope": "f1", "scienceqa": "accuracy",
                                   "mme": "perception", "mmbench": "accuracy"}  # fmt: skip
PAPER_COLUMNS: dict[str, str] = {"vqav2": "VQAv2", "gqa": "GQA", "textvqa": "TextVQA", "vizwiz": "VizWiz",
                                 "pope": "POPE", "scienceqa": "SQA", "mme": "MME", "mmbench": "MMB"}  # fmt: skip
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
    """Benchmark name in its canonical spelling, or a ValueError listing the known ones."""
    key = benchmark_key(name)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
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
    name: str
    samples: list[EvalSample]
    truth: dict[str, Any] = field(default_factory=dict)

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
        raise ValueError(f"{where}: record {record.get('key', '?')!r} lacks field(s) {missing}; has {sorted(record)}")


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
    samples, problems = [], {}
    for r in records:
        _require(r, ("key", "question", "choices", "answer"), "scienceqa")
        if r.get("image") is None:
            continue  # ScienceQA-IMG: the paper scores the questions that come with an image
        hint = f"Context: {r['hint']}" if r.get("hint") else None
        prompt = r.get("prompt") or prompts.multiple_choice_prompt(r["question"], r["choices"], hint)
        samples.append(EvalSample(r["key"], r.get("question_id", r["key"]), r["image"], prompt))
        problems[r["key"]] = {"choices": list(r["choices"]), "answer": int(r["answer"])}
    return Benchmark("scienceqa", samples, {"problems": problems})


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


def read_predictions(path: str | Path, name: str, samples: Sequence[EvalSample] = ()) -> dict[str, str]:
    """A LLaVA answers file (`{"question_id", "prompt", "text", ...}` per line) -> `{key: text}`.

    Lines written by our runner carry their key in `metadata.key`. Lines from LLaVA's own scripts do not: their
    key is then taken from the sample with the same question id (MME also by prompt, MMBench by `round_id`, POPE
    by line order within the ids that repeat across its splits).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file {path} does not exist")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_id: dict[str, list[EvalSample]] = {}
    for sample in samples:
        by_id.setdefault(str(sample.question_id), []).append(sample)
    seen: dict[str, int] = {}
    predictions = {}
    for number, line in enumerate(lines, 1):
        if "text" not in line:
            raise ValueError(f"{path}:{number}: answer line lacks 'text' (LLaVA answers-file format)")
        key = (line.get("metadata") or {}).get("key")
        if key is None and name == "mmbench" and "round_id" in line:  # LLaVA's --all-rounds answers
            key = f"{line['question_id']}/{line['round_id']}"
        if key is None:
            qid = str(line.get("question_id"))
            candidates = by_id.get(qid) or [EvalSample(qid, qid, None, "")]
            if len(candidates) > 1 and name == "mme":
                candidates = [s for s in candidates if s.prompt == line.get("prompt")] or candidates
            key = candidates[min(seen.get(qid, 0), len(candidates) - 1)].key
            seen[qid] = seen.get(qid, 0) + 1
        predictions[str(key)] = line["text"]
    return predictions


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
