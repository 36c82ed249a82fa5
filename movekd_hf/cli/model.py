"""`movekd-hf init`, `plan` and `demo`: start a checkpoint, size a preset, run the end-to-end demo."""

from __future__ import annotations

import argparse
import json
import os

MOLE_FLAGS = ("num_experts", "lora_rank", "lora_alpha", "mole_routing")
# `movekd_hf.models.PRESETS` and the keys of `movekd_hf.distill.presets.TEACHER_SETS`, spelled out here because
# importing those modules imports torch, which `--help` must not (tests/test_cli.py checks they agree).
PRESETS = ("tiny", "llava-1.5-7b", "llava-1.5-13b", "mobilellama-1.4b", "onevision-qwen2-0.5b", "onevision-qwen2-7b")
# LLaVA-OneVision presets (models.ONEVISION_PRESETS) -> the llava-hf checkpoint `init --onevision` starts from.
ONEVISION_PRESETS = {
    "onevision-qwen2-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "onevision-qwen2-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}
PAPER_PRESETS = tuple(name for name in PRESETS[1:] if name not in ONEVISION_PRESETS)
# Vision-tower tiles `plan` counts per LLaVA-OneVision image: the base view plus a 3x3 grid (a 1152 px square image at
# 384 px tiles). The tower sees every tile; `anyres_max_9` only shrinks the features the LLM gets afterwards.
ONEVISION_PLAN_TILES = 10
TEACHER_SETS = ("v1.0", "v1.1", "tiny", "modern", "tiny-modern", "modern-2", "tiny-modern-2")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (0 < value < float("inf")):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def add_parser(subparsers) -> None:
    init = subparsers.add_parser(
        "init",
        help="Write an untrained MoVE-KD checkpoint folder.",
        description="Write an untrained MoVE-KD checkpoint (weights, config, processor) to --out: the tiny random "
        "preset, an existing LLaVA or LLaVA-OneVision checkpoint with MoLE added, or a vision encoder plus a causal "
        "LM. Give exactly one of --preset, --llava, --onevision, or --vision with --llm.",
    )
    source = init.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="tiny (random weights, CPU-sized) or a paper preset, whose weights then come from --vision and --llm",
    )
    source.add_argument("--llava", default=None, help="an HF LLaVA checkpoint (Hub id or folder) to add MoLE to")
    source.add_argument(
        "--onevision",
        default=None,
        help="an HF LLaVA-OneVision checkpoint (Hub id or folder, e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf) to "
        "add MoLE to; every weight, the AnyRes settings and the processor are kept",
    )
    init.add_argument("--vision", default=None, help="CLIP/SigLIP vision model (Hub id or folder); needs --llm")
    init.add_argument("--llm", default=None, help="causal LM (Hub id or folder); needs --vision")
    init.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    init.add_argument("--faithful", action="store_true", help="the authors' MoLE switches (METHOD.md section 6)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (tiny preset; default 0)")
    init.add_argument(
        "--num-experts", dest="num_experts", type=positive_int, default=None, help="LoRA experts per MLP (paper: 3)"
    )
    init.add_argument(
        "--lora-rank", dest="lora_rank", type=positive_int, default=None, help="rank of each LoRA expert (paper: 32)"
    )
    init.add_argument(
        "--lora-alpha",
        dest="lora_alpha",
        type=positive_float,
        default=None,
        help="LoRA scaling numerator: experts are scaled by alpha / rank (default 1.0)",
    )
    init.add_argument(
        "--mole-routing",
        dest="mole_routing",
        choices=("sparse", "dense"),
        default=None,
        help="sparse: the top-1 expert per token (paper); dense: all experts weighted by the router",
    )
    init.set_defaults(func=run_init)

    plan = subparsers.add_parser(
        "plan",
        help="Parameters per component and stage, and whether a stage fits a GPU, built on the meta device.",
        description="Count the parameters of a preset per component and per training stage, with their bf16 "
        "weight memory, and estimate each stage's memory per GPU under DDP, ZeRO-2 and ZeRO-3 (weights, "
        "gradients, AdamW states, activations, frozen teachers) against --gpu-memory; the model is built on the "
        "meta device (no memory, no download).",
    )
    plan.add_argument("--preset", required=True, choices=PRESETS, help="the model preset to size")
    plan.add_argument(
        "--teachers",
        default=None,
        choices=TEACHER_SETS,
        help="also count a teacher set (v1.0 and v1.1 are the paper's, tiny the CPU-sized one) and its adapters, "
        "with each teacher's tokens x channels, input size, parameters and forward FLOPs per image",
    )
    plan.add_argument("--gpus", type=positive_int, default=8, help="GPUs the run shares (default 8, the paper's)")
    plan.add_argument(
        "--gpu-memory",
        dest="gpu_memory",
        type=positive_float,
        default=80.0,
        help="memory of one GPU in GiB (default 80, the paper's A100-80G)",
    )
    plan.add_argument(
        "--batch-size",
        dest="batch_size",
        type=positive_int,
        default=None,
        help="samples per GPU in both stages (default: the paper's, 16 in stage 1 and 8 in stage 2)",
    )
    plan.add_argument(
        "--max-length", dest="max_length", type=positive_int, default=2048, help="tokens per sample (default 2048)"
    )
    plan.add_argument(
        "--lora-llm", dest="lora_llm", action="store_true", help="stage 2 trains LoRA on the LLM (the `lora_llm` run)"
    )
    plan.add_argument(
        "--lora-llm-rank",
        dest="lora_llm_rank",
        type=positive_int,
        default=128,
        help="rank of that LoRA (default 128, LLaVA-1.5's recipe)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=run_plan)

    demo = subparsers.add_parser(
        "demo",
        help="End-to-end run on the CPU (see README).",
        description="The end-to-end demo on the CPU: tiny model, toy data, both training stages, evaluation and "
        "model card (see README).",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    demo.set_defaults(func=run_demo)


def _mole_settings(args: argparse.Namespace) -> dict:
    settings = {name: getattr(args, name) for name in MOLE_FLAGS if getattr(args, name) is not None}
    if args.faithful:
        settings["faithful"] = True
    return settings


def _check_init_sources(args: argparse.Namespace) -> None:
    """Refuse a wrong combination of sources, or a source that cannot exist, before any model is loaded."""
    from movekd_hf.cli import model_source
    from movekd_hf.errors import SettingsError

    if (args.vision or args.llm) and not (args.vision and args.llm):
        given, missing = ("--vision", "--llm") if args.vision else ("--llm", "--vision")
        raise SettingsError(f"{given} needs {missing} too", field=given, expected="--vision and --llm together")
    onevision = getattr(args, "onevision", None)
    for option, value in (("--llava", args.llava), ("--onevision", onevision)):
        if value and (args.vision or args.llm):
            raise SettingsError(f"{option} already has a vision tower and an LLM", field=option,
                                expected=f"either {option} or --vision with --llm")  # fmt: skip
    if not (args.preset or args.llava or onevision or args.vision):
        raise SettingsError("no model source given", field="--preset",
                            expected="--preset, --llava, --onevision, or --vision with --llm")  # fmt: skip
    if args.preset in ONEVISION_PRESETS:
        raise SettingsError(
            f"preset {args.preset!r} starts from a pretrained LLaVA-OneVision",
            field="--preset",
            expected=f"`--onevision {ONEVISION_PRESETS[args.preset]}` (or a local copy) instead",
        )
    if args.preset in PAPER_PRESETS and not args.vision:
        raise SettingsError(
            f"preset {args.preset!r} starts from pretrained weights",
            field="--preset",
            expected="`--vision openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5` with it (or local "
            "copies), or `--llava llava-hf/llava-1.5-7b-hf` instead",
        )
    for option in ("llava", "onevision", "vision", "llm"):
        if getattr(args, option, None):
            model_source(f"--{option}", getattr(args, option))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SettingsError("is a file", file=args.out, field="--out", expected="a folder (new or existing)")


def _check_onevision(source: str) -> None:
    """Raise `SettingsError` unless `source`'s config is a LLaVA-OneVision one."""
    from transformers import AutoConfig

    from movekd_hf.errors import SettingsError

    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in ("llava_onevision", "movekd_llava_onevision"):
        hint = "; for 'llava' use --llava" if model_type in ("llava", "movekd_llava") else ""
        raise SettingsError(f"{source} is a {model_type!r} checkpoint, not LLaVA-OneVision", field="--onevision",
                            expected=f"a checkpoint with model_type 'llava_onevision'{hint}")  # fmt: skip


def run_init(args: argparse.Namespace) -> int:
    _check_init_sources(args)  # before torch is imported: a wrong line fails at once
    from movekd_hf import models
    from movekd_hf.cli import loading

    settings = _mole_settings(args)
    if args.llava:
        with loading("--llava", args.llava):
            model, processor = models.from_llava(args.llava, **settings)
    elif getattr(args, "onevision", None):
        with loading("--onevision", args.onevision):
            _check_onevision(args.onevision)  # the config first: a LLaVA of another kind is named before any weights
            model, processor = models.from_onevision(args.onevision, **settings)
    elif args.vision:
        if args.preset:
            preset = models.build_config(args.preset)
            settings = {**{k: getattr(preset, k) for k in ("num_experts", "lora_rank", "lora_alpha")}, **settings}
        from transformers import AutoConfig

        from movekd_hf.distill.anchor import check_student_tower
        from movekd_hf.modeling.llava_conventions import tower_cls_tokens

        for option, source in (("--vision", args.vision), ("--llm", args.llm)):
            with loading(option, source):  # the config first, so a missing source is named before any weights load
                config = AutoConfig.from_pretrained(source)
                if option == "--vision":  # a tower the package cannot use is named as --vision, not --llm
                    check_student_tower(getattr(config, "vision_config", config), field="--vision", file=source)
                    tower_cls_tokens(getattr(config, "vision_config", config))
        with loading("--llm", args.llm):  # both configs loaded: what fails now is most likely the LLM's weights
            model, processor = models.from_vision_and_llm(args.vision, args.llm, **settings)
    else:
        model, processor = models.from_preset(args.preset, seed=args.seed, **settings)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {total:,} parameters")
    return 0


def plan_rows(
    preset: str,
    teachers: str | None = None,
    gpus: int = 8,
    gpu_memory: float = 80.0,
    batch_size: int | None = None,
    max_length: int = 2048,
    lora_llm_rank: int | None = None,
) -> dict:
    """Parameter counts per component and per stage, bf16 weight memory, each teacher's profile and each stage's
    memory per GPU (movekd_hf/distill/memory.py) for a preset, all on the meta device.

    lora_llm_rank: stage 2 trains LoRA of this rank on the LLM (None: the LLM trains in full).
    """
    import torch

    from movekd_hf.distill.memory import memory_plan
    from movekd_hf.modeling.llava_conventions import student_grid, tower_cls_tokens
    from movekd_hf.models import build_config, model_class
    from movekd_hf.training.stages import STAGES, count_parameters

    config = build_config(preset)
    with torch.device("meta"):
        model = model_class(config)(config)
    components = count_parameters(model)
    parts = dict(components)
    vision, text = config.vision_config, config.text_config
    height, width = student_grid(vision)
    # The tower runs once per AnyRes tile: a LLaVA-OneVision image counts as ONEVISION_PLAN_TILES tiles.
    tiles = ONEVISION_PLAN_TILES if preset in ONEVISION_PRESETS else 1
    profiles = None
    if teachers:
        from movekd_hf.distill.plan import student_anchor_spec, teacher_plan_rows, teacher_profiles

        # The anchor is the student's own tower: CLIP-L/336 as the paper's presets say, else sized from the tower.
        anchor_spec = None if vision.model_type == "clip_vision_model" else student_anchor_spec(config)
        rows = teacher_plan_rows(teachers, height * width, vision.hidden_size, anchor_spec=anchor_spec)
        components["teachers (frozen)"] = sum(count for _, count, trainable in rows if not trainable)
        components["adapters"] = parts["adapters"] = sum(count for _, count, trainable in rows if trainable)
        components.update({f"  {name}": count for name, count, _ in rows})
        profiles = teacher_profiles(teachers, anchor_spec=anchor_spec)
    stages = {stage: sum(components.get(part, 0) for part in trained) for stage, trained in STAGES.items()}
    memory = memory_plan(
        parts,
        STAGES,
        llm=dict(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                 vocab=text.vocab_size),
        vision=dict(hidden=vision.hidden_size, intermediate=vision.intermediate_size,
                    layers=vision.num_hidden_layers, tokens=tiles * (height * width + tower_cls_tokens(vision))),
        teachers=profiles,
        num_gpus=gpus,
        gpu_memory_gib=gpu_memory,
        batch=dict.fromkeys(STAGES, batch_size) if batch_size else None,
        max_length=max_length,
        llm_lora=_llm_lora_parameters(model, lora_llm_rank) if lora_llm_rank else None,
    )  # fmt: skip
    settings = {"gpus": gpus, "gpu_memory_gib": gpu_memory, "lora_llm_rank": lora_llm_rank}
    return {"preset": preset, "teachers": teachers, "components": components, "stages": stages,
            "teacher_profiles": profiles, "tiles_per_image": tiles, "memory": {"settings": settings, **memory}}  # fmt: skip


def _llm_lora_parameters(model, rank: int) -> int:
    """Parameters of peft LoRA of `rank` on the LLM's linears the trainer targets: rank x (in + out) each."""
    import re

    from torch import nn

    from movekd_hf.training.module import LLM_LORA_TARGETS

    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(LLM_LORA_TARGETS, name)
    )


def run_plan(args: argparse.Namespace) -> int:
    from movekd_hf.training.stages import STAGES

    rank = args.lora_llm_rank if args.lora_llm else None
    plan = plan_rows(args.preset, args.teachers, args.gpus, args.gpu_memory, args.batch_size, args.max_length, rank)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    width = max(len(name) for name in plan["components"]) + 2
    print(f"{'component':<{width}}{'parameters':>16}{'bf16 weights':>16}")
    for name, count in plan["components"].items():
        print(f"{name:<{width}}{count:>16,}{count * 2 / 2**30:>12.2f} GiB")
    print()
    for stage, count in plan["stages"].items():
        print(f"{stage}: trains {', '.join(STAGES[stage])} = {count:,} parameters")
    if plan["teacher_profiles"]:
        _print_teachers(plan["teacher_profiles"])
    _print_memory(plan["memory"], STAGES, args.lora_llm)
    if plan["tiles_per_image"] > 1:
        print(f"vision tower: {plan['tiles_per_image']} AnyRes tiles per image (the base view and a 3x3 grid)")
    return 0


def _print_teachers(profiles: dict) -> None:
    print("\nteacher     input     tokens x channels    parameters  forward per image  activations per image")
    for slug, p in profiles.items():
        shape = f"{p['tokens']} x {p['channels']}"
        print(f"{slug:<10}{p['image_size_px']:>7} px{shape:>19}{p['parameters']:>14,}"
              f"{p['forward_flops'] / 1e9:>12.2f} GFLOPs{p['activation_peak_bytes'] / 2**30:>18.2f} GiB")  # fmt: skip


_MEMORY_ROWS = (
    ("weights_bf16_gib", "weights, bf16 (trained + frozen)"),
    ("master_weights_fp32_gib", "master weights, fp32 (trained)"),
    ("gradients_fp32_gib", "gradients, fp32 (trained)"),
    ("adamw_states_fp32_gib", "AdamW states, 2 x fp32 (trained)"),
    ("teacher_weights_bf16_gib", "teachers' weights, bf16 (every rank)"),
    ("teacher_activations_gib", "teachers running (no grad)"),
    ("teacher_outputs_gib", "teachers' outputs kept for the loss"),
    ("activations_checkpointing_gib", "activations, checkpointing"),
    ("activations_no_checkpointing_gib", "activations, no checkpointing"),
    ("total_checkpointing_gib", "total, checkpointing"),
    ("total_no_checkpointing_gib", "total, no checkpointing"),
)


def _print_memory(memory: dict, stages: dict, lora_llm: bool) -> None:
    from movekd_hf.distill.memory import STRATEGIES, STRATEGY_NAMES

    settings = memory["settings"]
    gpus, limit = settings["gpus"], settings["gpu_memory_gib"]
    for stage, trained in stages.items():
        entry = memory[stage]
        what = ", ".join(("llm (LoRA)" if part == "llm" and lora_llm else part) for part in trained)
        print(f"\n{stage} memory per GPU, {gpus} GPUs: trains {what} ({entry['trainable_parameters']:,} parameters); "
              f"{entry['batch_per_gpu_samples']} samples x {entry['max_length_tokens']} tokens per GPU, bf16 + AdamW")  # fmt: skip
        print(f"{'':<40}" + "".join(f"{STRATEGY_NAMES[s]:>14}" for s in STRATEGIES))
        for key, label in _MEMORY_ROWS:
            print(f"{label:<40}" + "".join(f"{entry[s][key]:>10.2f} GiB" for s in STRATEGIES))
        for suffix in ("checkpointing", "no_checkpointing"):
            label = f"fits {limit:g} GiB, {suffix.replace('_', ' ')}"
            print(f"{label:<40}" + "".join(f"{'yes' if entry[s]['fits_' + suffix] else 'no':>14}" for s in STRATEGIES))
    print(
        "\nactivations: LLM layers x b x s x h x 2 B x (8 + 4 i/h) + logits b x s x vocab x 6 B + vision tower layers x "
        "b x tokens x h x 2 B x (8 + 2 i/h); checkpointing keeps each layer's input plus one layer. total = weights, "
        "gradients and AdamW states + teachers' weights + max(teachers running, activations + teachers' outputs); "
        "CUDA context and fragmentation not included (movekd_hf/distill/memory.py)."
    )


def run_demo(args: argparse.Namespace) -> int:
    from movekd_hf.demo import run

    return run(args.out, quick=args.quick)
