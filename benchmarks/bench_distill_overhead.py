"""Benchmark 2: what distillation adds to a training step besides the teachers' own forwards, and the cost of
reading the CLS attention row.

Part A (a small MoVE-KD model, `_kd_setup.py`, stage 2, online teachers clip/eva/convnext/sam):
- `plain step`: the same model and trainable set, LM loss only (forward, backward, AdamW).
- `teacher forwards`: the four teachers on the batch's teacher images (preprocessing included).
- `KD step, online teachers`: LM + lambda_kd * KD + lambda_bal * balance, teachers run inside the step.
- `distillation machinery`: adapters + KD loss + balance loss, forward and backward, on fixed tensors.
The machinery's share of the step is reported two ways: measured directly, and as
(KD step - plain step - teacher forwards) / KD step (noisier: a difference of large numbers). Target: <= 5 %.

Part B: the clip teacher's forward with our CLS row (one layer's CLS query against its keys, any attention
backend; run under SDPA and under eager attention) against an eager forward with `output_attentions=True`
(every layer's full attention maps), at CLIP-L widths (577 tokens, fewer layers); the rows are compared too.
The maps `output_attentions` keeps are layers x heads x 577^2 per image: 255 MB in bf16 for CLIP-L's 24 layers.

    .venv/bin/python benchmarks/bench_distill_overhead.py [--quick] [--adapter token_mix|resample]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402
from _kd_setup import (  # noqa: E402
    LAMBDA_BAL,
    LAMBDA_KD,
    SIZES,
    StepParts,
    build_distiller,
    build_movekd,
    build_teachers,
    make_batch,
    online_source,
    optimizer_for,
    student_grid,
    training_step,
)

from movekd_hf.distill.losses import mole_balance_loss  # noqa: E402


def machinery(distiller, teacher_outputs: dict, student: torch.Tensor, router_logits, grid) -> None:
    """Adapters + KD loss + balance loss, forward and backward, on fixed inputs."""
    tokens = student.detach().requires_grad_(True)
    logits = [r.detach().requires_grad_(True) for r in router_logits]
    loss = LAMBDA_KD * distiller(tokens, grid, teacher_outputs)["loss"]
    loss = loss + LAMBDA_BAL * mole_balance_loss(logits)["loss"]
    loss.backward()
    distiller.zero_grad(set_to_none=True)


def part_a(args, sizes: dict) -> dict:
    batch = make_batch(sizes)
    teachers = build_teachers(sizes)
    grid = student_grid(sizes)
    model = build_movekd(sizes)
    distiller = build_distiller(sizes, teachers, batch["teacher_images"], args.adapter)
    kd_parts = StepParts(model, optimizer_for(model, distiller), distiller, online_source(teachers))
    plain_parts = StepParts(model, optimizer_for(model))
    source = online_source(teachers)
    with torch.no_grad():
        outputs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
    fixed = source(batch)
    variants = {
        "plain step": lambda: training_step(plain_parts, batch, grid),
        "teacher forwards": lambda: source(batch),
        "KD step, online teachers": lambda: training_step(kd_parts, batch, grid),
        "distillation machinery": lambda: machinery(
            distiller, fixed, outputs.vision_hidden_states, outputs.router_logits, grid
        ),
    }
    repeats = args.repeats or (2 if args.quick else 12)
    times = interleaved_timings(variants, repeats, args.warmup if args.warmup is not None else 1, args.clock)
    summary = summarise(times, baseline="KD step, online teachers")
    median = {name: stats["median_s"] for name, stats in summary.items()}
    rest = median["KD step, online teachers"] - median["plain step"] - median["teacher forwards"]
    shares = {
        "machinery_share_measured": median["distillation machinery"] / median["KD step, online teachers"],
        "machinery_share_by_difference": rest / median["KD step, online teachers"],
        "teacher_share": median["teacher forwards"] / median["KD step, online teachers"],
    }
    return {"summary": summary, "shares": shares, "repeats": repeats}


def eager_cls_row(model, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    outputs = model(pixel_values=pixel_values, output_attentions=True)
    return outputs.attentions[layer][:, :, 0, 1:].mean(dim=1)  # [B, N]


def part_b(args) -> dict:
    from transformers import CLIPVisionModel

    from movekd_hf.distill import build_teacher
    from movekd_hf.distill.presets import CLIP_L_336, clip_teacher
    from movekd_hf.distill.teachers import BACKENDS, prepare_images

    layers = 2 if args.quick else args.clip_layers
    sizes = dict(CLIP_L_336, num_hidden_layers=layers)
    if args.quick:
        sizes.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=56)
    spec = clip_teacher(sizes, pretrained=False)
    config = spec.config
    torch.manual_seed(0)
    ours = build_teacher(spec)
    eager = CLIPVisionModel._from_config(ours.model.config, attn_implementation="eager").eval()
    eager.load_state_dict(ours.model.state_dict())
    pixels = prepare_images(torch.rand(1, 3, spec.image_size, spec.image_size), spec)
    index = spec.feature_layer % (layers + 1) - 1  # the layer whose output is hidden_states[feature_layer]
    with torch.no_grad():
        row = BACKENDS["transformers"].extract(ours.model, pixels, spec).cls_attention
        difference = float((row - eager_cls_row(eager, pixels, index)).abs().max())

    def run_ours():
        with torch.no_grad():
            BACKENDS["transformers"].extract(ours.model, pixels, spec)

    def run_ours_eager():
        with torch.no_grad():
            BACKENDS["transformers"].extract(eager, pixels, spec)

    def run_eager():
        with torch.no_grad():
            model_out = eager(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
            model_out.attentions[index][:, :, 0, 1:].mean(dim=1)

    variants = {
        "clip teacher, our CLS row (sdpa)": run_ours,
        "clip teacher, our CLS row (eager)": run_ours_eager,
        "clip teacher, eager output_attentions": run_eager,
    }
    repeats = args.repeats or (2 if args.quick else 12)
    times = interleaved_timings(variants, repeats, args.warmup if args.warmup is not None else 1, args.clock)
    summary = summarise(times, baseline="clip teacher, eager output_attentions")
    tokens = (spec.image_size // config["patch_size"]) ** 2 + 1
    return {
        "summary": summary,
        "max_abs_difference": difference,
        "layers": layers,
        "hidden_size": config["hidden_size"],
        "tokens": tokens,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="token_mix", choices=("token_mix", "resample"))
    parser.add_argument("--clip-layers", type=int, default=4, help="CLIP-L layers for part B")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "small"]
    a = part_a(args, sizes)
    print(
        f"Distillation overhead per step ({'quick' if args.quick else 'small'} sizes, adapter {args.adapter}, "
        f"{args.threads} thread(s), {args.clock} clock, {a['repeats']} interleaved rounds)"
    )
    print(format_table(timing_rows(a["summary"]), ["variant", "median ms", "IQR ms", "ratio"]))
    shares = a["shares"]
    print(
        f"machinery share of the KD step: measured {shares['machinery_share_measured']:.1%}, "
        f"by difference {shares['machinery_share_by_difference']:.1%} (target <= 5 %); "
        f"teachers {shares['teacher_share']:.1%}"
    )
    b = part_b(args)
    print(
        f"\nCLS attention row: hidden {b['hidden_size']}, {b['layers']} layers, {b['tokens']} tokens "
        f"({b['repeats']} interleaved rounds)"
    )
    print(format_table(timing_rows(b["summary"]), ["variant", "median ms", "IQR ms", "ratio"]))
    print(f"max |our row - eager row| = {b['max_abs_difference']:.2e}")
    path = write_result(
        "distill_overhead",
        {"settings": {"sizes": sizes, "adapter": args.adapter, "threads": args.threads, "clock": args.clock},
         "step": a, "cls_attention": b},
        args.out,
        args.quick,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
