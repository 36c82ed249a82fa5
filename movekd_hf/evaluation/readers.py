"""Readers: each benchmark's public files (the layouts LLaVA-1.5's evaluation uses) or its Hugging Face datasets
version -> records, one dict per question, that `benchmarks.build_benchmark` turns into prompts and ground truth.

Record fields: `key` (unique), `question_id`, `image` (path or PIL image), `question`, plus per benchmark:
answers / answer_type (VQAv2, TextVQA, VizWiz), answer / structural (GQA), label / category (POPE), hint / choices
/ answer index (ScienceQA), answer / category / image_id (MME), index / options / answer / hint / category
(MMBench). A LLaVA question file (`--questions`, jsonl with question_id and text) overrides the prompts verbatim.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataFileError
from ..modeling.llava_conventions import IMAGE_TOKEN
from .answers import read_answers
from .benchmarks import Benchmark, build_benchmark, canonical_name, paper_report, prompt_set
from .hf_readers import read_hf_records
from .records import mmbench_record


def _load_json(path: Path) -> Any:
    """A JSON file, or a JSON-lines one (POPE's and LLaVA's ".json" files often are). Raises FileNotFoundError,
    or DataFileError naming the line that is neither."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    return read_jsonl(path, text)


def read_jsonl(path: Path, text: str | None = None) -> list[Any]:
    """One JSON value per non-blank line (a LLaVA question file). Raises FileNotFoundError or DataFileError."""
    if text is None:
        if not path.is_file():
            raise FileNotFoundError(f"question file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"is not JSON ({err.msg})", file=path, line=number,
                                    expected="a JSON document, or one JSON object per line") from err  # fmt: skip
    return rows


def _image_path(image_dir: Path | None, name: str) -> str:
    return str(image_dir / name) if image_dir is not None else name


def read_vqav2(annotations: Path, image_dir: Path | None, questions: Path | None = None) -> list[dict]:
    """`v2_mscoco_val2014_annotations.json` + `v2_OpenEnded_mscoco_val2014_questions.json` (found next to it)."""
    if questions is None:
        found = sorted(annotations.parent.glob("*OpenEnded*questions*.json"))
        if not found:
            raise FileNotFoundError(
                f"VQAv2 needs its questions file (v2_OpenEnded_*_questions.json) next to {annotations}"
            )
        questions = found[0]
    qdata = _load_json(questions)
    subtype = qdata.get("data_subtype", "val2014")
    text = {q["question_id"]: q for q in qdata["questions"]}
    records = []
    for ann in _load_json(annotations)["annotations"]:
        q = text[ann["question_id"]]
        image = _image_path(image_dir, f"COCO_{subtype}_{int(ann['image_id']):012d}.jpg")
        records.append({"key": str(ann["question_id"]), "question_id": ann["question_id"], "image": image,
                        "question": q["question"], "answers": [a["answer"] for a in ann["answers"]],
                        "answer_type": ann.get("answer_type")})  # fmt: skip
    return records


def read_textvqa(annotations: Path, image_dir: Path | None) -> list[dict]:
    """`TextVQA_0.5.1_val.json`: {"data": [{question_id, question, image_id, answers: [10 str]}]}."""
    return [{"key": str(d["question_id"]), "question_id": d["question_id"], "question": d["question"],
             "image": _image_path(image_dir, f"{d['image_id']}.jpg"), "answers": d.get("answers")}
            for d in _load_json(annotations)["data"]]  # fmt: skip


def read_vizwiz(annotations: Path, image_dir: Path | None) -> list[dict]:
    """VizWiz `val.json`: a list of {image, question, answers: [{answer}], answer_type}. The key is the position
    in the list, as in LLaVA's question file (its question_id numbers the questions in file order)."""
    return [{"key": str(i), "question_id": i, "question": d["question"], "image": _image_path(image_dir, d["image"]),
             "answers": [a["answer"] if isinstance(a, Mapping) else a for a in d.get("answers", [])],
             "answer_type": d.get("answer_type")}
            for i, d in enumerate(_load_json(annotations))]  # fmt: skip


def read_gqa(annotations: Path, image_dir: Path | None) -> list[dict]:
    """`testdev_balanced_questions.json`: {qid: {imageId, question, answer, types: {structural}}}."""
    return [{"key": str(qid), "question_id": qid, "question": d["question"], "answer": d.get("answer"),
             "image": _image_path(image_dir, f"{d['imageId']}.jpg"), "structural": d.get("types", {}).get("structural")}
            for qid, d in _load_json(annotations).items()]  # fmt: skip


