"""The embedded demo end to end (`movekd-hf demo --quick`, once per session) and its parts.

The quick run trains for a handful of steps, so its numbers mean nothing; these tests check the contract: every
artefact exists and parses, the gap check comes first, the probe and QA tables carry per-seed and over-seed
intervals for every arm and question type, the KD loss is accounted per teacher, the verdict is the one the
intervals give, the run folder satisfies the model-card contract, and the checkpoint answers through the pipeline
where `movekd_hf` is not importable. Determinism is checked on the pieces that decide the data and the teachers.
The statistics and probes themselves are checked on constructed cases in test_demo_probes.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from movekd_hf.demo import world
from movekd_hf.demo.arms import ARMS, BASELINE_ARM
from movekd_hf.demo.evaluate import COLUMNS, OPEN_TYPES
from movekd_hf.demo.pipeline import FINAL_ARM, QUICK_SIZE

QUICK_ARMS = [arm for arm in ARMS if arm.name in QUICK_SIZE.arms]

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
    for arm in QUICK_ARMS:
        for seed in QUICK_SIZE.seeds:
            for stage in ("stage1", "stage2"):
                history = json.loads(
                    (run / "arms" / arm.name / f"seed{seed}" / stage / "log_history.json").read_text()
                )
                assert any("lm_loss" in entry for entry in history), (arm.name, seed, stage)
    assert len(list((run / "teacher_cache").iterdir())) == 3  # one cache per teacher, written once


def test_output_has_the_gap_check_then_probe_and_qa_tables_with_intervals(quick_run):
    run, printed = quick_run
    results = json.loads((run / "results.json").read_text())
    positions = [printed.index(text) for text in ("gap check", "stripes probe (%)", "diff vs no KD",
                                                   "Difference from no KD", "Verdict:")]  # fmt: skip
    assert positions == sorted(positions)  # the gap first, the verdict last
    assert set(results["gap"]["accuracy"]) == {"student (initial)", "clip teacher", "convnext teacher", "sam teacher"}
    for arm in QUICK_ARMS:
        assert arm.label in printed
        for attr in ("stripes", "colour"):
            entry = results["probes"][arm.name][attr]
            assert len(entry["accuracy"]) == len(QUICK_SIZE.seeds)
            if arm.name != BASELINE_ARM:
                assert len(entry["paired"]) == len(QUICK_SIZE.seeds) and {"low", "high"} <= set(entry["mean"])
        qa = results["qa"][arm.name]
        assert set(qa["accuracy"]) == set(COLUMNS) | {"overall"}
        if arm.name != BASELINE_ARM:
            assert set(qa["mean"]) == set(COLUMNS) | {"overall"}
    assert "stripes" in OPEN_TYPES


def test_kd_arms_log_their_loss_components_and_where_the_loss_went(quick_run):
    run, printed = quick_run
    results = json.loads((run / "results.json").read_text())
    for arm in QUICK_ARMS:
        history = json.loads((run / "arms" / arm.name / "seed0" / "stage2" / "log_history.json").read_text())
        logged = {key for entry in history for key in entry}
        assert ("kd_loss" in logged) == (arm.kd_preset != "none"), arm.name
        assert ("kd/convnext_weight" in logged) == (arm.kd_preset != "none"), arm.name
    accounts = results["losses"][FINAL_ARM]
    assert set(accounts) == {"clip", "convnext", "sam"}
    for seeds in accounts.values():
        for account in seeds:
            assert account["decrease"] == pytest.approx(account["start"] - account["final"])
            assert account["student_part"] == pytest.approx(
                account["initial_student_final_adapters"] - account["final"]
            )
    assert "initial student, final adapters" in printed


def test_verdict_follows_from_the_intervals(quick_run):
    run, printed = quick_run
    results = json.loads((run / "results.json").read_text())
    for line in results["verdict"]:
        assert line in printed
    moved = [arm for arm, by in results["probes"].items() if arm != BASELINE_ARM and by["stripes"]["mean"]["resolved"]
             and by["stripes"]["mean"]["estimate"] > 0]  # fmt: skip
    last = results["verdict"][-1]
    if not results["gap"]["present"]:
        assert last.startswith("Verdict: the gap check failed")
    elif moved:
        assert "moved the stripes attribute" in last
    else:
        assert last.startswith("Verdict: no arm moved")


def test_run_dir_satisfies_the_card_contract(quick_run):
    from movekd_hf.hub_cards.run_dir import read_run_dir

    run, _ = quick_run
    parsed = read_run_dir(run)
    assert parsed.checkpoint == run / "checkpoint"
    assert set(parsed.eval_results) == {f"world-{kind}" for kind in COLUMNS}
    assert {plot.name for plot in parsed.plots} == set(PLOTS)
    card = (run / "checkpoint" / "README.md").read_text()
    assert "world-stripes" in card and "convnext" in card


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
        if question.kind == "stripes":
            shape = question.text.split()[-2]
            assert [o.stripes for o in scene.objects if o.shape == shape] == [question.answer]
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


@pytest.mark.parametrize("stripes", world.STRIPES)
def test_masks_match_the_striped_drawing(stripes):
    scene = world.Scene((world.WorldObject("square", "red", "large", (1, 1), stripes),), "white", "plain", seed=7)
    image = torch.from_numpy(np.array(world.render_scene(scene))).float()
    mask = torch.from_numpy(world.render_mask(scene))
    drawn = image[..., 1] < 100  # red or dark red (x 0.45); the white background is not
    assert torch.equal(drawn, mask == 1 + world.SHAPES.index("square"))
    assert torch.equal(drawn, torch.from_numpy(world.render_stripe_mask(scene)) == 1 + world.STRIPES.index(stripes))
    rows, columns = drawn.nonzero().unbind(1)
    square = image[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1, 0]  # [h, w] red channel
    along = square if stripes == "horizontal" else square.T  # constant along each stripe, alternating across
    assert (along == along[:, :1]).all() and len(set(along[:, 0].tolist())) == 2


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
    assert [values["kd_preset"] for values in arguments] == ["none"] + ["faithful"] * (len(ARMS) - 1)
