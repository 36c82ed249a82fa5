"""The training entry: `accelerate launch -m movekd_hf.train CONFIG.yaml [--key value ...]` (or `movekd-hf train`).

One process or many (DDP, DeepSpeed ZeRO-2/3) run the same code; accelerate's launcher decides which. The steps:
arguments -> model and processor -> teachers and distiller (built from the model's untouched tower) -> stage
(what trains; optional LoRA on the LLM) -> data -> `MoVEKDTrainer` -> train (or resume) -> final save / push.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import torch
import transformers
from transformers import set_seed

from ..distill.distiller import MoVEKDDistiller
from ..distill.losses import KDLossConfig
from .arguments import MoVEKDModelArguments, MoVEKDTrainingArguments, parse_args
from .callbacks import RunReportCallback, sigkill_from_env
from .checkpoint import DISTILLER_FILE
from .data_args import MoVEKDDataArguments, build_train_data
from .stages import COMPONENTS, apply_stage, component_of
from .teacher_source import (
    OnlineTeachers,
    build_teachers,
    clip_teacher_spec,
    outside_zero3,
    run_teacher_specs,
    teacher_cache_settings,
    teacher_shapes,
    teacher_view_size,
)
from .trainer import MoVEKDTrainer, MoVEKDTrainingModule

logger = logging.getLogger("movekd_hf.train")

# peft targets: the LLM's linear layers only (MoLE, projector and adapters train in full).
LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_PEFT_LORA_PARAM = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")


def training_dtype(args: MoVEKDTrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_model(model_args: MoVEKDModelArguments):
    """(MoVE-KD VLM, processor) from a checkpoint folder / Hub id or from a preset."""
    from ..builders import from_preset
    from ..modeling import MoVEKDForConditionalGeneration, MoVEKDProcessor

    if model_args.preset is not None:
        vlm, processor = from_preset(model_args.preset, seed=model_args.seed_model)
    else:
        kwargs = {}
        if model_args.qlora:
            kwargs["quantization_config"] = qlora_config()
        vlm = MoVEKDForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **kwargs)
        processor = MoVEKDProcessor.from_pretrained(model_args.model_name_or_path)
    return vlm.train(), processor


def qlora_config():
    """4-bit NF4 for the LLM; vision tower, projector and head stay in full precision (they train or distil)."""
    if not torch.cuda.is_available():
        raise ValueError("`qlora: true` needs a CUDA GPU (bitsandbytes 4-bit kernels); use `lora_llm` alone on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError("`qlora: true` needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )


def apply_training_stage(vlm, model_args: MoVEKDModelArguments, args: MoVEKDTrainingArguments):
    """Freeze all but the stage's components (METHOD.md section 5); with `lora_llm` the LLM trains through peft
    LoRA instead. Returns (module to train, trainable parameters per component)."""
    counts = apply_stage(vlm, model_args.stage)
    if not model_args.lora_llm:
        return vlm, counts
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.qlora:
        vlm = prepare_model_for_kbit_training(vlm, use_gradient_checkpointing=args.gradient_checkpointing)
    config = LoraConfig(
        r=model_args.lora_llm_rank,
        lora_alpha=model_args.lora_llm_alpha,
        lora_dropout=model_args.lora_llm_dropout,
        target_modules=LLM_LORA_TARGETS,
        bias="none",
    )
    vlm = get_peft_model(vlm, config)
    # peft freezes everything but its own LoRA: give MoLE and the projector back their gradients.
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in vlm.named_parameters():
        component = component_of(name.removeprefix("base_model.model."))
        trains = bool(_PEFT_LORA_PARAM.search(name)) or component in ("mole", "projector")
        param.requires_grad_(trains)
        counts[component] += param.numel() if trains else 0
    return vlm, counts


def resolve_toy_data(data_args: MoVEKDDataArguments, args: MoVEKDTrainingArguments) -> None:
    """`data_path: toy:pretrain[:N]` / `toy:finetune[:N]`: generate the package's toy data set and point at it."""
    if not data_args.data_path.startswith("toy:"):
        return
    from .toy_data import make_toy_llava_dataset

    _, kind, *count = data_args.data_path.split(":")
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"`data_path` {data_args.data_path!r}: use toy:pretrain[:N] or toy:finetune[:N]")
    num_samples = int(count[0]) if count else 32
    folder = os.path.join(args.output_dir, "_toy_data", f"n{num_samples}")  # `_*` is never uploaded
    with args.main_process_first(desc="toy data"):
        # Written once (JSON files last): other ranks, and resumed runs, must not rewrite images being read.
        if not os.path.isfile(os.path.join(folder, "finetune.json")):
            make_toy_llava_dataset(folder, num_samples=num_samples, seed=0)
    data_args.data_path = os.path.join(folder, f"{kind}.json")
    data_args.image_folder = os.path.join(folder, "images")


