"""docs/DATA.md's folders, built with tiny files for each of the eight benchmarks and resolved as `eval` does."""

import json
import shutil
from pathlib import Path

import pytest

from movekd_hf.cli import evaluate as commands
from movekd_hf.evaluation.benchmarks import BENCHMARKS
from movekd_hf.evaluation.readers import load_benchmark

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
DOC = Path(__file__).parents[1] / "docs" / "DATA.md"
OCR_PROMPT = "what brand is this?\nReference OCR token: Coca, Cola\nAnswer the question using a single word or phrase."

# benchmark -> (files copied from the fixtures into --data, the image folder the samples must point into)
LAYOUTS = {
    "vqav2": (["v2_mscoco_val2014_annotations.json", "v2_OpenEnded_mscoco_val2014_questions.json"], "val2014"),
    "gqa": (["testdev_balanced_questions.json"], "images"),
    "textvqa": (["TextVQA_0.5.1_val.json"], "train_images"),
    "vizwiz": (["val.json"], "val"),
    "pope": (["coco"], "val2014"),
    "scienceqa": (["problems.json"], "test"),
    "mme": (["MME_Benchmark_release_version"], "MME_Benchmark_release_version"),
    "mmbench": (["mmbench_dev_20230712.tsv"], None),
}


def build(root: Path, name: str) -> Path:
    data = root / name
    files, images = LAYOUTS[name]
    data.mkdir(parents=True)
    for item in files:
        source = FIXTURES / name / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, data / item)
    if images:
        (data / images).mkdir(parents=True, exist_ok=True)
    return data


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_documented_layout_resolves_to_samples_in_its_image_folder(tmp_path, name):
    data = build(tmp_path, name)
    if name == "textvqa":  # LLaVA's OCR question file, the documented default
        line = {"question_id": 34602, "image": "003a8ae2ef43b901.jpg", "text": OCR_PROMPT}
        (data / "llava_textvqa_val_v051_ocr.jsonl").write_text(json.dumps(line) + "\n")
    annotations, images = commands.resolve_data(name, data, None, None)
    benchmark = load_benchmark(name, annotations, images, commands.resolve_questions(name, data, None))
    assert benchmark.samples
    folder = data / LAYOUTS[name][1] if LAYOUTS[name][1] else None
    for sample in benchmark.samples:
        if folder is not None:
            assert Path(sample.image).resolve().is_relative_to(folder.resolve()), (name, sample.image)
    if name == "textvqa":
        assert benchmark.info["prompt_set"] == "ocr" and benchmark.samples[0].prompt == OCR_PROMPT


def test_server_layouts_of_vqav2_and_vizwiz(tmp_path):
    data = tmp_path / "vqav2"
    (data / "test2015").mkdir(parents=True)
    line = {"question_id": 7, "image": "COCO_test2015_000000000007.jpg", "text": "How many?\nAnswer briefly."}
    (data / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text(json.dumps(line) + "\n")
    (data / "llava_vqav2_mscoco_test2015.jsonl").write_text(
        json.dumps(line) + "\n" + json.dumps(line | {"question_id": 8})
    )
    benchmark, everything = commands.server_benchmark("vqav2", data, None, None)
    assert [s.key for s in benchmark.samples] == ["7"] and everything.name == "llava_vqav2_mscoco_test2015.jsonl"
    assert benchmark.samples[0].image == str(data / "test2015" / "COCO_test2015_000000000007.jpg")
    with pytest.raises(FileNotFoundError, match="llava_test.jsonl does not exist"):
        commands.server_benchmark("vizwiz", tmp_path, None, None)


def test_missing_layout_names_the_files_and_the_guide(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"textvqa: none of \['TextVQA_0.5.1_val.json'\].*docs/DATA.md"):
        commands.resolve_data("textvqa", tmp_path, None, None)


def test_the_guide_names_every_file_the_resolver_looks_for():
    text = DOC.read_text()
    names = [c for candidates, _ in commands.DATA_LAYOUT.values() for c in candidates if c != "."]
    names += list(commands.DEFAULT_QUESTIONS.values()) + [
        f for layout in commands.SERVER_LAYOUT.values() for f in layout
    ]
    missing = [n for n in names if n not in text and n != "mmbench_dev_en_20231003.tsv"]
    assert not missing