POPE_SPLITS = ("adversarial", "popular", "random")
# LLaVA's llava_pope_test.jsonl numbers a split's questions from these offsets (adversarial 1..3000, random
# 10000001.., popular 20000001..), so its ids are unique across splits; we give official-file questions the same.
POPE_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
_POPE_SPLIT_IN_NAME = re.compile(r"pope.*_(random|popular|adversarial)\.jsonl?$")


def pope_split_files(folder: Path) -> list[tuple[str, Path]]:
    """(split, file) of the official `coco_pope_{split}.json` files (or `*pope*_{split}.json`) in `folder`."""
    found = []
    for split in POPE_SPLITS:
        exact = folder / f"coco_pope_{split}.json"
        candidates = [exact] if exact.is_file() else sorted(folder.glob(f"*pope*_{split}.json"))
        if len(candidates) > 1:
            raise DataFileError(f"holds several {split} files: {[c.name for c in candidates]}", file=folder,
                                expected="one file per POPE split")  # fmt: skip
        found += [(split, path) for path in candidates]
    return found


def read_pope(annotations: Path, image_dir: Path | None) -> list[dict]:
    """POPE's official label files as released (AoiDragon/POPE, output/coco/): a folder of
    `coco_pope_{random,popular,adversarial}.json`, or one of them (the split is in the file name: the lines
    carry `question_id`, `image`, `text`, `label` and no split); or one jsonl whose lines carry `category`.

    Official ids restart at 1 in every split: the key is `split/question_id`, and `question_id` becomes LLaVA's
    (`POPE_ID_OFFSET[split] + id`), unique across splits like llava_pope_test.jsonl's.
    """
    if annotations.is_dir():
        files = pope_split_files(annotations)
        if not files:
            raise FileNotFoundError(f"no coco_pope_{{{','.join(POPE_SPLITS)}}}.json files in {annotations}")
    else:
        named = _POPE_SPLIT_IN_NAME.search(annotations.name)
        files = [(named.group(1) if named else None, annotations)]
    records = []
    for split, path in files:
        for number, row in enumerate(_load_json(path), 1):
            category = row.get("category", split)
            if category is None:
                raise DataFileError("has no 'category' and the file name names no split", file=path, line=number,
                                    field="category", expected="coco_pope_{random,popular,adversarial}.json "
                                    "as released, or lines with a 'category'")  # fmt: skip
            qid = row["question_id"]
            llava_id = (
                POPE_ID_OFFSET[category] + int(qid) if "category" not in row and category in POPE_ID_OFFSET else qid
            )
            records.append({"key": f"{category}/{qid}", "question_id": llava_id, "category": category,
                            "question": row.get("text", row.get("question")), "image": _image_path(image_dir, row["image"]),
                            "label": row.get("label", row.get("answer"))})  # fmt: skip
    return records


def read_scienceqa(annotations: Path, image_dir: Path | None, split: str = "test") -> list[dict]:
    """ScienceQA `problems.json` ({pid: {question, choices, answer, hint, image, split}}), `split` problems; the
    image of problem pid is `{image_dir}/{pid}/{image}` as in the release's test/ folder."""
    return [{"key": str(pid), "question_id": pid, "question": p["question"], "choices": p["choices"],
             "answer": p["answer"], "hint": p.get("hint") or None,
             "image": _image_path(image_dir, f"{pid}/{p['image']}") if p.get("image") else None}
            for pid, p in _load_json(annotations).items() if p.get("split", split) == split]  # fmt: skip


