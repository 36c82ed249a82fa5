"""Answers files as the benchmarks and LLaVA distribute them: strict reading with counts, safe writing from two real
processes, POPE's official and LLaVA layouts, TextVQA's prompt set, server submission files, one-line errors."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from movekd_hf.cli import main
from movekd_hf.errors import AnswersFileError, DataFileError
from movekd_hf.evaluation.answers import read_answers
from movekd_hf.evaluation.benchmarks import paper_report
from movekd_hf.evaluation.readers import load_benchmark, score_answers_file
from movekd_hf.evaluation.scorers import pope_answer_kind

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

# Real lines of POPE's label files as LLaVA-1.5 pairs them: AoiDragon/POPE commit e3e3926 (2023-08-10),
# output/coco/coco_pope_{split}.json, lines 1-3 (random also 17-18), verbatim.
POPE_LABELS = {
    "adversarial": [
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}',
        '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a backpack in the image?", "label": "no"}',
        '{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?", "label": "yes"}',
    ],
    "random": [
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}',
        '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a car in the image?", "label": "no"}',
        '{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?", "label": "yes"}',
    ],
    "popular": [
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}',
        '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dining table in the image?", "label": "no"}',
        '{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?", "label": "yes"}',
    ],
}  # fmt: skip
# Real lines of LLaVA's playground/data/eval/pope/llava_pope_test.jsonl (haotian-liu/LLaVA commit 32cebc38): ids
# are unique across splits (adversarial 1.., random 10000001.., popular 20000001..), the split is `category`.
SUFFIX = "\nAnswer the question using a single word or phrase."
LLAVA_POPE_QUESTIONS = [
    '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?\\nAnswer the question using a single word or phrase.", "category": "adversarial"}',
    '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a backpack in the image?\\nAnswer the question using a single word or phrase.", "category": "adversarial"}',
    '{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?\\nAnswer the question using a single word or phrase.", "category": "adversarial"}',
    '{"question_id": 10000001, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?\\nAnswer the question using a single word or phrase.", "category": "random"}',
    '{"question_id": 10000002, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a car in the image?\\nAnswer the question using a single word or phrase.", "category": "random"}',
    '{"question_id": 10000003, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?\\nAnswer the question using a single word or phrase.", "category": "random"}',
    '{"question_id": 20000001, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?\\nAnswer the question using a single word or phrase.", "category": "popular"}',
    '{"question_id": 20000002, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dining table in the image?\\nAnswer the question using a single word or phrase.", "category": "popular"}',
    '{"question_id": 20000003, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?\\nAnswer the question using a single word or phrase.", "category": "popular"}',
]  # fmt: skip


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pope_folder(root: Path) -> Path:
    for split, lines in POPE_LABELS.items():
        write_lines(root / "coco" / f"coco_pope_{split}.json", lines)
    return root / "coco"


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 1. Strict reading, counts, --allow-partial ---------------------------------------------------------------


GQA = FIXTURES / "gqa" / "testdev_balanced_questions.json"


def gqa_answers(tmp_path: Path, extra: list[str]) -> Path:
    good = [json.dumps({"question_id": "201307251", "prompt": "", "text": "yes"}),
            json.dumps({"question_id": "202225914", "prompt": "", "text": "left"})]  # fmt: skip
    return write_lines(tmp_path / "answers.jsonl", good + extra)


@pytest.mark.parametrize(
    "extra, reason, line",
    [
        (['{"question_id": "201640614", "text": "table"'], "not_json", 3),  # a torn line
        (['{"prompt": "x", "text": "table"}'], "no_question_id", 3),  # dropped silently before
        (['{"question_id": "201307251", "text": "no"}'], "duplicate_id", 3),  # overwrote the first answer before
        (['{"question_id": "999", "text": "no"}'], "unknown_id", 3),
        (['["not", "an", "object"]'], "not_json", 3),
    ],
)  # fmt: skip
def test_each_bad_line_stops_scoring_with_its_line_and_the_counts(tmp_path, extra, reason, line):
    answers = gqa_answers(tmp_path, extra)
    with pytest.raises(AnswersFileError) as caught:
        score_answers_file("gqa", answers, GQA)
    error = caught.value
    assert error.reason == reason and error.line == line and error.file == answers
    assert f"{answers}:{line}:" in str(error) and "3 lines: 1 " in str(error)
    assert "2 of 4 questions unanswered" in str(error)  # the questions without any answer are counted too


def test_allow_partial_scores_the_rest_and_reports_every_count(tmp_path, capsys):
    lines = ["not json at all", '{"text": "x"}', '{"question_id": "201307251", "text": "no"}',
             '{"question_id": "42", "text": "no"}']  # fmt: skip
    answers = gqa_answers(tmp_path, lines)
    code, out, err = run_cli(["score", "--benchmark", "gqa", "--predictions", str(answers), "--annotations", str(GQA)],
                             capsys)  # fmt: skip
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"movekd-hf score: error: {answers}:3: line is not JSON")
    code, out, err = run_cli(["score", "--benchmark", "gqa", "--predictions", str(answers), "--annotations", str(GQA),
                              "--allow-partial"], capsys)  # fmt: skip
    assert code == 0
    printed = json.loads(out)
    assert printed["answers"] == {"lines": 6, "answered": 2, "questions": 4, "missing": 2, "ignored": 0,
                                  "not_json": 1, "no_text": 0, "no_question_id": 1, "duplicate_id": 1,
                                  "unknown_id": 1, "prompt_mismatch": 0}  # fmt: skip
    assert printed["accuracy"] == pytest.approx(50.0)  # the first "yes" kept: 2 right of 4
    assert "accuracy" in err and "50.0" in err and "answers: not_json" in err  # the table, on stderr


def test_empty_answers_file_is_an_error_even_when_partial(tmp_path):
    answers = write_lines(tmp_path / "answers.jsonl", ["", "  "])
    with pytest.raises(AnswersFileError, match="empty file"):
        read_answers(answers, allow_partial=True)


def test_missing_answers_are_counted_not_fatal():
    _, report = score_answers_file("gqa", FIXTURES / "gqa" / "answers.jsonl", GQA)
    assert report["answers"]["missing"] == 1 and report["answers"]["answered"] == 3


# 2. Two processes writing one answers file ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from movekd_hf.evaluation.answers import append_answers, compact_answers
    path, worker = Path(sys.argv[1]), int(sys.argv[2])
    keys = [f"q{i}" for i in range(400)]
    (path.parent / f"ready{worker}").touch()
    while not (path.parent / "go").exists():  # start together: importing the package takes seconds
        time.sleep(0.01)
    for batch in range(0, 400, 2):
        # Both workers answer every question (two runs on one file), with lines longer than stdio's 8 kB buffer.
        lines = [{"question_id": k, "text": f"w{worker}-" + "x" * 10000, "metadata": {"key": k}}
                 for k in keys[batch:batch + 2]]
        append_answers(path, lines)
        if batch % 40 == 0:
            compact_answers(path, keys)  # rewrites the file while the other worker keeps appending
    compact_answers(path, keys)
    """
)


