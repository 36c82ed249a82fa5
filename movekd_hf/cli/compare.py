"""`movekd-hf compare A B --benchmark NAME --annotations FILE`: is run A better than run B on a benchmark, beyond
the noise of which questions were asked? Paired differences per question type and for the paper's number, with
bootstrap intervals over questions (movekd_hf/evaluation/compare.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    compare = subparsers.add_parser(
        "compare",
        help="Paired difference A - B per question type, with bootstrap intervals over questions.",
        description="Compare two runs' answers on the same benchmark questions. A and B are answers files "
        "(LLaVA format) or folders holding `<benchmark>_answers.jsonl` (an `eval --out` folder or a run folder with "
        "eval/ inside). Prints one row per question type and the paper's number, each `diff [low, high]`; "
        "cells whose interval includes zero are marked `not resolved`.",
    )
    compare.add_argument("a", metavar="A", help="answers file or folder of the first run")
    compare.add_argument("b", metavar="B", help="answers file or folder of the run compared against")
    compare.add_argument("--benchmark", required=True, help="benchmark name (vqav2, gqa, textvqa, vizwiz, pope, ...)")
    compare.add_argument("--annotations", required=True, help="the benchmark's annotation file or folder")
    compare.add_argument("--questions", help="LLaVA question jsonl, to map its question ids to keys")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--confidence", type=float, default=0.95, help="interval confidence (default 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    compare.add_argument(
        "--json",
        metavar="PATH",
        help="also write the intervals as JSON to PATH; under RUN/eval/compare/ the model card of RUN shows them",
    )
    compare.set_defaults(func=run_compare)


def answers_path(given: str, benchmark: str) -> Path:
    """An answers file, or `<benchmark>_answers.jsonl` inside a folder (or its `eval/`)."""
    from movekd_hf.errors import InputError

    path = Path(given)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / f"{benchmark}_answers.jsonl", path / "eval" / f"{benchmark}_answers.jsonl"):
            if candidate.is_file():
                return candidate
        raise InputError(
            f"holds no {benchmark}_answers.jsonl (nor eval/{benchmark}_answers.jsonl)",
            file=path,
            expected="an answers file or an `eval --out` folder",
        )
    raise FileNotFoundError(f"no such answers file or folder: {path}")


def run_compare(args: argparse.Namespace) -> int:
    from movekd_hf.errors import SettingsError
    from movekd_hf.evaluation.benchmarks import canonical_name, read_predictions
    from movekd_hf.evaluation.compare import compare_predictions, format_comparison
    from movekd_hf.evaluation.readers import load_benchmark

    if not 0.0 < args.confidence < 1.0:
        raise SettingsError(f"is {args.confidence}", field="--confidence", expected="a number between 0 and 1")
    if args.resamples < 100:
        raise SettingsError(f"is {args.resamples}", field="--resamples", expected="at least 100")
    name = canonical_name(args.benchmark)
    benchmark = load_benchmark(name, args.annotations, questions=args.questions)
    paths = [answers_path(given, name) for given in (args.a, args.b)]
    a, b = (read_predictions(path, name, benchmark.samples) for path in paths)
    intervals = compare_predictions(benchmark, a, b, args.resamples, args.confidence, args.seed)
    print(format_comparison(name, intervals, str(args.a), str(args.b)))
    if args.json:
        payload = {"benchmark": name, "a": str(paths[0]), "b": str(paths[1]), "against": Path(args.b).name,
                   "resamples": args.resamples,
                   "intervals": {kind: value.to_dict() for kind, value in intervals.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0
