"""Wall time and peak memory of the embedded demo (`movekd-hf demo`), default and/or `--quick`.

    python benchmarks/bench_demo.py [--quick] [--out runs/bench_demo] [--json results.json] [--log demo.log]

The demo runs as a child process (exactly what `make demo` runs); peak memory is the largest resident set of the
child and its descendants (the isolated final check included), from `getrusage(RUSAGE_CHILDREN)`. The load average
is recorded next to the figures: on a shared machine other processes slow the run down, so compare runs measured
under similar load (the load average counts runnable processes: above the core count, the demo shares its cores).
The child's CPU time is recorded too, a figure a busy machine inflates much less than the wall time. The child's
output goes to `--log` as it runs (default OUT.log), so a long run can be watched. Targets (issue 16): default
< 10 min and < 4 GB on 2 cores; `--quick` < ~2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"default": {"seconds": 600, "gib": 4.0}, "quick": {"seconds": 120, "gib": 4.0}}


def run_demo(out: Path, quick: bool, log: Path | None = None) -> dict:
    """Run the demo once in a fresh folder; returns its wall time, peak memory and the machine's load."""
    if out.exists():
        shutil.rmtree(out)
    log = log or out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no runs/ yet
    command = [sys.executable, "-m", "movekd_hf.cli", "demo", "--out", str(out)] + (["--quick"] if quick else [])
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True).returncode
    seconds = time.perf_counter() - start
    output = log.read_text(encoding="utf-8", errors="replace")
    if returncode != 0:
        raise RuntimeError(f"demo failed ({returncode}):\n{output[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib = usage.ru_maxrss  # Linux reports KiB
    mode = "quick" if quick else "default"
    return {
        "mode": mode,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        # CPU time of the child and its descendants: much less sensitive to other processes than the wall time
        # (on an idle machine, wall ~ cpu_seconds / the cores torch keeps busy).
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "within_target": seconds < TARGETS[mode]["seconds"] and peak_kib / 2**20 < TARGETS[mode]["gib"],
        "target": TARGETS[mode],
        "log": str(log),
        "stdout_tail": [line for line in output.splitlines() if "\r" not in line][-12:],
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="benchmark `--quick` instead of the default demo")
    parser.add_argument("--out", default="runs/bench_demo", help="run folder (deleted first)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--log", default=None, help="the demo's output, written as it runs (default OUT.log)")
    args = parser.parse_args(argv)
    result = run_demo(Path(args.out), args.quick, Path(args.log) if args.log else None)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