@pytest.mark.slow  # two fresh interpreters import the package (torch, transformers)
def test_two_processes_append_and_compact_one_file_without_losing_or_repeating(tmp_path):
    path = tmp_path / "answers.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    workers = [subprocess.Popen([sys.executable, str(script), str(path), str(w)], stderr=subprocess.PIPE, text=True)
               for w in (0, 1)]  # fmt: skip
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{w}").exists() for w in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    for worker in workers:
        assert worker.wait(timeout=240) == 0, worker.stderr.read()
    # The worker that finished last compacted after every append of both.
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert [line["metadata"]["key"] for line in lines] == [f"q{i}" for i in range(400)]  # each once, in order
    assert all(line["text"].endswith("x" * 10000) for line in lines)
    assert not list(tmp_path.glob("*.tmp"))


# 3. POPE as released --------------------------------------------------------------------------------------


def pope_answers(tmp_path: Path, texts: dict[int, str]) -> Path:
    return write_lines(tmp_path / "answers.jsonl", [{"question_id": qid, "prompt": "", "text": text}
                                                    for qid, text in texts.items()])  # fmt: skip


def test_pope_official_single_file_takes_the_split_from_its_name(tmp_path):
    coco = pope_folder(tmp_path)
    random = load_benchmark("pope", coco / "coco_pope_random.json")
    assert [s.key for s in random.samples] == ["random/1", "random/2", "random/3"]
    assert [s.question_id for s in random.samples] == [10000001, 10000002, 10000003]  # LLaVA's ids
    answers = pope_answers(tmp_path, {10000001: "Yes", 10000002: "No", 10000003: "I cannot tell."})
    metrics, report = score_answers_file("pope", answers, coco / "coco_pope_random.json")
    assert metrics["random/accuracy"] == pytest.approx(100.0)  # "I cannot tell." counts as yes (LLaVA's rule)
    assert metrics["num_other"] == 1 and metrics["random/num_other"] == 1
    assert report["comparable_with_paper"] is False and "1 of the 3 splits" in report["notes"][0]


