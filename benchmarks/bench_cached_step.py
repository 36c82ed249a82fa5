"""Benchmark 4: a MoVE-KD training step reading cached teacher features, against the same step with online
teachers and against a plain LLaVA step (stock transformers LLaVA, same sizes, LLaVA-1.5 stage 2: LLM and
projector train, vision tower frozen). Target: cached step <= 1.15x the plain LLaVA step.

The cache is written for the benchmark's batch with the real writer (`TeacherCacheWriter`, student grid, float16)
and read through `CachedTeachers`, as training reads it; the distiller uses the resolution-free `resample`
adapter that a student-grid cache serves (`--grid native --adapter token_mix` for the faithful adapter).

    .venv/bin/python benchmarks/bench_cached_step.py [--quick] [--grid native --adapter token_mix]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402
from _kd_setup import (  # noqa: E402
    SIZES,
    StepParts,
    build_distiller,
    build_movekd,
    build_plain_llava,
    build_teachers,
    make_batch,
    online_source,
    optimizer_for,
    student_grid,
    training_step,
)

from movekd_hf.distill.cache import CachedTeachers, CacheSettings  # noqa: E402
from movekd_hf.distill.cache_writer import TeacherCacheWriter  # noqa: E402


def write_cache(root: str, teachers, settings: CacheSettings, batch: dict) -> None:
    keys = [(sample_id, 0) for sample_id in batch["sample_ids"]]
    for teacher in teachers:
        writer = TeacherCacheWriter(root, teacher, settings)
        writer.add(keys, teacher(batch["teacher_images"]))
        writer.flush()


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--grid", default="student", choices=("student", "native"))
    parser.add_argument("--adapter", default="resample", choices=("resample", "token_mix"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "small"]
    batch, teachers, grid = make_batch(sizes), build_teachers(sizes), student_grid(sizes)
    settings = CacheSettings(student_grid=grid, grid=args.grid, teacher_image_size=sizes["teacher_image_size"])
    with tempfile.TemporaryDirectory() as root:
        write_cache(root, teachers, settings, batch)
        model = build_movekd(sizes)
        distiller = build_distiller(sizes, teachers, batch["teacher_images"], args.adapter)
        cached = CachedTeachers(root, [t.spec for t in teachers], settings, distiller=distiller)
        plain = build_plain_llava(sizes)
        parts = {
            "plain LLaVA step": StepParts(plain, optimizer_for(plain)),
            "MoVE-KD step, cached teachers": StepParts(model, optimizer_for(model, distiller), distiller, cached),
            "MoVE-KD step, online teachers": StepParts(
                model, optimizer_for(model, distiller), distiller, online_source(teachers)
            ),
        }
        variants = {name: (lambda p=p: training_step(p, batch, grid)) for name, p in parts.items()}
        repeats = args.repeats or (2 if args.quick else 12)
        times = interleaved_timings(variants, repeats, args.warmup if args.warmup is not None else 1, args.clock)
        fetch = interleaved_timings({"cache read": lambda: cached(batch)}, repeats, 1, args.clock)
    summary = summarise(times, baseline="plain LLaVA step")
    print(
        f"Training step, cached vs online teachers vs plain LLaVA ({'quick' if args.quick else 'small'} sizes, "
        f"batch {sizes['batch']}, grid {args.grid}, adapter {args.adapter}, {args.threads} thread(s), "
        f"{args.clock} clock, {repeats} interleaved rounds)"
    )
    print(format_table(timing_rows(summary), ["variant", "median ms", "IQR ms", "ratio", "paired ratio"]))
    read = summarise(fetch, baseline="cache read")["cache read"]["median_s"]
    print(f"reading the batch's features from the cache: {read * 1e3:.3g} ms (target: cached step <= 1.15x plain)")
    path = write_result(
        "cached_step",
        {"settings": {"sizes": sizes, "grid": args.grid, "adapter": args.adapter, "threads": args.threads,
                      "clock": args.clock, "repeats": repeats},
         "summary": summary, "cache_read_s": read},
        args.out,
        args.quick,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
