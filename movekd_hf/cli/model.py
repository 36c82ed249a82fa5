"""`movekd-hf init`, `plan` and `demo`: start a checkpoint, size a preset, run the end-to-end demo."""

from __future__ import annotations

import argparse
import json
import os

MOLE_FLAGS = ("num_experts", "lora_rank", "lora_alpha", "mole_routing")
# `movekd_hf.models.PRESETS` and the keys of `movekd_hf.distill.presets.TEACHER_SETS`, spelled out here because
# importing those modules imports torch, which `--help` must not (tests/test_cli.py checks they agree).
PRESETS = ("tiny", "llava-1.5-7b", "llava-1.5-13b", "mobilellama-1.4b")
PAPER_PRESETS = PRESETS[1:]
TEACHER_SETS = ("v1.0", "v1.1", "tiny")


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
        "preset, an existing LLaVA checkpoint with MoLE added, or a vision encoder plus a causal LM. "
        "Give exactly one of --preset, --llava, or --vision with --llm.",
    )
    source = init.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="tiny (random weights, CPU-sized) or a paper preset, whose weights then come from --vision and --llm",
    )
    source.add_argument("--llava", default=None, help="an HF LLaVA checkpoint (Hub id or folder) to add MoLE to")
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
        help="Parameters per component and per stage, built on the meta device.",
        description="Count the parameters of a preset per component and per training stage, with their bf16 "
        "weight memory; the model is built on the meta device (no memory, no download).",
    )
    plan.add_argument("--preset", required=True, choices=PRESETS, help="the model preset to size")
    plan.add_argument(
        "--teachers",
        default=None,
        choices=TEACHER_SETS,
        help="also count a teacher set (v1.0 and v1.1 are the paper's, tiny the CPU-sized one) and its adapters",
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
    if args.llava and (args.vision or args.llm):
        raise SettingsError("--llava already has a vision tower and an LLM", field="--llava",
                            expected="either --llava or --vision with --llm")  # fmt: skip
    if not (args.preset or args.llava or args.vision):
        raise SettingsError("no model source given", field="--preset",
                            expected="--preset, --llava, or --vision with --llm")  # fmt: skip
    if args.preset in PAPER_PRESETS and not args.vision:
        raise SettingsError(
            f"preset {args.preset!r} starts from pretrained weights",
            field="--preset",
            expected="`--vision openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5` with it (or local "
            "copies), or `--llava llava-hf/llava-1.5-7b-hf` instead",
        )
    for option in ("llava", "vision", "llm"):
        if getattr(args, option):
            model_source(f"--{option}", getattr(args, option))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SettingsError("is a file", file=args.out, field="--out", expected="a folder (new or existing)")


def run_init(args: argparse.Namespace) -> int:
    _check_init_sources(args)  # before torch is imported: a wrong line fails at once
    from movekd_hf import models
    from movekd_hf.cli import loading

    settings = _mole_settings(args)
    if args.llava:
        with loading("--llava", args.llava):
            model, processor = models.from_llava(args.llava, **settings)
    elif args.vision:
        if args.preset:
            preset = models.build_config(args.preset)
            settings = {**{k: getattr(preset, k) for k in ("num_experts", "lora_rank", "lora_alpha")}, **settings}
        from transformers import AutoConfig

        for option, source in (("--vision", args.vision), ("--llm", args.llm)):
            with loading(option, source):  # the config first, so a missing source is named before any weights load
                AutoConfig.from_pretrained(source)
        with loading("--llm", args.llm):  # both configs loaded: what fails now is most likely the LLM's weights
            model, processor = models.from_vision_and_llm(args.vision, args.llm, **settings)
    else:
        model, processor = models.from_preset(args.preset, seed=args.seed, **settings)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    total = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {total:,} parameters")
    return 0


def plan_rows(preset: str, teachers: str | None = None) -> dict:
    """Parameter counts per component, per stage, and bf16 weight memory for a preset (meta device)."""
    import torch

    from movekd_hf.modeling import MoVEKDForConditionalGeneration
    from movekd_hf.modeling.llava_conventions import student_grid
    from movekd_hf.models import build_config
    from movekd_hf.training.stages import STAGES, count_parameters

    config = build_config(preset)
    with torch.device("meta"):
        model = MoVEKDForConditionalGeneration(config)
    components = count_parameters(model)
    if teachers:
        from movekd_hf.distill.plan import teacher_plan_rows

        vision = config.vision_config
        height, width = student_grid(vision)
        rows = teacher_plan_rows(teachers, height * width, vision.hidden_size)
        components["teachers (frozen)"] = sum(count for _, count, trainable in rows if not trainable)
        components["adapters"] = sum(count for _, count, trainable in rows if trainable)
        components.update({f"  {name}": count for name, count, _ in rows})
    stages = {stage: sum(components.get(part, 0) for part in parts) for stage, parts in STAGES.items()}
    return {"preset": preset, "teachers": teachers, "components": components, "stages": stages}


def run_plan(args: argparse.Namespace) -> int:
    from movekd_hf.training.stages import STAGES

    plan = plan_rows(args.preset, args.teachers)
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
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from movekd_hf.demo import run

    return run(args.out, quick=args.quick)
