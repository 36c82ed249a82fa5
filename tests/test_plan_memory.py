"""`movekd-hf plan` answers "does it fit": memory per GPU per stage and strategy, teacher FLOPs, checked by hand."""

import json
import re

import peft
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from movekd_hf.cli import main
from movekd_hf.cli.model import plan_rows
from movekd_hf.distill.memory import GIB, forward_flops, forward_peak_bytes, model_state_bytes
from movekd_hf.distill.plan import teacher_profile
from movekd_hf.distill.presets import teacher_specs
from movekd_hf.distill.teachers import build_teacher
from movekd_hf.models import build_config, from_preset
from movekd_hf.training.module import llm_lora_config


def test_model_states_per_gpu_by_hand():
    # 1,000 trained + 3,000 frozen parameters on 4 GPUs: bf16 weights 2 B each, fp32 master 4 B, fp32 grad 4 B and
    # AdamW's two fp32 moments 8 B per trained one; ZeRO-2 shards the last three, ZeRO-3 the weights too.
    assert model_state_bytes(1000, 3000, 4, "ddp") == {
        "weights_bf16": 8000, "master_weights_fp32": 4000, "gradients_fp32": 4000, "adamw_states_fp32": 8000
    }  # fmt: skip
    assert model_state_bytes(1000, 3000, 4, "zero2") == {
        "weights_bf16": 8000, "master_weights_fp32": 1000, "gradients_fp32": 1000, "adamw_states_fp32": 2000
    }  # fmt: skip
    assert model_state_bytes(1000, 3000, 4, "zero3")["weights_bf16"] == 2000
    with pytest.raises(ValueError, match="strategy must be one of"):
        model_state_bytes(1000, 3000, 4, "fsdp")


def _tiny_activations(batch: int, length: int, checkpointing: bool) -> dict[str, int]:
    """The module docstring's formula written out for the tiny preset (LLM h 40, i 56, 2 layers, vocab 261; CLIP
    h 32, i 48, 3 layers, 4 x 4 patches + CLS)."""
    text, images = batch * length, batch * 17
    llm_layer = text * 40 * 2 * (8 + 4 * 56 / 40)
    vision_layer = images * 32 * 2 * (8 + 2 * 48 / 32)
    if checkpointing:
        llm, vision = 2 * text * 40 * 2 + llm_layer, 3 * images * 32 * 2 + vision_layer
    else:
        llm, vision = 2 * llm_layer, 3 * vision_layer
    return {"llm": llm, "logits": text * 261 * 6, "vision": vision}


def test_tiny_stage_memory_matches_a_hand_computation():
    plan = plan_rows("tiny", gpus=4, gpu_memory=1.0, batch_size=3, max_length=64)
    parts, memory = plan["components"], plan["memory"]
    trained = {
        "stage1": parts["mole"] + parts["projector"],
        "stage2": parts["mole"] + parts["projector"] + parts["llm"],
    }
    everything = sum(parts[name] for name in ("vision_base", "mole", "projector", "llm"))
    for stage, trainable in trained.items():
        entry = memory[stage]
        assert (entry["trainable_parameters"], entry["frozen_parameters"]) == (trainable, everything - trainable)
        for checkpointing, suffix in ((True, "checkpointing"), (False, "no_checkpointing")):
            hand = _tiny_activations(3, 64, checkpointing)
            for name, value in hand.items():
                assert entry["activation_parts"][f"{name}_{suffix}_gib"] * GIB == pytest.approx(value, rel=1e-12)
            activations = sum(hand.values())
            for strategy, weight_shards, state_shards in (("ddp", 1, 1), ("zero2", 1, 4), ("zero3", 4, 4)):
                total = 2 * everything / weight_shards + 16 * trainable / state_shards + activations
                figures = entry[strategy]
                assert figures[f"total_{suffix}_gib"] * GIB == pytest.approx(total, rel=1e-12)
                assert figures[f"activations_{suffix}_gib"] * GIB == pytest.approx(activations, rel=1e-12)
                assert figures["adamw_states_fp32_gib"] * GIB == pytest.approx(8 * trainable / state_shards)
                assert figures[f"fits_{suffix}"] is (total <= GIB)


def test_teachers_add_their_weights_and_the_larger_of_their_run_or_their_outputs_plus_activations():
    plan = plan_rows("tiny", teachers="tiny", gpus=2, batch_size=5, max_length=32)
    profiles, entry = plan["teacher_profiles"], plan["memory"]["stage1"]
    assert list(profiles) == ["clip", "convnext", "sam"]
    assert entry["trainable_parameters"] == sum(plan["components"][k] for k in ("mole", "projector", "adapters"))
    weights = 2 * sum(p["parameters"] for p in profiles.values())
    outputs = 5 * sum(p["output_bytes"] for p in profiles.values())
    running = 5 * max(p["activation_peak_bytes"] for p in profiles.values()) + outputs
    for strategy in ("ddp", "zero2", "zero3"):
        figures = entry[strategy]
        assert figures["teacher_weights_bf16_gib"] * GIB == weights  # whole on every rank, ZeRO-3 included
        assert figures["teacher_outputs_gib"] * GIB == outputs
        assert figures["teacher_activations_gib"] * GIB == running
        states = sum(figures[k] for k in ("weights_bf16_gib", "master_weights_fp32_gib", "gradients_fp32_gib",
                                          "adamw_states_fp32_gib"))  # fmt: skip
        peak = max(running, figures["activations_checkpointing_gib"] * GIB + outputs)
        assert figures["total_checkpointing_gib"] == pytest.approx(states + (weights + peak) / GIB, rel=1e-12)
    # SAM's output, 8 x 8 tokens of 20 channels in bf16, is what it leaves behind for the loss
    assert profiles["sam"]["output_bytes"] == 64 * 20 * 2 and profiles["sam"]["tokens"] == 64