def test_pope_with_llava_question_file_reports_each_split_and_the_mean_f1(tmp_path, capsys):
    coco = pope_folder(tmp_path)
    questions = write_lines(tmp_path / "llava_pope_test.jsonl", LLAVA_POPE_QUESTIONS)
    # adversarial: yes,no,yes vs yes,no,yes -> F1 100; random: yes,yes,yes vs yes,no,yes -> P 2/3, R 1 -> F1 80;
    # popular: no,no,yes vs yes,no,yes -> P 1, R 1/2 -> F1 2/3.
    texts = {1: "Yes", 2: "No, there is not.", 3: "Yes.", 10000001: "Yes", 10000002: "There is a car", 10000003: "yes",
             20000001: "No", 20000002: "no", 20000003: "Yes"}  # fmt: skip
    answers = pope_answers(tmp_path, texts)
    code, out, err = run_cli(["score", "--benchmark", "POPE", "--predictions", str(answers), "--annotations",
                              str(coco), "--questions", str(questions)], capsys)  # fmt: skip
    assert code == 0, err
    printed = json.loads(out)
    assert printed["adversarial/f1"] == pytest.approx(100.0) and printed["random/f1"] == pytest.approx(80.0)
    assert printed["popular/f1"] == pytest.approx(200 / 3)
    assert printed["f1"] == printed["paper_value"] == pytest.approx((100 + 80 + 200 / 3) / 3)
    assert printed["paper_metric"] == "f1" and printed["comparable_with_paper"] is True
    assert printed["num_other"] == 1 and printed["random/num_other"] == 1  # "There is a car"
    assert "POPE (f1, the paper's column)" in err and f"{printed['f1']:.1f}" in err


def test_pope_label_files_of_another_release_are_refused(tmp_path):
    # POPE's current random file (HEAD) has a different 18th question than the one LLaVA's ids were made from.
    head_random = POPE_LABELS["random"] + [
        '{"question_id": 17, "image": "COCO_val2014_000000429109.jpg", "text": "Is there a car in the image?", "label": "yes"}',
        '{"question_id": 18, "image": "COCO_val2014_000000429109.jpg", "text": "Is there a tennis racket in the image?", "label": "no"}',
    ]  # fmt: skip
    write_lines(tmp_path / "coco" / "coco_pope_random.json", head_random)
    llava = [line for line in LLAVA_POPE_QUESTIONS if '"random"' in line] + [
    '{"question_id": 10000017, "image": "COCO_val2014_000000429109.jpg", "text": "Is there a car in the image?\\nAnswer the question using a single word or phrase.", "category": "random"}',
    '{"question_id": 10000018, "image": "COCO_val2014_000000211674.jpg", "text": "Is there a person in the image?\\nAnswer the question using a single word or phrase.", "category": "random"}',
    ]  # fmt: skip
    questions = write_lines(tmp_path / "llava_pope_test.jsonl", llava)
    with pytest.raises(DataFileError, match="question 10000018 .* shows COCO_val2014_000000211674.jpg"):
        load_benchmark("pope", tmp_path / "coco", questions=questions)
    # Without the question file, LLaVA's answers meet the wrong question under id 10000018: their prompts tell.
    answers = write_lines(tmp_path / "answers.jsonl", [
        {"question_id": 10000017, "prompt": "Is there a car in the image?" + SUFFIX, "text": "Yes"},
        {"question_id": 10000018, "prompt": "Is there a person in the imange?" + SUFFIX, "text": "Yes"}])  # fmt: skip
    with pytest.raises(AnswersFileError, match="answers.jsonl:2: question_id 10000018 was asked"):
        score_answers_file("pope", answers, tmp_path / "coco")


@pytest.mark.parametrize(
    "text, kind", [("Yes, there is.", "yes"), ("No.", "no"), ("There is not a cat.", "no"), ("A dog", "other"),
                   ("I cannot tell. Yes.", "other"), ("yes!", "yes")],
)  # fmt: skip
def test_pope_answer_kinds(text, kind):
    assert pope_answer_kind(text) == kind


# 4. TextVQA's prompt set ------------------------------------------------------------------------------------


def test_textvqa_reports_which_prompt_set_the_answers_used(tmp_path):
    annotations = FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json"
    ocr = "what brand is this?\nReference OCR token: Coca, Cola\nAnswer the question using a single word or phrase."
    with_ocr = write_lines(tmp_path / "ocr.jsonl", [{"question_id": 34602, "prompt": ocr, "text": "coca cola"},
                                                    {"question_id": 34603, "prompt": "x", "text": "3.5"}])  # fmt: skip
    _, report = score_answers_file("textvqa", with_ocr, annotations)
    assert report["prompt_set"] == "ocr" and report["comparable_with_paper"] is True
    _, report = score_answers_file("textvqa", FIXTURES / "textvqa" / "answers.jsonl", annotations)
    assert report["prompt_set"] == "plain" and report["comparable_with_paper"] is False
    assert "llava_textvqa_val_v051_ocr.jsonl" in report["notes"][0]


