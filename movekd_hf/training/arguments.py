"""What a MoVE-KD run is: the stage, the loss and the optimisation (`MoVEKDTrainingArguments`, what
`MoVEKDTrainer` reads), and for the command line also which model and teachers to load (`MoVEKDModelArguments`)
and the data (`MoVEKDDataArguments`, data_args.py). `parse_args` reads a YAML file whose values become the
defaults of one `HfArgumentParser`, so any `--key value` after it overrides the file.

Every value a user can get wrong raises `SettingsError` naming the option (and the YAML file, for its keys and
values): unknown keys, values of the wrong type, NaN or infinite loss weights, LoRA settings out of range.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .. import configs
from ..distill.cache_codec import COMPRESSION_KINDS, TOKEN_DTYPES
from ..distill.losses import KD_LOSS_FIELDS, KD_LOSS_PRESETS, KDLossConfig
from ..distill.presets import TEACHER_SETS
from ..errors import InputError, SettingsError
from .data_args import MoVEKDDataArguments
from .stages import STAGES

KD_PRESETS = (*KD_LOSS_PRESETS, "none")
TEACHER_SOURCES = ("online", "cached")
NONFINITE_POLICIES = ("stop", "skip_step")
NONNEGATIVE = "a finite number >= 0"


def _check_number(name: str, value, low: float, high: float | None = None, expected: str = NONNEGATIVE) -> None:
    """`value` must be a finite number in [low, high) (no upper bound when `high` is None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if not ok or (high is not None and value >= high):
        raise SettingsError(f"got {value!r}", field=name, expected=expected)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise SettingsError(f"got {value!r}", field=name, expected=f"one of {tuple(choices)}")


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
    teacher_revisions: str | None = field(
        default=None,
        metadata={"help": "Hub revisions of teacher weights, `slug=rev,slug=rev` (branch, tag or commit; part of the "
                  "feature cache's key, as `cache-teachers --revision` writes it)."},
    )  # fmt: skip
    extra_teachers: str | None = field(
        default=None,
        metadata={"help": "Teachers added to the set, `slug=ID,slug=ID`: each a transformers or timm vision model "
                  "by Hub id or local folder (`teacher_from_pretrained` reads it: its default output, input size "
                  "and normalisation from its own configs)."},
    )  # fmt: skip
    teacher_source: str = field(default="online", metadata={"help": f"One of {TEACHER_SOURCES}."})
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "The feature cache (`cached` source): a `cache-teachers --cache-dir` folder, an "
                  "`--export-repo` folder, or a Hub dataset repository id holding one."},
    )  # fmt: skip
    teacher_cache_grid: str = field(
        default="native",
        metadata={"help": "Grid the cache stores (`native` suits every adapter; `student` only `resample`)."},
    )
    teacher_cache_compress: str | None = field(
        default=None,
        metadata={"help": "The cache's compression, as `cache-teachers --compress` wrote it: `slug=k,slug=k` "
                  "(channels kept per teacher); with the four options below it must match the cache's."},
    )  # fmt: skip
    teacher_cache_compression: str = field(default="random", metadata={"help": "`random` or `pca` (cache-teachers)."})
    teacher_cache_compression_seed: int = field(default=0, metadata={"help": "cache-teachers --compression-seed."})
    teacher_cache_calibration_images: int = field(
        default=256, metadata={"help": "cache-teachers --calibration-images."}
    )
    teacher_cache_token_dtype: str = field(
        default="float16", metadata={"help": "`float16`, `int8` or `float8_e4m3fn` (cache-teachers --token-dtype)."}
    )
    lora_llm: bool = field(default=False, metadata={"help": "Stage 2 low-memory: peft LoRA on the LLM's linears."})
    lora_llm_rank: int = field(default=128, metadata={"help": "LLaVA-1.5's LoRA recipe: r=128, alpha=256."})
    lora_llm_alpha: int = field(default=256)
    lora_llm_dropout: float = field(default=0.05)
    qlora: bool = field(default=False, metadata={"help": "4-bit base LLM (bitsandbytes, CUDA only) under the LoRA."})

    def __post_init__(self) -> None:
        if (self.model_name_or_path is None) == (self.preset is None):
            raise SettingsError(
                "give exactly one of them",
                field="model_name_or_path/preset",
                expected="`model_name_or_path` (a checkpoint) or `preset` (e.g. `tiny`)",
            )
        for name, value, choices in (
            ("teacher_set", self.teacher_set, tuple(TEACHER_SETS)),
            ("teacher_source", self.teacher_source, TEACHER_SOURCES),
            ("teacher_cache_grid", self.teacher_cache_grid, ("native", "student")),
            ("teacher_cache_compression", self.teacher_cache_compression, COMPRESSION_KINDS),
            ("teacher_cache_token_dtype", self.teacher_cache_token_dtype, tuple(TOKEN_DTYPES)),
        ):
            _check_choice(name, value, choices)
        # Checked here, under the names the user typed: peft's own errors speak of `r` and `lora_alpha`.
        _check_number("lora_llm_rank", self.lora_llm_rank, 1, expected="an integer >= 1")
        _check_number("lora_llm_alpha", self.lora_llm_alpha, 0, expected="a finite number > 0")
        if self.lora_llm_alpha == 0:
            raise SettingsError("got 0", field="lora_llm_alpha", expected="a finite number > 0")
        _check_number("lora_llm_dropout", self.lora_llm_dropout, 0, 1, expected="a number in [0, 1)")
        if self.qlora and not self.lora_llm:
            raise SettingsError("trains LoRA on a 4-bit LLM", field="qlora", expected="`lora_llm: true` too")

    def cache_compression(self) -> dict:
        """The `CacheSettings` compression fields the cache was written with (`movekd-hf cache-teachers`)."""
        compress = {}
        for item in filter(None, (self.teacher_cache_compress or "").split(",")):
            slug, _, channels = item.partition("=")
            if not channels.strip().isdigit() or int(channels) < 1:
                raise SettingsError(
                    f"entry {item!r}", field="teacher_cache_compress", expected="`slug=k` with k an integer >= 1"
                )
            compress[slug.strip()] = int(channels)
        return dict(
            compress=compress,
            compression=self.teacher_cache_compression,
            compression_seed=self.teacher_cache_compression_seed,
            calibration_images=self.teacher_cache_calibration_images,
            token_dtype=self.teacher_cache_token_dtype,
        )

    def checkpoint_map(self) -> dict[str, str]:
        """`teacher_checkpoints` as {slug: path}."""
        return _slug_map("teacher_checkpoints", self.teacher_checkpoints, "path")

    def revision_map(self) -> dict[str, str]:
        """`teacher_revisions` as {slug: revision}."""
        return _slug_map("teacher_revisions", self.teacher_revisions, "rev")

    def extra_teacher_map(self) -> dict[str, str]:
        """`extra_teachers` as {slug: Hub id or folder}."""
        return _slug_map("extra_teachers", self.extra_teachers, "id")


