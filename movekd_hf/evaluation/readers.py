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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..modeling.llava_conventions import IMAGE_TOKEN
from .benchmarks import Benchmark, build_benchmark, canonical_name, read_predictions
from .hf_readers import read_hf_records
from .records import mmbench_record


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"annotation file {path} does not exist")
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # POPE's and LLaVA's ".json" files are often jsonl
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _image_path(image_dir: Path | None, name: str) -> str:
    return str(image_dir / name) if image_dir is not None else name


def read_vqav2(annotations: Path, image_dir: Path | None, questions: Path | None = None) -> list[dict]:
    """`v2_mscoco_val2014_annotations.json` + `v2_OpenEnded_mscoco_val2014_questions.json` (found next to it)."""
    if questions is None:
        found = sorted(annotations.parent.glob("*OpenEnded*questions*.json"))
        if not found:
            raise ValueError(f"VQAv2 needs its questions file (v2_OpenEnded_*_questions.json) next to {annotations}")
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


def read_pope(annotations: Path, image_dir: Path | None) -> list[dict]:
    """A folder of `coco_pope_{random,popular,adversarial}.json` (jsonl: question_id, image, text, label), or one
    jsonl whose lines also carry `category`. Ids repeat across splits, so the key is `split/question_id`."""
    if annotations.is_dir():
        files = [(split, annotations / f"coco_pope_{split}.json") for split in POPE_SPLITS]
        files = [(split, path) for split, path in files if path.is_file()]
        if not files:
            raise ValueError(f"no coco_pope_{{{','.join(POPE_SPLITS)}}}.json files in {annotations}")
        rows = [dict(line, category=split) for split, path in files for line in _load_json(path)]
    else:
        rows = _load_json(annotations)
    return [{"key": f"{r['category']}/{r['question_id']}", "question_id": r["question_id"], "category": r["category"],
             "question": r.get("text", r.get("question")), "image": _image_path(image_dir, r["image"]),
             "label": r.get("label", r.get("answer"))}
            for r in rows]  # fmt: skip


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
        raise ValueError(f"MME annotations must be the MME_Benchmark_release_version folder, got {annotations}")
    records = []
    for category_dir in sorted(p for p in annotations.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN"
        images = category_dir / "images" if qa_dir.is_dir() else category_dir
        for txt in sorted((qa_dir if qa_dir.is_dir() else category_dir).glob("*.txt")):
            image = next((p for p in sorted(images.glob(txt.stem + ".*")) if p.suffix != ".txt"), None)
            if image is None:
                raise ValueError(f"MME: no image named {txt.stem}.* in {images} for {txt}")
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
        raise ValueError(f"MMBench TSV {annotations} does not exist")
    csv.field_size_limit(1 << 30)  # base64 images exceed the default field limit
    with annotations.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [mmbench_record(row) for row in rows if int(row["index"]) < 1_000_000]


FILE_READERS = {"vqav2": read_vqav2, "textvqa": read_textvqa, "vizwiz": read_vizwiz, "gqa": read_gqa,
                "pope": read_pope, "scienceqa": read_scienceqa, "mme": read_mme, "mmbench": read_mmbench}  # fmt: skip


def read_records(
    name: str, annotations: str | Path, image_dir: str | Path | None = None, questions: str | Path | None = None
) -> list[dict]:
    """Records of benchmark `name` from its official files, or from a `datasets.save_to_disk` folder."""
    name, annotations = canonical_name(name), Path(annotations)
    image_dir = Path(image_dir) if image_dir is not None else None
    if (annotations / "dataset_info.json").is_file() or (annotations / "dataset_dict.json").is_file():
        return read_hf_records(name, annotations)
    kwargs = {"questions": Path(questions)} if name == "vqav2" and questions else {}
    try:
        records = FILE_READERS[name](annotations, image_dir, **kwargs)
    except KeyError as err:  # the file is not in the layout this reader expects
        raise ValueError(f"{annotations}: a {name} entry lacks the field {err} of the official layout") from err
    if questions and name != "vqav2":
        records = apply_question_file(records, Path(questions), image_dir)
    return records


def apply_question_file(records: Iterable[dict], questions: Path, image_dir: Path | None) -> list[dict]:
    """Use a LLaVA question file's prompts (and images) verbatim, matching lines by question id (and category),
    and put the records in the file's order, the order LLaVA's answers files follow."""

    lines = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
    # POPE's ids repeat across its splits: match on the category too when both sides have one.
    pending: dict[tuple, list[dict]] = {}
    for line in lines:
        pending.setdefault((str(line["question_id"]), line.get("category")), []).append(line)
    position = {id(line): i for i, line in enumerate(lines)}
    placed = []
    for record in records:
        qid = str(record["question_id"])
        matches = pending.get((qid, record.get("category"))) or pending.get((qid, None))
        rank = len(lines)  # records the question file does not list go last
        if matches:
            line = matches.pop(0)
            rank = position[id(line)]
            record["prompt"] = line["text"].replace(f"{IMAGE_TOKEN}\n", "").strip()
            if line.get("image"):
                record["image"] = _image_path(image_dir, line["image"])
        placed.append((rank, record))
    return [record for _, record in sorted(placed, key=lambda item: item[0])]


def load_benchmark(
    name: str, annotations: str | Path, image_dir: str | Path | None = None, questions: str | Path | None = None
) -> Benchmark:
    """The benchmark's samples and ground truth, read from its files."""
    return build_benchmark(name, read_records(name, annotations, image_dir, questions))


def score_files(
    name: str, predictions: str | Path, annotations: str | Path, questions: str | Path | None = None
) -> dict[str, float]:
    """Score a LLaVA answers file against the benchmark's annotations -> metric values."""
    benchmark = load_benchmark(name, annotations, questions=questions)
    return benchmark.score(read_predictions(predictions, benchmark.name, benchmark.samples))
