"""What a MoVE-KD run is: the stage, the loss and the optimisation (`MoVEKDTrainingArguments`, what
`MoVEKDTrainer` reads), and for the command line also which model and teachers to load (`MoVEKDModelArguments`)
and the data (`MoVEKDDataArguments`, data_args.py). `parse_args` reads a YAML file whose values become the
defaults of one `HfArgumentParser`, so any `--key value` after it overrides the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..distill.losses import KD_LOSS_PRESETS
from ..distill.presets import TEACHER_SETS
from .data_args import MoVEKDDataArguments
from .stages import STAGES

KD_PRESETS = (*KD_LOSS_PRESETS, "none")
TEACHER_SOURCES = ("online", "cached")


@dataclass
class MoVEKDModelArguments:
    """Which student and which teachers to load, and whether the LLM trains through LoRA: what the command line
    turns into the objects `MoVEKDTrainer` takes. Paper values: `teacher_set` v1.0/v1.1."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A MoVE-KD checkpoint folder or Hub id (e.g. `movekd-hf init` output)."}
    )
    preset: str | None = field(default=None, metadata={"help": "Build a random model instead: `tiny`."})
    seed_model: int = field(default=0, metadata={"help": "Seed of the random `preset` model."})
    teacher_set: str = field(default="v1.1", metadata={"help": f"One of {tuple(TEACHER_SETS)}; `tiny` for CPU runs."})
    teacher_pretrained: bool = field(
        default=True, metadata={"help": "Load teacher weights (False: random weights of the same architecture)."}
    )
    teacher_checkpoints: str | None = field(
        default=None, metadata={"help": "Local teacher weights, `slug=path,slug=path` (replaces Hub downloads)."}
    )
    teacher_source: str = field(default="online", metadata={"help": f"One of {TEACHER_SOURCES}."})
    teacher_cache_dir: str | None = field(default=None, metadata={"help": "Feature cache folder (`cached` source)."})
    teacher_cache_grid: str = field(
        default="native",
        metadata={"help": "Grid the cache stores (`native` suits every adapter; `student` only `resample`)."},
    )
    lora_llm: bool = field(default=False, metadata={"help": "Stage 2 low-memory: peft LoRA on the LLM's linears."})
    lora_llm_rank: int = field(default=128, metadata={"help": "LLaVA-1.5's LoRA recipe: r=128, alpha=256."})
    lora_llm_alpha: int = field(default=256)
    lora_llm_dropout: float = field(default=0.05)
    qlora: bool = field(default=False, metadata={"help": "4-bit base LLM (bitsandbytes, CUDA only) under the LoRA."})

    def __post_init__(self) -> None:
        if (self.model_name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of `model_name_or_path` (a checkpoint) or `preset` (e.g. `tiny`)")
        for name, value, choices in (
            ("teacher_set", self.teacher_set, tuple(TEACHER_SETS)),
            ("teacher_source", self.teacher_source, TEACHER_SOURCES),
            ("teacher_cache_grid", self.teacher_cache_grid, ("native", "student")),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
        if self.qlora and not self.lora_llm:
            raise ValueError("`qlora` trains LoRA on a 4-bit LLM: set `lora_llm: true` too")

    def checkpoint_map(self) -> dict[str, str]:
        """`teacher_checkpoints` as {slug: path}."""
        mapping = {}
        for item in filter(None, (self.teacher_checkpoints or "").split(",")):
            slug, sep, path = item.partition("=")
            if not sep or not path:
                raise ValueError(f"`teacher_checkpoints` entries are `slug=path`, got {item!r}")
            mapping[slug.strip()] = path.strip()
        return mapping


@dataclass
class MoVEKDTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what a MoVE-KD run adds (METHOD.md sections 4 and 5): the stage (what trains), the
    distillation loss (`kd_preset`) and the weights of L = L_lm + lambda_kd L_kd + lambda_bal L_bal. Paper values:
    `kd_preset` faithful, lambda_kd 0.5, lambda_bal 0.01.

    Image collators need `remove_unused_columns=False`: the default here.
    """

    stage: str = field(default="stage1", metadata={"help": f"One of {tuple(STAGES)} (METHOD.md section 5)."})
    kd_preset: str = field(
        default="default", metadata={"help": f"One of {KD_PRESETS}; `none` trains the LLaVA baseline (no KD)."}
    )
    lambda_kd: float = field(default=0.5, metadata={"help": "Weight of the distillation loss (paper 0.5)."})
    lambda_bal: float = field(default=0.01, metadata={"help": "Weight of the MoLE balance loss (paper 0.01)."})
    adapters_from: str | None = field(
        default=None,
        metadata={"help": "A checkpoint whose distill_adapters.safetensors the teacher adapters start from (stage 2 "
                  "carrying on from stage 1)."},
    )  # fmt: skip
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns for the collator."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, choices in (("stage", self.stage, tuple(STAGES)), ("kd_preset", self.kd_preset, KD_PRESETS)):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
        if self.lambda_kd < 0 or self.lambda_bal < 0:
            raise ValueError(f"lambda_kd and lambda_bal must be >= 0, got {self.lambda_kd} and {self.lambda_bal}")


ARGUMENT_CLASSES = (MoVEKDModelArguments, MoVEKDDataArguments, MoVEKDTrainingArguments)


def read_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}")
    return values


def _cpu_only_multi_process() -> bool:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def parse_args(argv: list[str]) -> tuple[MoVEKDModelArguments, MoVEKDDataArguments, MoVEKDTrainingArguments]:
    """`CONFIG.yaml [--key value ...]` (or only flags) -> the three argument dataclasses."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv and argv[0].endswith((".yaml", ".yml")):
        values = read_yaml(argv[0])
        known = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{argv[0]}: unknown argument(s) {unknown}; see `python -m movekd_hf.train --help`")
        for name in values:
            known[name].required = False  # the file supplies it; the command line may still override it
        parser.set_defaults(**values)
        argv = argv[1:]
    if _cpu_only_multi_process():
        # accelerate makes a CPU process group (gloo, DistributedType.MULTI_CPU) only when asked for the CPU;
        # otherwise each of the launched processes silently trains alone (DistributedType.NO).
        parser.set_defaults(use_cpu=True)
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if model_args.lora_llm and args.stage != "stage2":
        raise ValueError(f"`lora_llm`/`qlora` apply to stage2 (the LLM trains there), not {args.stage!r}")
    return model_args, data_args, args
