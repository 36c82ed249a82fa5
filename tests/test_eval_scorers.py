"""Each scorer on small fixture files in the official layouts; expected values worked out by hand (comments)."""

import json
from pathlib import Path

import pytest

from movekd_hf.cli import evaluate as commands
from movekd_hf.evaluation import scorers
from movekd_hf.evaluation.benchmarks import mmbench_rounds, score_pairs
from movekd_hf.evaluation.readers import score_files
from movekd_hf.evaluation.scorers import choice_letter, mme_yes_no, pope_scores, pope_yes_no

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _score(name, annotations, questions=None):
    return score_files(name, FIXTURES / name / "answers.jsonl", FIXTURES / name / annotations, questions)


def test_vqav2_accuracy_by_hand():
    # per question: "Two." vs 3x"2"/"two" -> 0.9; "Dog" vs "the dog","dog" -> 0.6; "dont" vs one "don't" -> 0.3;
    # "black-and-white" vs 10 -> 1; q5 unanswered -> 0; "3,000" vs 2x"3000" -> 0.6. Mean 3.4 / 6.
    m = _score("vqav2", "v2_mscoco_val2014_annotations.json")
    assert m["accuracy"] == pytest.approx(100 * 3.4 / 6)
    assert m["accuracy_number"] == pytest.approx(75.0)  # (0.9 + 0.6) / 2
    assert m["accuracy_other"] == pytest.approx(100 * 1.6 / 3)
    assert m["accuracy_yes/no"] == pytest.approx(30.0)
    assert m["num_missing"] == 1


def test_textvqa_accuracy_by_hand():
    # "Coca-Cola" -> "coca cola" matches 2 humans -> 0.6; "3.5" keeps its point, matches 1 -> 0.3.
    assert _score("textvqa", "TextVQA_0.5.1_val.json")["accuracy"] == pytest.approx(45.0)


