"""Shared pieces of the benchmark scripts: interleaved timing, a plain-text table, JSON results.

Every benchmark measures its variants side by side in one run, interleaved (A, B, C, A, B, C, ...), and reports
medians and ratios to a baseline: on a shared machine the load drifts, and interleaving spreads the drift over
all variants instead of biasing whichever ran last. Ratios, not absolute times, are the result.

Clock: `--clock cpu` (default) times each call by the process's CPU time (`time.process_time`), which counts the
work done and not the time spent waiting for a core, so other jobs on a shared machine barely move it; `--clock
wall` uses `time.perf_counter`. With one torch thread both measure the same work on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: checks the script runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadier when shared)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/)")
    return parser


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_timings(
    variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int, clock: str = "cpu"
) -> dict[str, list[float]]:
    """Run every variant `warmup` times, then `repeats` rounds of one call each, in turn; seconds per call."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = now()
            run()
            times[name].append(now() - start)
    return times


def summarise(times: Mapping[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median, spread (interquartile range) and ratio of medians to `baseline`, per variant.

    The ratio of medians is also given per round (median of the per-round ratios), which is steadier when the
    machine's load changes between rounds but not within one.
    """
    base = statistics.median(times[baseline])
    summary = {}
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        paired = [value / ref for value, ref in zip(values, times[baseline])]
        summary[name] = {
            "median_s": statistics.median(values),
            "iqr_s": quartiles[2] - quartiles[0],
            "ratio": statistics.median(values) / base,
            "paired_ratio": statistics.median(paired),
            "rounds": len(values),
        }
    return summary


def format_table(rows: list[Mapping[str, object]], columns: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines)


def timing_rows(summary: Mapping[str, Mapping[str, float]], unit: float = 1e3) -> list[dict[str, object]]:
    return [
        {
            "variant": name,
            "median ms": stats["median_s"] * unit,
            "IQR ms": stats["iqr_s"] * unit,
            "ratio": stats["ratio"],
            "paired ratio": stats["paired_ratio"],
        }
        for name, stats in summary.items()
    ]


def environment() -> dict[str, object]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_result(name: str, result: Mapping[str, object], out: Path | None, quick: bool) -> Path:
    """Write `result` (plus the environment) as JSON; quick runs get their own file so they never overwrite
    the figures the README quotes."""
    path = out or RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "quick": quick, "environment": environment(), **result}
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path