def _slug_map(name: str, text: str | None, value: str) -> dict[str, str]:
    """`slug=value,slug=value` -> {slug: value}; a malformed entry raises `SettingsError` naming the field `name`
    (the command line prints it as one line)."""
    mapping = {}
    for item in filter(None, (text or "").split(",")):
        slug, sep, found = item.partition("=")
        if not sep or not slug.strip() or not found.strip():
            raise SettingsError(
                f"entry {item!r} is not slug={value}", field=name, expected=f"slug={value},slug={value}"
            )
        mapping[slug.strip()] = found.strip()
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
    kd_options: dict | str | None = field(
        default=None,
        metadata={"help": "KDLossConfig options over kd_preset's: a YAML mapping, or JSON on the command line, e.g. "
                  "'{\"token_loss\": \"cosine_smooth_l1\", \"feature_standardization\": \"phi_s\"}'. Keys: "
                  + ", ".join(KD_LOSS_FIELDS) + "."},
    )  # fmt: skip
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns for the collator."})
    nonfinite_policy: str = field(
        default="stop",
        metadata={"help": "A NaN/inf loss, loss component (lm, kd per teacher, balance) or gradient norm: `stop` "
                  "raises NonFiniteError naming step and component before the optimizer step (CLI exit 1); "
                  "`skip_step` drops that step's gradients (the optimizer leaves the weights and its state as "
                  "they were; the LR schedule moves on) and logs it. Not with DeepSpeed (it steps inside "
                  "backward)."},
    )  # fmt: skip
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "Load pickle files (.bin/.pth: an old rng_state.pth, pytorch_model.bin) from the "
                  "checkpoint resumed; loading a pickle can run code, so only for checkpoints you trust."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        # `--resume_from_checkpoint true` (and YAML `true`): the newest complete checkpoint in output_dir, as
        # `Trainer.train(resume_from_checkpoint=True)`; "false" is no resume. A folder named so still wins.
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() in ("true", "false") and not os.path.isdir(resume):
            resume = resume.lower() == "true"
        self.resume_from_checkpoint = resume if resume else None
        if not self.use_cpu and _cpu_only_multi_process():
            # accelerate makes a CPU process group (gloo, DistributedType.MULTI_CPU) only when asked for the CPU;
            # otherwise each of the launched processes silently trains alone (DistributedType.NO).
            self.use_cpu = True
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False  # pinned memory needs an accelerator; torch warns per loader without
        super().__post_init__()
        for name, value, choices in (
            ("stage", self.stage, tuple(STAGES)),
            ("kd_preset", self.kd_preset, KD_PRESETS),
            ("nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES),
        ):
            _check_choice(name, value, choices)
        for name in ("lambda_kd", "lambda_bal", "learning_rate"):
            _check_number(name, getattr(self, name), 0)
        self.kd_options = _parse_kd_options(self.kd_options, self.kd_preset)

    def kd_option_overrides(self) -> dict[str, Any]:
        """The `KDLossConfig` fields `kd_options` sets over `kd_preset`'s (a copy; {} when none), for
        `KDLossConfig.from_preset(args.kd_preset, **args.kd_option_overrides())`."""
        return dict(self.kd_options or {})


_KD_OPTION_TYPES = {f.name: type(getattr(KDLossConfig(), f.name)) for f in fields(KDLossConfig)}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _kd_value_ok(name: str, value: Any) -> bool:
    kind = _KD_OPTION_TYPES[name]
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _parse_kd_options(value: dict | str | None, kd_preset: str) -> dict[str, Any] | None:
    """`kd_options` (a mapping, JSON text of one, or None) -> a checked mapping of KDLossConfig fields, or None.
    Raises `SettingsError` (field kd_options) naming the key and the values it allows."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise SettingsError(
                f"is not JSON ({error.msg} at character {error.pos})", field="kd_options",
                expected='a JSON object, e.g. \'{"token_loss": "cosine_smooth_l1"}\'',
            ) from error  # fmt: skip
    if not isinstance(value, dict):
        raise SettingsError(f"holds a {type(value).__name__}", field="kd_options", expected="a mapping of options")
    if kd_preset == "none":
        raise SettingsError(
            "is set, but kd_preset 'none' trains without KD", field="kd_options", expected="no kd_options"
        )
    for key, option in value.items():
        if key not in _KD_OPTION_TYPES:
            close = difflib.get_close_matches(str(key), list(_KD_OPTION_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(
                f"has unknown key {key!r}{hint}", field="kd_options", expected=f"keys among {KD_LOSS_FIELDS}"
            )
        if not _kd_value_ok(key, option):
            kind = _TYPE_WORDS[_KD_OPTION_TYPES[key]]
            raise SettingsError(f"key {key!r} is {option!r}", field="kd_options", expected=f"{kind} for {key}")
    try:
        KDLossConfig.from_preset(kd_preset, **value)
    except ValueError as error:  # the allowed values, as KDLossConfig states them
        raise SettingsError(
            f"{error}", field="kd_options", expected=f"values KDLossConfig accepts over kd_preset {kd_preset!r}"
        ) from error
    return dict(value)


ARGUMENT_CLASSES = (MoVEKDModelArguments, MoVEKDDataArguments, MoVEKDTrainingArguments)


class _Parser(HfArgumentParser):
    """argparse's errors (a bad value on the command line, a missing required option) as `SettingsError`: the
    command line prints them as one line, not a usage block, and a Python caller can catch them."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(f"{message} (options: `movekd-hf train --help`)")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config; `SettingsError` naming the file (and line) if it is not one."""
    if not os.path.isfile(path):
        raise SettingsError("no such file", file=str(path), expected="a YAML config (e.g. configs/train/*.yaml)")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = f"is not valid YAML ({getattr(error, 'problem', None) or error})"
        raise SettingsError(problem, file=str(path), line=line) from error
    if not isinstance(values, dict):
        raise SettingsError(
            f"holds a {type(values).__name__}", file=str(path), expected="a mapping of option names to values"
        )
    return values


def _check_yaml_values(path: str, values: dict[str, Any], known: dict[str, Any]) -> None:
    """Unknown keys and values argparse cannot convert (`lambda_kd: abc`, `stage: stage9` is left to the
    dataclasses) -> `SettingsError` naming the file and key."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = {key: difflib.get_close_matches(key, list(known), n=1) for key in unknown}
        hints = [f"{key} (did you mean {match[0]}?)" if match else key for key, match in close.items()]
        raise SettingsError(
            f"unknown option(s) {', '.join(hints)}", file=path, expected="options of `movekd-hf train --help`"
        )
    for name, value in values.items():
        action = known[name]
        if value is None or isinstance(value, (list, dict)) or action.type is None:
            continue
        try:
            converted = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, InputError):
            converted = _BAD
        if converted is _BAD or (action.choices is not None and converted not in action.choices):
            kind = f"one of {tuple(action.choices)}" if action.choices else getattr(action.type, "__name__", "value")
            raise SettingsError(f"got {value!r}", file=path, field=name, expected=kind)


_BAD = object()


def _resolve_deepspeed(path: str, values: dict[str, Any]) -> None:
    """A YAML `deepspeed:` path that does not exist from the working directory is looked up among the packaged
    configs (`configs/deepspeed/zero2.json`, as the paper YAMLs write it, works from any folder); one that is in
    neither place is a `SettingsError` naming the file."""
    value = values.get("deepspeed")
    if not isinstance(value, str) or not value or value.lstrip().startswith("{") or os.path.exists(value):
        return  # unset, JSON text, or a file reachable as given
    try:
        values["deepspeed"] = str(configs.path(value))
    except FileNotFoundError as error:
        raise SettingsError(
            f"no such file {value!r} (from {os.getcwd()!r}), and {error}",
            file=path,
            field="deepspeed",
            expected="a DeepSpeed JSON path, or a packaged one such as configs/deepspeed/zero2.json",
        ) from error


def _given(argv: list[str], name: str) -> bool:
    """Whether `--name` (or its `--kebab-case` alias) is on the command line."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(arg.partition("=")[0] in flags for arg in argv)


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _cpu_only_multi_process() -> bool:
    """Whether this process is one of several launched (`WORLD_SIZE` > 1) on a machine with no accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _accelerator_available()


def build_parser() -> HfArgumentParser:
    """The parser of `movekd-hf train` (its `--help` lists every option)."""
    return _Parser(
        ARGUMENT_CLASSES,
        prog="movekd-hf train",
        usage="movekd-hf train [CONFIG.yaml] [--key value ...]",
        description="Train one MoVE-KD stage. The YAML's keys are these options; `--key value` after it overrides "
        "them. `--model_name_or_path` and `--preset` replace each other's YAML value.",
    )


# The model comes from exactly one of these: giving one on the command line replaces the YAML's other.
_MODEL_SOURCES = ("model_name_or_path", "preset")


def parse_args(argv: list[str]) -> tuple[MoVEKDModelArguments, MoVEKDDataArguments, MoVEKDTrainingArguments]:
    """`CONFIG.yaml [--key value ...]` (or only flags) -> the three argument dataclasses.

    Raises `SettingsError` for anything wrong in them, naming the YAML file when a YAML value is at fault.
    """
    parser = build_parser()
    config, values = None, {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        config, values = argv[0], read_yaml(argv[0])
        argv = argv[1:]
        known = {action.dest: action for action in parser._actions if action.dest != "help"}
        _check_yaml_values(config, values, known)
        _resolve_deepspeed(config, values)
        for given, other in (_MODEL_SOURCES, _MODEL_SOURCES[::-1]):
            if _given(argv, given):
                values.pop(other, None)  # stage 2 from stage 1: `--model_name_or_path runs/stage1` over `preset`
        for name in values:
            known[name].required = False  # the file supplies it; the command line may still override it
        parser.set_defaults(**values)
    try:
        *parsed, unused = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
    except InputError as error:
        if config is None or error.file is not None or error.field not in values or _given(argv, error.field):
            raise
        raise SettingsError(error.problem, file=config, field=error.field, expected=error.expected) from error
    except ValueError as error:  # TrainingArguments' own checks
        raise SettingsError(str(error), file=config) from error
    if unused:
        raise SettingsError(f"unknown command-line argument(s) {unused} (options: `movekd-hf train --help`)")
    model_args, data_args, args = parsed
    if model_args.lora_llm and args.stage != "stage2":
        raise SettingsError(
            f"applies to stage2 (the LLM trains there), not {args.stage!r}", file=config, field="lora_llm"
        )
    return model_args, data_args, args