def test_vizwiz_accuracy_with_unanswerable():
    # "Unanswerable." vs 7x unanswerable -> 1; "A red shirt" vs 2x "red shirt" -> 0.6; "Unanswerable" vs 10x yes -> 0.
    m = _score("vizwiz", "val.json")
    assert m["accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert m["accuracy_unanswerable"] == pytest.approx(100.0)
    assert m["accuracy_yes/no"] == 0.0


def test_gqa_exact_match():
    # "Yes." -> yes (right, verify); "The table" != "table" (exact match keeps articles: wrong, query);
    # "left" right (choose); the fourth question is unanswered (wrong, query).
    m = _score("gqa", "testdev_balanced_questions.json")
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["accuracy_open"] == 0.0 and m["accuracy_binary"] == 100.0


def test_pope_per_split_from_llava_files():
    # LLaVA answers file (no keys) + question file in the order random, adversarial, popular; ids repeat per split.
    # random: preds yes,no,no,yes ("I don't think so" has no "no"/"not" word -> yes) vs yes,yes,no,no -> all 50.
    # popular: all right. adversarial: yes,yes,no,yes vs yes,yes,yes,no -> acc 50, P = R = F1 = 2/3, yes 75.
    m = _score("pope", "coco", FIXTURES / "pope" / "llava_pope_test.jsonl")
    assert m["random/accuracy"] == m["random/f1"] == m["random/yes_ratio"] == pytest.approx(50.0)
    assert m["popular/accuracy"] == m["popular/f1"] == pytest.approx(100.0)
    assert m["adversarial/accuracy"] == pytest.approx(50.0)
    assert m["adversarial/precision"] == m["adversarial/recall"] == pytest.approx(200 / 3)
    assert m["adversarial/yes_ratio"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx((50 + 100 + 200 / 3) / 3)
    assert m["yes_ratio"] == pytest.approx((50 + 50 + 75) / 3)


@pytest.mark.parametrize(
    "text, expected",
    [("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a cat.", "no"), ("I don't think so", "yes"),
     ("Nope", "yes"), ("Yes. But no dog.", "yes"), ("no", "no")],
)  # fmt: skip
def test_pope_free_text_parsing(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_missing_prediction_counts_as_wrong():
    m = pope_scores({}, {"a": "yes", "b": "no"}, {"a": "random", "b": "random"})
    assert m["accuracy"] == 0.0 and m["num_missing"] == 2


def test_scienceqa_img_accuracy():
    # Only test problems with an image count (4 of 6). "B" right; "The answer is A." right; "D. June" wrong
    # (answer C); "dog" wrong: LLaVA reads letters only.
    m = _score("scienceqa", "problems.json")
    assert m["num_questions"] == 4
    assert m["accuracy"] == pytest.approx(50.0)


def test_mme_scores_by_hand():
    # existence: 3/4 right, 1 of 2 images fully right -> 75 + 50; OCR: "nope" starts with "no" -> 100 + 100;
    # code_reasoning: "Sure, yes" -> other -> 50 + 0. Perception = 125 + 200, cognition = 50.
    m = _score("mme", "MME_Benchmark_release_version")
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["OCR/acc_plus"] == pytest.approx(100.0)
    assert m["perception"] == pytest.approx(325.0)
    assert m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(375.0)
    assert (m["num_perception_subtasks"], m["num_cognition_subtasks"]) == (2.0, 1.0)


def test_mme_group_without_subtasks_has_no_score():
    # Perception subtasks only (as a partial MME folder gives): no cognition score, not a cognition of 0.
    questions = {f"q{i}": {"category": "existence", "image": f"{i // 2}.jpg", "answer": "Yes"} for i in range(4)}
    m = scorers.mme_scores({"q0": "Yes", "q1": "Yes", "q2": "No"}, questions)
    assert "cognition" not in m and m["num_cognition_subtasks"] == 0.0
    # q0, q1 right, q2 wrong, q3 unanswered: 2 of 4 right (50), image 0 of the two has both right (50)
    assert m["perception"] == m["total"] == pytest.approx(50.0 + 50.0)


@pytest.mark.parametrize(
    "text, expected", [("Yes", "yes"), ("No, it is not.", "no"), ("Sure, yes", "other"), ("yes.", "yes")]
)
def test_mme_parsing(text, expected):
    assert mme_yes_no(text) == expected


def test_mmbench_circular():
    # Question 0 is right in all 3 rounds ("green" matches round 2's option C); question 1 fails round 1.
    m = _score("mmbench", "mmbench_dev_20230712.tsv")
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["accuracy_first_round"] == pytest.approx(100.0)
    assert m["category/color"] == 100.0 and m["category/animal"] == 0.0
    assert m["num_questions"] == 2  # the release's circular copy (index >= 1e6) is not a new question


def test_mmbench_rounds_shift_options_and_answer():
    rounds = mmbench_rounds({"options": {"A": "red", "B": "green", "C": "blue", "D": ""}, "answer": "B"})
    assert [r["options"] for r in rounds] == [
        {"A": "red", "B": "green", "C": "blue"},
        {"A": "green", "B": "blue", "C": "red"},
        {"A": "blue", "B": "red", "C": "green"},
    ]
    assert [r["answer"] for r in rounds] == ["B", "A", "C"]


@pytest.mark.parametrize(
    "text, expected",
    [("B", "B"), ("B. June", "B"), ("The answer is C.", "C"), ("E", None), ("dog", None), ("Banana", None)],
)
def test_choice_letter_llava_rules(text, expected):
    assert choice_letter(text, ["A", "B", "C"]) == expected


def test_score_command_prints_one_json_object(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", "--benchmark", "TextVQA", "--predictions", str(FIXTURES / "textvqa" / "answers.jsonl"),
                              "--annotations", str(FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json")])  # fmt: skip
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(45.0)


def test_cli_registers_evaluation_commands():
    from movekd_hf import cli

    subcommands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    assert {"score", "eval"} <= set(subcommands)


def test_benchmark_names_in_any_spelling():
    from movekd_hf.evaluation.benchmarks import benchmark_key, canonical_name

    assert [canonical_name(name) for name in ("VQA-v2", "SQA-IMG", "ScienceQA_IMG", "MMB", "MMBench-EN")] == [
        "vqav2", "scienceqa", "scienceqa", "mmbench", "mmbench",
    ]  # fmt: skip
    assert benchmark_key("My-Private bench") == "myprivatebench"  # normalised, not checked (cards keep it)


def test_unknown_benchmark_and_missing_files_are_named():
    with pytest.raises(ValueError, match="unknown benchmark 'okvqa'"):
        score_files("okvqa", FIXTURES / "gqa" / "answers.jsonl", FIXTURES / "gqa")
    with pytest.raises(FileNotFoundError, match="nope.json do not exist"):
        score_files("gqa", FIXTURES / "gqa" / "answers.jsonl", FIXTURES / "gqa" / "nope.json")


def test_score_pairs_matches_the_file_scorers():
    # The aligned-list form (what an `evaluate` module receives) gives the POPE numbers of the adversarial split.
    refs = [{"label": "yes", "category": "adversarial"}] * 3 + [{"label": "no", "category": "adversarial"}]
    m = score_pairs("pope", ["Yes", "yes", "No", "Yes"], refs)
    assert m["f1"] == pytest.approx(200 / 3) and m["yes_ratio"] == pytest.approx(75.0)
    vqa = score_pairs(
        "vqav2", ["Two.", "dont"], [{"answers": ["2"] * 3 + ["3"] * 7}, {"answers": ["don't"] + ["no"] * 9}]
    )
    assert vqa["accuracy"] == pytest.approx(60.0)  # (0.9 + 0.3) / 2
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_pairs("gqa", ["a", "b"], [{"answer": "a"}])


def test_evaluate_module_file_is_valid_python_naming_a_metric():
    import ast

    path = Path(scorers.__file__).parent / "evaluate_modules" / "movekd_benchmarks.py"
    tree = ast.parse(path.read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert [ast.unparse(base) for base in classes[0].bases] == ["evaluate.Metric"]
    assert {f.name for f in classes[0].body if isinstance(f, ast.FunctionDef)} == {"_info", "_compute"}


def test_mmbench_llava_answers_with_round_ids(tmp_path):
    # LLaVA's --all-rounds answers carry `round_id` and no key; the order of lines must not matter.
    lines = [(1, 1, "A"), (0, 2, "C"), (1, 0, "A"), (0, 0, "B"), (0, 1, "A")]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps({"question_id": q, "round_id": r, "prompt": "", "text": t}) + "\n" for q, r, t in lines)
    )
    m = score_files("mmbench", answers, FIXTURES / "mmbench" / "mmbench_dev_20230712.tsv")
    assert m["accuracy"] == pytest.approx(50.0) and m["num_missing"] == 0
