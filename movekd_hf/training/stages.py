"""The model's trainable components and what each training stage trains (METHOD.md section 5).

One place decides which parameter belongs to which component, so `movekd-hf plan`, the stage presets and
the trainer's logs always agree.
"""

from __future__ import annotations

from torch import nn

COMPONENTS = ("vision_base", "mole", "projector", "llm")

# Adapters train in both stages but live outside the VLM (in the distillation module), so they are listed
# here for the plan and handled by the trainer.
STAGES: dict[str, tuple[str, ...]] = {
    "stage1": ("mole", "projector", "adapters"),
    "stage2": ("llm", "projector", "mole", "adapters"),
}

_MOLE_MARKERS = (".lora_A", ".lora_B", ".mlp.router.")


def component_of(parameter_name: str) -> str:
    """Which component a MoVE-KD parameter belongs to, from its name."""
    if "vision_tower." in parameter_name:
        return "mole" if any(marker in parameter_name for marker in _MOLE_MARKERS) else "vision_base"
    if "multi_modal_projector." in parameter_name or "image_newline" in parameter_name:
        return "projector"
    if "language_model." in parameter_name or parameter_name.startswith("lm_head."):
        return "llm"
    raise ValueError(f"Parameter {parameter_name!r} belongs to no known component {COMPONENTS}.")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component (works on the meta device)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        counts[component_of(name)] += param.numel()
    return counts


def apply_stage(model: nn.Module, stage: str) -> dict[str, int]:
    """Freeze everything but the stage's components; returns trainable parameters per component."""
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {tuple(STAGES)}, got {stage!r}.")
    trained = set(STAGES[stage])
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        component = component_of(name)
        param.requires_grad_(component in trained)
        if param.requires_grad:
            counts[component] += param.numel()
    return counts
