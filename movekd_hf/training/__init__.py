"""Training: arguments, LLaVA data (JSON / datasets -> batches), stages, and `MoVEKDTrainer` (a transformers
`Trainer` whose loss adds the MoVE-KD distillation, METHOD.md sections 4-5)."""

from .arguments import MoVEKDModelArguments, MoVEKDTrainingArguments, parse_args
from .collator import MoVEKDDataCollator
from .data_args import MoVEKDDataArguments, MoVEKDTrainData, build_train_data
from .module import MoVEKDTrainingModule, llm_lora_config
from .stages import STAGES, apply_stage
from .trainer import MoVEKDTrainer

__all__ = [
    "STAGES",
    "MoVEKDDataArguments",
    "MoVEKDDataCollator",
    "MoVEKDModelArguments",
    "MoVEKDTrainData",
    "MoVEKDTrainer",
    "MoVEKDTrainingArguments",
    "MoVEKDTrainingModule",
    "apply_stage",
    "build_train_data",
    "llm_lora_config",
    "parse_args",
]
