"""The command line's side of training: `CONFIG.yaml [--key value ...]` -> the objects `MoVEKDTrainer` takes.

`build_trainer(argv)` parses the arguments, loads the model and processor, resolves the teachers (a teacher set,
local checkpoints, or a feature cache), builds the data, and calls the same `MoVEKDTrainer(...)` a Python user
calls. The entry that runs it (`accelerate launch -m movekd_hf.train`, `movekd-hf train`) is movekd_hf/train.py.
One process or many (DDP, DeepSpeed ZeRO-2/3) run the same code; accelerate's launcher decides which.

Stage 2 after stage 1: `movekd-hf train stage2.yaml --model_name_or_path runs/stage1` starts from stage 1's saved
model, and its teacher adapters from the `distill_adapters.safetensors` saved beside it (`adapters_from` defaults
to the model folder when that file is there; `--adapters_from none` starts new adapters).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import set_seed

from ..distill.anchor import anchor_teacher_spec
from ..distill.cache_sources import open_cached_teachers
from ..distill.teacher_views import view_settings
from ..errors import SettingsError, loading, model_source
from ..models import checkpoint_classes, from_preset
from .arguments import MoVEKDModelArguments, MoVEKDTrainingArguments, parse_args
from .checkpoint import DISTILLER_FILE
from .data_args import MoVEKDDataArguments, build_train_data
from .distillation import build_distiller, recorded_teachers
from .module import llm_lora_config
from .teacher_source import (
    outside_zero3,
    run_teacher_specs,
    teacher_cache_settings,
)
from .toy_data import make_toy_llava_dataset
from .trainer import MoVEKDTrainer

logger = logging.getLogger("movekd_hf.train")


def load_model(model_args: MoVEKDModelArguments):
    """(MoVE-KD VLM, processor) from a checkpoint folder / Hub id or from a preset."""

    if model_args.preset is not None:
        vlm, processor = from_preset(model_args.preset, seed=model_args.seed_model)
    else:
        kwargs = {}
        if model_args.qlora:
            kwargs["quantization_config"] = qlora_config()
        source = model_args.model_name_or_path
        model_source("model_name_or_path", source)  # a mistyped path: one line naming it, not a Hub error
        with loading("model_name_or_path", source):
            model_class, processor_class = checkpoint_classes(source)
            vlm = model_class.from_pretrained(source, **kwargs)
            processor = processor_class.from_pretrained(source)
    return vlm.train(), processor


def qlora_config():
    """4-bit NF4 for the LLM; vision tower, projector and head stay in full precision (they train or distil)."""
    if not torch.cuda.is_available():
        raise SettingsError(
            "needs a CUDA GPU (bitsandbytes 4-bit kernels)", field="qlora", expected="`lora_llm` alone on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise SettingsError("needs bitsandbytes", field="qlora", expected="pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )


def resolve_toy_data(data_args: MoVEKDDataArguments, args: MoVEKDTrainingArguments) -> None:
    """`data_path: toy:pretrain[:N]` / `toy:finetune[:N]`: generate the package's toy data set and point at it."""
    if not data_args.data_path.startswith("toy:"):
        return

    _, kind, *count = data_args.data_path.split(":")
    if kind not in ("pretrain", "finetune") or len(count) > 1 or (count and not count[0].isdigit()):
        raise SettingsError(
            f"got {data_args.data_path!r}", field="data_path", expected="toy:pretrain[:N] or toy:finetune[:N]"
        )
    num_samples = int(count[0]) if count else 32
    folder = os.path.join(args.output_dir, "_toy_data", f"n{num_samples}")  # `_*` is never uploaded
    with args.main_process_first(desc="toy data"):
        # Written once (JSON files last): other ranks, and resumed runs, must not rewrite images being read.
        if not os.path.isfile(os.path.join(folder, "finetune.json")):
            make_toy_llava_dataset(folder, num_samples=num_samples, seed=0)
    data_args.data_path = os.path.join(folder, f"{kind}.json")
    data_args.image_folder = os.path.join(folder, "images")


