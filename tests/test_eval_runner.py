"""The generation runner and `movekd-hf eval`, on the tiny MoVE-KD model and real images (skimage)."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from movekd_hf.cli import evaluate as commands
from movekd_hf.evaluation.benchmarks import EvalSample
from movekd_hf.evaluation.runner import build_prompt, generate_batch, run_generation
from movekd_hf.hub_cards.run_dir import validate_eval_results
from movekd_hf.modeling.llava_conventions import VICUNA_SYSTEM, expand_to_square
from movekd_hf.models import build_tiny_model

QUESTIONS = ["What is this?", "Is it red?", "Count the cups in the picture please."]


def tiny_model_with_varied_outputs(seed: int = 0):
    """The tiny model with larger random weights, so greedy answers depend on the prompt and the image (at the
    preset's small init every prompt decodes to the same tokens, which would hide padding mistakes)."""
    model, processor = build_tiny_model(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3, generator=generator)
    return model, processor


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "astronaut.png", folder / "coffee.png", folder / "chelsea.png"]
    for path, array, size in zip(
        paths, (data.astronaut(), data.coffee(), data.chelsea()), ((64, 48), (40, 60), (50, 50))
    ):
        Image.fromarray(array).resize(size).save(path)
    return paths


def make_samples(images: list[Path], count: int = 5) -> list[EvalSample]:
    return [EvalSample(f"k{i}", i, str(images[i % 3]), QUESTIONS[i % 3]) for i in range(count)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_with_varied_outputs()


def test_batched_greedy_equals_one_at_a_time(tiny, tmp_path):
    model, processor = tiny
    samples = make_samples(write_images(tmp_path))
    batched = generate_batch(model, processor, samples, "v1", max_new_tokens=6, pad=True)
    alone = [generate_batch(model, processor, [s], "v1", max_new_tokens=6, pad=True)[0] for s in samples]
    assert batched == alone  # left padding leaves every row's greedy answer unchanged
    assert len(set(alone)) > 1  # the answers do depend on the inputs


def test_run_generation_resumes_and_merges_leftover_parts(tiny, tmp_path):
    model, processor = tiny
    samples = make_samples(write_images(tmp_path / "images"))
    answers = tmp_path / "out" / "answers.jsonl"
    run_generation(model, processor, samples[:2], answers, batch_size=2, max_new_tokens=4, model_id="tiny")
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    # An interrupted multi-process run left a part file with sample 3 answered.
    leftover = {"question_id": 3, "prompt": "x", "text": "from rank 1", "answer_id": "old", "model_id": "tiny",
                "metadata": {"key": "k3", "category": None}}  # fmt: skip
    (answers.parent / "answers.rank1.jsonl").write_text(json.dumps(leftover) + "\n")
    run_generation(model, processor, samples, answers, batch_size=2, max_new_tokens=4, model_id="tiny")
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [line["metadata"]["key"] for line in lines] == ["k0", "k1", "k2", "k3", "k4"]  # sample order
    assert lines[:2] == first  # not regenerated
    assert lines[3]["text"] == "from rank 1"
    assert set(lines[2]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[2]["prompt"] == QUESTIONS[2] and lines[2]["question_id"] == 2
    assert not list(answers.parent.glob("*.rank*.jsonl"))


def test_prompt_formats(tiny):
    _, processor = tiny
    sample = EvalSample("k", 0, None, "Is it red?")
    assert build_prompt(sample, processor, "v1") == f"{VICUNA_SYSTEM} USER: <image>\nIs it red? ASSISTANT:"
    templated = build_prompt(sample, processor, "chat_template")
    assert "Is it red?" in templated and "<image>" in templated
    with pytest.raises(ValueError, match="prompt_format must be"):
        build_prompt(sample, processor, "plain")


def test_pad_to_square_uses_the_mean_colour():
    image = Image.fromarray(data.coffee()).resize((40, 20))
    padded = expand_to_square(image, (122, 116, 104))
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == (122, 116, 104) and padded.getpixel((20, 20)) == image.getpixel((20, 10))


def write_pope_data(root: Path) -> None:
    """A POPE folder in LLaVA's layout (coco/coco_pope_*.json + val2014/ images)."""
    images = write_images(root / "val2014")
    (root / "coco").mkdir(parents=True)
    for split, labels in (("random", ["yes", "no", "yes"]), ("adversarial", ["no", "yes"])):
        rows = [{"question_id": i + 1, "image": images[i].name, "text": f"Is there a cup in the image? {i}",
                 "label": label} for i, label in enumerate(labels)]  # fmt: skip
        (root / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_command_generates_scores_and_writes_tables(tiny, tmp_path, capsys):
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_pope_data(tmp_path / "pope")
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    argv = ["eval", "--model", str(tmp_path / "model"), "--benchmark", "pope", "--data", str(tmp_path / "pope"),
            "--out", str(tmp_path / "results"), "--batch-size", "2", "--max-new-tokens", "3"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "results"
    assert len((out / "pope_answers.jsonl").read_text().splitlines()) == 5
    entry = json.loads((out / "pope.json").read_text())
    assert entry["metric"] == "f1" and entry["value"] == printed["f1"]
    # The whole benchmark ran: the record says so (no limit) and how many samples, so the card may publish it.
    assert entry["limit"] is None and entry["num_samples"] == 5
    assert set(printed) >= {"random/f1", "adversarial/f1", "accuracy", "precision", "recall", "yes_ratio"}
    # A second benchmark joins the combined table the model card reads, in the paper's column order.
    combined = commands.write_results(out, "gqa", {"accuracy": 12.5, "num_missing": 0.0}, "tiny")
    assert list(combined["pope"]) == ["f1", "accuracy", "precision", "recall", "yes_ratio"]  # no per-split rows
    assert combined["pope"]["f1"] == printed["f1"] and combined["gqa"] == {"accuracy": 12.5}
    assert json.loads((out / "results.json").read_text()) == combined
    assert validate_eval_results(combined, "results.json") == combined  # the shape hub_cards reads
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| model | GQA | POPE |" and table[2] == f"| tiny | 12.5 | {printed['f1']:.1f} |"
    assert printed["comparable_with_paper"] is False  # one of POPE's 3 splits missing
    # `--limit` scores a part of the benchmark: its number is not the paper's, and the report says why.
    args = parser.parse_args([*argv[:-6], "--out", str(tmp_path / "limited"), "--limit", "2", *argv[-4:]])
    assert args.func(args) == 0
    limited = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert limited["comparable_with_paper"] is False
    assert "--limit 2: the first 2 of the 5 samples" in limited["notes"]


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_eval_runner import make_samples, tiny_model_with_varied_outputs
    from movekd_hf.evaluation.runner import run_generation
    model, processor = tiny_model_with_varied_outputs()
    images = [Path(sys.argv[1]) / name for name in ("astronaut.png", "coffee.png", "chelsea.png")]
    run_generation(model, processor, make_samples(images), sys.argv[2], batch_size=2, max_new_tokens=4)
    """
)


@pytest.mark.slow
def test_two_processes_match_one(tiny, tmp_path):
    model, processor = tiny
    images = write_images(tmp_path / "images")
    run_generation(model, processor, make_samples(images), tmp_path / "one.jsonl", batch_size=2, max_new_tokens=4)
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "images"),
           str(tmp_path / "two.jsonl"), str(Path(__file__).parent)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generate[rank 1]" in result.stderr  # the second process really took a share
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [(a["metadata"]["key"], a["text"]) for a in two] == [(a["metadata"]["key"], a["text"]) for a in one]
    assert not list(tmp_path.glob("two.rank*.jsonl"))  # rank 0 merged and removed the parts
