"""Benchmark 3: preparing one batch of images for every teacher of a set (v1.1: clip 336, eva, convnext 1024 with CLIP
normalisation, sam 1024 padded with ImageNet normalisation).

- `batched tensors (ours)`: the collator turns the square images into one [B, 3, S, S] tensor in [0, 1] once
  (`images_to_unit_tensor`), then each teacher resizes, crops/pads and normalises the whole batch as tensors
  (`prepare_images`, on whatever device the batch is on).
- `HF image processors`: each teacher's own transformers image processor (CLIPImageProcessor, SamImageProcessor:
  torchvision-backed in transformers 5) over the list of PIL images, once per teacher.
- `HF PIL image processors`: the per-image PIL/NumPy processors (CLIPImageProcessorPil, SamImageProcessorPil).

All start from the same square PIL images (the collator's `pad` view) and produce every teacher's pixel_values.

    .venv/bin/python benchmarks/bench_teacher_inputs.py [--quick] [--batch 8]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402

from movekd_hf.distill.presets import teacher_specs  # noqa: E402
from movekd_hf.distill.teachers import prepare_images  # noqa: E402
from movekd_hf.modeling.llava_conventions import (  # noqa: E402
    CLIP_MEAN_COLOUR,
    expand_to_square,
    images_to_unit_tensor,
)


def square_photos(batch: int, side: int):
    """Real photos (scikit-image), padded to squares and scaled to `side` (LLaVA images are ~500 px)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = [expand_to_square(Image.fromarray(photos[i % len(photos)]), CLIP_MEAN_COLOUR) for i in range(batch)]
    return [image.resize((side, side)) for image in images]


def hf_processor(spec, pil: bool):
    import transformers

    family = "Sam" if spec.resize_mode == "pad" else "CLIP"
    cls = getattr(transformers, f"{family}ImageProcessor{'Pil' if pil else ''}")
    if family == "Sam":
        return cls(
            size={"longest_edge": spec.image_size},
            pad_size={"height": spec.image_size, "width": spec.image_size},
            image_mean=list(spec.mean),
            image_std=list(spec.std),
        )
    return cls(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher-set", default="v1.1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = teacher_specs(args.teacher_set, pretrained=False)
    scale = 8 if args.quick else 1  # quick: every size / 8
    specs = [replace(spec, image_size=spec.image_size // scale) for spec in specs]
    teacher_size = max(spec.image_size for spec in specs)
    batch = 2 if args.quick else args.batch
    images = square_photos(batch, 512 // scale)
    processors = {pil: [hf_processor(spec, pil) for spec in specs] for pil in (False, True)}

    def ours():
        unit = images_to_unit_tensor(images, teacher_size)  # [B, 3, S, S]
        return [prepare_images(unit, spec) for spec in specs]

    def hf(pil: bool):
        return lambda: [p(images=images, return_tensors="pt")["pixel_values"] for p in processors[pil]]

    variants = {"batched tensors (ours)": ours, "HF image processors": hf(False), "HF PIL image processors": hf(True)}
    repeats = args.repeats or (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else 1
    times = interleaved_timings(variants, repeats, warmup, args.clock)
    summary = summarise(times, baseline="HF image processors")
    shapes = [tuple(x.shape) for x in ours()]
    print(
        f"Teacher input preparation, {args.teacher_set} ({', '.join(s.slug for s in specs)}), batch {batch}, "
        f"{args.threads} thread(s), {args.clock} clock, {repeats} interleaved rounds; outputs {shapes}"
    )
    print(format_table(timing_rows(summary), ["variant", "median ms", "IQR ms", "ratio", "paired ratio"]))
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
            },
            "summary": summary,
        },
        args.out,
        args.quick,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
