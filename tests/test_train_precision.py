"""Mixed precision: one SGD step of the real trainer under bf16 and fp16 autocast against the same step in float32,
for stage 1, stage 2 and stage 2 with LoRA on the LLM. Every trainable group must move as in float32."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _train_fixtures import SGD_ONE_STEP, TINY_STAGE1, TINY_STAGE2, build, trainable_state

from movekd_hf.training.stages import component_of

SETTINGS = {
    "stage1": (TINY_STAGE1, ("--data_path", "toy:pretrain:4")),
    "stage2": (TINY_STAGE2, ("--data_path", "toy:finetune:4")),  # 4 image samples and 1 text-only
    "stage2-lora": (TINY_STAGE2, ("--data_path", "toy:finetune:4", "--lora_llm", "true")),
}
GROUPS = {
    "stage1": {"lora", "router", "projector", "adapters"},
    "stage2": {"lora", "router", "projector", "adapters", "llm"},
    "stage2-lora": {"lora", "router", "projector", "adapters", "llm"},
}
PRECISIONS = {  # name: (flags, dtype the forward computes in)
    "fp32": ((), torch.float32),
    "bf16": (("--bf16", "true"), torch.bfloat16),
    "fp16": (("--fp16", "true"), torch.float16),  # with accelerate's autocast switched on (see `one_step`)
    "fp16-flag": (("--fp16", "true"), torch.float32),  # the flag alone: accelerate runs no autocast on a CPU
}
COMMON = ("--use_cpu", "true", "--per_device_train_batch_size", "4")

# Tolerances. bf16 keeps 8 significant bits (rounding 2^-9 ~ 0.2 %), fp16 11; the rounding of activations and
# gradients is percent-level per element at worst and averages out over a group's update vector. Measured here: cosine
# >= 0.99992 and norms within 0.35 % (bf16, LoRA experts the worst; fp16 >= 0.999999, 0.02 %). The bounds leave ~60x
# (1 - cosine) and ~9x (norm) of margin, yet a term lost or mis-scaled under autocast (a group's KD or balance gradient
# gone, a loss counted twice) breaks them.
MIN_COSINE = 0.995
MAX_NORM_ERROR = 0.03
FP16_SCALE = 2.0**10  # loss scale of the fp16 runs (see `one_step`)


@dataclass
class Step:
    updates: dict[str, torch.Tensor]  # group -> flattened update of all its parameters (float64)
    log: dict[str, float]  # the step's logged components
    projector_dtypes: set  # dtype of the projector's output in the forward: shows autocast was on


def group_of(name: str) -> str:
    """LoRA experts, routers, projector, LLM (full or its peft LoRA) or the distiller's adapters."""
    if name.startswith("distiller."):
        return "adapters"
    name = name.removeprefix("vlm.").removeprefix("base_model.model.")
    component = component_of(name)
    if component == "mole":
        return "router" if ".router." in name else "lora"
    return component


def one_step(setting: str, precision: str, output_dir) -> Step:
    config, data = SETTINGS[setting]
    trainer = build(config, output_dir, *SGD_ONE_STEP, *COMMON, *data, *PRECISIONS[precision][0])
    if precision == "fp16":
        # The Trainer accepts `--fp16 true` on a CPU, but accelerate (1.15) turns its native AMP on for fp16 only
        # on accelerators: on the CPU it runs no autocast and no GradScaler, so the flag alone trains in float32
        # (with float16 teachers; `test_fp16_flag_alone_on_the_cpu_trains_in_float32` covers that). To test fp16
        # autocast itself, switch on what accelerate does on a GPU: `native_amp` (its `prepare` then wraps the
        # module's forward in `torch.autocast(device, float16)`) and a GradScaler (torch's CPU one). The
        # projector's output dtype below shows the forward really ran in float16. The scaler starts at 2^10, not
        # its default 2^16: at 2^16 the stage-1 gradients overflow and the scaler skips the (only) step, as it
        # would on a GPU before backing off.
        accelerator = trainer.accelerator
        assert not accelerator.native_amp and accelerator.scaler is None  # if this fails, drop the workaround
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=FP16_SCALE)
    dtypes = set()
    projector = trainer.model.base_vlm().model.multi_modal_projector
    handle = projector.register_forward_hook(lambda _module, _args, output: dtypes.add(output.dtype))
    before = trainable_state(trainer.model)
    trainer.train()
    handle.remove()
    if trainer.accelerator.scaler is not None:
        assert trainer.accelerator.scaler.get_scale() == FP16_SCALE, "the scaler found inf gradients: step skipped"
    updates = {}
    for name, value in trainable_state(trainer.model).items():
        updates.setdefault(group_of(name), []).append((value - before[name]).double().flatten())
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    return Step({group: torch.cat(parts) for group, parts in updates.items()}, log, dtypes)


@pytest.fixture(scope="module")
def fp32_step(tmp_path_factory):
    """The float32 step of each setting, computed once for both half precisions."""
    steps = {}

    def get(setting: str) -> Step:
        if setting not in steps:
            steps[setting] = one_step(setting, "fp32", tmp_path_factory.mktemp(f"{setting}-fp32"))
        return steps[setting]

    return get


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_half_precision_step_matches_float32(setting, precision, fp32_step, tmp_path):
    reference = fp32_step(setting)
    step = one_step(setting, precision, tmp_path / "run")
    assert reference.projector_dtypes == {PRECISIONS["fp32"][1]}
    assert step.projector_dtypes == {PRECISIONS[precision][1]}  # autocast really ran
    losses = ("loss", "lm_loss", "kd_loss", "balance_loss")
    assert all(torch.isfinite(torch.tensor(step.log[key])) for key in losses), step.log
    # Teacher weights are computed in float32 whatever the autocast: the anchor's fixed 0.8 stays exact.
    weights = [value for key, value in step.log.items() if key.startswith("kd/") and key.endswith("_weight")]
    assert step.log["kd/clip_weight"] == pytest.approx(0.8) and sum(weights) == pytest.approx(1.0, abs=1e-6)
    assert set(step.updates) == set(reference.updates) == GROUPS[setting]
    for group, expected in reference.updates.items():
        update = step.updates[group]
        assert torch.isfinite(update).all(), group
        assert expected.norm() > 0, f"{group} did not move in float32: nothing to compare"
        cosine = F.cosine_similarity(update, expected, dim=0).item()
        norm_ratio = (update.norm() / expected.norm()).item()
        assert cosine > MIN_COSINE and abs(norm_ratio - 1) < MAX_NORM_ERROR, (
            f"{setting} {precision} {group}: cosine {cosine:.5f}, norm ratio {norm_ratio:.4f}"
        )


def test_fp16_flag_alone_on_the_cpu_trains_in_float32(fp32_step, tmp_path):
    """`--fp16 true` without accelerate's autocast: float16 teachers feed float32 adapters (this crashed with a
    dtype mismatch); the model itself computes in float32, so the step is the float32 one up to teacher rounding."""
    step = one_step("stage1", "fp16-flag", tmp_path / "run")
    reference = fp32_step("stage1")
    assert step.projector_dtypes == {PRECISIONS["fp16-flag"][1]}
    for group, expected in reference.updates.items():
        cosine = F.cosine_similarity(step.updates[group], expected, dim=0).item()
        assert cosine > MIN_COSINE, f"{group}: cosine {cosine:.5f}"
