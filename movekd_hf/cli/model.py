"""`movekd-hf init`, `plan` and `demo`: start a checkpoint, size a preset, run the end-to-end demo."""

from __future__ import annotations

import argparse
import json

MOLE_FLAGS = ("num_experts", "lora_rank", "lora_alpha", "mole_routing")


def add_parser(subparsers) -> None:
    init = subparsers.add_parser("init", help="Write an untrained MoVE-KD checkpoint folder.")
    source = init.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="tiny (random weights) or a paper preset with --vision/--llm")
    source.add_argument("--llava", default=None, help="an HF LLaVA checkpoint (id or path) to add MoLE to")
    init.add_argument("--vision", default=None, help="CLIP/SigLIP vision model id or path")
    init.add_argument("--llm", default=None, help="causal LM id or path")
    init.add_argument("--out", required=True, help="output folder")
    init.add_argument("--faithful", action="store_true", help="the authors' MoLE switches (METHOD.md section 6)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--num-experts", dest="num_experts", type=int, default=None)
    init.add_argument("--lora-rank", dest="lora_rank", type=int, default=None)
    init.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None)
    init.add_argument("--mole-routing", dest="mole_routing", choices=("sparse", "dense"), default=None)
    init.set_defaults(func=run_init)

    plan = subparsers.add_parser("plan", help="Parameters per component and per stage, built on the meta device.")
    plan.add_argument("--preset", required=True)
    plan.add_argument("--teachers", default=None, help="teacher set to add (v1.0, v1.1 or tiny)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=run_plan)

    demo = subparsers.add_parser("demo", help="End-to-end run on the CPU (see README).")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true")
    demo.set_defaults(func=run_demo)


def _mole_settings(args: argparse.Namespace) -> dict:
    settings = {name: getattr(args, name) for name in MOLE_FLAGS if getattr(args, name) is not None}
    if args.faithful:
        settings["faithful"] = True
    return settings


def run_init(args: argparse.Namespace) -> int:
    from movekd_hf import models

    settings = _mole_settings(args)
    if args.llava:
        model, processor = models.from_llava(args.llava, **settings)
    elif args.vision or args.llm:
        if not (args.vision and args.llm):
            raise SystemExit("movekd-hf init: --vision and --llm go together.")
        if args.preset:
            preset = models.build_config(args.preset)
            settings = {**{k: getattr(preset, k) for k in ("num_experts", "lora_rank", "lora_alpha")}, **settings}
        model, processor = models.from_vision_and_llm(args.vision, args.llm, **settings)
    elif args.preset:
        model, processor = models.from_preset(args.preset, seed=args.seed, **settings)
    else:
        raise SystemExit("movekd-hf init: give --preset, --llava, or --vision with --llm.")
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