def read_mme(annotations: Path, image_dir: Path | None) -> list[dict]:
    """`MME_Benchmark_release_version/`: per subtask folder, `*.txt` files of `question<TAB>answer` lines next to
    their images, or under `questions_answers_YN/` with images in `images/`."""
    if not annotations.is_dir():
        raise FileNotFoundError(f"MME annotations must be the MME_Benchmark_release_version folder, got {annotations}")
    records = []
    for category_dir in sorted(p for p in annotations.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN"
        images = category_dir / "images" if qa_dir.is_dir() else category_dir
        for txt in sorted((qa_dir if qa_dir.is_dir() else category_dir).glob("*.txt")):
            image = next((p for p in sorted(images.glob(txt.stem + ".*")) if p.suffix != ".txt"), None)
            if image is None:
                raise FileNotFoundError(f"MME: no image named {txt.stem}.* in {images} for {txt}")
            image_id = f"{category_dir.name}/{image.name}"
            for line in txt.read_text().splitlines():
                if not line.strip():
                    continue
                question, answer = line.rsplit("\t", 1)
                records.append({"key": f"{image_id}::{question}", "question_id": image_id, "image_id": image_id,
                                "image": str(image), "question": question, "answer": answer.strip(),
                                "category": category_dir.name})  # fmt: skip
    return records


def read_mmbench(annotations: Path, image_dir: Path | None = None) -> list[dict]:
    """MMBench TSV (`mmbench_dev_20230712.tsv`): index, question, hint, A-D, answer, category, image (base64).

    Rows already expanded by the release (index >= 1e6 marks a circular copy) are dropped: our rounds re-create
    the shifts from the original row."""
    if not annotations.is_file():
        raise FileNotFoundError(f"MMBench TSV {annotations} does not exist")
    csv.field_size_limit(1 << 30)  # base64 images exceed the default field limit
    with annotations.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [mmbench_record(row) for row in rows if int(row["index"]) < 1_000_000]


FILE_READERS = {"vqav2": read_vqav2, "textvqa": read_textvqa, "vizwiz": read_vizwiz, "gqa": read_gqa,
                "pope": read_pope, "scienceqa": read_scienceqa, "mme": read_mme, "mmbench": read_mmbench}  # fmt: skip


def read_records(
    name: str, annotations: str | Path, image_dir: str | Path | None = None, questions: str | Path | None = None
) -> list[dict]:
    """Records of benchmark `name` from its official files, or from a `datasets.save_to_disk` folder.

    Raises FileNotFoundError for a missing file, DataFileError for a file not in the layout its reader expects."""
    name, annotations = canonical_name(name), Path(annotations)
    image_dir = Path(image_dir) if image_dir is not None else None
    if not annotations.exists():
        raise FileNotFoundError(f"{name} annotations {annotations} do not exist")
    if (annotations / "dataset_info.json").is_file() or (annotations / "dataset_dict.json").is_file():
        return read_hf_records(name, annotations)
    kwargs = {"questions": Path(questions)} if name == "vqav2" and questions else {}
    try:
        records = FILE_READERS[name](annotations, image_dir, **kwargs)
    except (KeyError, TypeError, AttributeError) as err:  # the file is not in the layout this reader expects
        field = err.args[0] if isinstance(err, KeyError) else None
        raise DataFileError(f"a {name} entry lacks the field {field!r} of the official layout" if field else
                            f"is not in the official {name} layout ({err})", file=annotations) from err  # fmt: skip
    if questions and name != "vqav2":
        apply = apply_pope_question_file if name == "pope" else apply_question_file
        records = apply(records, Path(questions), image_dir)
    return records


def llava_prompt(line: Mapping, path: Path, number: int) -> str:
    """A LLaVA question line's prompt, image token removed. Raises DataFileError unless it has question_id and text."""
    if not isinstance(line, Mapping) or "question_id" not in line or not isinstance(line.get("text"), str):
        raise DataFileError("is not a LLaVA question line", file=path, line=number,
                            expected="an object with 'question_id' and 'text'")  # fmt: skip
    return line["text"].replace(f"{IMAGE_TOKEN}\n", "").strip()


def apply_question_file(records: Iterable[dict], questions: Path, image_dir: Path | None) -> list[dict]:
    """Use a LLaVA question file's prompts (and images) verbatim, matching lines by question id (and category),
    and put the records in the file's order, the order LLaVA's answers files follow."""
    lines = read_jsonl(questions)
    pending: dict[tuple, list[tuple[int, dict]]] = {}
    for number, line in enumerate(lines, 1):
        llava_prompt(line, questions, number)
        pending.setdefault((str(line["question_id"]), line.get("category")), []).append((number, line))
    placed = []
    for record in records:
        qid = str(record["question_id"])
        matches = pending.get((qid, record.get("category"))) or pending.get((qid, None))
        rank = len(lines) + 1  # records the question file does not list go last
        if matches:
            rank, line = matches.pop(0)
            record["prompt"] = llava_prompt(line, questions, rank)
            if line.get("image"):
                record["image"] = _image_path(image_dir, line["image"])
        placed.append((rank, record))
    return [record for _, record in sorted(placed, key=lambda item: item[0])]


def apply_pope_question_file(records: Iterable[dict], questions: Path, image_dir: Path | None) -> list[dict]:
    """POPE with LLaVA's llava_pope_test.jsonl: pair, within each split, the file's k-th question of that split
    (its `category`) with the label files' k-th, as LLaVA's llava/eval/eval_pope.py does (it zips them); take the
    file's prompt, image and question id (unique across splits there). The images of each pair must agree: a
    mismatch means label files of another POPE release (POPE re-released random with 3000 questions; LLaVA's file
    was made from the 2910-question one of 2023-08-10)."""
    lines = read_jsonl(questions)
    by_split: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for number, line in enumerate(lines, 1):
        llava_prompt(line, questions, number)
        if line.get("category") is None:
            raise DataFileError("has no 'category'", file=questions, line=number, field="category",
                                expected="llava_pope_test.jsonl's layout: each line names its split")  # fmt: skip
        by_split[line["category"]].append((number, line))
    records_by_split: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        records_by_split[record["category"]].append(record)
    placed = []
    for split, split_records in records_by_split.items():
        split_lines = by_split.get(split, [])
        if split_lines and len(split_lines) != len(split_records):
            raise DataFileError(
                f"has {len(split_lines)} {split} questions but the label file has {len(split_records)}",
                file=questions,
                line=split_lines[0][0],
                expected="the label files of the POPE release this question file was made from",
            )
        for index, record in enumerate(split_records):
            if not split_lines:
                placed.append((len(lines) + 1, record))
                continue
            number, line = split_lines[index]
            if line.get("image") and Path(line["image"]).name != Path(str(record["image"])).name:
                raise DataFileError(
                    f"question {line['question_id']} ({split} #{index + 1}) shows {line['image']} but "
                    f"the label file's {split} #{index + 1} ({record['key']}) shows "
                    f"{Path(str(record['image'])).name}",
                    file=questions,
                    line=number,
                    expected="the label files of the POPE release this question file was made from",
                )
            record["prompt"] = llava_prompt(line, questions, number)
            record["question_id"] = line["question_id"]
            if line.get("image"):
                record["image"] = _image_path(image_dir, line["image"])
            placed.append((number, record))
    return [record for _, record in sorted(placed, key=lambda item: item[0])]


def load_benchmark(
    name: str, annotations: str | Path, image_dir: str | Path | None = None, questions: str | Path | None = None
) -> Benchmark:
    """The benchmark's samples and ground truth, read from its files; `info["prompt_set"]` for TextVQA."""
    benchmark = build_benchmark(name, read_records(name, annotations, image_dir, questions))
    used = prompt_set(benchmark.name, [sample.prompt for sample in benchmark.samples])
    if used is not None:
        benchmark.info["prompt_set"] = used
    return benchmark


def score_answers_file(
    name: str,
    predictions: str | Path,
    annotations: str | Path,
    questions: str | Path | None = None,
    allow_partial: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Score a LLaVA answers file against the benchmark's annotations -> (metric values, report): the answers
    file's counts (`answers`), the paper's column and whether this number is comparable with it.

    Raises FileNotFoundError, DataFileError (annotations), AnswersFileError (answers; see `answers.read_answers`)."""
    benchmark = load_benchmark(name, annotations, questions=questions)
    texts, answers = read_answers(predictions, benchmark.samples, name=benchmark.name, allow_partial=allow_partial,
                                  check_prompts=benchmark.name == "pope",
                                  ignored_ids=benchmark.info.get("ignored_ids", ()))  # fmt: skip
    metrics = benchmark.score(texts)
    used = benchmark.info.get("prompt_set")
    if benchmark.name == "textvqa":  # the prompts the answers were generated from decide, not our defaults
        used = prompt_set("textvqa", list(answers.prompts.values())) or used
    report = {"benchmark": benchmark.name, **paper_report(benchmark.name, metrics, used), "answers": answers.counts()}
    return metrics, report


def score_files(
    name: str, predictions: str | Path, annotations: str | Path, questions: str | Path | None = None
) -> dict[str, float]:
    """Score a LLaVA answers file against the benchmark's annotations -> metric values (strict reading)."""
    return score_answers_file(name, predictions, annotations, questions)[0]
