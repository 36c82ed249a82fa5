"""The benchmark metrics as local `evaluate` modules give the numbers `movekd-hf score` gives, from the files a wheel
ships, loaded offline.

The inputs are the scorer tests' fixtures in the official layouts (tests/fixtures/eval): each benchmark's ground
truth and a LLaVA answers file, read by the package's readers, then handed to the `evaluate` module row by row as a
user would. A wheel built from the working tree is unpacked to tmp, and one side process imports `movekd_hf` from
it and `evaluate.load`s every metric folder there with the Hub and datasets offline and sockets refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _model_fixtures import REPO

from movekd_hf import metrics
from movekd_hf.errors import SettingsError
from movekd_hf.evaluation import load_benchmark, read_predictions, score_files

FIXTURES = REPO / "tests" / "fixtures" / "eval"
# benchmark -> (metric, annotations, LLaVA question file or None), as tests/test_eval_scorers.py scores them
CASES = {
    "vqav2": ("vqa_accuracy", "v2_mscoco_val2014_annotations.json", None),
    "textvqa": ("vqa_accuracy", "TextVQA_0.5.1_val.json", None),
    "vizwiz": ("vqa_accuracy", "val.json", None),
    "gqa": ("gqa", "testdev_balanced_questions.json", None),
    "pope": ("pope", "coco", "llava_pope_test.jsonl"),
    "scienceqa": ("scienceqa", "problems.json", None),
    "mme": ("mme", "MME_Benchmark_release_version", None),
    "mmbench": ("mmbench", "mmbench_dev_20230712.tsv", None),
}

SIDE_RUN = r"""
import json, socket, sys


def refuse(*args, **kwargs):
    raise OSError("network access during an offline metric load")


socket.socket.connect = refuse
socket.create_connection = refuse

import evaluate
import movekd_hf

unpacked, cases_file, out = sys.argv[1:4]
cases = json.load(open(cases_file))
result = {"movekd_hf_file": movekd_hf.__file__, "compute": {}, "add_batch": {}}
for name, case in cases.items():
    metric = evaluate.load(f"{unpacked}/movekd_hf/metrics/{case['metric']}")
    result["compute"][name] = metric.compute(predictions=case["predictions"], references=case["references"],
                                             **case["kwargs"])
    half = len(case["predictions"]) // 2  # streaming: two batches, then compute
    metric.add_batch(predictions=case["predictions"][:half], references=case["references"][:half])
    metric.add_batch(predictions=case["predictions"][half:], references=case["references"][half:])
    result["add_batch"][name] = metric.compute(**case["kwargs"])
vqa = evaluate.load(f"{unpacked}/movekd_hf/metrics/vqa_accuracy")
try:
    vqa.compute(predictions=["2", "3"], references=[["2"] * 10, ["3"] * 10], answer_types=["number"])
except ValueError as error:
    result["short_answer_types"] = [type(error).__name__, str(error)]
json.dump(result, open(out, "w"))
"""


def rows(name: str) -> tuple[dict, dict]:
    """(the evaluate inputs for benchmark `name` from its fixture files, the numbers `movekd-hf score` gives)."""
    metric, annotations, questions = CASES[name]
    folder = FIXTURES / name
    questions = folder / questions if questions else None
    benchmark = load_benchmark(name, folder / annotations, questions=questions)
    texts = read_predictions(folder / "answers.jsonl", name, benchmark.samples,
                             ignored_ids=benchmark.info.get("ignored_ids", ()))  # fmt: skip
    truth, kwargs = benchmark.truth, {}
    if metric == "vqa_accuracy":
        keys = list(truth["answers"])
        references = [truth["answers"][k] for k in keys]
        if truth["answer_types"]:
            kwargs["answer_types"] = [truth["answer_types"].get(k, "unknown") for k in keys]
    elif metric == "gqa":
        keys = list(truth["answers"])
        references = [truth["answers"][k] for k in keys]
        if truth["structural_types"]:
            kwargs["structural_types"] = [truth["structural_types"][k] for k in keys]
    elif metric == "pope":
        keys = list(truth["labels"])
        references = [{"label": truth["labels"][k], "split": truth["splits"][k]} for k in keys]
    elif metric == "scienceqa":
        keys = list(truth["problems"])
        references = [dict(truth["problems"][k]) for k in keys]
    elif metric == "mme":
        keys = list(truth["questions"])
        references = [dict(truth["questions"][k]) for k in keys]
    else:
        keys = list(truth["rounds"])
        references = [{"group": int(r["group"]), "answer": r["answer"], "category": r.get("category") or "",
                       "options": [r["options"][letter] for letter in sorted(r["options"])]}
                      for r in (truth["rounds"][k] for k in keys)]  # fmt: skip
    case = {"metric": metric, "predictions": [texts.get(k) for k in keys], "references": references,
            "kwargs": kwargs}  # fmt: skip
    return case, score_files(name, folder / "answers.jsonl", folder / annotations, questions)


@pytest.fixture(scope="module")
def wheel_tree(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from the working tree, unpacked."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "movekd_hf", source / "movekd_hf", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (work / "dist").glob("movekd_hf-*.whl")
    unpacked = work / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    return unpacked


@pytest.fixture(scope="module")
def side(wheel_tree, tmp_path_factory):
    """Every benchmark's case through its `evaluate` module, in one offline process importing from the wheel."""
    work = tmp_path_factory.mktemp("evaluate_side")
    cases, expected = {}, {}
    for name in CASES:
        cases[name], expected[name] = rows(name)
    (work / "cases.json").write_text(json.dumps(cases))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
               "HF_HOME": str(work / "hf"), "HF_MODULES_CACHE": str(work / "modules"), "PYTHONPATH": str(wheel_tree)}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", SIDE_RUN, str(wheel_tree), str(work / "cases.json"), str(work / "out.json")],
        cwd=work, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((work / "out.json").read_text()), cases, expected


def test_every_metric_ships_in_the_wheel(wheel_tree):
    for name in metrics.METRICS:
        assert (wheel_tree / "movekd_hf" / "metrics" / name / f"{name}.py").is_file(), name


def test_the_modules_ran_from_the_wheel(side, wheel_tree):
    result, _, _ = side
    assert Path(result["movekd_hf_file"]).resolve().is_relative_to(wheel_tree.resolve())


@pytest.mark.parametrize("name", list(CASES))
def test_evaluate_module_gives_the_scorers_numbers(side, name):
    result, cases, expected = side
    got = result["compute"][name]
    assert set(got) == set(expected[name])
    assert got == pytest.approx(expected[name], abs=1e-9)
    assert result["add_batch"][name] == pytest.approx(expected[name], abs=1e-9)
    # The fixtures are made to exercise the scoring: not everything right, and (VQAv2) a question unanswered.
    assert 0 < len(cases[name]["predictions"]) and expected[name].get("accuracy", 50.0) < 100.0
    if name == "vqav2":
        assert None in cases[name]["predictions"] and got["num_missing"] == 1


def test_per_row_lists_must_match_the_predictions(side):
    result, _, _ = side
    kind, message = result["short_answer_types"]
    assert kind == "SettingsError"
    assert "answer_types" in message and "1 values for 2 predictions" in message


def test_unknown_metric_name_lists_the_known_ones():
    with pytest.raises(SettingsError, match="unknown metric 'vqa'.*one of vqa_accuracy, gqa, pope"):
        metrics.path("vqa")
