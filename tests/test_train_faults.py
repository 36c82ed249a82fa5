"""Training-run faults, for real: SIGTERM to a running `python -m movekd_hf.train` (a checkpoint at the step's end,
exit 0), half-written checkpoints never resumed, `--resume_from_checkpoint true`, stage 2 continuing stage 1 from
the command line, non-finite losses stopping (or skipping) the run, settings refused by name, pickles refused
without `allow_pickle`, two real data-loader workers, and the one-line errors of `movekd-hf train`.

One SIGTERM-stopped tiny run (a subprocess) is shared: its checkpoint is resumed, corrupted and continued below.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import REPO, TINY_STAGE1, TINY_STAGE2, build, child_env, load_safetensors, trainable_state
from transformers import TrainerCallback

from movekd_hf.cli import main as cli_main
from movekd_hf.errors import NonFiniteError, SettingsError, UnsafeFileError
from movekd_hf.train import run
from movekd_hf.training.arguments import parse_args
from movekd_hf.training.checkpoint import DISTILLER_FILE, STAGING_DIR, load_rng_state, save_rng_state

DATA = ("--data_path", "toy:pretrain:8", "--per_device_train_batch_size", "4", "--warmup_steps", "0")
QUIET = ("--disable_tqdm", "true", "--report_to", "none")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """`python -m movekd_hf.train` sent SIGTERM once it has logged a step: (output_dir, exit code, output, step)."""
    out = tmp_path_factory.mktemp("sigterm") / "run"
    argv = [TINY_STAGE1, "--output_dir", str(out), "--max_steps", "500", "--save_steps", "1000", "--logging_steps",
            "1", *DATA, *QUIET]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "movekd_hf.train", *argv],
        cwd=REPO,
        env=child_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in process.stdout:  # the Trainer prints every step's logs: training is under way
        seen.append(line)
        if " | loss " in line:  # the first training log line (console.py's format)
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=240)
    output = "".join(seen) + rest
    match = re.search(r"saved checkpoint (\S+) at step (\d+)", output)
    return out, process.returncode, output, match


def test_sigterm_saves_a_complete_checkpoint_and_exits_0(stopped):
    out, code, output, match = stopped
    assert code == 0, output[-3000:]
    assert match is not None, output[-3000:]
    step = int(match.group(2))
    assert Path(match.group(1)) == out / f"checkpoint-{step}" and 1 <= step < 500
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    folder = out / f"checkpoint-{step}"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert load_safetensors(folder / "model.safetensors") and load_safetensors(folder / DISTILLER_FILE)
    # RNG state as safetensors, the arguments as JSON too: nothing but optimizer/scheduler state is a pickle.
    assert (folder / "rng_state.safetensors").is_file() and not list(folder.glob("rng_state*.pth"))
    assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 500
    assert not (out / STAGING_DIR).exists()  # staged, then renamed into place
    assert not (out / "model.safetensors").exists()  # stopped, not finished: no final save


def _copy_run(stopped, destination: Path) -> tuple[Path, int]:
    out, code, output, match = stopped
    assert code == 0 and match is not None, output[-3000:]
    shutil.copytree(out, destination)
    return destination, int(match.group(2))


def test_resume_true_takes_the_newest_complete_checkpoint(stopped, tmp_path, caplog):
    run_dir, step = _copy_run(stopped, tmp_path / "run")
    good = run_dir / f"checkpoint-{step}"
    # Two newer, half-written folders, as a crash while copying or saving leaves them.
    for offset, missing in ((10, "model.safetensors"), (20, "trainer_state.json")):
        broken = run_dir / f"checkpoint-{step + offset}"
        shutil.copytree(good, broken)
        (broken / missing).unlink()
    counter = CountSteps()
    trainer = build(
        TINY_STAGE1, run_dir, *DATA, "--max_steps", str(step + 1), "--save_strategy", "no",
        "--resume_from_checkpoint", "true", callbacks=[counter],
    )  # fmt: skip
    assert trainer.args.resume_from_checkpoint is True  # "true" read as "the newest", not as a Hub id
    with caplog.at_level(logging.INFO, logger="movekd_hf"):
        assert run(trainer) == 0
    assert counter.steps == [step + 1]  # one step: the earlier ones came from the checkpoint
    messages = [record.getMessage() for record in caplog.records]
    assert f"resuming from {good}" in messages
    assert f"skipping incomplete checkpoint {run_dir / f'checkpoint-{step + 10}'} (no model.safetensors)" in messages
    assert f"skipping incomplete checkpoint {run_dir / f'checkpoint-{step + 20}'} (no trainer_state.json)" in messages

    # The same folder again without resuming: one line says what is there.
    caplog.clear()
    fresh = build(TINY_STAGE1, run_dir, *DATA, "--max_steps", "1", "--save_strategy", "no")
    with caplog.at_level(logging.WARNING, logger="movekd_hf"):
        fresh.train()
    found = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert len(found) == 1 and f"newest complete: checkpoint-{step}" in found[0], found
    assert "--resume_from_checkpoint true" in found[0]


def test_pickled_rng_state_needs_allow_pickle(stopped, tmp_path):
    run_dir, step = _copy_run(stopped, tmp_path / "run")
    folder = run_dir / f"checkpoint-{step}"
    (folder / "rng_state.safetensors").unlink()
    torch.save({"python": None}, folder / "rng_state.pth")  # what the plain Trainer writes (any pickle will do)
    trainer = build(TINY_STAGE1, run_dir, *DATA, "--max_steps", str(step + 1), "--save_strategy", "no")
    with pytest.raises(UnsafeFileError, match=re.escape(str(folder / "rng_state.pth"))):
        trainer.train(resume_from_checkpoint=True)


def test_rng_state_round_trips_through_safetensors(tmp_path):
    import random

    import numpy as np

    path = str(tmp_path / "rng_state.safetensors")
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1)  # a cached Gaussian in Python's state
    save_rng_state(path, all_cuda_devices=False)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_rng_state(path, all_cuda_devices=False)
    assert (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_stage2_continues_stage1_from_the_command_line(stopped, tmp_path, caplog):
    """`movekd-hf train stage2.yaml --model_name_or_path <stage 1 output>`: the YAML's `preset: tiny` gives way,
    and the teacher adapters continue from stage 1's `distill_adapters.safetensors`."""
    out, _, _, match = stopped
    stage1 = Path(match.group(1))
    with caplog.at_level(logging.INFO, logger="movekd_hf"):
        trainer = build(
            TINY_STAGE2, tmp_path / "stage2", "--model_name_or_path", str(stage1), "--data_path", "toy:finetune:4",
            "--max_steps", "1", "--save_strategy", "no", "--warmup_steps", "0",
        )  # fmt: skip
    assert trainer.args.adapters_from == str(stage1)
    assert any("teacher adapters start from" in r.getMessage() for r in caplog.records)
    adapters = load_safetensors(stage1 / DISTILLER_FILE)
    for name, tensor in trainer.model.distiller.state_dict().items():
        assert torch.equal(tensor, adapters[name]), name

    def projector(state):
        return {k.split("multi_modal_projector.")[1]: v for k, v in state.items() if "multi_modal_projector." in k}

    saved, live = projector(load_safetensors(stage1 / "model.safetensors")), projector(trainer.model.vlm.state_dict())
    assert saved and saved.keys() == live.keys() and all(torch.equal(live[k], v) for k, v in saved.items())
    trainer.train()
    assert trainer.state.global_step == 1


