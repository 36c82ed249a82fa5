"""MoVEKDTrainer in-process on the tiny configs: loss under gradient accumulation, what each stage trains,
frozen teachers, logged components, checkpoint contents and remote-code loading."""

from __future__ import annotations

import json

import pytest
import torch
from _train_fixtures import (
    TINY_STAGE1,
    TINY_STAGE2,
    build,
    full_state,
    load_safetensors,
    one_step_update,
)

from movekd_hf.training.checkpoint import DISTILLER_FILE
from movekd_hf.training.stages import component_of


def _update(config, tmp_path, name, *overrides):
    return one_step_update(config, tmp_path / name, *overrides)


def test_gradient_accumulation_matches_the_doubled_batch(tmp_path):
    """GA=2 x batch 2 and GA=1 x batch 4 see the same 4 samples (3 with images, 1 text-only, so the two
    micro-batches hold different image counts) and must make the same SGD update: LM, KD and balance terms."""
    data = ("--data_path", "toy:finetune:3")  # 3 image samples + 1 text-only sample
    accumulated, trainer = _update(
        TINY_STAGE2, tmp_path, "ga", *data, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"
    )
    assert len(trainer.train_dataset) == 4
    single, _ = _update(
        TINY_STAGE2, tmp_path, "one", *data, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"
    )
    moved = [key for key, delta in single.items() if delta.abs().max() > 0]
    assert any(key.startswith("distiller.") for key in moved) and any(".router." in key for key in moved)
    for key, delta in single.items():
        torch.testing.assert_close(accumulated[key], delta, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(
    ("config", "overrides", "trained"),
    [
        (TINY_STAGE1, (), {"mole", "projector"}),
        (TINY_STAGE2, (), {"mole", "projector", "llm"}),
        (TINY_STAGE2, ("--lora_llm", "true"), {"mole", "projector", "llm"}),
    ],
    ids=["stage1", "stage2", "stage2-lora"],
)
def test_stage_trains_exactly_its_components(tmp_path, config, overrides, trained):
    trainer = build(
        config, tmp_path / "run", "--max_steps", "2", "--warmup_steps", "0", "--save_strategy", "no", *overrides
    )
    module = trainer.model
    teachers = trainer.teacher_source.teachers
    teacher_before = {slug: full_state(t) for slug, t in teachers.items()}
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer.train()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    last_layer = f"encoder.layers.{module.config.vision_config.num_hidden_layers - 1}.mlp.fc"
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        component = (
            "adapters" if name.startswith("distiller.") else component_of(name[4:].removeprefix("base_model.model."))
        )
        expected = component in trained | {"adapters"}
        if overrides and component == "llm":  # peft: only the LoRA matrices of the LLM train
            expected = ".lora_A.default" in name or ".lora_B.default" in name
        assert param.requires_grad == expected, name
        assert (id(param) in optimised) == expected, name
        if not expected:
            assert not changed, f"frozen {name} moved"
        elif last_layer not in name or ".router." in name:  # LLaVA reads layer -2: the last layer's LoRA is idle
            assert changed, f"trainable {name} did not move"
    for slug, teacher in teachers.items():
        assert not teacher.training and not teacher.model.training
        assert all(not p.requires_grad and id(p) not in optimised for p in teacher.parameters())
        for key, value in full_state(teacher).items():
            assert torch.equal(value, teacher_before[slug][key]), f"teacher {slug} {key} moved"
    assert not any(name.startswith("teacher") for name, _ in module.named_parameters())


def test_clip_teacher_is_the_student_initial_tower(tmp_path):
    trainer = build(TINY_STAGE1, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no")
    clip = trainer.teacher_source.teachers["clip"].model.state_dict()
    tower = trainer.model.vlm.model.vision_tower.state_dict()
    assert set(tower) - set(clip) == {k for k in tower if ".lora_" in k or ".router." in k}
    for key, value in clip.items():
        assert torch.equal(value, tower[key]), key


def test_logs_components_per_teacher_and_expert_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "run"
    trainer = build(
        TINY_STAGE1, tmp_path / "run", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "tensorboard",
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        weights = [entry[f"kd/{slug}_weight"] for slug in ("clip", "convnext", "sam")]
        assert entry["kd/clip_weight"] == pytest.approx(0.8) and sum(weights) == pytest.approx(1.0, abs=1e-5)
        shares = [entry[f"mole/expert_{e}_tokens"] for e in range(3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        total = entry["lm_loss"] + 0.5 * entry["kd_loss"] + 0.01 * entry["balance_loss"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)  # GA 1, every sample has an image
    assert logs[0]["trainable_params/projector"] > 0 and logs[0]["trainable_params/llm"] == 0
    events = EventAccumulator(str(next(logdir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/kd/sam_loss", "train/kd/convnext_weight", "train/mole/expert_2_tokens", "train/lm_loss"} <= tags


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    trainer = build(TINY_STAGE1, root / "run", "--max_steps", "2", "--save_steps", "2", "--learning_rate", "0.05")
    trainer.train()
    return trainer, root / "run" / "checkpoint-2"


def test_checkpoint_is_a_vlm_plus_training_state_without_teachers(trained_run):
    trainer, checkpoint = trained_run
    names = {path.name for path in checkpoint.iterdir()}
    model_files = {"config.json", "model.safetensors", "modeling_movekd.py", "configuration_movekd.py"}
    model_files |= {"mole.py", "mole_sorted.py"}
    processor_files = {"processing_movekd.py", "processor_config.json", "tokenizer.json", "README.md"}
    resume_files = {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.safetensors",
        "trainer_state.json",
        "training_args.json",
        DISTILLER_FILE,
    }
    assert model_files | processor_files | resume_files <= names
    weights = load_safetensors(checkpoint / "model.safetensors")
    assert len(weights) == len(trainer.model.vlm.state_dict())  # the VLM and nothing else: no teacher
    adapters = load_safetensors(checkpoint / DISTILLER_FILE)
    assert set(adapters) == set(trainer.model.distiller.state_dict())
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_movekd.MoVEKDForConditionalGeneration"


def test_checkpoint_loads_through_remote_code_only(trained_run):
    """A process without movekd_hf loads the checkpoint with trust_remote_code and gets the trained logits."""
    from movekd_hf.isolated import run_without_package

    trainer, checkpoint = trained_run
    torch.manual_seed(0)
    input_ids = torch.randint(0, 250, (1, 9))
    pixel_values = torch.rand(1, 3, 32, 32)
    input_ids[0, 1:17] = 0
    image_token = trainer.model.config.image_token_index
    input_ids = torch.cat([input_ids[:, :1], torch.full((1, 16), image_token), input_ids[:, 1:]], dim=1)
    vlm = trainer.model.vlm.eval()
    with torch.no_grad():
        expected = vlm(input_ids=input_ids, pixel_values=pixel_values).logits
    code = f"""
import json, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
ids = torch.tensor({input_ids.tolist()}); pixels = torch.tensor({pixel_values.tolist()})
with torch.no_grad():
    logits = model(input_ids=ids, pixel_values=pixels).logits
print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist()}}))
"""
    result = run_without_package(code)
    assert not result["module"].startswith("movekd_hf")
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)


def test_modality_grouped_batches_hold_one_modality(tmp_path):
    """`group_by_modality_length`: LLaVA's sampler replaces the random one, so a batch is all-image or text-only."""
    trainer = build(
        TINY_STAGE2, tmp_path / "run", "--group_by_modality_length", "true", "--data_path", "toy:finetune:16",
        "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no",
    )  # fmt: skip
    batches = list(trainer.get_train_dataloader())
    kinds = [tuple(int(n) > 0 for n in batch["images_per_sample"]) for batch in batches]
    assert ((False, False) in kinds or (False,) in kinds) and (True, True) in kinds
    assert all(len(set(kind)) == 1 for kind in kinds[:-1])  # only the last, leftover batch may mix


def test_adapters_can_start_from_a_previous_stage(tmp_path):
    first = build(TINY_STAGE1, tmp_path / "stage1")
    with torch.no_grad():
        for param in first.model.distiller.parameters():
            param.add_(0.25)  # as if stage 1 had trained them
    first.save_model()
    second = build(TINY_STAGE1, tmp_path / "stage2", "--adapters_from", str(tmp_path / "stage1"))
    expected = first.model.distiller.state_dict()
    for name, tensor in second.model.distiller.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(ValueError, match="distill_adapters.safetensors"):
        build(TINY_STAGE1, tmp_path / "stage2", "--adapters_from", str(tmp_path / "nowhere"))


def test_train_config_says_whether_the_base_model_is_a_local_folder(trained_run, tmp_path):
    """A run from a local checkpoint records `base_model_is_local` (the card then links no Hub model); a preset
    run does not."""
    trainer, checkpoint = trained_run
    assert trainer.train_config["base_model_is_local"] is False
    local = build(TINY_STAGE2, tmp_path / "run", "--model_name_or_path", str(checkpoint))
    assert local.train_config["base_model"] == str(checkpoint) and local.train_config["base_model_is_local"] is True
