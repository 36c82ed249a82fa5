"""The launch entry for real: the entry's trainer killed with SIGKILL and resumed (against an uninterrupted
`python -m movekd_hf.train`), two CPU ranks under `accelerate launch` with DDP (gloo) and with DeepSpeed ZeRO-2/3,
and every shipped config parsed. The kill and the per-rank reports are callbacks the tests pass in
(_train_fixtures.py run as the child's script)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from _train_fixtures import (
    ACCELERATE,
    REPO,
    TINY_STAGE1,
    TORCH_EXTENSIONS_DIR,
    accelerate_launch,
    build,
    child_env,
    free_port,
    load_safetensors,
    run_module,
    run_with_callbacks,
)

from movekd_hf import configs
from movekd_hf.errors import SettingsError
from movekd_hf.training.arguments import parse_args
from movekd_hf.training.checkpoint import DISTILLER_FILE

RUN = ("--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0")


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_safetensors(folder / "model.safetensors"), **load_safetensors(folder / DISTILLER_FILE)}


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    killed = tmp_path / "killed"
    # The child SIGKILLs itself at the end of step 3: checkpoint-2 is on disk, step 3's work is lost.
    result = run_with_callbacks(["--sigkill-after", "3"], [TINY_STAGE1, "--output_dir", str(killed), *RUN])
    assert result.returncode == -9, result.stderr[-3000:]
    assert (killed / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (killed / "checkpoint-4").exists() and not (killed / "model.safetensors").exists()

    resumed = build(TINY_STAGE1, killed, *RUN, "--resume_from_checkpoint", str(killed / "checkpoint-2"))
    resumed.train(resume_from_checkpoint=str(killed / "checkpoint-2"))
    resumed.save_model()
    # The uninterrupted run through the real module entry, which also writes the model card at every save.
    reference = tmp_path / "reference"
    result = run_module([TINY_STAGE1, "--output_dir", str(reference), *RUN])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2501.01709" in (reference / "checkpoint-2" / "README.md").read_text()
    assert "2501.01709" in (reference / "README.md").read_text()
    history = json.loads((reference / "checkpoint-4" / "trainer_state.json").read_text())
    assert resumed.state.global_step == history["global_step"] == 4
    expected, actual = _final_weights(reference), _final_weights(killed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    losses = [[e["loss"] for e in h if "loss" in e] for h in (resumed.state.log_history, history["log_history"])]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The tiny stage 1 config on 2 CPU ranks with DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3."""
    root = tmp_path_factory.mktemp("launch")
    train = [TINY_STAGE1, "--max_steps", "4", "--logging_steps", "1", "--save_steps", "4"]
    env = child_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS_DIR))
    reports = {}
    for name, launch in (
        ("ddp", ["--multi_gpu", "--num_processes", "2"]),
        (
            "zero2",
            ["--use_deepspeed", "--deepspeed_config_file", "configs/deepspeed/zero2.json", "--num_processes", "2"],
        ),
        ("zero3", ["--config_file", "configs/accelerate/deepspeed_zero3.yaml", "--num_processes", "2"]),
    ):
        out, report = root / name, root / f"{name}-report"
        accelerate_launch(launch, [*train, "--output_dir", str(out)], env, report)
        reports[name] = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
        reports[name + "_dir"] = out
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_cpu_ranks_really_run_distributed(two_rank_runs, name):
    ranks = two_rank_runs[name]
    assert [report["rank"] for report in ranks] == [0, 1]
    for report in ranks:
        assert report["world_size"] == 2
        expected_type = "DistributedType.MULTI_CPU" if name == "ddp" else "DistributedType.DEEPSPEED"
        assert report["distributed_type"] == expected_type
        assert report["zero_stage"] == {"ddp": None, "zero2": 2, "zero3": 3}[name]
        assert report["global_step"] == 4 and len(report["losses"]) == 4  # NaN stops a rank
        assert {"kd/sam_loss", "balance_loss", "lm_loss"} <= set(report["components"])
    # The Trainer's logged loss is the mean over ranks: both ranks log the same value.
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"], rel=1e-6)
    folder = two_rank_runs[name + "_dir"]
    assert (folder / "model.safetensors").is_file() and (folder / "modeling_movekd.py").is_file()