def test_model_source_on_the_command_line_replaces_the_yaml_one(tmp_path):
    model_args, _, _ = parse_args([TINY_STAGE2, "--model_name_or_path", "runs/stage1"])
    assert (model_args.model_name_or_path, model_args.preset) == ("runs/stage1", None)
    config = tmp_path / "from_checkpoint.yaml"
    config.write_text("model_name_or_path: runs/stage1\ndata_path: toy:finetune\noutput_dir: x\n")
    model_args, _, args = parse_args([str(config), "--preset", "tiny", "--resume_from_checkpoint", "true"])
    assert (model_args.model_name_or_path, model_args.preset) == (None, "tiny")
    assert args.resume_from_checkpoint is True
    config.write_text("preset: tiny\ndata_path: toy:finetune\noutput_dir: x\nresume_from_checkpoint: true\n")
    assert parse_args([str(config)])[2].resume_from_checkpoint is True


# ------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_stops_the_cli_with_exit_1_and_no_bad_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(
        ["train", TINY_STAGE1, "--output_dir", str(out), *DATA, "--learning_rate", "1e30", "--max_steps", "4",
         "--save_steps", "1", "--logging_steps", "1", *QUIET]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    # Step 1 (finite gradients) throws the weights to ~1e30; step 2's forward overflows.
    assert re.fullmatch(
        r"movekd-hf train: error: non-finite (lm_loss|kd/\w+_loss|balance_loss) \(nan\) at step 2: .*", last
    )
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()


class SnapshotAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.weights = trainable_state(model)


def test_skip_step_keeps_the_weights_and_a_nonfinite_model_is_never_saved(tmp_path, caplog):
    snapshot = SnapshotAfterFirstStep()
    trainer = build(
        TINY_STAGE1, tmp_path / "run", *DATA, "--learning_rate", "1e30", "--max_steps", "3", "--save_strategy", "no",
        "--nonfinite_policy", "skip_step", "--logging_steps", "1", callbacks=[snapshot],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="movekd_hf"):
        trainer.train()
    assert trainer.state.global_step == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped: non-finite" in r.getMessage()]
    assert [m.split()[1] for m in skipped] == ["2", "3"], skipped
    after = trainable_state(trainer.model)
    for name, value in snapshot.weights.items():
        assert torch.equal(after[name], value), f"{name} moved on a skipped step"
        assert torch.isfinite(value).all()
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    assert int(trainer.optimizer.state[param]["step"]) == 1  # the optimizer never saw steps 2 and 3
    assert trainer.state.log_history[-2]["nonfinite_skipped_steps"] == 2

    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="weight vlm.*inf"):
        trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(NonFiniteError, match="at step 3"):
        trainer._save_checkpoint(trainer.model, trial=None)
    assert (
        not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "final" / "model.safetensors").exists()
    )


