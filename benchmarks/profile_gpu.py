"""Where a GPU step's time goes: torch.profiler tables (top ops by GPU time and by CPU self time) and the host
syncs (`torch.cuda.set_sync_debug_mode`, counted by source line) of `bench_gpu.py`'s steps at paper widths.

- the encoder step of plain CLIP-L/336 and of the MoLE student (batch 16, bf16, SDPA), as `bench_gpu.py`
  builds them;
- with `--stage1`, one stage-1 MoVE-KD step with cached features (LLM cut to 4 layers, batch 8).

Prints the tables; nothing is written. On a machine without a CUDA GPU it runs at tiny widths on the CPU (a
check of the code paths), without the GPU columns and the sync count.

    python benchmarks/profile_gpu.py [--stage1]
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402
from _kd_setup import (  # noqa: E402
    StepParts,
    build_distiller,
    build_movekd,
    make_batch,
    optimizer_for,
    student_grid,
    training_step,  # noqa: E402
)

CUDA = torch.cuda.is_available()


def report(name: str, run: Callable[[], object], device: torch.device, rows: int) -> None:
    """Three warm-up calls, then one profiled call and (CUDA) one call under the sync debug mode."""
    for _ in range(3):
        run()
    bench_gpu.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        run()
        bench_gpu.synchronize(device)
    averages = prof.key_averages()
    print(f"===== {name}: by {'CUDA' if CUDA else 'CPU'} time")
    print(averages.table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=rows))
    print(f"===== {name}: by CPU self time")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    if not CUDA:
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    places = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)
    print(f"===== {name}: host syncs {len(caught)}")
    for place, count in places.most_common(15):
        print(f"{count:5d}  {place}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", action="store_true", help="also profile a stage-1 step with cached features")
    parser.add_argument("--rows", type=int, default=20, help="rows per table")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda" if CUDA else "cpu"), torch.bfloat16
    sizes = bench_gpu.paper_sizes(4, 8, 128) if CUDA else bench_gpu.tiny_sizes(2)
    vision = dict(**sizes["vision"], image_size=sizes["image_size"], patch_size=sizes["patch_size"])
    side = sizes["image_size"]
    pixels = torch.randn(16 if CUDA else 2, 3, side, side, device=device, dtype=dtype)
    for name, model in bench_gpu.encoder_pair(vision, "sdpa", device, dtype).items():
        if "sorted" not in name:
            report(f"encoder, {name}", bench_gpu.encoder_step(model, pixels), device, args.rows)
    bench_gpu.free(device)
    if args.stage1:
        teachers = bench_gpu.build_teachers_on(bench_gpu.v11_teacher_specs(not CUDA, sizes), device, dtype)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch(sizes).items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.device(device):
            model = build_movekd(sizes, "stage1").to(dtype)
            distiller = build_distiller(sizes, teachers, batch["teacher_images"], "token_mix").to(dtype).train()
        cached = bench_gpu.cached_source(bench_gpu.online_source(teachers)(batch), device)
        part = StepParts(model, optimizer_for(model, distiller), distiller, cached)
        grid = student_grid(sizes)
        report("stage 1 step, cached features", lambda: training_step(part, batch, grid), device, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