def test_lora_llm_counts_what_peft_trains():
    plan = plan_rows("tiny", lora_llm_rank=4)
    parts, entry = plan["components"], plan["memory"]["stage2"]
    model, _ = from_preset("tiny")
    lora = peft.get_peft_model(model, llm_lora_config(r=4))
    peft_count = sum(p.numel() for n, p in lora.named_parameters() if re.search(r"\.lora_(A|B)\.default\.", n))
    # per layer r x (in + out) over q 40->40, k 40->20, v 40->20, o 40->40, gate/up 40->56, down 56->40; 2 layers
    assert peft_count == 2 * 4 * 568
    assert entry["trainable_parameters"] == parts["mole"] + parts["projector"] + peft_count
    assert entry["frozen_parameters"] == parts["vision_base"] + parts["llm"]
    assert plan["memory"]["stage1"]["trainable_parameters"] == parts["mole"] + parts["projector"]


def test_paper_7b_recipe_fits_under_zero2_and_full_llm_ddp_does_not():
    plan = plan_rows("llava-1.5-7b")
    stage1, stage2 = plan["memory"]["stage1"], plan["memory"]["stage2"]
    assert (stage1["batch_per_gpu_samples"], stage2["batch_per_gpu_samples"]) == (16, 8)
    # the paper's setting (ZeRO-2, activation checkpointing, 8 x A100-80G) fits; DDP of the full 7B LLM needs
    # 16 B per trained parameter for its states alone, over 100 GiB
    assert stage1["zero2"]["fits_checkpointing"] and stage2["zero2"]["fits_checkpointing"]
    assert not stage2["ddp"]["fits_checkpointing"] and stage2["ddp"]["total_checkpointing_gib"] > 100
    assert stage2["zero3"]["weights_bf16_gib"] == pytest.approx(stage2["ddp"]["weights_bf16_gib"] / 8)


def test_forward_flops_on_meta_match_a_hand_count_and_real_tensors():
    class ConvThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
            self.linear = nn.Linear(8, 5)

        def forward(self, x):
            return self.linear(self.conv(x).flatten(2).transpose(1, 2))

    # conv: 2 x C_out x C_in x 3 x 3 per output position, 7 x 7 of them; linear: 2 x 8 x 5 per token, 49 tokens
    hand = 2 * (2 * 8 * 3 * 3 * 3 * 49 + 2 * 49 * 8 * 5)
    with torch.device("meta"):
        model = ConvThenLinear()
        assert forward_flops(lambda: model(torch.empty(2, 3, 16, 16))) == hand
    real = ConvThenLinear()
    assert forward_flops(lambda: real(torch.randn(2, 3, 16, 16))) == hand

    spec = teacher_specs("tiny", pretrained=False)[2]  # SAM: attention, convolutions, layer norms
    torch.manual_seed(0)
    teacher = build_teacher(spec)
    # on real CPU tensors SDPA's fused kernel is not counted; its math path is (as every op on meta)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(torch.rand(1, 3, spec.image_size, spec.image_size))
    assert teacher_profile(spec)["forward_flops"] == counter.get_total_flops() > 0


def test_peak_bytes_count_new_tensors_alive_at_once_and_sdpa_as_a_fused_kernel():
    with torch.device("meta"), torch.no_grad():
        linear = nn.Linear(1000, 1000)
        x = torch.empty(10, 1000)
        # two 10 x 1000 fp32 activations alive at once; the weights and the input are not new
        _, peak, held = forward_peak_bytes(lambda: linear(linear(linear(x))))
        assert (peak, held) == (2 * 40_000, 40_000)
        q, k, v = (torch.empty(1, 2, 4096, 8, dtype=torch.bfloat16) for _ in range(3))
        _, peak, _ = forward_peak_bytes(lambda: nn.functional.scaled_dot_product_attention(q, k, v))
        assert peak == 2 * 4096 * 8 * 2  # no 4096 x 4096 scores


def _numbers(tree, key=""):
    if isinstance(tree, dict):
        for name, value in tree.items():
            yield from _numbers(value, name)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield key, tree


def test_plan_json_names_a_unit_for_every_figure_and_the_table_puts_one_on_each(capsys):
    args = ["plan", "--preset", "tiny", "--teachers", "tiny", "--gpus", "2", "--gpu-memory", "0.001"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    units = ("_gib", "_flops", "_bytes", "_px", "parameters", "tokens", "channels", "_samples", "gpus", "rank")
    figures = list(_numbers({"memory": plan["memory"], "teachers": plan["teacher_profiles"]}))
    assert len(figures) > 100
    assert [key for key, _ in figures if not key.endswith(units)] == []
    assert plan["memory"]["settings"] == {"gpus": 2, "gpu_memory_gib": 0.001, "lora_llm_rank": None}

    assert main(args) == 0
    table = capsys.readouterr().out
    assert re.search(r"^sam\s+64 px\s+64 x 20\s+[\d,]+\s+0\.00 GFLOPs\s+0\.00 GiB$", table, re.M)
    rows = [line for line in table.splitlines() if line.startswith(("weights, bf16", "total, ", "AdamW"))]
    assert len(rows) == 2 * 4 and all(line.count("GiB") == 3 for line in rows)
    assert "ZeRO-2" in table and "fits 0.001 GiB, checkpointing" in table
    assert "no" in table.split("fits 0.001 GiB, checkpointing")[1].split("\n")[0]


def test_build_config_tiny_sizes_the_hand_computation_uses():
    config = build_config("tiny")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (40, 56, 2, 261)
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (32, 48, 3)
    assert (vision.image_size // vision.patch_size) ** 2 + 1 == 17
