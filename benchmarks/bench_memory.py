"""Benchmark 5: peak memory of a MoVE-KD training step (online teachers, stage 2) with and without gradient
checkpointing on the MoLE student and on the LLM.

Without a GPU this measures host memory: each configuration runs in a fresh subprocess, which builds the model,
teachers, distiller and optimizer and runs one step (allocating AdamW's state). It then hands freed memory back
to the system (`malloc_trim`), resets the kernel's peak-RSS mark (`/proc/self/clear_refs` = 5), runs one more
step and reads the peak (`VmHWM` in `/proc/self/status`). The figure is that peak minus the resident set before
the step (`VmRSS`): the step's activations, gradients and temporaries. Gradient checkpointing uses non-reentrant
`torch.utils.checkpoint` through transformers' `gradient_checkpointing_enable`, so dropout masks are replayed.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--batch 4]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, environment, format_table, write_result  # noqa: E402

CONFIGS = {
    "no checkpointing": (False, False),
    "checkpointing: student": (True, False),
    "checkpointing: LLM": (False, True),
    "checkpointing: student + LLM": (True, True),
}


def memory_status() -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak since the last reset) of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed blocks back to the system, so VmRSS is what is live
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def child(size: str, student: bool, llm: bool, batch: int, threads: int) -> dict:
    """Runs in the subprocess: one configuration's step, its memory figures as a dict."""
    import torch
    from _kd_setup import (
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

    torch.set_num_threads(threads)
    sizes = dict(SIZES[size], batch=batch)
    data, teachers, grid = make_batch(sizes), build_teachers(sizes), student_grid(sizes)
    model = build_movekd(sizes)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if student:
        model.model.vision_tower.gradient_checkpointing_enable(**kwargs)
    if llm:
        model.model.language_model.gradient_checkpointing_enable(**kwargs)
    distiller = build_distiller(sizes, teachers, data["teacher_images"], "token_mix")
    parts = StepParts(model, optimizer_for(model, distiller), distiller, online_source(teachers))
    training_step(parts, data, grid)  # allocates AdamW's state
    reset_peak()
    before = memory_status()["VmRSS"]
    loss = float(training_step(parts, data, grid))
    peak = memory_status()["VmHWM"]
    return {"resident_before": before, "peak": peak, "step_peak_delta": peak - before, "loss": loss}


def run_config(name: str, args) -> dict:
    student, llm = CONFIGS[name]
    size = "quick" if args.quick else "small"
    bench = str(Path(__file__).resolve().parent)
    call = f"child({size!r}, {student}, {llm}, {args.batch}, {args.threads})"
    code = f"import json, sys; sys.path.insert(0, {bench!r}); from bench_memory import child; "
    code += f"print('RESULT', json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"configuration {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 4; quick 2)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run these configurations only")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    names = [name for name in CONFIGS if not args.only or name in args.only]
    results = {name: run_config(name, args) for name in names}
    base = next(iter(results.values()))["step_peak_delta"]
    rows = [
        {
            "configuration": name,
            "step peak - resident before (MB)": r["step_peak_delta"] / 1e6,
            "ratio": r["step_peak_delta"] / base,
            "process peak (MB)": r["peak"] / 1e6,
            "loss": r["loss"],
        }
        for name, r in results.items()
    ]
    print(
        f"Peak host memory of one MoVE-KD step ({'quick' if args.quick else 'small'} sizes, batch {args.batch}, "
        "online teachers, stage 2), fresh subprocess per configuration, VmHWM after a reset"
    )
    print(format_table(rows, list(rows[0])))
    path = write_result(
        "memory",
        {"settings": {"batch": args.batch, "method": "VmHWM (reset before the step) - VmRSS before the step"},
         "results": results, "child_environment": environment()},
        args.out,
        args.quick,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
