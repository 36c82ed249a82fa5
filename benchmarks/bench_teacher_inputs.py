"""Benchmark 3: preparing one batch of images for every teacher of a set (v1.1: clip 336, eva, convnext 1024 with CLIP
normalisation, sam 1024 padded with ImageNet normalisation).

- `teacher views (ours)`: what the collator does in the loader workers since issue 18.3: each teacher's own uint8
  view at its size (`teacher_views.make_views`: torchvision's antialiased uint8 resize, once per image and distinct
  geometry, so eva and convnext share one). `+ normalise on CPU` adds what `Teacher.forward` then does on the device
  (`prepare_view`: cast, normalise, pad), here on the CPU: the same output as the processors.
- `old path: 1024 px float (ours before)`: the collator turns the squares into one [B, 3, S, S] tensor in [0, 1] at
  the largest size (`images_to_unit_tensor`), then each teacher resizes, crops/pads and normalises it
  (`prepare_images`); still what `teacher_image_size` and the feature-cache writer use.
- `HF image processors`: each teacher's own transformers image processor (CLIPImageProcessor, SamImageProcessor:
  torchvision-backed in transformers 5) over the list of PIL images, once per teacher.
- `HF PIL image processors`: the per-image PIL/NumPy processors (CLIPImageProcessorPil, SamImageProcessorPil).

All start from the same square PIL images (the collator's `pad` view) and produce every teacher's pixel_values.
`pixels` in the result: per teacher, the largest and mean difference to the HF processors' output, in 8-bit steps.

    .venv/bin/python benchmarks/bench_teacher_inputs.py [--quick] [--batch 8] [--mixed]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402

from movekd_hf.distill.presets import teacher_specs  # noqa: E402
from movekd_hf.distill.teacher_views import make_views, view_settings  # noqa: E402
from movekd_hf.distill.teachers import prepare_images, prepare_view  # noqa: E402
from movekd_hf.modeling.llava_conventions import (  # noqa: E402
    CLIP_MEAN_COLOUR,
    expand_to_square,
    images_to_unit_tensor,
)


def square_photos(batch: int, side: int, mixed: bool = False):
    """Real photos (scikit-image), padded to squares and scaled to `side` (LLaVA images are ~500 px); `mixed`: to
    sides spread over 0.75-1.25 x `side`, as a real batch's images differ (processors cannot stack them then)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = [expand_to_square(Image.fromarray(photos[i % len(photos)]), CLIP_MEAN_COLOUR) for i in range(batch)]
    sides = [int(side * (0.75 + 0.5 * i / max(batch - 1, 1))) if mixed else side for i in range(batch)]
    return [image.resize((s, s)) for image, s in zip(images, sides)]


def hf_processor(spec, pil: bool):
    import transformers
    from transformers.image_utils import PILImageResampling

    family = "Sam" if spec.resize_mode == "pad" else "CLIP"
    cls = getattr(transformers, f"{family}ImageProcessor{'Pil' if pil else ''}")
    resample = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}[spec.interpolation]
    common = dict(image_mean=list(spec.mean), image_std=list(spec.std), resample=resample)
    if family == "Sam":
        return cls(
            size={"longest_edge": spec.image_size},
            pad_size={"height": spec.image_size, "width": spec.image_size},
            **common,
        )
    return cls(
        size={"shortest_edge": spec.resize_size or spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        **common,
    )


def pixel_agreement(specs, outputs: dict[str, list[torch.Tensor]], reference: str) -> dict[str, dict[str, float]]:
    """Per variant and teacher: max and mean |difference| to `reference`'s output, in 8-bit steps of the image."""
    table = {}
    for name, tensors in outputs.items():
        for spec, ours, theirs in zip(specs, tensors, outputs[reference], strict=True):
            step = (ours - theirs).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255
            table.setdefault(name, {})[spec.slug] = {"max": step.max().item(), "mean": step.mean().item()}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher-set", default="v1.1")
    parser.add_argument("--mixed", action="store_true", help="squares of different sides (0.75-1.25 x 512 px)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = teacher_specs(args.teacher_set, pretrained=False)
    scale = 8 if args.quick else 1  # quick: every size / 8
    specs = [replace(spec, image_size=spec.image_size // scale) for spec in specs]
    teacher_size = max(spec.image_size for spec in specs)
    batch = 2 if args.quick else args.batch
    images = square_photos(batch, 512 // scale, args.mixed)
    processors = {pil: [hf_processor(spec, pil) for spec in specs] for pil in (False, True)}
    settings = view_settings(specs)

    def views():
        return make_views(images, settings)  # ({slug: uint8 [B, 3, S_t, S_t]}, {"sam": [B, 2]})

    def views_normalised():
        pixels, sizes = views()
        return [prepare_view(pixels[spec.slug], spec, sizes.get(spec.slug)) for spec in specs]

    def old():
        unit = images_to_unit_tensor(images, teacher_size)  # [B, 3, S, S]
        return [prepare_images(unit, spec) for spec in specs]

    def hf(pil: bool):
        return lambda: [p(images=images, return_tensors="pt")["pixel_values"] for p in processors[pil]]

    variants = {
        "HF image processors": hf(False),
        "teacher views (ours, uint8, worker side)": views,
        "teacher views + normalise on CPU (ours)": views_normalised,
        "old path: 1024 px float (ours before)": old,
        "HF PIL image processors": hf(True),
    }
    repeats = args.repeats or (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else 1
    times = interleaved_timings(variants, repeats, warmup, args.clock)
    summary = summarise(times, baseline="HF image processors")
    outputs = {"teacher views": views_normalised(), "old path": old(), "HF PIL": hf(True)(), "HF": hf(False)()}
    pixels = pixel_agreement(specs, outputs, reference="HF")
    shapes = [tuple(x.shape) for x in outputs["teacher views"]]
    print(
        f"Teacher input preparation, {args.teacher_set} ({', '.join(s.slug for s in specs)}), batch {batch}, "
        f"{args.threads} thread(s), {args.clock} clock, {repeats} interleaved rounds; outputs {shapes}"
    )
    print(format_table(timing_rows(summary), ["variant", "median ms", "IQR ms", "ratio", "paired ratio"]))
    rows = [
        {"output": name, **{f"{slug} max/mean": f"{d['max']:.3g} / {d['mean']:.3g}" for slug, d in per.items()}}
        for name, per in pixels.items()
    ]
    print("difference to the HF image processors' output, in 8-bit steps (max / mean):")
    print(format_table(rows, ["output", *[f"{s.slug} max/mean" for s in specs]]))
    path = write_result(
        "teacher_inputs",
        {
            "settings": {
                "batch": batch,
                "teacher_set": args.teacher_set,
                "threads": args.threads,
                "clock": args.clock,
                "repeats": repeats,
                "sizes": [s.image_size for s in specs],
                "square_sides": [image.width for image in images],
            },
            "summary": summary,
            "pixels": pixels,
        },
        args.out,
        args.quick,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