def build_distillation(vlm, processor, model_args, data_args, args, teacher_specs=None, adapters_from=None):
    """(teacher source or None, MoVEKDDistiller or None, teacher slugs) for the run's teacher set and KD preset.

    teacher_specs: non-clip teachers to use instead of `model_args.teacher_set` (e.g. teachers pretrained by the
    caller). adapters_from: a checkpoint folder whose `distill_adapters.safetensors` the adapters start from (stage 2
    carrying on from stage 1).
    """
    if model_args.kd_preset == "none":
        return None, None, []
    specs = teacher_specs
    if specs is None:
        specs = run_teacher_specs(model_args.teacher_set, model_args.teacher_pretrained, model_args.checkpoint_map())
    image_processor = processor.image_processor
    online = model_args.teacher_source == "online"
    if online:
        teachers = build_teachers(vlm, specs, image_processor.image_mean, image_processor.image_std)
    shapes = teacher_shapes(vlm, specs)
    vision = vlm.config.vision_config
    num_tokens = (vision.image_size // vision.patch_size) ** 2
    torch.manual_seed(args.seed)  # adapters start the same whether teachers were built here or read from a cache
    distiller = MoVEKDDistiller(shapes, vision.hidden_size, num_tokens, KDLossConfig.from_preset(model_args.kd_preset))
    if adapters_from is not None:
        load_adapters(distiller, adapters_from)
    if not online:
        return cached_teachers(vlm, image_processor, specs, model_args, data_args, distiller), distiller, list(shapes)
    if data_args.teacher_image_size is None:  # one raw view, large enough for the largest teacher input
        data_args.teacher_image_size = teacher_view_size(vlm.config, specs)
    source = OnlineTeachers(teachers).to(args.device, training_dtype(args))
    return source, distiller, list(teachers)


def cached_teachers(vlm, image_processor, specs, model_args, data_args, distiller):
    """Teacher outputs read from `movekd-hf cache-teachers` output instead of running the teachers; the cache
    must have been written for this student, teacher set and data view (checked through its key)."""
    from ..distill.cache import CachedTeachers

    if not model_args.teacher_cache_dir:
        raise ValueError("`teacher_source: cached` needs `teacher_cache_dir` (written by `movekd-hf cache-teachers`)")
    all_specs = [clip_teacher_spec(vlm.config, image_processor.image_mean, image_processor.image_std), *specs]
    settings = teacher_cache_settings(
        vlm.config, image_processor, specs, model_args.teacher_cache_grid, data_args.image_aspect
    )
    return CachedTeachers(model_args.teacher_cache_dir, all_specs, settings, distiller=distiller)


def run_config(model_args, data_args, args, teacher_names, counts) -> dict[str, Any]:
    """train_config.json: the MoVE-KD settings of the run (read by the model card)."""
    return {
        "teacher_set": model_args.teacher_set if teacher_names else None,
        "teachers": teacher_names,
        "kd_preset": model_args.kd_preset,
        "stage": model_args.stage,
        "lambda_kd": args.lambda_kd,
        "lambda_bal": args.lambda_bal,
        "lora_llm": model_args.lora_llm,
        "qlora": model_args.qlora,
        "base_model": model_args.model_name_or_path or f"preset:{model_args.preset}",
        "template": data_args.template,
        "trainable_parameters": counts,
    }


def grouped_sampler(data, data_args: MoVEKDDataArguments, args: MoVEKDTrainingArguments):
    """LLaVA's modality-length grouped sampler (megabatches of per-device batch x accumulation x ranks), or None."""
    if not data_args.group_by_modality_length:
        return None
    seed = args.data_seed if args.data_seed is not None else args.seed
    return data.sampler(args.per_device_train_batch_size * args.gradient_accumulation_steps, args.world_size, seed)


def load_adapters(distiller: MoVEKDDistiller, folder: str) -> None:
    """Start the adapters (and standardisers) from a checkpoint's `distill_adapters.safetensors`."""
    from safetensors.torch import load_file

    path = os.path.join(folder, DISTILLER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"adapters_from={folder!r}: no {DISTILLER_FILE} there (a run without distillation?)")
    distiller.load_state_dict(load_file(path))


def build_trainer(argv: list[str], teacher_specs=None, adapters_from: str | None = None) -> MoVEKDTrainer:
    """The trainer `movekd-hf train` / `accelerate launch -m movekd_hf.train` runs for `argv` (a YAML plus
    overrides); `teacher_specs` and `adapters_from` as in `build_distillation`."""
    model_args, data_args, args = parse_args(argv)
    if args.fp16 and args.device.type == "cpu":
        logger.warning(
            "fp16 on the CPU: accelerate autocasts only bf16 there (fp16 gets no autocast and no loss scaling), so "
            "the model trains in float32 and only the teachers run in float16; use `bf16: true` for mixed precision"
        )
    set_seed(args.seed)
    # Built whole on every rank, also under ZeRO-3; the engine partitions it when training starts. Building it
    # partitioned under zero.Init fails later in the tiny build path (IndexError on an empty shard; not chased yet).
    with outside_zero3():
        vlm, processor = load_model(model_args)
    # Teachers copy the tower before anything changes it; their random (tiny) weights follow the seed on every rank.
    torch.manual_seed(args.seed)
    source, distiller, teacher_names = build_distillation(
        vlm, processor, model_args, data_args, args, teacher_specs, adapters_from
    )
    vlm, counts = apply_training_stage(vlm, model_args, args)
    if distiller is not None:
        counts["adapters"] = sum(p.numel() for p in distiller.parameters())
    logger.info("stage %s trains %s parameters per component", model_args.stage, counts)
    resolve_toy_data(data_args, args)
    with args.main_process_first(desc="tokenising"):
        data = build_train_data(data_args, processor)
    trainer = MoVEKDTrainer(
        model=MoVEKDTrainingModule(vlm, distiller),
        args=args,
        teacher_source=source,
        trainable_counts=counts,
        train_config=run_config(model_args, data_args, args, teacher_names, counts),
        train_dataset=data.dataset,
        data_collator=data.collator,
        processing_class=processor,
        train_sampler=grouped_sampler(data, data_args, args),
    )
    if args.run_report:
        trainer.add_callback(RunReportCallback(args.run_report, trainer))
    killer = sigkill_from_env()
    if killer is not None:
        trainer.add_callback(killer)
    return trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    trainer = build_trainer(argv)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.args.push_to_hub:
        trainer.push_to_hub()
    return 0
