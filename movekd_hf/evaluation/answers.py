"""Answers files: LLaVA's answers jsonl (one JSON object per line: `question_id`, `prompt`, `text`, `answer_id`,
`model_id`, `metadata`), read strictly against a benchmark's questions and written safely by several processes.

Reading (`read_answers`): every line must be a JSON object with a string `text` and a `question_id` that the
questions list, each question answered once. Lines that are not JSON, lack the id, repeat an id, or name an id the
questions do not know are counted with their line numbers; by default the first one stops the reading with an
`AnswersFileError` that gives the counts of all of them, and with `allow_partial=True` they are left out and
counted in the report. Questions without an answer are counted too (the scorers count them wrong). LLaVA's own
scripts read these files with a dict comprehension, where a later duplicate silently replaces an earlier one
(`scripts/convert_vqav2_for_submission.py`); we refuse instead.

Writing (`append_answers`, `compact_answers`): every batch is appended with one `write` on an `O_APPEND`
descriptor while holding an inter-process lock on `<answers>.lock`, so lines from different processes (the
ranks of `accelerate launch`, or two runs started on the same file) never interleave; compaction (dedup by key,
sample order, atomic replace) holds the same lock, so no append lands between its read and its replace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import AnswersFileError

# Line problems, in the order the report lists them: (reason, how the summary counts it).
PROBLEMS: dict[str, str] = {
    "not_json": "not a JSON object",
    "no_text": "without a string 'text'",
    "no_question_id": "without question_id",
    "duplicate_id": "repeating an answered question",
    "unknown_id": "with an id the questions do not list",
    "prompt_mismatch": "whose prompt is another question's",
}
EXPECTED = (
    "one JSON object per line with a string 'text' and a 'question_id' the questions list, each question once "
    "(pass --allow-partial to score the readable answers and report the rest)"
)


@dataclass
class AnswersReport:
    """What reading one answers file found. `problems[reason]` lists the 1-based line numbers of each problem."""

    file: str
    lines: int = 0  # non-blank lines
    answered: int = 0  # lines kept as predictions
    questions: int = 0  # questions the answers were matched against (0: not checked)
    missing: int = 0  # questions without an answer
    ignored: int = 0  # answers to questions the benchmark lists but does not score (ScienceQA's text-only ones)
    problems: dict[str, list[int]] = field(default_factory=lambda: {reason: [] for reason in PROBLEMS})
    first: tuple[int, str, str] | None = None  # (line, reason, message) of the first problem
    prompts: dict[str, str] = field(default_factory=dict)  # key -> the prompt the line says it answered

    def add(self, line: int, reason: str, message: str) -> None:
        self.problems[reason].append(line)
        if self.first is None:
            self.first = (line, reason, message)

    def counts(self) -> dict[str, int]:
        """Integer counts for the output JSON: lines, answered, questions, missing and one entry per problem."""
        counts = {"lines": self.lines, "answered": self.answered, "questions": self.questions, "missing": self.missing,
                  "ignored": self.ignored}  # fmt: skip
        return counts | {reason: len(lines) for reason, lines in self.problems.items()}

    def summary(self) -> str:
        """One sentence of counts, e.g. `2 of 10 lines not a JSON object, 1 duplicate ...; 3 questions unanswered`."""
        parts = [f"{len(lines)} {PROBLEMS[reason]}" for reason, lines in self.problems.items() if lines]
        text = f"{self.lines} lines: " + (", ".join(parts) if parts else "all readable")
        if self.questions:
            text += f"; {self.missing} of {self.questions} questions unanswered"
        return text


def _question_line(prompt: Any) -> str:
    """A prompt's first line, compared loosely: lower case, and POPE's "imange" typo read as "image" (POPE's
    "Fix spelling errors" commits of 2023 corrected it in the label files; LLaVA's question file keeps it)."""
    if not isinstance(prompt, str) or not prompt.strip():
        return ""
    return prompt.strip().splitlines()[0].strip().lower().replace("imange", "image")


def read_answers(
    path: str | Path,
    samples: Sequence[Any] = (),
    *,
    name: str = "",
    allow_partial: bool = False,
    check_prompts: bool = False,
    ignored_ids: Collection[str] = (),
) -> tuple[dict[str, str], AnswersReport]:
    """An answers file -> (`{sample key: text}`, report).

    Args:
        path: the answers jsonl.
        samples: the benchmark's `EvalSample`s (`key`, `question_id`, `prompt`); without them ids are not checked
            and each line's key is its `question_id`.
        name: the benchmark (MME matches repeated ids by prompt; MMBench's `round_id` picks the round).
        allow_partial: keep the readable answers and count the rest instead of raising.
        check_prompts: also require the first line of a line's `prompt` to equal its question's (POPE: the label
            files were re-released with other questions under the same ids).
        ignored_ids: question ids that are the benchmark's but not scored (ScienceQA-IMG leaves out the test
            questions without an image, which LLaVA's answers files hold too): accepted, counted, dropped.
    Lines written by our runner carry their key in `metadata.key`; LLaVA's carry `question_id` only, matched to
    the samples with that id in order (POPE's older question files repeat ids across splits).
    Raises:
        FileNotFoundError: no such file.
        AnswersFileError: the file is empty, or (unless `allow_partial`) any line has a problem; names the file,
            the first problem's line and the counts of all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answers file {path} does not exist")
    by_id: dict[str, list[Any]] = {}
    for sample in samples:
        by_id.setdefault(str(sample.question_id), []).append(sample)
    known = {str(sample.key): sample for sample in samples}
    report = AnswersReport(str(path), questions=len(known))
    taken: dict[str, int] = {}  # key -> line that answered it
    predictions: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        report.lines += 1
        key, reason, message = _line_key(raw, number, name, by_id, known, taken, check_prompts)
        if reason == "unknown_id" and str(json.loads(raw).get("question_id")) in ignored_ids:
            report.ignored += 1
            continue
        if reason is not None:
            report.add(number, reason, message)
            continue
        taken[key] = number
        line = json.loads(raw)
        predictions[key] = line["text"]
        if isinstance(line.get("prompt"), str):
            report.prompts[key] = line["prompt"]
    report.answered = len(predictions)
    report.missing = sum(key not in predictions for key in known)
    if report.lines == 0:
        raise AnswersFileError("holds no answer lines (empty file)", file=path, expected=EXPECTED, reason="empty")
    if report.first is not None and not allow_partial:
        line, reason, message = report.first
        raise AnswersFileError(f"{message}; in all, {report.summary()}", file=path, line=line, reason=reason,
                               expected=EXPECTED)  # fmt: skip
    return predictions, report


def _line_key(
    raw: str, number: int, name: str, by_id: Mapping, known: Mapping, taken: Mapping, check_prompts: bool
) -> tuple[str, str | None, str]:
    """(key, None, "") for a good line, else ("", reason, message)."""
    try:
        line = json.loads(raw)
    except json.JSONDecodeError as err:
        return "", "not_json", f"line is not JSON ({err.msg} at column {err.colno})"
    if not isinstance(line, dict):
        return "", "not_json", f"line is a JSON {type(line).__name__}, not an object"
    if not isinstance(line.get("text"), str):
        return "", "no_text", "line has no string 'text' (the model's answer)"
    key = (line.get("metadata") or {}).get("key") if isinstance(line.get("metadata"), dict) else None
    if key is None and name == "mmbench" and "round_id" in line and "question_id" in line:  # LLaVA --all-rounds
        key = f"{line['question_id']}/{line['round_id']}"
    if key is not None:
        key = str(key)
        if known and key not in known:
            return "", "unknown_id", f"key {key!r} is not a question of this benchmark"
        if key in taken:
            return "", "duplicate_id", f"question {key!r} answered again (first on line {taken[key]})"
        return key, None, ""
    if line.get("question_id") is None:
        return "", "no_question_id", "line has no 'question_id'"
    qid = str(line["question_id"])
    if not known:
        if qid in taken:
            return "", "duplicate_id", f"question_id {qid} answered again (first on line {taken[qid]})"
        return qid, None, ""
    candidates = by_id.get(qid)
    if not candidates:
        return "", "unknown_id", f"question_id {line['question_id']!r} is not a question of this benchmark"
    if name == "mme" and len(candidates) > 1:  # two questions per image share the id; the prompt tells them apart
        candidates = [s for s in candidates if s.prompt == line.get("prompt")] or candidates
    free = [s for s in candidates if str(s.key) not in taken]
    if not free:
        first = taken[str(candidates[-1].key)]
        return "", "duplicate_id", f"question_id {line['question_id']!r} answered again (first on line {first})"
    sample = free[0]
    asked, listed = _question_line(line.get("prompt")), _question_line(sample.prompt)
    if check_prompts and asked and listed and asked != listed:
        return "", "prompt_mismatch", (f"question_id {line['question_id']!r} was asked {asked!r} but the questions "
                                       f"list {listed!r} under that id: answers and questions come from different "
                                       "releases")  # fmt: skip
    return str(sample.key), None, ""


def answers_lock(path: str | Path) -> FileLock:
    """The inter-process lock of an answers file: `<path>.lock`, never replaced, so it outlives compactions."""
    return FileLock(f"{path}.lock")


def append_answers(path: str | Path, lines: Iterable[Mapping[str, Any]]) -> None:
    """Append answer lines to `path` as one `write` under the lock: whole lines, whatever other processes do."""
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    with answers_lock(path):
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it in one call; loop in case the system splits it
                view = view[os.write(descriptor, view) :]
        finally:
            os.close(descriptor)


def _part_files(path: Path) -> list[Path]:
    """Per-rank part files (`answers.rank{i}.jsonl`) left by runs of versions before the shared lock."""
    return sorted(path.parent.glob(path.stem + ".rank*.jsonl"))


def _keyed_lines(paths: Iterable[Path]) -> Iterable[tuple[str | None, str]]:
    """(metadata key or None, line) for each readable line; a torn line (a writer killed mid-batch) is skipped,
    so its question counts as unanswered and is generated again."""
    for path in paths:
        if not path.is_file():
            continue
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict):
                metadata = line.get("metadata") if isinstance(line.get("metadata"), dict) else {}
                yield (None if metadata.get("key") is None else str(metadata["key"])), raw


def answered_keys(path: str | Path) -> set[str]:
    """Sample keys already answered in `path` (and in leftover part files), read under the lock."""
    path = Path(path)
    with answers_lock(path):
        return {key for key, _ in _keyed_lines([path, *_part_files(path)]) if key is not None}


def compact_answers(path: str | Path, order: Sequence[str]) -> int:
    """Rewrite `path` in the order of `order` (sample keys), one line per key (the first written wins), leftover
    part files folded in and removed; lines without a key are kept after the rest. Atomic: a crash leaves the old
    file. Returns the number of lines written."""
    path = Path(path)
    rank = {key: i for i, key in enumerate(order)}
    with answers_lock(path):
        parts = _part_files(path)
        lines: dict[str, str] = {}
        loose: list[str] = []
        for key, raw in _keyed_lines([path, *parts]):
            if key is None:
                loose.append(raw)
            else:
                lines.setdefault(key, raw)
        ordered = [raw for _, raw in sorted(lines.items(), key=lambda item: rank.get(item[0], len(rank)))] + loose
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(raw + "\n" for raw in ordered), encoding="utf-8")
        temporary.replace(path)
        for part in parts:
            part.unlink()
    return len(ordered)