def resolve_teachers(vlm, processor, model_args, data_args, args) -> dict[str, Any]:
    """The `teachers` (and, for a feature cache, `distiller`) arguments of `MoVEKDTrainer` for this run, and for
    online teachers `teacher_views` (what `build_train_data` gives the collator: each teacher's own uint8 view)
    unless `teacher_image_size` asks for the one float view of before."""
    if args.kd_preset == "none":
        return {}
    specs = run_teacher_specs(
        model_args.teacher_set,
        model_args.teacher_pretrained,
        model_args.checkpoint_map(),
        model_args.revision_map(),
        model_args.extra_teacher_map(),
    )
    if model_args.teacher_source == "online":
        if data_args.teacher_image_size is not None:  # the one float view of before, as asked
            return {"teachers": specs}
        image_processor = processor.image_processor
        anchor = anchor_teacher_spec(vlm.config, image_processor.image_mean, image_processor.image_std)
        return {"teachers": specs, "teacher_views": view_settings([anchor, *specs])}
    # Teacher outputs read from `movekd-hf cache-teachers` output: the cache must have been written for this
    # student, teacher set and data view (checked through its key), and suit the adapters (checked against them).

    if not model_args.teacher_cache_dir:
        raise SettingsError(
            "`teacher_source: cached` needs it",
            field="teacher_cache_dir",
            expected="a folder written by `movekd-hf cache-teachers`",
        )
    image_processor = processor.image_processor
    all_specs = [anchor_teacher_spec(vlm.config, image_processor.image_mean, image_processor.image_std), *specs]
    settings = teacher_cache_settings(
        vlm.config,
        image_processor,
        specs,
        model_args.teacher_cache_grid,
        data_args.image_aspect,
        # as online teachers would see the images: their own views, or the one square `teacher_image_size` asks for
        teacher_inputs="square" if data_args.teacher_image_size is not None else "views",
        **model_args.cache_compression(),
    )
    distiller = build_distiller(vlm, specs, args)
    try:
        cache = open_cached_teachers(model_args.teacher_cache_dir, all_specs, settings, distiller=distiller)
    except ValueError as error:  # missing, stale or unsuitable: one line naming the option, as other settings
        raise SettingsError(
            str(error),
            field="teacher_cache_dir",
            expected="the cache `movekd-hf cache-teachers --model` wrote for this run",
        ) from error
    # The trainer sees a ready source; what it was cached from goes into train_config.json here.
    return {"teachers": cache, "distiller": distiller, "recorded_teachers": recorded_teachers(distiller, specs)}


def resolve_adapters_from(model_args: MoVEKDModelArguments, args: MoVEKDTrainingArguments) -> None:
    """`adapters_from` unset and the model a local folder holding `distill_adapters.safetensors` (stage 1's
    output): the teacher adapters continue from there. `none`: new adapters."""
    if args.adapters_from == "none":
        args.adapters_from = None
        return
    folder = model_args.model_name_or_path
    if args.adapters_from is None and args.kd_preset != "none" and folder:
        if os.path.isfile(os.path.join(folder, DISTILLER_FILE)):
            args.adapters_from = folder
            logger.info("teacher adapters start from %s (`--adapters_from none` for new ones)",
                        os.path.join(folder, DISTILLER_FILE))  # fmt: skip


def grouped_sampler(data, data_args: MoVEKDDataArguments, args: MoVEKDTrainingArguments):
    """LLaVA's modality-length grouped sampler (megabatches of per-device batch x accumulation x ranks), or None."""
    if not data_args.group_by_modality_length:
        return None
    seed = args.data_seed if args.data_seed is not None else args.seed
    return data.sampler(args.per_device_train_batch_size * args.gradient_accumulation_steps, args.world_size, seed)


def check_eval_data(data_args: MoVEKDDataArguments, args: MoVEKDTrainingArguments) -> None:
    """`eval_strategy` other than `no` needs held-out data; say which options give it."""
    has_eval = bool(data_args.eval_data_path) or data_args.validation_split_percentage is not None
    if args.eval_strategy != "no" and not has_eval:
        raise SettingsError(
            f"`eval_strategy: {args.eval_strategy}` has no held-out data",
            field="eval_data_path",
            expected="`eval_data_path` (a LLaVA json/jsonl) or `validation_split_percentage`, or `eval_strategy: no`",
        )


def build_trainer(argv: list[str], **trainer_kwargs) -> MoVEKDTrainer:
    """The trainer for `argv` (a YAML plus overrides): argv parsed into objects, then `MoVEKDTrainer(...)`.
    `trainer_kwargs` go to the constructor too (the entry's `card_writer`, a caller's `callbacks`)."""
    model_args, data_args, args = parse_args(argv)
    check_eval_data(data_args, args)
    resolve_adapters_from(model_args, args)
    set_seed(args.seed)
    # Built whole on every rank, also under ZeRO-3; the engine partitions it when training starts. Building it
    # partitioned under zero.Init fails later in the tiny build path (IndexError on an empty shard; not chased yet).
    with outside_zero3():
        vlm, processor = load_model(model_args)
    distillation = resolve_teachers(vlm, processor, model_args, data_args, args)
    teachers_record = distillation.pop("recorded_teachers", None)
    resolve_toy_data(data_args, args)
    with args.main_process_first(desc="tokenising"):
        # The held-out split follows the data seed, as the sampler's order does.
        seed = args.data_seed if args.data_seed is not None else args.seed
        data = build_train_data(data_args, processor, seed=seed, teacher_views=distillation.pop("teacher_views", None))
    model_name = model_args.model_name_or_path
    peft_config = None
    if model_args.lora_llm:
        peft_config = llm_lora_config(model_args.lora_llm_rank, model_args.lora_llm_alpha, model_args.lora_llm_dropout)
    return MoVEKDTrainer(
        model=vlm,
        args=args,
        **distillation,
        train_dataset=data.dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.collator,
        processing_class=processor,
        peft_config=peft_config,
        train_sampler=grouped_sampler(data, data_args, args),
        train_config={
            "teacher_set": model_args.teacher_set if args.kd_preset != "none" else None,
            "base_model": model_args.model_name_or_path or f"preset:{model_args.preset}",
            # The card links `base_model` to the Hub only when it is not a local folder.
            "base_model_is_local": bool(model_name and os.path.isdir(model_name)),
            "template": data_args.template,
            **({"teachers": teachers_record} if teachers_record is not None else {}),
        },
        **trainer_kwargs,
    )
