"""The benchmark scripts run (`--quick`: tiny sizes, two rounds) and print their table; nothing here is timed."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the scripts pin torch to one thread
    yield
    torch.set_num_threads(threads)


def run_script(name: str, tmp_path: Path, capsys, *extra: str) -> tuple[str, dict]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module(name)
        out = tmp_path / f"{name}.json"
        assert module.main(["--quick", "--out", str(out), *extra]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    return capsys.readouterr().out, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("name", "header", "baseline"),
    [
        ("bench_mole_overhead", "MoLE overhead, forward+backward", "plain CLIP"),
        ("bench_teacher_inputs", "Teacher input preparation", "HF image processors"),
        ("bench_cached_step", "Training step, cached vs online teachers", "plain LLaVA step"),
    ],
)
def test_timing_benchmarks_print_their_table(name, header, baseline, tmp_path, capsys):
    printed, result = run_script(name, tmp_path, capsys)
    assert printed.startswith(header) and "| variant" in printed and " ratio " in printed
    assert result["quick"] is True and result["summary"][baseline]["ratio"] == 1.0


def test_mole_benchmark_dispatches_agree(tmp_path, capsys):
    _, result = run_script("bench_mole_overhead", tmp_path, capsys, "--lora-dropout", "0")
    assert result["max_abs_difference_vs_ours"] < 1e-5  # the loop and batched re-implementations match MoLEMLP


def test_mole_benchmark_ablation_adds_ours_without_each_piece(tmp_path, capsys):
    printed, result = run_script("bench_mole_overhead", tmp_path, capsys, "--ablation")
    rows = {"ours, routing only", "ours, rank 1, no dropout", "ours, no dropout"}
    assert rows <= set(result["summary"]) and all(f"| {row}" in printed for row in rows)
    assert result["settings"]["ablation"] is True


def test_mole_benchmark_core_runs_plain_ours_and_the_previous_round_only(tmp_path, capsys):
    printed, result = run_script("bench_mole_overhead", tmp_path, capsys, "--core")
    assert set(result["summary"]) == {"plain CLIP", "MoLE sparse (ours)", "MoLE sparse, bias pass"}
    assert set(result["ours_over"]) == {"bias pass"} and "ours / bias pass dispatch" in printed
    assert result["max_abs_difference_vs_ours"] < 1e-5  # the previous round's linear computes ours' values


def test_forward_wrapper_benchmark_compares_with_llava_on_one_model(tmp_path, capsys):
    printed, result = run_script("bench_forward_wrapper", tmp_path, capsys)
    assert "MoVE-KD adds" in printed and set(result["results"]) == {"forward (no_grad)", "forward+backward"}
    assert result["same_last_hidden_state"] is True


def test_distill_overhead_benchmark_prints_shares_and_cls_rows(tmp_path, capsys):
    printed, result = run_script("bench_distill_overhead", tmp_path, capsys)
    assert "machinery share of the KD step" in printed and "CLS attention row" in printed
    assert result["cls_attention"]["max_abs_difference"] < 1e-5  # our row is the eager attention map's row


def test_memory_benchmark_runs_a_configuration_in_a_subprocess(tmp_path, capsys):
    printed, result = run_script("bench_memory", tmp_path, capsys, "--only", "no checkpointing")
    assert "| configuration" in printed and result["results"]["no checkpointing"]["step_peak_delta"] > 0


def test_gpu_benchmark_runs_every_section_at_tiny_widths_on_cpu(tmp_path, capsys):
    """`bench_gpu.py --device cpu --tiny`: the GPU benchmark's code paths (MoLE vs plain CLIP, the v1.1 teachers,
    stage-1 and stage-2 steps with online teachers, cached features and plain LLaVA) at tiny widths, in bf16."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module("bench_gpu")
        out = tmp_path / "gpu.json"
        assert module.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    printed, result = capsys.readouterr().out, json.loads(out.read_text())
    assert printed.startswith("MoVE-KD at tiny widths on cpu") and "| section" in printed
    assert result["quick"] is True and result["settings"]["dtype"] == "bfloat16"
    sections = result["results"]
    assert set(sections) == {"encoder", "teachers", "stage1", "stage2"}
    assert list(sections["encoder"]["summary"]) == [
        "plain CLIP (sdpa)", "MoLE student (sdpa)", "MoLE student, LoRA inputs sorted (sdpa)"
    ]  # fmt: skip
    assert set(sections["teachers"]["summary"]) == {
        "clip teacher (28 px)", "eva teacher (64 px)", "convnext teacher (64 px)", "sam teacher (64 px)"
    }  # fmt: skip
    for stage in ("stage1", "stage2"):
        assert list(sections[stage]["summary"]) == [
            f"plain LLaVA {stage}", f"MoVE-KD {stage}, cached features", f"MoVE-KD {stage}, online teachers"
        ]  # fmt: skip
    for section in sections.values():
        rows = list(section["summary"].values())
        assert rows[0]["ratio"] == 1.0 and all(row["median_s"] > 0 and row["state_gb"] > 0 for row in rows)
        assert all(row["peak_gb"] is None for row in rows)  # CUDA allocator figures only on a GPU
    online = sections["stage2"]["summary"]["MoVE-KD stage2, online teachers"]
    assert online["state_gb"] > sections["stage2"]["summary"]["MoVE-KD stage2, cached features"]["state_gb"]


def test_gpu_benchmark_without_a_gpu_prints_one_line_and_exits_0(capsys, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module("bench_gpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
        assert module.main([]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1
    assert captured.out.startswith("bench_gpu: skipped: no CUDA GPU")


def test_gpu_profile_prints_the_tables_for_the_encoder_and_a_stage1_step(capsys):
    """`profile_gpu.py --stage1` at tiny widths on the CPU: the profiled steps are bench_gpu's own."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module("profile_gpu")
        assert module.main(["--stage1", "--rows", "5"]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    printed = capsys.readouterr().out
    for name in ("encoder, plain CLIP (sdpa)", "encoder, MoLE student (sdpa)", "stage 1 step, cached features"):
        assert f"===== {name}: by CPU self time" in printed
    assert "aten::addmm" in printed