# --------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("flags", "field", "expected"),
    [
        (("--lambda_kd", "nan"), "lambda_kd", "a finite number >= 0"),
        (("--lambda_kd", "inf"), "lambda_kd", "a finite number >= 0"),
        (("--lambda_bal", "nan"), "lambda_bal", "a finite number >= 0"),
        (("--lambda_bal", "-1"), "lambda_bal", "a finite number >= 0"),
        (("--lora_llm_rank", "0"), "lora_llm_rank", "an integer >= 1"),
        (("--lora_llm_alpha", "-16"), "lora_llm_alpha", "a finite number > 0"),
        (("--lora_llm_dropout", "1.0"), "lora_llm_dropout", "a number in [0, 1)"),
        (("--lora_llm_dropout", "-0.1"), "lora_llm_dropout", "a number in [0, 1)"),
        (("--nonfinite_policy", "ignore"), "nonfinite_policy", "one of ('stop', 'skip_step')"),
    ],
)
def test_bad_settings_are_refused_by_name(flags, field, expected):
    with pytest.raises(SettingsError) as caught:
        parse_args([TINY_STAGE2, *flags])
    assert caught.value.field == field and caught.value.expected == expected
    assert "`r`" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lamda_kd: 0.5\n", "unknown option(s) lamda_kd (did you mean lambda_kd?)"),
        ("lambda_kd: heavy\n", "field 'lambda_kd': got 'heavy'; expected float"),
        ("lambda_kd: .nan\n", "field 'lambda_kd': got nan; expected a finite number >= 0"),
        ("stage: stage3\n", "field 'stage': got 'stage3'; expected one of ('stage1', 'stage2')"),
        ("lr_scheduler_type: [cosine\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_names_the_file(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\ndata_path: toy:pretrain\noutput_dir: x\n" + text)
    with pytest.raises(SettingsError) as caught:
        parse_args([str(config)])
    assert str(caught.value).startswith(str(config)) and message in str(caught.value)


# ------------------------------------------------------------------------------------------ data loading


def test_two_workers_see_every_sample_once_per_epoch(tmp_path):
    trainer = build(
        TINY_STAGE1, tmp_path / "run", "--data_path", "toy:pretrain:12", "--per_device_train_batch_size", "4",
        "--max_steps", "-1", "--num_train_epochs", "2", "--dataloader_num_workers", "2", "--save_strategy", "no",
        "--warmup_steps", "0", "--logging_steps", "1",
    )  # fmt: skip
    seen: list[str] = []
    fetch = trainer.get_batch_samples

    def recording(epoch_iterator, num_batches, device):  # the main process's view of what the workers sent
        batches, count = fetch(epoch_iterator, num_batches, device)
        seen.extend(sample for batch in batches for sample in batch["sample_ids"])
        return batches, count

    trainer.get_batch_samples = recording
    assert trainer.get_train_dataloader().num_workers == 2
    trainer.train()
    expected = sorted(str(sample) for sample in trainer.train_dataset["id"])
    assert len(expected) == 12 and trainer.state.global_step == 6
    assert sorted(seen[:12]) == expected and sorted(seen[12:]) == expected
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.yaml"], "missing.yaml: no such file"),
        (["{bad}", "--output_dir", "{out}"], "unknown option(s) lamda_kd"),
        ([TINY_STAGE1, "--output_dir", "{out}", "--lambda_kd", "nan"], "field 'lambda_kd': got nan"),
        ([TINY_STAGE1, "--output_dir", "{out}", "--max_steps", "many"], "--max_steps"),
        ([TINY_STAGE1, "--output_dir", "{out}", "--data_path", "{out}/none.json"], "none.json"),
        (
            ["--model_name_or_path", "runs/nope", "--output_dir", "{out}", "--data_path", "toy:pretrain"],
            "field 'model_name_or_path': 'runs/nope' is no local folder, and as a Hub id it is not in the local cache",
        ),
        (
            [TINY_STAGE1, "--output_dir", "{out}", "--teacher_checkpoints", "sam={out}"],
            "field 'teacher_checkpoints': names ['sam'], built here with random weights",
        ),
    ],
    ids=["missing-yaml", "unknown-key", "nan-value", "bad-value", "missing-data", "missing-model", "tiny-checkpoint"],
)
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ndata_path: toy:pretrain\nlamda_kd: 0.5\n")
    argv = [arg.format(bad=bad, out=tmp_path / "out") for arg in argv]
    assert cli_main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("movekd-hf train: error: ") and message in last, err[-2000:]


def test_cli_train_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as caught:
        cli_main(["train", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: movekd-hf train")
    for option in ("--lambda_kd", "--nonfinite_policy", "--allow_pickle", "--resume_from_checkpoint", "--preset"):
        assert option in out