# 5. Server-scored columns -----------------------------------------------------------------------------------


def test_vqav2_and_vizwiz_submission_files(tmp_path, capsys):
    # LLaVA's test2015 list (all ids) and answers for the test-dev subset only; EvalAI wants every id.
    questions = write_lines(
        tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
        [{"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": "?"} for q in (1, 2, 3)],
    )
    answers = write_lines(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "Two."}, {"question_id": 3, "text": "The Dog's"}])  # fmt: skip
    code, out, err = run_cli(["submission", "--benchmark", "VQAv2", "--predictions", str(answers), "--questions",
                              str(questions), "--out", str(tmp_path / "up" / "vqav2.json")], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "up" / "vqav2.json").read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "dog 's"},
    ]
    assert json.loads(out)["answers"]["missing"] == 1
    vizwiz_questions = write_lines(tmp_path / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "?"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "?"}])  # fmt: skip
    answers = write_lines(tmp_path / "vizwiz.jsonl", [{"question_id": 0, "text": "Unanswerable"}])
    argv = ["submission", "--benchmark", "vizwiz", "--predictions", str(answers), "--questions", str(vizwiz_questions),
            "--out", str(tmp_path / "vizwiz.json")]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "1 of 2 VizWiz test questions are unanswered" in err  # LLaVA asserts every one
    write_lines(answers, [{"question_id": 0, "text": "Unanswerable"}, {"question_id": 1, "text": "A red shirt."}])
    assert run_cli(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "vizwiz.json").read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "red shirt"}]  # fmt: skip


def test_mmbench_sheet_has_llavas_columns_and_local_scores_say_not_comparable(tmp_path, capsys):
    tsv = FIXTURES / "mmbench" / "mmbench_dev_20230712.tsv"
    answers = FIXTURES / "mmbench" / "answers.jsonl"
    code, out, err = run_cli(["submission", "--benchmark", "mmbench", "--predictions", str(answers), "--questions",
                              str(tsv), "--out", str(tmp_path / "sheet.tsv")], capsys)  # fmt: skip
    assert code == 0, err
    rows = [line.split("\t") for line in (tmp_path / "sheet.tsv").read_text().splitlines()]
    header = tsv.read_text().splitlines()[0].split("\t")
    kept = [c for c in header if c not in ("hint", "category", "source", "image", "comment", "l2-category")]
    assert rows[0] == kept[:6] + ["prediction"] + kept[6:]
    assert len(rows) == len(tsv.read_text().splitlines())  # every row, circular copies included
    assert all(row[6] for row in rows[1:])  # each row got its round's prediction
    _, report = score_answers_file("mmbench", answers, tsv)
    assert report["comparable_with_paper"] is False and "MMBench server" in report["notes"][0]


def test_mme_output_names_the_perception_score():
    metrics, report = score_answers_file("mme", FIXTURES / "mme" / "answers.jsonl",
                                         FIXTURES / "mme" / "MME_Benchmark_release_version")  # fmt: skip
    assert report["paper_metric"] == "perception" and report["paper_value"] == metrics["perception"]
    # The fixture holds 2 of the 10 perception subtasks: its perception is not the paper's number.
    assert report["comparable_with_paper"] is False
    assert report["notes"][0] == "perception over 2 of the 10 perception subtasks; the paper's MME sums all of them"
    assert "perception score" in report["notes"][1]
    complete = {**metrics, "num_perception_subtasks": 10.0}  # what a whole MME folder scores to
    assert paper_report("mme", complete)["comparable_with_paper"] is True


# 7. Expected user errors: one line, exit 2 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "--benchmark", "okvqa", "--predictions", "a", "--annotations", "b"], "unknown benchmark 'okvqa'"),
        (["score", "--benchmark", "gqa", "--predictions", "nope.jsonl", "--annotations", str(GQA)],
         "answers file nope.jsonl does not exist"),
        (["score", "--benchmark", "gqa", "--predictions", str(FIXTURES / "gqa" / "answers.jsonl"), "--annotations",
          "nope.json"], "gqa annotations nope.json do not exist"),
        (["eval", "--model", "m", "--benchmark", "textvqa", "--data", "nowhere", "--out", "o"],
         "--data nowhere is not a folder"),
        (["eval", "--model", "runs/nope", "--benchmark", "gqa", "--data", ".", "--annotations", str(GQA), "--out",
          "o"], "field '--model': 'runs/nope' is no local folder, and as a Hub id it is not in the local cache"),
        (["submission", "--benchmark", "gqa", "--predictions", "a", "--questions", "q", "--out", "o"],
         "gqa is scored locally"),
    ],
)  # fmt: skip
def test_user_errors_end_in_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith(f"movekd-hf {argv[0]}: error:")
