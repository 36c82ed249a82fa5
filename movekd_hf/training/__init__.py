"""Training: arguments, LLaVA data (JSON / datasets -> batches), stages, and `MoVEKDTrainer` (a transformers
`Trainer` whose loss adds the MoVE-KD distillation, METHOD.md sections 4-5).

The public names load on first use (PEP 562, as `movekd_hf` itself does): importing one submodule, say
`movekd_hf.training.stages`, does not import the data readers and with them `datasets` and pyarrow.
"""

from __future__ import annotations

from movekd_hf._lazy import lazy_exports

# Public name -> the submodule that defines it.
_LAZY = {
    "MoVEKDModelArguments": ".arguments",
    "MoVEKDTrainingArguments": ".arguments",
    "parse_args": ".arguments",
    "MoVEKDDataCollator": ".collator",
    "MoVEKDDataArguments": ".data_args",
    "MoVEKDTrainData": ".data_args",
    "build_train_data": ".data_args",
    "MoVEKDTrainingModule": ".module",
    "llm_lora_config": ".module",
    "STAGES": ".stages",
    "apply_stage": ".stages",
    "MoVEKDTrainer": ".trainer",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
