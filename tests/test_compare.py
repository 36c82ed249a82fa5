"""Paired comparisons (movekd_hf/evaluation/compare.py) on constructed cases whose answer is known: a planted
difference is found with the right size, equal arms give intervals that cover zero about as often as the confidence
says, and the per-unit scores reproduce the official scorers' numbers exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from movekd_hf.evaluation import compare, scorers
from movekd_hf.evaluation.benchmarks import build_benchmark


def vqa_benchmark(n: int, seed: int = 0):
    rng = random.Random(seed)
    records = [{"key": f"q{i}", "question": "What colour?", "image": "x.png",
                "answers": [rng.choice(["red", "blue"]) for _ in range(10)],
                "answer_type": rng.choice(["number", "other", "yes/no"])} for i in range(n)]  # fmt: skip
    return build_benchmark("vqav2", records)


def pope_benchmark(n_per_split: int, seed: int = 0):
    rng = random.Random(seed)
    records = [{"key": f"{split}-{i}", "question": "Is there a cat in the image?", "image": "x.png",
                "category": split, "label": rng.choice(["yes", "no"])}
               for split in ("adversarial", "popular", "random") for i in range(n_per_split)]  # fmt: skip
    return build_benchmark("pope", records)


def answers_right_with(benchmark, probability: float, seed: int) -> dict[str, str]:
    """VQA answers that are each the majority answer with `probability`, else a wrong word."""
    rng = random.Random(seed)
    out = {}
    for key, answers in benchmark.truth["answers"].items():
        best = max(set(answers), key=answers.count)
        out[key] = best if rng.random() < probability else "green"
    return out


def pope_answers(benchmark, probability: float, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    flip = {"yes": "No, there is not.", "no": "Yes, there is."}
    keep = {"yes": "Yes, there is.", "no": "No, there is not."}
    return {
        key: (keep if rng.random() < probability else flip)[label] for key, label in benchmark.truth["labels"].items()
    }


def test_unit_means_reproduce_the_official_scorers():
    vqa = vqa_benchmark(300)
    predictions = answers_right_with(vqa, 0.6, seed=1)
    del predictions["q7"]  # a missing answer scores as the scorer scores it
    units = compare.unit_scores(vqa, predictions)
    official = vqa.score(predictions)
    for kind in units.units:
        assert compare.mean_percent(units.values[kind][None])[0] == pytest.approx(official[f"accuracy_{kind}"])
    counts = {k: len(v) for k, v in units.units.items()}
    per_type = {k: compare.mean_percent(v[None]) for k, v in units.values.items()}
    assert compare.weighted_mean(per_type, counts)[0] == pytest.approx(official["accuracy"])

    pope = pope_benchmark(80)
    answers = pope_answers(pope, 0.7, seed=2)
    answers.pop("random-3")
    units = compare.unit_scores(pope, answers)
    official = pope.score(answers)
    per_split = {k: compare.f1_percent(v[None]) for k, v in units.values.items()}
    for split, value in per_split.items():
        assert value[0] == pytest.approx(official[f"{split}/f1"])
    assert compare.mean_over_types(per_split, {})[0] == pytest.approx(official["f1"])


def test_mme_units_reproduce_the_perception_score():
    rng = random.Random(3)
    records = []
    for category in ("existence", "count", "color", "code_reasoning"):
        for image in range(15):
            for answer in ("Yes", "No"):
                records.append({"key": f"{category}/{image}/{answer}", "question": "Is it?", "image": f"{image}.png",
                                "image_id": f"{image}.png", "category": category, "answer": answer})  # fmt: skip
    mme = build_benchmark("mme", records)
    predictions = {r["key"]: rng.choice(["Yes", "No"]) for r in records}
    official = mme.score(predictions)
    units = compare.unit_scores(mme, predictions)
    per_type = {k: compare.mean_value(v[None]) for k, v in units.values.items()}
    assert compare.mme_perception(per_type, {})[0] == pytest.approx(official["perception"])
    # Comparing a model with itself: exactly zero everywhere, and never "resolved".
    same = compare.compare_predictions(mme, predictions, predictions, n_resamples=200)
    assert all(v.estimate == v.low == v.high == 0.0 and not v.resolved for v in same.values())


def test_a_planted_difference_is_found_with_its_size():
    vqa = vqa_benchmark(1500)
    better, worse = answers_right_with(vqa, 0.8, seed=4), answers_right_with(vqa, 0.5, seed=5)
    result = compare.compare_predictions(vqa, better, worse, n_resamples=1000)
    overall = result[compare.OVERALL]
    assert overall.resolved and overall.low > 20 and overall.high < 40  # planted: about +30 points
    assert overall.estimate == pytest.approx(vqa.score(better)["accuracy"] - vqa.score(worse)["accuracy"])
    # The other direction is the mirror image.
    mirrored = compare.compare_predictions(vqa, worse, better, n_resamples=1000)[compare.OVERALL]
    assert mirrored.estimate == pytest.approx(-overall.estimate) and mirrored.high < 0

    pope = pope_benchmark(300)
    result = compare.compare_predictions(pope, pope_answers(pope, 0.9, 6), pope_answers(pope, 0.6, 7), 1000)
    assert result[compare.OVERALL].resolved and result[compare.OVERALL].estimate > 20


def test_equal_arms_cover_zero_at_about_the_stated_rate():
    """Two arms of the same skill answering independently: the 95% interval should contain the true difference
    (zero) in about 95% of repetitions, so the bootstrap is neither much too narrow nor much too wide."""
    vqa = vqa_benchmark(200)
    covered = 0
    trials = 120
    for trial in range(trials):
        a = answers_right_with(vqa, 0.6, seed=1000 + trial)
        b = answers_right_with(vqa, 0.6, seed=5000 + trial)
        interval = compare.compare_predictions(vqa, a, b, n_resamples=400, seed=trial)[compare.OVERALL]
        covered += interval.low <= 0.0 <= interval.high
    assert 0.88 <= covered / trials <= 1.0


def test_t_interval_and_paired_bootstrap_known_values():
    interval = compare.t_interval([2.0, 3.0, 4.0])
    # t_{0.975, 2} = 4.302653; s = 1; half width = 4.302653 / sqrt(3) = 2.484
    assert interval.estimate == 3.0 and interval.high - 3.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert interval.resolved and not compare.t_interval([1.0, 2.0, 3.0]).resolved
    assert not compare.t_interval([-1.0, 0.5, 1.0, -0.2]).resolved
    with pytest.raises(ValueError, match="at least 2"):
        compare.t_interval([1.0])

    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.7).astype(float)
    b = (rng.random(2000) < 0.7).astype(float)
    assert not compare.bootstrap_mean_difference(a, b).resolved
    shifted = compare.bootstrap_mean_difference(np.ones(2000), b)
    assert shifted.resolved and shifted.estimate == pytest.approx(1 - b.mean())
    with pytest.raises(ValueError, match="one length"):
        compare.bootstrap_mean_difference([1.0, 0.0], [1.0])


def test_different_question_sets_are_refused():
    vqa = vqa_benchmark(20)
    a = compare.unit_scores(vqa, answers_right_with(vqa, 0.5, 0))
    smaller = build_benchmark("vqav2", [{"key": "q0", "question": "?", "image": "x", "answers": ["red"] * 10}])
    b = compare.unit_scores(smaller, {"q0": "red"})
    with pytest.raises(ValueError, match="different questions"):
        compare.paired_bootstrap(a, b)


def test_format_comparison_marks_unresolved_cells():
    vqa = vqa_benchmark(100)
    same_skill = compare.compare_predictions(
        vqa, answers_right_with(vqa, 0.5, 1), answers_right_with(vqa, 0.5, 2), n_resamples=300
    )
    text = compare.format_comparison("vqav2", same_skill, "run-a", "run-b")
    assert text.splitlines()[0] == "vqav2: run-a - run-b, 95% interval"
    assert "overall" in text.splitlines()[-1]
    assert ("not resolved" in text) == any(not v.resolved for v in same_skill.values())
    json.dumps({k: v.to_dict() for k, v in same_skill.items()})  # serialisable for results files and cards
    assert scorers.MME_PERCEPTION  # the MME headline sums these subtasks


def write_gqa(tmp_path, n: int, right_a: float, right_b: float):
    """A GQA annotation file as distributed (testdev_balanced_questions.json) and two LLaVA answers files."""
    rng = random.Random(9)
    truth = {str(100 + i): {"imageId": f"n{i}", "question": "Is it red?", "answer": rng.choice(["yes", "no"]),
                            "types": {"structural": rng.choice(["verify", "query"])}} for i in range(n)}  # fmt: skip
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps(truth))
    paths = []
    for name, right in (("a", right_a), ("b", right_b)):
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        with open(folder / "gqa_answers.jsonl", "w") as handle:
            for qid, item in truth.items():
                wrong = "no" if item["answer"] == "yes" else "yes"
                text = item["answer"].capitalize() + "." if rng.random() < right else wrong
                handle.write(json.dumps({"question_id": qid, "prompt": item["question"], "text": text}) + "\n")
        paths.append(tmp_path / name)
    return annotations, paths


def test_compare_command_on_run_folders(tmp_path, capsys):
    from movekd_hf.cli import main

    annotations, (run_a, run_b) = write_gqa(tmp_path, 600, 0.9, 0.55)
    out = tmp_path / "compare.json"
    code = main(["compare", str(run_a), str(run_b / "eval" / "gqa_answers.jsonl"), "--benchmark", "GQA",
                 "--annotations", str(annotations), "--resamples", "500", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and printed[0].startswith("gqa: ") and len(printed) == 4  # header, binary, open, overall
    saved = json.loads(out.read_text())["intervals"]
    assert set(saved) == {"binary", "open", "overall"}
    assert saved["overall"]["resolved"] and 25 < saved["overall"]["estimate"] < 45
    official_a = scorers.gqa_accuracy(
        {str(json.loads(line)["question_id"]): json.loads(line)["text"]
         for line in (run_a / "eval" / "gqa_answers.jsonl").read_text().splitlines()},
        {qid: item["answer"] for qid, item in json.loads(annotations.read_text()).items()},
    )["accuracy"]  # fmt: skip
    assert official_a > 80


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--resamples", "5"], "field '--resamples': is 5; expected at least 100"),
        (["--confidence", "95"], "field '--confidence': is 95.0; expected a number between 0 and 1"),
    ],
)
def test_compare_command_refuses_bad_settings_in_one_line(tmp_path, capsys, argv_tail, message):
    from movekd_hf.cli import main

    annotations, (run_a, run_b) = write_gqa(tmp_path, 10, 0.5, 0.5)
    code = main(["compare", str(run_a), str(run_b), "--benchmark", "gqa", "--annotations", str(annotations),
                 *argv_tail])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == f"movekd-hf compare: error: {message}"


def test_compare_command_names_a_folder_without_answers(tmp_path, capsys):
    from movekd_hf.cli import main

    annotations, (run_a, _) = write_gqa(tmp_path, 10, 0.5, 0.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["compare", str(run_a), str(empty), "--benchmark", "gqa", "--annotations", str(annotations)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(empty) in err[0] and "gqa_answers.jsonl" in err[0]


def test_a_runs_card_carries_its_comparisons(tmp_path, capsys):
    """`compare --json RUN/eval/compare/...` puts the intervals where the run's model card shows them."""
    from _hub_fixtures import make_run_dir
    from huggingface_hub import ModelCard

    from movekd_hf.cli import main
    from movekd_hf.hub_cards.card import write_card

    annotations, (run_a, run_b) = write_gqa(tmp_path, 300, 0.9, 0.5)
    run = make_run_dir(run_a, full=False)
    out = run / "eval" / "compare" / "gqa_vs_b.json"
    out.parent.mkdir(parents=True)
    argv = ["compare", str(run_a), str(run_b), "--benchmark", "gqa", "--annotations", str(annotations),
            "--resamples", "300", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "eval" / "gqa_answers.jsonl").read_text().splitlines()[0])  # eval records untouched
    write_card(run)
    text = (run / "checkpoint" / "README.md").read_text()
    ModelCard(text)  # still a valid card
    overall = json.loads(out.read_text())["intervals"]["overall"]
    row = (f"| gqa | b | overall | {overall['n']} (95 %) | {overall['estimate']:+.1f} "
           f"[{overall['low']:+.1f}, {overall['high']:+.1f}] |")  # fmt: skip
    assert "## Paired comparisons" in text and row in text