@pytest.mark.slow
def test_arguments_built_in_a_script_join_the_cpu_process_group(tmp_path):
    # A script of one's own (no `movekd-hf train` entry) under `accelerate launch --multi_gpu` on a machine
    # without GPUs: its MoVEKDTrainingArguments must ask accelerate for the CPU, or each rank trains alone.
    script = tmp_path / "script.py"
    script.write_text(
        "import json, pathlib, sys\n"
        "from movekd_hf.training.arguments import MoVEKDTrainingArguments\n"
        "args = MoVEKDTrainingArguments(output_dir=sys.argv[1], report_to='none')\n"
        "state = args.distributed_state\n"
        "report = [args.process_index, args.world_size, str(state.distributed_type), args.use_cpu]\n"
        "pathlib.Path(sys.argv[2], f'rank{state.process_index}.json').write_text(json.dumps(report))\n"
    )  # each rank its own file: two ranks' prints can share one line of a pipe
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), str(tmp_path / "out"), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(json.loads(path.read_text()) for path in tmp_path.glob("rank*.json"))
    assert ranks == [[0, 2, "DistributedType.MULTI_CPU", True], [1, 2, "DistributedType.MULTI_CPU", True]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_ddp_and_deepspeed_reach_the_same_loss(two_rank_runs, name):
    ddp, zero = two_rank_runs["ddp"][0]["losses"], two_rank_runs[name][0]["losses"]
    assert ddp[0] == pytest.approx(zero[0], rel=1e-6)  # same data, same initial weights
    assert ddp == pytest.approx(zero, rel=1e-4)  # and the same updates


CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_train_config_parses(path):
    # bf16 runs are validated as GPU runs would be; on this CPU machine `use_cpu` lets bf16 through.
    model_args, data_args, args = parse_args([str(path), "--use_cpu", "true"])
    if path.stem.startswith("tiny"):
        assert model_args.preset == "tiny" and data_args.data_path.startswith("toy:")
        return
    stage1 = args.stage == "stage1"
    assert model_args.teacher_set in path.stem and args.kd_preset == "faithful"
    assert args.learning_rate == (1e-3 if stage1 else 2e-5)
    # the paper's samples per GPU and step; OneVision's longer sequences take them in accumulation steps
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == (16 if stage1 else 8)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.bf16) == ("cosine", 0.03, True)
    onevision = "onevision" in path.stem  # its own chat template, up to 10 AnyRes tiles of 729 tokens per image
    assert data_args.template == ("plain" if stage1 else "chat_template" if onevision else "v1")
    assert data_args.max_length == (8192 if onevision else 2048)
    assert args.activation_checkpointing and (REPO / args.deepspeed).is_file()
    assert (args.lambda_kd, args.lambda_bal) == (0.5, 0.01)


def test_accelerate_and_deepspeed_configs_are_consistent():
    for stage in (2, 3):
        launch = yaml.safe_load((REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
        inline = launch["deepspeed_config"][
            "deepspeed_config_file"
        ]  # a path, or the JSON itself (accelerate reads both)
        settings = json.loads(inline if inline.lstrip().startswith("{") else (REPO / inline).read_text())
        assert settings == json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert settings["zero_optimization"]["stage"] == stage
    assert yaml.safe_load((REPO / "configs" / "accelerate" / "multi_gpu.yaml").read_text())["distributed_type"] == (
        "MULTI_GPU"
    )
    assert yaml.safe_load((REPO / "configs" / "accelerate" / "single_process.yaml").read_text())["num_processes"] == 1


def test_yaml_values_are_overridden_by_the_command_line_and_unknown_keys_fail(tmp_path):
    _, _, args = parse_args([TINY_STAGE1, "--max_steps", "3", "--output_dir", str(tmp_path)])
    assert args.max_steps == 3 and args.learning_rate == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ndata_path: toy:pretrain\noutput_dir: x\nlamda_kd: 0.5\n")
    with pytest.raises(ValueError, match="lamda_kd"):
        parse_args([str(bad)])


def test_paper_configs_find_their_deepspeed_file_from_any_folder(tmp_path, monkeypatch):
    """`deepspeed: configs/deepspeed/zero2.json` (relative to a source checkout) resolves to the packaged file when
    the run starts elsewhere; a path found in neither place names the YAML and the option."""
    paper = REPO / "configs" / "train" / "movekd-v1.1-7b-stage1.yaml"
    monkeypatch.chdir(tmp_path)
    _, _, args = parse_args([str(paper), "--use_cpu", "true"])
    assert args.deepspeed == str(configs.path("deepspeed/zero2.json"))
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2  # the file was read
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ndata_path: toy:pretrain\noutput_dir: x\ndeepspeed: configs/deepspeed/zero9.json\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml.*deepspeed.*zero9\.json"):
        parse_args([str(bad)])
