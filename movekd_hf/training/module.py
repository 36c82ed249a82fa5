"""The module the Trainer trains: the VLM (possibly inside a peft `PeftModel`) and the distiller side by side, so
DDP all-reduces, DeepSpeed partitions and the optimiser steps both; and what each stage trains of it (METHOD.md
section 5), LLaVA's LoRA on the LLM included.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..distill.distiller import MoVEKDDistiller
from ..distill.losses import mole_balance_loss
from ..modeling.llava_conventions import student_grid
from .arguments import MoVEKDTrainingArguments
from .stages import COMPONENTS, STAGES, apply_stage, component_of

# peft targets: the LLM's linear layers only (MoLE, projector and adapters train in full).
LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_PEFT_LORA_PARAM = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")
_PEFT_PREFIX = "base_model.model."


class MoVEKDTrainingModule(nn.Module):
    """The trained module: `vlm` (a `MoVEKDForConditionalGeneration`, possibly inside a peft `PeftModel`) and
    `distiller` (None for the no-KD baseline). `forward` returns the loss components, unweighted."""

    # The Trainer reads this to pass `num_items_in_batch` (label tokens of the accumulated batch).
    accepts_loss_kwargs = True
    main_input_name = "input_ids"

    def __init__(self, vlm: nn.Module, distiller: MoVEKDDistiller | None = None):
        super().__init__()
        self.vlm = vlm
        self.distiller = distiller
        self.student_grid = student_grid(self.config.vision_config)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.vlm, "peft_config")

    def base_vlm(self) -> nn.Module:
        """The `MoVEKDForConditionalGeneration` itself (peft's base model when LoRA wraps it)."""
        return self.vlm.get_base_model() if self.is_peft else self.vlm

    @property
    def config(self):
        return self.base_vlm().config

    @property
    def generation_config(self):
        return self.base_vlm().generation_config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        vlm = self.base_vlm()
        if hasattr(vlm, "activation_checkpointing_enable"):  # transformers >= 5.24
            vlm.activation_checkpointing_enable(
                activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )
        else:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        if self.is_peft:  # frozen embeddings give checkpointed LoRA blocks no input that requires grad
            vlm.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """What the Trainer of transformers < 5.24 calls; 5.24 renamed it `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def forward(self, teacher_outputs: dict | None = None, num_items_in_batch=None, **batch) -> dict[str, Any]:
        """batch: the VLM's inputs (input_ids, attention_mask, labels, pixel_values). Returns {"lm_loss",
        "kd" (distiller output or None), "balance" (mole_balance_loss output or None), "num_images"}."""
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        outputs = self.vlm(**batch)
        result = {"lm_loss": outputs.loss, "kd": None, "balance": None, "num_images": 0}
        if outputs.router_logits is not None:
            result["balance"] = mole_balance_loss(outputs.router_logits)
            result["num_images"] = outputs.router_logits[0].shape[0]
        if self.distiller is not None and teacher_outputs and outputs.vision_hidden_states is not None:
            result["kd"] = self.distiller(outputs.vision_hidden_states, self.student_grid, teacher_outputs)
        return result


def llm_lora_config(r: int = 128, lora_alpha: int = 256, lora_dropout: float = 0.05):
    """peft LoRA on the LLM's linear layers, LLaVA-1.5's recipe by default (r=128, alpha=256), for stage 2."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LLM_LORA_TARGETS, bias="none"
    )


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def prepare_model(model: nn.Module, args: MoVEKDTrainingArguments, peft_config=None) -> nn.Module:
    """Freeze all but what `args.stage` trains (METHOD.md section 5). With LoRA on the LLM (a peft model, or
    `peft_config` to wrap it in one) the LLM trains through its LoRA matrices only; MoLE and projector in full."""
    if (peft_config is not None or is_peft(model)) and args.stage != "stage2":
        raise ValueError(f"LoRA on the LLM applies to stage2 (the LLM trains there), not {args.stage!r}")
    if peft_config is not None:
        if is_peft(model):
            raise ValueError("`model` is already a peft model: pass no `peft_config`")
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "hf_quantizer", None) is not None:  # QLoRA: a quantized LLM under the LoRA
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        model = get_peft_model(model, peft_config)
    if not is_peft(model):
        apply_stage(model, args.stage)
        return model
    in_full = set(STAGES[args.stage]) - {"llm"}  # peft froze everything but its LoRA: give these back
    for name, param in model.named_parameters():
        component = component_of(name.removeprefix(_PEFT_PREFIX))
        param.requires_grad_(bool(_PEFT_LORA_PARAM.search(name)) or component in in_full)
    return model


def trainable_parameters(module: MoVEKDTrainingModule) -> dict[str, int]:
    """Trainable parameters per component (`adapters`: the distiller's)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in module.vlm.named_parameters():
        if param.requires_grad:
            counts[component_of(name.removeprefix(_PEFT_PREFIX))] += param.numel()
    if module.distiller is not None:
        counts["adapters"] = sum(p.numel() for p in module.distiller.parameters())
    return counts
