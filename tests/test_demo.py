"""The embedded demo end to end (`movekd-hf demo --quick`, once per session) and its parts.

The quick run trains for a handful of steps, so its numbers mean nothing; these tests check the contract: every
artefact exists and parses, the table has all four arms and all question types, the verdict is the one computed
from the table, the run folder satisfies the model-card contract, and the checkpoint answers through the pipeline
where `movekd_hf` is not importable. Determinism is checked on the pieces that decide the data and the teachers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from movekd_hf.demo import report, world
from movekd_hf.demo.arms import ARMS
from movekd_hf.demo.evaluate import COLUMNS, OPEN_TYPES

PLOTS = ("loss_components.png", "teacher_weights.png", "expert_utilisation.png", "cls_attention_astronaut.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    """One `movekd-hf demo --quick` through the CLI entry point; (run folder, what it printed)."""
    from movekd_hf.cli import main

    folder = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(folder), "--quick"])
    if code != 0:
        raise RuntimeError(f"demo exited with {code}:\n{printed.getvalue()}")
    return folder, printed.getvalue()


def test_run_folder_has_every_artefact(quick_run):
    run, _ = quick_run
    checkpoint = run / "checkpoint"
    for name in ("config.json", "model.safetensors", "modeling_movekd.py", "tokenizer.json", "README.md"):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "distill_adapters.safetensors").exists()  # training state stays out of the release
    for name in ("results.md", "results.json", "eval/results.json", "train_config.json", "training_args.json",
                 "final_check.json"):  # fmt: skip
        assert (run / name).is_file(), name
    for name in PLOTS:
        assert (run / "plots" / name).stat().st_size > 1000, name
    for arm in ARMS:
        for stage in ("stage1", "stage2"):
            history = json.loads((run / "arms" / arm.name / stage / "log_history.json").read_text())
            assert any("lm_loss" in entry for entry in history), (arm.name, stage)


def test_table_has_all_arms_and_question_types(quick_run):
    run, printed = quick_run
    results = json.loads((run / "results.json").read_text())
    assert list(results["arms"]) == [arm.name for arm in ARMS]
    assert results["columns"] == list(COLUMNS)
    table = (run / "results.md").read_text()
    for arm in ARMS:
        assert arm.label in table and arm.label in printed
        row = results["arms"][arm.name]["row"]
        assert set(row) == set(COLUMNS) and all(0.0 <= value <= 100.0 for value in row.values())
        assert row["overall"] == pytest.approx(sum(row[c] for c in COLUMNS if c != "overall") / 5)
    for header in report.HEADERS.values():
        assert header in table.splitlines()[2]


def test_kd_arms_log_their_loss_components(quick_run):
    run, _ = quick_run
    for arm in ARMS:
        history = json.loads((run / "arms" / arm.name / "stage2" / "log_history.json").read_text())
        logged = {key for entry in history for key in entry}
        assert ("kd_loss" in logged) == (arm.kd_preset != "none"), arm.name
        weighted = arm.kd_preset in ("faithful", "improved")  # CLS-similarity teacher weights
        assert ("kd/convnext_weight" in logged) == weighted, arm.name


def test_verdict_is_computed_from_the_table(quick_run):
    run, printed = quick_run
    results = json.loads((run / "results.json").read_text())
    rows = {name: arm["row"] for name, arm in results["arms"].items()}
    labels = {name: arm["label"] for name, arm in results["arms"].items()}
    from movekd_hf.demo.pipeline import TRIED

    assert results["verdict"] == report.verdict(rows, labels, TRIED)
    for line in results["verdict"]:
        assert line in printed


def test_run_dir_satisfies_the_card_contract(quick_run):
    from movekd_hf.hub_cards.run_dir import read_run_dir

    run, _ = quick_run
    parsed = read_run_dir(run)
    assert parsed.checkpoint == run / "checkpoint"
    assert set(parsed.eval_results) == {f"world-{kind}" for kind in OPEN_TYPES} | {"world-pope"}
    assert {plot.name for plot in parsed.plots} == set(PLOTS)
    card = (run / "checkpoint" / "README.md").read_text()
    assert "world-colour" in card and "convnext" in card


def test_final_check_reloads_without_the_package(quick_run):
    run, printed = quick_run
    check = json.loads((run / "final_check.json").read_text())
    assert check["module"].startswith("transformers_modules.")  # remote code, not movekd_hf
    assert check["model_class"] == "MoVEKDForConditionalGeneration"
    assert isinstance(check["answer"], str) and check["expected"] in world.COLOURS
    assert "Final check:" in printed


# ----------------------------------------------------------------------------------------------- the pieces


def test_world_is_deterministic_and_answerable(tmp_path):
    first = world.build_world(str(tmp_path / "a"), num_train=12, num_test=9, seed=3)
    second = world.build_world(str(tmp_path / "b"), num_train=12, num_test=9, seed=3)
    assert Path(first.finetune_json).read_text() == Path(second.finetune_json).read_text()
    assert first.test.questions == second.test.questions
    for name in ("train-00000.png", "test-00008.png"):
        assert (Path(first.image_folder) / name).read_bytes() == (Path(second.image_folder) / name).read_bytes()
    for question in first.test.questions:
        scene = first.test.scenes[question.scene]
        present = {(o.colour, o.shape) for o in scene.objects}
        if question.kind == "count":
            assert question.answer == str(len(scene.objects))
        if question.kind == "colour":  # the shape asked about is unique in its scene
            shape = question.text.split()[-1].rstrip("?")
            assert [o.colour for o in scene.objects if o.shape == shape] == [question.answer]
        if question.kind == "existence":
            colour, shape = question.text.split()[3:5]
            assert ((colour, shape) in present) == (question.answer == "yes")


def test_training_conversations_describe_the_scene_then_ask_short_questions(tmp_path):
    from movekd_hf.demo.assemble import llm_texts

    data = world.build_world(str(tmp_path), num_train=10, num_test=2, seed=4)
    records = json.loads(Path(data.finetune_json).read_text())
    for record, scene in zip(records, data.train.scenes):
        turns = record["conversations"]
        questions = [turn["value"].removeprefix("<image>\n") for turn in turns[0::2]]
        assert turns[0]["value"].startswith("<image>\n") and 2 <= len(questions) <= 3
        described = [answer["value"] for question, answer in zip(questions, turns[1::2]) if question == world.DESCRIBE]
        assert described == [world.caption(scene)]  # one description turn, the scene's caption
        assert all(q.endswith(world.SHORT_ANSWER) for q in questions if q != world.DESCRIBE)
    texts = llm_texts(data.finetune_json, data.pretrain_json)
    assert len(texts) == 3 * len(records)  # each conversation with and without the caption in context, + captions
    assert sum(world.caption(data.train.scenes[0]) in text for text in texts) == 3


def test_segmentation_mask_matches_the_drawing():
    scene = world.Scene((world.WorldObject("square", "red", "large", (1, 1)),), "white", "plain", seed=7)
    image = torch.from_numpy(np.array(world.render_scene(scene))).float()
    mask = torch.from_numpy(world.render_mask(scene))
    red = (image[..., 0] > 150) & (image[..., 1] < 100)
    assert torch.equal(red, mask == 1 + world.SHAPES.index("square"))


def test_word_tokenizer_covers_the_world(tmp_path):
    from movekd_hf.demo.vocab import build_word_tokenizer

    tokenizer = build_word_tokenizer()
    data = world.build_world(str(tmp_path), num_train=20, num_test=5, seed=1)
    texts = [turn["value"] for path in (data.pretrain_json, data.finetune_json)
             for record in json.loads(Path(path).read_text()) for turn in record["conversations"]]  # fmt: skip
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert tokenizer.decode(tokenizer("purple", add_special_tokens=False)["input_ids"]) == "purple"


def test_teacher_pretraining_is_deterministic():
    from movekd_hf.demo.teachers import pretrain_teacher

    rng = world.random.Random(0)
    scenes = [world.sample_scene(rng) for _ in range(8)]
    data = (world.scene_tensor(scenes), scenes)
    runs = [pretrain_teacher("convnext", data, data, steps=2, batch_size=4, seed=5) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    for (name, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), name


def test_arms_differ_only_in_the_kd_setting():
    from movekd_hf.demo.arms import StageSettings, stage_arguments

    settings = StageSettings("stage2", "d.json", "images", "v1", max_steps=5, batch_size=4, learning_rate=1e-3)
    arguments = [stage_arguments(settings, arm.kd_preset, "o").to_dict() for arm in ARMS]
    for values in arguments:
        assert {k: v for k, v in values.items() if k != "kd_preset"} == {
            k: v for k, v in arguments[0].items() if k != "kd_preset"
        }
    assert [values["kd_preset"] for values in arguments] == ["none", "mse_baseline", "faithful", "improved"]


def test_verdict_is_honest_either_way():
    labels = {"llava": "LLaVA", "mse": "MSE", "movekd_improved": "MoVE-KD"}
    row = dict.fromkeys(COLUMNS, 50.0)
    better = {**row, "colour": 60.0, "overall": 52.0}
    worse = {**row, "count": 40.0, "overall": 48.0}
    winning = report.verdict({"llava": row, "mse": row, "movekd_improved": better}, labels, "x")
    assert winning[-1].startswith("Verdict: MoVE-KD has the best mean")
    assert "better on 1/5 question types (colour), mean +2.0 points" in winning[1]
    losing = report.verdict({"llava": row, "mse": row, "movekd_improved": worse}, labels, "tried this")
    assert "does NOT beat the baselines" in losing[-1] and "tried this" in losing[-1]
    with pytest.raises(ValueError, match="llava"):
        report.verdict({"mse": row}, labels, "x")


def test_a_second_run_gives_the_same_table(quick_run, tmp_path):
    """Fixed seeds: the whole quick demo, run again in another folder, reproduces the results and answers."""
    from movekd_hf.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--out", str(tmp_path / "again"), "--quick"]) == 0
    first, _ = quick_run
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == json.loads(
        (first / "results.json").read_text()
    )
